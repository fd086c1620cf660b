"""`--param NAME=VALUE` pairs -> Kubeflow run arguments, the same for `rlhf submit` and `rlhf schedule create`.

Values are JSON when they parse as JSON (objects, lists, numbers, booleans), else strings; quote a string that
looks like JSON: --param 'tag="123"'. When the pipeline's parameter definitions are at hand (`known`, from the
compiled spec), names are checked against them and each value against its declared type, so a typo fails here
rather than in a pod. `--params-file` gives the same as a YAML/JSON mapping (`--param` wins over it), and
`check_run_arguments` builds every stage's config from the arguments and the pipeline's defaults before anything
is uploaded (stage_parameters.py: the same check as the run's first step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.orchestration.stage_parameters import ALIGNMENTS, validated_options

# KFP parameterType -> the Python types a JSON value of that kind decodes to
JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "STRUCT": dict,
    "LIST": list,
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": bool,
}


def parse_params(
    pairs: tuple[str, ...] | list[str],
    known: dict[str, dict[str, Any]] | None = None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run arguments of `pairs` over `base` (a params file's); `known` (name -> KFP parameter definition)
    checks names and types."""
    out: dict[str, Any] = {}
    for name, value in (base or {}).items():
        out[name] = value if known is None else _checked(name, value, known, json.dumps(value))
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"--param {pair!r}: expected NAME=VALUE")
        if known is None:
            out[name] = _json_or_string(raw)
            continue
        out[name] = _typed(name, raw, _kind(name, known))
    if "alignment" in out and out["alignment"] not in ALIGNMENTS:
        raise UserError(f"--param alignment must be one of {', '.join(ALIGNMENTS)}, got {out['alignment']!r}")
    return out


def read_params_file(path: str | Path) -> dict[str, Any]:
    """A params file: a YAML (or JSON) mapping of pipeline parameter -> value."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"{path} must be a mapping of pipeline parameter names to values")
    return data


def check_run_arguments(args: dict[str, Any], known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every stage's options as the run would build them (the arguments over the pipeline's defaults), checked
    through the stages' real config classes; one line on a bad key or value."""
    defaults = {name: _default(spec) for name, spec in known.items() if "defaultValue" in spec}
    return validated_options({**defaults, **args})


def _default(spec: dict[str, Any]) -> Any:
    """A compiled default as the run gets it (protobuf stores every number as a double: 20 is 20.0 in the YAML)."""
    value = spec["defaultValue"]
    return int(value) if spec.get("parameterType") == "NUMBER_INTEGER" else value


def _kind(name: str, known: dict[str, dict[str, Any]]) -> str:
    if name not in known:
        raise UserError(f"--param {name}: not a pipeline parameter (known: {', '.join(sorted(known))})")
    return known[name].get("parameterType", "STRING")


def _checked(name: str, value: Any, known: dict[str, dict[str, Any]], shown: str) -> Any:
    """A decoded value (from a params file) against its declared type."""
    kind = _kind(name, known)
    expected = JSON_TYPES.get(kind, str)
    if not isinstance(value, expected) or (kind == "NUMBER_INTEGER" and isinstance(value, bool)):
        raise UserError(f"--param {name}: expected a JSON {kind.lower()}, got {shown}")
    return value


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
