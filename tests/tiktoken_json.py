"""Hugging Face `tokenizer.json` files made from tiktoken ranks, the way the models' own
tooling makes them: transformers' `TikTokenConverter` (every token's bytes as GPT-2's
printable characters, the merges that rebuild each token in rank order, the pre-tokenizer
regex as a `Split` before a regex-free `ByteLevel`, the special tokens as added tokens)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any


def load_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one "base64 rank" line per token."""
    with open(path, "rb") as f:
        return {
            base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())
        }


def write_tokenizer_json(
    ranks_file: Path,
    pattern: str,
    specials: list[str],
    folder: Path,
    *,
    bos: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Writes `folder/tokenizer.json` (specials numbered after the ranks) and the side files
    a Hugging Face model folder has; with `bos`, a post-processor that prepends it (as Llama 3's
    tokenizer.json does: ByteLevel then TemplateProcessing)."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(
        vocab_file=str(ranks_file), pattern=pattern, extra_special_tokens=specials
    ).converted()
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, bos_id)],
                ),
            ]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    for name, data in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
    ):
        if data is not None:
            path = folder / name
            merged = {**json.loads(path.read_text()), **data} if path.is_file() else data
            path.write_text(json.dumps(merged, indent=1))
    return folder / "tokenizer.json"
