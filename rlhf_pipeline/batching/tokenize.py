"""Token ids for training: SFT documents, reward/DPO preference pairs, and generation prompts.

Prompt and answer are always tokenized TOGETHER (as the model will see them) and a document ends in EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_pipeline.data.prompts import format_example, format_prompt
from rlhf_pipeline.errors import UserError


def sft_texts(rows: list[dict], template: str) -> list[str]:
    """Prompt + preferred answer, once per (qid, answer_id_j): a question with 5 pairs won by the same answer
    would otherwise train on that answer 5 times."""
    seen: set[tuple[Any, Any]] = set()
    texts = []
    for row in rows:
        key = (row["qid"], row["answer_id_j"])
        if key in seen:
            continue
        seen.add(key)
        texts.append(format_example(template, row["question"], row["response_j"]))
    return texts


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's own BOS, if it adds one) followed by EOS, the document end."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; packing needs one to separate documents")
    if not texts:  # e.g. --eval-fraction 0: the tokenizer rejects an empty batch
        return []
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [ids + [eos] if not ids or ids[-1] != eos else ids for ids in encoded]


@dataclass
class TokenizedPairs:
    chosen: list[list[int]]
    rejected: list[list[int]]
    dropped_too_long: int

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.chosen[index], self.rejected[index]


def tokenize_pairs(tokenizer, rows: list[dict], template: str, max_length: int) -> TokenizedPairs:
    """Prompt + response_j (chosen) and prompt + response_k (rejected), each ending in EOS.

    A pair where either side is longer than `max_length` tokens is DROPPED (and counted), not truncated: a cut-off
    answer is not the answer the votes were about.
    """
    chosen_texts = [format_example(template, r["question"], r["response_j"]) for r in rows]
    rejected_texts = [format_example(template, r["question"], r["response_k"]) for r in rows]
    chosen_ids = tokenize_documents(tokenizer, chosen_texts)
    rejected_ids = tokenize_documents(tokenizer, rejected_texts)
    kept_j, kept_k = [], []
    for ids_j, ids_k in zip(chosen_ids, rejected_ids):
        if len(ids_j) <= max_length and len(ids_k) <= max_length:
            kept_j.append(ids_j)
            kept_k.append(ids_k)
    return TokenizedPairs(kept_j, kept_k, dropped_too_long=len(rows) - len(kept_j))


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts BEFORE a text when it adds special tokens: Llama 3's <|begin_of_text|>, Gemma's
    and Mistral's <bos>; none for SmolLM2 or Qwen. Any it appends AFTER the text (an EOS) is not part of it."""
    probe = "Answer"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def keep_end(ids: list[int], max_length: int, head: Sequence[int] = ()) -> list[int]:
    """An over-long text cut to its LAST tokens (where a reward model reads its score), after the leading special
    ids `head` (`leading_special_ids`: a BOS) when it starts with them; a text that fits is returned as it is."""
    if len(ids) <= max_length:
        return ids
    keep = list(head) if head and len(head) < max_length and ids[: len(head)] == list(head) else []
    return keep + ids[len(ids) - (max_length - len(keep)) :]


def encode_prompts(tokenizer, template: str, questions: Sequence[str], max_prompt_length: int) -> list[list[int]]:
    """Token ids of each formatted prompt, starting as every training document starts (with the tokenizer's own
    BOS, if it adds one: Gemma or Llama 3 asked without it answer worse than the model SFT trained). A prompt over
    the limit loses the end of its QUESTION, never the BOS or the template's tail ("\\n\\nAnswer: "), so the
    policy is always asked to answer."""
    head_ids = leading_special_ids(tokenizer)
    tail = template[template.index("{question}") + len("{question}") : template.rindex("{answer}")]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if len(head_ids) + len(tail_ids) >= max_prompt_length:
        raise UserError(f"max_prompt_length={max_prompt_length} leaves no room for the question")
    encoded = []
    for question in questions:
        ids = head_ids + tokenizer(format_prompt(template, question), add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            ids = ids[: max_prompt_length - len(tail_ids)] + tail_ids
        encoded.append(ids)
    return encoded


def tokenize_preference_pairs(tokenizer, rows: list[dict], template: str, max_length: int):
    """[(chosen ids, chosen response start, rejected ids, rejected response start)], number dropped as too long.

    Prompt + answer are tokenized TOGETHER (as the SFT and reward stages do) and end in EOS; the response starts
    where that joint encoding stops matching the prompt's own encoding (BPE merges across the boundary).
    """
    if not rows:
        return [], 0
    prompts = tokenizer([format_prompt(template, r["question"]) for r in rows], add_special_tokens=True)["input_ids"]
    chosen = tokenize_documents(tokenizer, [format_example(template, r["question"], r["response_j"]) for r in rows])
    rejected = tokenize_documents(tokenizer, [format_example(template, r["question"], r["response_k"]) for r in rows])

    def response_start(prompt: list[int], full: list[int]) -> int:
        n = 0
        while n < min(len(prompt), len(full) - 1) and prompt[n] == full[n]:
            n += 1
        return max(n, 1)

    pairs, dropped = [], 0
    for prompt, ids_j, ids_k in zip(prompts, chosen, rejected):
        if len(ids_j) > max_length or len(ids_k) > max_length:
            dropped += 1
            continue
        pairs.append((ids_j, response_start(prompt, ids_j), ids_k, response_start(prompt, ids_k)))
    return pairs, dropped
