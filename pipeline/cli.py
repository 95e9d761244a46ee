"""The `pipeline` command line: a thin Typer app.

Each command lives in `pipeline/commands/<name>.py` and does three things: options -> typed
config, one stage (or workflow) call, presentation. This module only builds the app and turns
every failure into one line on stderr and a non-zero exit code; `--debug` shows the traceback.
Nothing heavy is imported here, so `pipeline --help` answers at once.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from pipeline import __version__

app = typer.Typer(
    name="pipeline",
    help="Train a dropout CNN, export it to ONNX with proof that dropout is gone, quantize it, and measure it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _debug_from_env() -> bool:
    return os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")


_state = {"debug": _debug_from_env()}
F = TypeVar("F", bound=Callable)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    # Set on every invocation, so one `--debug` call never leaks into the next in the same process.
    _state["debug"] = debug or _debug_from_env()


# What is true after Ctrl-C, per command. Commands that know more (train and run name the folder
# to resume) raise `Interrupted` themselves; these are for the rest. Keep each one true.
INTERRUPTED = {
    "bench": "bench.json and bench.png are unchanged (they are replaced only when a benchmark completes)",
    # export, quantize and MC export each publish files and manifest in one step when they complete
    # (artifacts.staged_update); `export --quantize` is two such stages, so the first may have landed.
    "export": "nothing of the interrupted stage was kept; stages that had completed (the fp32 export before "
              "--quantize) were published whole",
    "quantize": "the run folder is unchanged (quantize publishes its files and manifest together, when it completes)",
    "pack": "no archive was written (it is renamed into place only when complete)",
    "predict": "nothing was written",
    "inspect": "nothing was written",
}


def fail(message: str, code: int) -> None:
    """Print one line to stderr and exit with `code`."""
    line = " ".join(str(message).split())
    typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def guarded(command: F) -> F:
    """Run a command so that any failure is one line and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from pipeline.errors import PipelineError

        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:
            if _state["debug"]:
                raise
            # Only a PipelineError is a failure the user caused (ConfigError: a bad option, exit 2);
            # anything else, a ValueError included, is a bug in pipeline.
            if isinstance(exc, PipelineError):
                fail(str(exc), exc.exit_code)
            fail(f"unexpected {type(exc).__name__}: {exc}: a bug, please report it with the output of "
                 f"`pipeline --debug {command.__name__} ...`", 70)
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            said = INTERRUPTED.get(command.__name__)
            fail(f"interrupted: {said}" if said else "interrupted", 130)

    return wrapper  # type: ignore[return-value]


def _register() -> None:
    from pipeline.commands import train as train_command

    app.command("train")(guarded(train_command.train))
    from pipeline.commands import export as export_command
    from pipeline.commands import inspect as inspect_command

    app.command("export")(guarded(export_command.export))
    app.command("inspect")(guarded(inspect_command.inspect))
    from pipeline.commands import predict as predict_command

    app.command("predict")(guarded(predict_command.predict))
    from pipeline.commands import pack as pack_command

    app.command("pack")(guarded(pack_command.pack))
    from pipeline.commands import run as run_command

    app.command("run")(guarded(run_command.run))
    from pipeline.commands import quantize as quantize_command

    app.command("quantize")(guarded(quantize_command.quantize))
    from pipeline.commands import study as study_command

    app.command("study")(guarded(study_command.study))
    from pipeline.commands import bench as bench_command

    app.command("bench")(guarded(bench_command.bench))


_register()


def main() -> None:
    app(prog_name="pipeline")


if __name__ == "__main__":
    sys.exit(main())
