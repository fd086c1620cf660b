"""Typed stage configuration: one pydantic model per stage, loaded from a YAML recipe with CLI overrides.

Precedence: field defaults < YAML recipe (`--config recipe.yaml`) < command-line flags. Every field is
documented once, in its `Field(description=...)`; the CLI help is generated from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rlhf_pipeline.errors import UserError


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def load(cls, recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Self:
        """Build the config from an optional YAML recipe and a dict of overrides (field name -> value)."""
        data: dict[str, Any] = {}
        source = "defaults"
        if recipe is not None:
            data.update(read_recipe(recipe))
            source = str(recipe)
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        data.update(overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UserError(format_validation_error(exc, overrides, source)) from None

    def to_flat_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (for MLflow params and config hashes)."""
        return json.loads(self.model_dump_json())

    def config_hash(self) -> str:
        """Short, stable hash of the full config (a lineage tag)."""
        blob = json.dumps(self.to_flat_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict, with one-line errors for the usual mistakes."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"recipe {p} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {p} must be a mapping of field: value, got {type(data).__name__}")
    return data


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def format_validation_error(exc: ValidationError, overrides: dict[str, Any], source: str) -> str:
    """One line naming the field (and the flag), the problem and the offending value."""
    err = exc.errors()[0]
    if not err["loc"]:  # a model-level check spanning several fields
        msg = err["msg"].removeprefix("Value error, ")
        return f"invalid options: {msg}"
    field = str(err["loc"][0])
    where = flag_name(field) if field in overrides else f"{field} (from {source})"
    if err["type"] == "extra_forbidden":
        msg = f"unknown option {where}"
    elif err["type"] == "missing":
        msg = f"missing required option {flag_name(field)} (or `{field}:` in a --config recipe)"
    else:
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = f"invalid value for {where}: {err['msg']}{shown}"
    more = len(exc.errors()) - 1
    return msg + (f" [and {more} more problem{'s' if more > 1 else ''}]" if more else "")
