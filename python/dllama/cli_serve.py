"""`dllama serve`: the OpenAI-compatible HTTP API and chat page (see `dllama.server`)."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from dllama.chat_template import BUILTIN, ChatTemplate
from dllama.cli_run import (
    CORES,
    BufferFloatType,
    BufferType,
    MaxMemory,
    MaxSeqLen,
    ModelPath,
    NThreads,
    ReadyTimeout,
    Secret,
    TokenizerPath,
    WeightsFloatType,
    Workers,
    _err,
    llm_args,
    model_line,
    start_llm,
)
from dllama.generate import LLM


def serve(
    model: ModelPath = None,
    tokenizer: TokenizerPath = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface, the LAN).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed).")] = 9990,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="DLLAMA_API_KEY",
            help="Require `Authorization: Bearer KEY` on /v1 (default: $DLLAMA_API_KEY).",
            show_default=False,
        ),
    ] = None,
    cors: Annotated[
        list[str] | None,
        typer.Option(
            "--cors",
            help="Let web pages from this origin call the API (repeatable; off by default).",
            show_default=False,
        ),
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name", help="The model's id in /v1/models (default: the file's name)."
        ),
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            help=f"A built-in template ({', '.join(BUILTIN)}) or a Jinja2 file.",
            show_default=False,
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for the model; past that: 429.")
    ] = 16,
    timeout: Annotated[
        float, typer.Option(help="Seconds a request may take, waiting included.")
    ] = 600.0,
    max_body: Annotated[int, typer.Option(help="Largest request body, bytes (413).")] = 1 << 20,
    max_tokens_limit: Annotated[
        int, typer.Option(help="Largest max_tokens a request may ask for.")
    ] = 4096,
    nthreads: NThreads = CORES,
    buffer_float_type: BufferFloatType = BufferType.q80,
    max_seq_len: MaxSeqLen = 0,
    weights_float_type: WeightsFloatType = None,
    workers: Workers = None,
    secret: Secret = None,
    ready_timeout: ReadyTimeout = 600.0,
    max_memory: MaxMemory = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a chat page at /."""
    for name, value, low in [
        ("--max-queue", max_queue, 1),
        ("--max-body", max_body, 1024),
        ("--max-tokens-limit", max_tokens_limit, 1),
    ]:
        if value < low:
            _err(f"{name} must be at least {low}, got {value}")
            raise typer.Exit(2)
    if not 0 <= port <= 65535:
        _err(f"--port {port} is not a TCP port (1-65535, or 0 for any free one)")
        raise typer.Exit(2)
    if not timeout > 0:
        _err(f"--timeout must be > 0, got {timeout}")
        raise typer.Exit(2)
    if api_key is not None and not api_key.strip():
        _err("--api-key is empty")
        raise typer.Exit(2)
    try:
        import uvicorn

        from dllama.server import Engine, ServerConfig, create_app
    except ImportError as e:
        _err(f"dllama serve needs fastapi and uvicorn ({e}): pip install fastapi uvicorn")
        raise typer.Exit(2) from None
    # listen first: a port in use or a bad address fails before the model loads, and the
    # address announced below is the one bound (the real port of --port 0)
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        _err(f"cannot listen on {host}:{port}: {e.strerror or e}")
        raise typer.Exit(1) from None
    port = sock.getsockname()[1]
    args = llm_args(locals())
    llm = start_llm(args)
    try:
        template = ChatTemplate(llm.tokenizer, chat_template)
    except ValueError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    name = model_name or (model.stem if model else "smollm2-135m-instruct")
    # a cluster's root loads again (reconnects) after losing a node, at the next request
    reload = functools.partial(LLM, **args) if workers else None
    engine = Engine(llm, template, max_queue=max_queue, reload=reload)
    cfg = ServerConfig(
        model_name=name,
        api_key=api_key,
        cors_origins=cors or [],
        max_body_bytes=max_body,
        max_tokens_limit=max_tokens_limit,
        timeout_s=timeout,
    )
    app = create_app(engine, cfg)
    typer.echo(model_line(llm), err=True)
    typer.echo(
        f"chat template: {template.name}; serving {name} on http://{host}:{port} "
        f"(chat page at /, API at /v1, schema at /openapi.json"
        f"{', API key required' if api_key else ''})",
        err=True,
    )
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
