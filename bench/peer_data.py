"""The TRL peers' fixed-seed synthetic preference data, in OUR prepare-data schema.

1. `make_data.py` (shared peer script, `peer_common.make_preference_data(256, 64, seed=1234)`) writes
   <out>/jsonl/{train,eval}.jsonl ({"id", "prompt", "chosen", "rejected"}), with the SmolLM2 tokenizer of the
   embedded model (the answer lengths depend on it) -> sha256 checked against the peers' documented value.
2. Each row becomes one row of our schema (rlhf_pipeline.data.writer.SCHEMA):
     question   = the text between "Question: " and "\\n\\nAnswer: " of the peer prompt ("<title>\\n\\n<body>"),
                  so our template "Question: {question}\\n\\nAnswer: {answer}" rebuilds the identical prompt
                  (asserted for every row);
     response_j = chosen, response_k = rejected, score_j = 1 > score_k = 0,
     qid = "bench:<id>", site = "bench", answer_id_j = 2*id, answer_id_k = 2*id + 1 (unique).
   finetune / reward / rl.parquet = the 256 train rows (what every peer trains on), evaluation.parquet = the 64
   held-out rows, plus stats.json.

Usage: python bench/peer_data.py [--out DIR]   (prints the data dir; idempotent)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PREFIX, SUFFIX = "Question: ", "\n\nAnswer: "


def split_prompt(prompt: str) -> str:
    if not prompt.startswith(PREFIX) or not prompt.endswith(SUFFIX):
        raise ValueError(f"unexpected peer prompt format: {prompt[:60]!r}")
    return prompt[len(PREFIX) : -len(SUFFIX)]


def data_sha256(train: list[dict], ev: list[dict]) -> str:
    # exactly what make_data.py hashes
    return hashlib.sha256(json.dumps(train + ev).encode()).hexdigest()


def write_jsonl(model_dir: str, jsonl_dir: Path) -> dict:
    """Run the shared make_data.py (peer venv if present, else this interpreter: it only needs a tokenizer)."""
    # The TRL side regenerates these rows in-process with the peer venv's tokenizer, so that venv writes them
    # when it works; our own interpreter is the fallback (same tokenizer.json; the sha256 check tells).
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    script = str(benchlib.peers_dir() / "make_data.py")
    out = None
    for py in (benchlib.peer_python(), Path(sys.executable)):
        if not py.exists():
            continue
        out = subprocess.run(
            [str(py), script, "--model", model_dir, "--outdir", str(jsonl_dir)], capture_output=True, text=True, env=env
        )
        if out.returncode == 0:
            info = json.loads(out.stdout.strip().splitlines()[-1])
            info["written_by"] = str(py)
            return info
        print(f"[bench] make_data.py with {py} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    raise SystemExit("bench: make_data.py failed with every interpreter")


def convert(jsonl_dir: Path, out_dir: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf_pipeline.data.prompts import DEFAULT_TEMPLATE, format_example, format_prompt
    from rlhf_pipeline.data.writer import SCHEMA

    rows = {name: [json.loads(line) for line in open(jsonl_dir / f"{name}.jsonl")] for name in ("train", "eval")}
    tables = {}
    for name, rs in rows.items():
        cols = {c: [] for c in SCHEMA.names}
        for r in rs:
            q = split_prompt(r["prompt"])
            assert format_prompt(DEFAULT_TEMPLATE, q) == r["prompt"], r["id"]
            assert format_example(DEFAULT_TEMPLATE, q, r["chosen"]) == r["prompt"] + r["chosen"], r["id"]
            vals = {
                "qid": f"bench:{r['id']}",
                "site": "bench",
                "question": q,
                "response_j": r["chosen"],
                "response_k": r["rejected"],
                "score_j": 1,
                "score_k": 0,
                "answer_id_j": 2 * r["id"],
                "answer_id_k": 2 * r["id"] + 1,
            }
            for c in SCHEMA.names:
                cols[c].append(vals[c])
        tables[name] = pa.Table.from_pydict(cols, schema=SCHEMA)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = {"finetune": "train", "reward": "train", "rl": "train", "evaluation": "eval"}
    for subset, src in layout.items():
        pq.write_table(tables[src], out_dir / f"{subset}.parquet")
    stats = {
        "source": "TRL peers' synthetic preference data (peer_common.make_preference_data)",
        "layout": layout,
        "rows": {s: tables[src].num_rows for s, src in layout.items()},
        "sha256": data_sha256(rows["train"], rows["eval"]),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def prepare(out_root: Path, model_dir: str) -> tuple[Path, dict]:
    """Idempotent: <out_root>/parquet (our schema) from <out_root>/jsonl (peer format)."""
    jsonl_dir, pq_dir = out_root / "jsonl", out_root / "parquet"
    info_path = out_root / "data.json"
    if info_path.is_file() and (pq_dir / "stats.json").is_file():
        return pq_dir, json.loads(info_path.read_text())
    made = write_jsonl(model_dir, jsonl_dir)
    stats = convert(jsonl_dir, pq_dir)
    info = {
        "jsonl_dir": str(jsonl_dir),
        "parquet_dir": str(pq_dir),
        "sha256": stats["sha256"],
        "sha256_matches_peers_readme": stats["sha256"] == benchlib.PEER_DATA_SHA256,
        "rows": stats["rows"],
        "written_by": made.get("written_by"),
        "token_stats": {"train": made.get("train_tokens"), "eval": made.get("eval_tokens")},
    }
    if not info["sha256_matches_peers_readme"]:
        print(
            f"[bench] WARNING: data sha256 {stats['sha256']} differs from the peers' documented "
            f"{benchlib.PEER_DATA_SHA256} (tokenizer version?) -- both sides still get the same rows",
            file=sys.stderr,
        )
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return pq_dir, info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(benchlib.REPO / "outputs" / "bench" / "data"))
    ap.add_argument("--model", default=None, help="model dir for the tokenizer (default: the embedded SmolLM2)")
    a = ap.parse_args()
    from rlhf_pipeline.modeling.loading import ensure_embedded_model

    pq_dir, info = prepare(Path(a.out), a.model or str(ensure_embedded_model()))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
