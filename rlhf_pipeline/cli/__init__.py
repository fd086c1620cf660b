"""The `rlhf` command line. This package is the only code that knows click: the library takes typed arguments,
raises UserError and returns results; the modules here turn flags into those calls and results into output.

Stage commands are generated from the stage registry (stages.py) with `stage_command` (stage_commands.py); the
tool commands (run, compile, submit, schedule, promote) are written out in run.py, pipeline.py and ops.py.
Everything is imported lazily, so `rlhf --help` and `rlhf prepare-data` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys

import click

from rlhf_pipeline.cli.stage_commands import stage_command
from rlhf_pipeline.errors import UserError

# The commands that are not stages: name -> (module:attribute of a click command, one-line help).
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("rlhf_pipeline.cli.run:run_command", "Run the whole pipeline locally via kfp.local."),
    "compile": ("rlhf_pipeline.cli.pipeline:compile_command", "Compile the Kubeflow pipeline to YAML."),
    "submit": ("rlhf_pipeline.cli.pipeline:submit_command", "Upload the pipeline to Kubeflow and start a run."),
    "schedule": ("rlhf_pipeline.cli.ops:schedule_command", "Create, list and delete recurring runs."),
    "promote": ("rlhf_pipeline.cli.ops:promote_command", "Gate a registered model and move its champion alias."),
    "estimate-memory": ("rlhf_pipeline.cli.estimate:estimate_memory_command", "Peak GPU memory per phase of a recipe."),
}


def commands() -> dict[str, str]:
    """Every subcommand and its one-line help: the registry's stages, then the tools."""
    from rlhf_pipeline.stages import STAGES

    return {**{s.command: s.help for s in STAGES.values()}, **{n: h for n, (_, h) in TOOL_COMMANDS.items()}}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(commands())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from rlhf_pipeline.stages import STAGES

        stage = STAGES.get(name.replace("-", "_"))
        if stage is not None and stage.command == name:
            # a stage that registers no model (evaluate, prepare-data) offers no --register-model
            omit = () if stage.registers else ("register_model",)
            return stage_command(name, stage.config_class(), stage.run_function(), help=stage.help, omit=omit)
        if name not in TOOL_COMMANDS:
            return None
        target, _ = TOOL_COMMANDS[name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # the command is not built yet
                raise UserError(f"command '{name}' is not available in this version") from None
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(commands().items()))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="rlhf-pipeline")
def cli() -> None:
    """rlhf-pipeline: align language models with human preferences, the StackLLaMA way."""


ENVIRONMENT_EXIT_CODE = 74  # EX_IOERR: the machine, not the input


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    prog = "rlhf " + args[0] if args and not args[0].startswith("-") else "rlhf"
    try:
        rv = cli.main(args=args, prog_name="rlhf", standalone_mode=False)
    except UserError as exc:
        click.echo(f"{prog}: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # the environment (a full disk, a read-only mount, a vanished file): one line
        where = f" ({exc.filename})" if exc.filename else ""
        click.echo(f"{prog}: error: {exc.strerror or exc}{where}", err=True)
        sys.exit(ENVIRONMENT_EXIT_CODE)
    except Exception as exc:
        # Rust-backed writers (safetensors, tokenizers) report a full disk or a failed write as a plain exception
        # carrying Rust's io::Error text ("No space left on device (os error 28)"), not as OSError: the same
        # environment fault, the same one line.
        message = str(exc)
        if "(os error " in message:
            click.echo(f"{prog}: error: {message.split('I/O error: ', 1)[-1]}", err=True)
            sys.exit(ENVIRONMENT_EXIT_CODE)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)
