"""distributed-llama's converter entry point, kept for its users:

    python converter/converter.py /path/to/llama-2-7b q40

writes dllama_model_<name>_<type>.m (and dllama_tokenizer_<name>.t when the folder or its parent
has a tokenizer) in the current folder. The source may be a Meta folder, a Hugging Face folder
or a .gguf file; the type is q40, q80, f16 or f32 (distributed-llama's float16 / float32 also work).
The work is done by the dllama package (`dllama convert` is the same with more options).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SEED_TYPES = {"float16": "f16", "float32": "f32"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a checkpoint to distributed-llama's .m format."
    )
    parser.add_argument("model_path", help="Meta folder, Hugging Face folder or .gguf file")
    parser.add_argument("float_type", help="q40, q80, f16, f32 (or float16, float32)")
    parser.add_argument("--out", help="output .m file (default: dllama_model_<name>_<type>.m)")
    parser.add_argument("--max-seq-len", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        from dllama.convert import ConvertError, convert_model, find_tokenizer
    except ImportError as e:
        print(
            f"error: the dllama package is not installed ({e}); pip install -r converter/requirements.txt",
            file=sys.stderr,
        )
        return 1
    float_type = SEED_TYPES.get(args.float_type, args.float_type)
    src = Path(args.model_path)
    name = (src.stem if src.is_file() else src.resolve().name).lower()
    out = Path(args.out or f"dllama_model_{name}_{float_type}.m")
    tok_out = Path(f"dllama_tokenizer_{name}.t") if src.exists() and find_tokenizer(src) else None
    try:
        convert_model(src, out, float_type, tokenizer_out=tok_out, max_seq_len=args.max_seq_len)
    except (ConvertError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + (f" and {tok_out}" if tok_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
