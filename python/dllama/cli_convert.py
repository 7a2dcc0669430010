"""CLI: `dllama convert` (checkpoints and tokenizers) and `dllama tokenize`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from dllama.convert.writer import FLOAT_TYPES


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def convert(
    src: Annotated[
        Path,
        typer.Argument(
            help="A Meta folder (params.json + consolidated.NN.pth), a Hugging Face folder "
            "(config.json + *.safetensors), a .gguf file, or a tokenizer alone "
            "(tokenizer.model, tokenizer.json, vocabulary-only .gguf)."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="The .m model file to write.")
    ] = None,
    tokenizer_out: Annotated[
        Path | None,
        typer.Option("--tokenizer-out", "-t", help="The .t tokenizer file to write."),
    ] = None,
    float_type: Annotated[
        str, typer.Option("--type", help=f"Weights type: {', '.join(FLOAT_TYPES)}.")
    ] = "q40",
    max_seq_len: Annotated[
        int | None, typer.Option("--max-seq-len", help="Override the model's context length.")
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = True,
) -> None:
    """Convert a checkpoint to a .m model (and its tokenizer to .t), or a tokenizer alone."""
    from dllama.convert import ConvertError, convert_model, convert_tokenizer

    try:
        if float_type.lower() not in FLOAT_TYPES:
            _fail(f"unknown --type {float_type!r}; choose one of {', '.join(FLOAT_TYPES)}")
        if not src.exists():
            _fail(f"{src}: no such file or folder")
        _check_outputs(src, out, tokenizer_out)
        if out is not None:
            result = convert_model(
                src,
                out,
                float_type,
                tokenizer_out=tokenizer_out,
                progress=progress,
                max_seq_len=max_seq_len,
            )
            assert result.model is not None
            f = result.fields
            copied = result.model.n_copied_q40
            typer.echo(
                f"wrote {out} ({result.model.file_size / 1e6:.1f} MB, {float_type}, dim {f['dim']}, "
                f"{f['n_layers']} layers, {f['n_heads']}/{f['n_kv_heads']} heads, "
                f"vocab {f['vocab_size']}"
                + (f", {copied} Q4_0 tensors copied" if copied else "")
                + ")"
            )
            if result.tokenizer_path is not None:
                typer.echo(f"wrote {result.tokenizer_path}")
        elif tokenizer_out is not None:
            tok = convert_tokenizer(src, tokenizer_out)
            typer.echo(
                f"wrote {tokenizer_out} ({len(tok['vocab'])} tokens, bos {tok['bos_id']}, "
                f"eos {tok['eos_ids']}, chat template: {'yes' if tok['chat_template'] else 'no'})"
            )
        else:
            _fail(
                "nothing to write: give --out model.m (a model) and/or --tokenizer-out tokenizer.t"
            )
    except (ConvertError, ValueError, OSError) as e:
        _fail(str(e))


def _check_outputs(src: Path, *outs: Path | None) -> None:
    """Refuse, before any work, outputs that cannot be written or would destroy an input: a
    folder, a missing or read-only folder to write into, the source itself (or a file of a
    source folder), the same file twice."""
    import os

    given = [p for p in outs if p is not None]
    source = src.resolve()
    for p in given:
        if p.is_dir():
            _fail(f"{p} is a folder: --out and --tokenizer-out name the files to write")
        parent = p.resolve().parent
        if not parent.is_dir():
            _fail(f"{p}: there is no folder {parent} to write it into")
        if not os.access(parent, os.W_OK):
            _fail(f"{p}: the folder {parent} is not writable")
        target = p.resolve()
        inside = source.is_dir() and target.parent == source and target.suffix not in (".m", ".t")
        if target == source or (inside and target.exists()):
            _fail(f"{p} is a file of the source {src}: write the output elsewhere")
    if len(given) == 2 and given[0].resolve() == given[1].resolve():
        _fail(f"--out and --tokenizer-out are the same file ({given[0]})")


def tokenize(
    text: Annotated[str, typer.Argument(help="The text to tokenize.")],
    tokenizer: Annotated[
        Path,
        typer.Option(
            "--tokenizer",
            help="A .t file, a tokenizer.model (SentencePiece or Llama 3), a tokenizer.json "
            "or a .gguf.",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    bos: Annotated[
        bool | None,
        typer.Option("--bos/--no-bos", help="Prepend the bos token (default: the tokenizer's)."),
    ] = None,
    special: Annotated[
        bool, typer.Option("--special", help="Turn the text of special tokens into their ids.")
    ] = False,
) -> None:
    """Print the token ids of TEXT on one line, space-separated."""
    from dllama.tokenizer import Tokenizer

    try:
        tok = Tokenizer(tokenizer)
        ids = tok.encode(text, add_bos=bos, parse_special=special)
    except (ValueError, OSError) as e:
        _fail(str(e))
    typer.echo(json.dumps(ids) if as_json else " ".join(str(i) for i in ids))


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("tokenize")(tokenize)
