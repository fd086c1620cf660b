"""Stage commands generated from a config class: every field becomes a `--flag`, `--config recipe.yaml` loads a
recipe, flags override the recipe (the precedence itself is StageConfig.load's)."""

from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Callable
from typing import Any

import click
import yaml

from rlhf_pipeline.config import StageConfig, flag_name
from rlhf_pipeline.errors import UserError


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _parse_cli_value(annotation: Any, raw: str) -> Any:
    """Strings from the command line -> what pydantic should validate (it does the type coercion)."""
    ann = _unwrap_optional(annotation)
    origin = typing.get_origin(ann)
    if origin in (list, tuple):  # a repeatable flag: each value may itself be comma-separated
        values = raw if isinstance(raw, (list, tuple)) else [raw]
        return [part.strip() for value in values for part in value.split(",") if part.strip()]
    if origin is dict or ann is dict:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw  # pydantic reports it as an invalid dict, naming the flag
    if raw.lower() in ("none", "null") and ann is not str:
        return None
    return raw


class _ShownAs(click.ParamType):
    """A type for the help text only ("INTEGER", "FLOAT"): the raw string goes on to pydantic, which validates it
    with the field's constraints and names the flag in its one-line error (click's own INT would pre-empt that)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value


_SHOWN_AS = {int: _ShownAs("integer"), float: _ShownAs("float")}


def _option_type(ann: Any) -> click.ParamType | None:
    """Choices for Literal fields (click validates and lists them), number names for int/float, else TEXT."""
    if typing.get_origin(ann) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(ann)])
    if typing.get_origin(ann) is list:
        (item,) = typing.get_args(ann) or (str,)
        return _SHOWN_AS.get(item)
    return _SHOWN_AS.get(ann)


def _help_text(field: Any) -> str:
    """The field's description and either [required] or its default (a factory's value, not the factory)."""
    if field.is_required():
        return (field.description or "") + " [required]"
    default = field.get_default(call_default_factory=True)
    if default is None or default == [] or default == {}:
        return field.description or ""
    if isinstance(default, list):
        default = ",".join(str(v) for v in default)
    elif isinstance(default, str) and "\n" in default:
        default = repr(default)  # a multi-line template, shown on one line with its \n
    return f"{field.description or ''} [default: {default}]"


def config_options(config_cls: type[StageConfig], omit: tuple[str, ...] = ()) -> list[click.Option]:
    """One click option per config field (but the `omit` ones); defaults stay None so only flags actually given
    override.

    Required fields are shown as [required] but not enforced by click: a recipe (`--config`) may supply them, and
    StageConfig.load reports a missing one in one line naming the flag."""
    options = []
    for name, field in config_cls.model_fields.items():
        if name in omit:
            continue
        ann = _unwrap_optional(field.annotation)
        help_ = _help_text(field)
        if ann is bool:
            flag = flag_name(name)
            decl = f"{flag}/--no-{flag[2:]}"
            options.append(click.Option([decl, name], default=None, help=help_))
        else:
            repeatable = typing.get_origin(ann) is list
            options.append(
                click.Option(
                    [flag_name(name), name],
                    default=None,
                    help=help_,
                    type=_option_type(ann),
                    multiple=repeatable,
                    metavar="A,B,..." if repeatable else None,
                )
            )
    return options


def _is_main_rank() -> bool:
    """False in the non-zero ranks of a distributed launch (torchrun / `accelerate launch` set RANK, MPI its own)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"))


def stage_command(
    name: str,
    config_cls: type[StageConfig],
    run: Callable[[Any], Any],
    help: str,
    extra_options: list[click.Option] | None = None,
    omit: tuple[str, ...] = (),
) -> click.Command:
    """A click command whose options are `config_cls`'s fields (less `omit`: fields that mean nothing for this
    command), plus --config and --print-config.

    `run(config)` does the work; if it returns a dict, it is printed as JSON on stdout (the stage summary).
    """

    def callback(config: str | None, print_config: bool, **values: Any) -> int:
        overrides = {}
        for key, raw in values.items():
            if raw is None or raw == ():  # not given (a repeatable flag gives an empty tuple)
                continue
            field = config_cls.model_fields[key]
            overrides[key] = raw if isinstance(raw, bool) else _parse_cli_value(field.annotation, raw)
        cfg = config_cls.load(config, overrides)
        for key in [k for k, v in overrides.items() if v is None]:  # `--flag none`: load() skips None overrides
            try:
                setattr(cfg, key, None)  # validate_assignment: a field that cannot be None says so
            except ValueError as exc:
                raise UserError(
                    f"invalid value for {flag_name(key)}: none is not allowed ({exc.errors()[0]['msg']})"
                ) from None
        if print_config:
            click.echo(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False))
            return 0
        result = run(cfg)
        if hasattr(result, "model_dump"):
            result = result.model_dump(mode="json")
        if isinstance(result, dict) and _is_main_rank():  # `accelerate launch`: one summary, not one per process
            click.echo(json.dumps(result, indent=2, default=str))
        return 0

    params: list[click.Parameter] = [
        click.Option(
            ["--config", "-c"],
            type=click.Path(dir_okay=False),
            default=None,
            help="YAML recipe; command-line flags override its values.",
        ),
        click.Option(
            ["--print-config"], is_flag=True, default=False, help="Print the resolved configuration and exit."
        ),
        *config_options(config_cls, omit),
        *(extra_options or []),
    ]
    return click.Command(name, callback=callback, params=params, help=help, context_settings={"max_content_width": 110})
