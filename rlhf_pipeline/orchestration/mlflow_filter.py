"""MLflow search filters built from values, not by pasting them into a string: `equals({"name": n, ...})`.

MLflow's filter grammar has no escapes inside a quoted literal, so a value is quoted with whichever quote it
does not contain; one holding both cannot be expressed and is refused (one line) instead of silently changing
the query (a prefix `x' or name != '` would otherwise match every model).
"""

from __future__ import annotations

import re

from rlhf_pipeline.errors import UserError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_.-]*)?$")


def literal(value: str) -> str:
    """`value` as an MLflow filter string literal."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"cannot search MLflow for {value!r}: it holds both quote characters")


def equals(conditions: dict[str, str]) -> str:
    """`key = 'value' and ...` for `search_model_versions` / `search_runs`; keys are code (checked), values data."""
    parts = []
    for key, value in conditions.items():
        if not _KEY.match(key):
            raise ValueError(f"not an MLflow filter key: {key!r}")
        parts.append(f"{key} = {literal(str(value))}")
    return " and ".join(parts)
