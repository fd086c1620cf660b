"""`--param NAME=VALUE` pairs -> Kubeflow run arguments, the same for `rlhf submit` and `rlhf schedule create`.

Values are JSON when they parse as JSON (objects, lists, numbers, booleans), else strings; quote a string that
looks like JSON: --param 'tag="123"'. When the pipeline's parameter definitions are at hand (`known`, from the
compiled spec), names are checked against them and each value against its declared type, so a typo fails here
rather than in a pod.
"""

from __future__ import annotations

import json
from typing import Any

from rlhf_pipeline.errors import UserError

# KFP parameterType -> the Python types a JSON value of that kind decodes to
JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "STRUCT": dict,
    "LIST": list,
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": bool,
}
ALIGNMENTS = ("ppo", "dpo")


def parse_params(pairs: tuple[str, ...] | list[str], known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run arguments of `pairs`; `known` (name -> KFP parameter definition) checks names and types."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"--param {pair!r}: expected NAME=VALUE")
        if known is None:
            out[name] = _json_or_string(raw)
            continue
        if name not in known:
            raise UserError(f"--param {name}: not a pipeline parameter (known: {', '.join(sorted(known))})")
        out[name] = _typed(name, raw, known[name].get("parameterType", "STRING"))
    if "alignment" in out and out["alignment"] not in ALIGNMENTS:
        raise UserError(f"--param alignment must be ppo or dpo, got {out['alignment']!r}")
    return out


def _json_or_string(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _typed(name: str, raw: str, kind: str) -> Any:
    if kind == "STRING":  # kept as given, unless quoted as a JSON string
        value = _json_or_string(raw)
        return value if isinstance(value, str) else raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"--param {name}: expected a JSON {kind.lower()}, got {raw!r}") from None
    expected = JSON_TYPES.get(kind)
    is_bool_for_int = kind == "NUMBER_INTEGER" and isinstance(value, bool)  # JSON true is a Python int
    if expected is not None and (not isinstance(value, expected) or is_bool_for_int):
        raise UserError(f"--param {name}: expected a JSON {kind.lower()}, got {raw!r}")
    return value
