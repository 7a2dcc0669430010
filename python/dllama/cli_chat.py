"""`dllama chat`: a multi-turn conversation in the terminal (see `dllama.chat`)."""

from __future__ import annotations

import signal
import sys
from enum import Enum
from types import FrameType
from typing import Annotated

import typer

from dllama import cli_sampling as cs
from dllama.chat import Chat, ContextFullError, Turn
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
    load_llm,
    model_line,
)

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"


class Overflow(str, Enum):
    stop = "stop"
    shift = "shift"


class _CtrlC:
    """SIGINT handler while an answer streams: the answer stops at the next token."""

    pressed = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.pressed = True


def turn_line(turn: Turn) -> str:
    """The stats line after an answer: what the prefill cost, how fast the answer came."""
    s = turn.summaries[0] if turn.summaries else None
    if s is None:
        return "(no answer)"
    gen = turn.generated_tokens
    ms = sum(x.decode_ms for x in turn.summaries)
    steps = sum(x.decode_steps for x in turn.summaries)
    speed = 1000 * steps / ms if ms > 0 else 0.0
    return (
        f"({gen} tokens, {speed:.1f} tokens/s; prompt {s.prompt_tokens} tokens: "
        f"{s.cached_tokens} from the cache, {s.prefill_tokens} new in {s.prompt_ms:.0f} ms)"
    )


def chat(
    model: ModelPath = None,
    tokenizer: TokenizerPath = None,
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt.", show_default=False)
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            help=f"A built-in template ({', '.join(BUILTIN)}) or a Jinja2 file. Default: the "
            "tokenizer's, else a built-in that fits its vocabulary.",
            show_default=False,
        ),
    ] = None,
    think: Annotated[
        bool | None,
        typer.Option(
            "--think/--no-think",
            help="Qwen3-style templates: let the model think first (enable_thinking; default: "
            "the template's).",
            show_default=False,
        ),
    ] = None,
    context_overflow: Annotated[
        Overflow,
        typer.Option(
            help="When the context is full: stop the answer, or shift (drop the oldest turns)."
        ),
    ] = Overflow.stop,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Most tokens per answer; 0: up to the context.")
    ] = 0,
    temperature: cs.Temperature = 0.8,
    topp: cs.TopP = 0.9,
    top_k: cs.TopK = 0,
    min_p: cs.MinP = 0.0,
    repetition_penalty: cs.RepetitionPenalty = 1.0,
    presence_penalty: cs.PresencePenalty = 0.0,
    frequency_penalty: cs.FrequencyPenalty = 0.0,
    seed: cs.Seed = None,
    logit_bias: cs.LogitBias = None,
    nthreads: NThreads = CORES,
    buffer_float_type: BufferFloatType = BufferType.q80,
    max_seq_len: MaxSeqLen = 0,
    weights_float_type: WeightsFloatType = None,
    workers: Workers = None,
    secret: Secret = None,
    ready_timeout: ReadyTimeout = 600.0,
    max_memory: MaxMemory = None,
) -> None:
    """Chat with the model in the terminal, turn after turn."""
    if max_tokens < 0:
        _err(f"--max-tokens must be >= 0, got {max_tokens}")
        raise typer.Exit(2)
    try:
        params = cs.sampling_params(locals())
    except ValueError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    llm = load_llm(locals())
    try:
        params.check(llm.vocab_size)
        template = ChatTemplate(llm.tokenizer, chat_template)
    except ValueError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    conv = Chat(
        llm,
        template,
        system=system,
        sampling=params,
        max_tokens=max_tokens,
        overflow=context_overflow.value,
        template_vars={} if think is None else {"enable_thinking": think},
    )
    typer.echo(model_line(llm), err=True)
    typer.echo(f"chat template: {template.name}. {HELP}.", err=True)
    if think is not None and "enable_thinking" not in template.source:
        typer.echo(
            f"warning: --{'think' if think else 'no-think'} does nothing here: the template "
            "has no enable_thinking switch",
            err=True,
        )
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    ctrl_c = _CtrlC()
    while True:
        try:
            line = input("> ")
        except EOFError:
            typer.echo("", err=True)
            break
        except KeyboardInterrupt:
            typer.echo("\n(/exit or Ctrl-D quits)", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            conv.reset()
            typer.echo("(new conversation)", err=True)
            continue
        if text.startswith("/") and " " not in text:
            typer.echo(f"(unknown command {text}: {HELP})", err=True)
            continue
        ctrl_c.pressed = False
        previous = signal.signal(signal.SIGINT, ctrl_c)
        turn = Turn()
        try:
            for piece in conv.say(text, turn, lambda: ctrl_c.pressed):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        except ContextFullError as e:
            typer.echo(f"(context full: {e})", err=True)
            continue
        except (ValueError, OSError) as e:
            sys.stdout.write("\n")
            _err(str(e))
            raise typer.Exit(1) from None
        finally:
            signal.signal(signal.SIGINT, previous)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if turn.interrupted:
            typer.echo("(stopped)", err=True)
        if turn.dropped_exchanges:
            n = turn.dropped_exchanges
            typer.echo(
                f"(context full: dropped the {'oldest exchange' if n == 1 else f'{n} oldest exchanges'})",
                err=True,
            )
        if turn.context_full:
            typer.echo(
                "(context full: the answer was cut; /reset to start over"
                + (")" if context_overflow is Overflow.shift else ", or --context-overflow shift)"),
                err=True,
            )
        typer.echo(turn_line(turn), err=True)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
