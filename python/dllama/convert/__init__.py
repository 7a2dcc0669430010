"""Checkpoint and tokenizer conversion to distributed-llama's `.m` and `.t` files.

    from dllama.convert import convert_model, convert_gguf, convert_tokenizer
    convert_model("llama-2-7b/", "model.m", "q40", tokenizer_out="tokenizer.t")
    convert_gguf("SmolLM2.gguf", "model.m", "tokenizer.t", "q40")

Sources: a Meta folder (params.json + consolidated.NN.pth), a Hugging Face folder
(config.json + *.safetensors) or a llama GGUF file. Output types: q40, q80, f16, f32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dllama.convert.source import ConvertError, Source
from dllama.convert.writer import FLOAT_TYPES, WriteStats, write_model

if TYPE_CHECKING:
    from dllama._core import TokenizerDict

__all__ = [
    "FLOAT_TYPES",
    "ConvertError",
    "ConvertResult",
    "convert_gguf",
    "convert_model",
    "convert_tokenizer",
    "find_tokenizer",
    "is_model_source",
    "open_source",
    "write_tokenizer_file",
]


@dataclass
class ConvertResult:
    model: WriteStats | None
    tokenizer_path: Path | None
    fields: dict[str, int | float]


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def is_model_source(path: str | Path) -> bool:
    """True for a Meta folder, a HF folder with weights, or a GGUF holding weights."""
    path = Path(path)
    if path.is_dir():
        return (path / "params.json").is_file() or (path / "config.json").is_file()
    if _is_gguf(path):
        from dllama.convert.gguf_file import GGUFError, GGUFFile

        try:
            with GGUFFile(path) as g:
                return "token_embd.weight" in g.tensors
        except GGUFError:
            return True  # let open_source report what is wrong with it
    return False


def open_source(path: str | Path, max_seq_len: int | None = None) -> Source:
    """Opens a checkpoint for conversion, picking the reader from what `path` is."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "params.json").is_file():
            from dllama.convert.meta import MetaSource

            return MetaSource(path, max_seq_len)
        if (path / "config.json").is_file():
            from dllama.convert.hf import HFSource

            return HFSource(path, max_seq_len)
        raise ConvertError(
            f"{path}: neither a Meta checkpoint (params.json) nor a Hugging Face model (config.json)"
        )
    if _is_gguf(path):
        from dllama.convert.gguf_source import GGUFSource

        return GGUFSource(path, max_seq_len)
    raise ConvertError(
        f"{path}: not a model this converter knows (a Meta or Hugging Face folder, or a .gguf file)"
    )


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer that comes with a checkpoint: the GGUF itself, tokenizer.json or
    tokenizer.model in the folder (or, for Meta checkpoints, its parent folder)."""
    path = Path(path)
    if path.is_file():
        return path if _is_gguf(path) else None
    for folder in (path, path.parent):
        for name in ("tokenizer.json", "tokenizer.model"):
            if (folder / name).is_file():
                return folder / name
    return None


def write_tokenizer_file(tok: TokenizerDict, out: str | Path) -> Path:
    from dllama import _core

    out = Path(out)
    _core.write_tokenizer(str(out), tok)
    return out


def convert_tokenizer(src: str | Path, out: str | Path) -> TokenizerDict:
    """Converts a tokenizer.model, tokenizer.json or GGUF vocabulary to the `.t` file `out`."""
    from dllama.convert.tokenizers import load_tokenizer_source

    tok = load_tokenizer_source(src)
    write_tokenizer_file(tok, out)
    return tok


def convert_model(
    src: str | Path,
    out: str | Path,
    float_type: str = "q40",
    *,
    tokenizer_out: str | Path | None = None,
    progress: bool = True,
    max_seq_len: int | None = None,
) -> ConvertResult:
    """Converts a checkpoint to `out` (and its tokenizer to `tokenizer_out`, if given)."""
    tok_path = None
    # the model's source first: a file that is no model (or a truncated one) says so, rather
    # than that no tokenizer goes with it
    with open_source(src, max_seq_len) as source:
        if tokenizer_out is not None:
            found = find_tokenizer(src)
            if found is None:
                raise ConvertError(
                    f"{src}: no tokenizer.json or tokenizer.model found next to the model"
                )
            convert_tokenizer(found, tokenizer_out)
            tok_path = Path(tokenizer_out)
        stats = write_model(source, out, float_type, progress=progress)
        fields = dict(source.fields)
    return ConvertResult(stats, tok_path, fields)


def convert_gguf(
    path: str | Path,
    out_model: str | Path,
    out_tokenizer: str | Path,
    float_type: str = "q40",
    progress: bool = True,
) -> ConvertResult:
    """Converts a llama GGUF file to a `.m` model and its vocabulary to a `.t` tokenizer."""
    return convert_model(
        path, out_model, float_type, tokenizer_out=out_tokenizer, progress=progress
    )
