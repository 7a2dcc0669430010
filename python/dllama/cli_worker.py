"""CLI: `dllama serve-worker`, a node of a cluster that serves one root at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dllama import _core
from dllama.cli_run import CORES, MAX_THREADS, parse_size, warn_threads


def serve_worker(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 9998,
    nthreads: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_THREADS,
            help=f"Threads for this worker's slice, 1 to {MAX_THREADS} (default: this machine's "
            "cores).",
        ),
    ] = CORES,
    model: Annotated[
        Path | None,
        typer.Option(
            help="This worker's own copy of the .m model: its slices are mapped from it and "
            "nothing is shipped (checked against the root's by size, header and checksum)."
        ),
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            help="Shared secret of the cluster (default: $DLLAMA_SECRET); roots must prove it.",
            show_default=False,
        ),
    ] = None,
    step_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds to wait for the root inside a step.")
    ] = 60.0,
    idle_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds to wait for the root's next step.")
    ] = 3600.0,
    handshake_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a root has for its whole handshake, preamble to setup, from the "
            "connection; slower ones are dropped.",
        ),
    ] = 10.0,
    build_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a root has to ship this worker its weights (plus their size at "
            "256 KiB/s) before it is dropped.",
        ),
    ] = 600.0,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Most memory a root's slice may take here (weights, KV cache, RoPE table), "
            "e.g. 6G, 512M or bytes (default: the memory available when the root connects).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve as a worker of a dllama cluster: one root at a time; when it goes away, wait for the next."""
    if not 0 < port < 65536:
        typer.echo(f"error: --port {port} is not a TCP port (1-65535)", err=True)
        raise typer.Exit(2)
    warn_threads(nthreads)
    try:
        budget = parse_size(max_memory) if max_memory is not None else None
    except ValueError as e:
        typer.echo(f"error: --max-memory: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        _core.serve_worker(
            host,
            port,
            nthreads=nthreads,
            model=str(model) if model is not None else None,
            secret=secret,
            step_timeout=step_timeout,
            idle_timeout=idle_timeout,
            handshake_timeout=handshake_timeout,
            build_timeout=build_timeout,
            max_memory=budget,
        )
    except KeyboardInterrupt:
        typer.echo("dllama worker: interrupted, stopping", err=True)
        raise typer.Exit(130) from None
    except (OSError, ValueError) as e:  # ConnectionError is an OSError
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.command("serve-worker")(serve_worker)
