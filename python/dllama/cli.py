"""The `dllama` command line. Each group of commands lives in its own `cli_*.py` module."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
import typer.core

from dllama import __version__

_display_type = typer.core.TyperOption.display_type


def _no_type_for_flags(self: typer.core.TyperOption, ctx: Any) -> str:
    # typer shows a type for every option, "<bool>" for flags too; a flag takes no value
    return "" if self.is_flag else _display_type(self, ctx)


typer.core.TyperOption.display_type = _no_type_for_flags  # type: ignore[method-assign, assignment]

app = typer.Typer(
    name="dllama",
    help="Run Llama-family models on one machine or split across several over TCP.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dllama {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = None,
) -> None:
    """dllama: Llama-family inference, one machine or a cluster of small ones."""


def _register_commands() -> None:
    from dllama import cli_chat, cli_convert, cli_run, cli_serve, cli_worker

    cli_convert.register(app)
    cli_run.register(app)
    cli_chat.register(app)
    cli_serve.register(app)
    cli_worker.register(app)


_register_commands()


def main() -> None:
    from dllama.cli_run import expand_workers_argv

    sys.argv[1:] = expand_workers_argv(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
