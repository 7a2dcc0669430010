"""Meta checkpoints: a folder with params.json and consolidated.NN.pth shards.

Llama 2 7B has 1 shard, 13B 2, 70B 8. Each shard holds a slice of every matrix: the shards
are joined along columns for tok_embeddings, wo and w2 and along rows for wq, wk, wv, w1, w3
and output; norms are replicated. Shards are opened with `torch.load(mmap=True,
weights_only=True)`, so only the tensor being written is ever resident. Q and K are already in
the interleaved-pair RoPE order that `.m` files use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dllama.convert.source import (
    ConvertError,
    F32Array,
    Source,
    base_fields,
    config_float,
    config_int,
    drop_pages,
    set_llama3_scaling,
)

_COLUMN_SPLIT = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
_KEYS = {
    "q": "attention.wq.weight",
    "k": "attention.wk.weight",
    "v": "attention.wv.weight",
    "wo": "attention.wo.weight",
    "w1": "feed_forward.w1.weight",
    "w2": "feed_forward.w2.weight",
    "w3": "feed_forward.w3.weight",
    "attn_norm": "attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
}
DEFAULT_MAX_SEQ_LEN = 4096


def _vocab_from_tokenizer(folder: Path) -> int | None:
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            from dllama.convert.tokenizers import tokenizer_vocab_size

            return tokenizer_vocab_size(candidate)
    return None


class MetaSource(Source):
    """A Meta (llama / llama-models) checkpoint folder."""

    def __init__(self, folder: str | Path, max_seq_len: int | None = None) -> None:
        folder = Path(folder)
        params_path = folder / "params.json"
        if not params_path.is_file():
            raise ConvertError(f"{folder}: no params.json (not a Meta checkpoint folder)")
        shards = sorted(folder.glob("consolidated.*.pth"))
        if not shards:
            raise ConvertError(f"{folder}: no consolidated.*.pth files")
        try:
            import torch
        except ImportError as e:
            raise ConvertError(
                "reading Meta .pth checkpoints needs torch: pip install torch"
            ) from e
        try:
            with open(params_path, encoding="utf-8") as f:
                params: Any = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConvertError(f"{params_path}: invalid JSON: {e}") from e
        if not isinstance(params, dict):
            raise ConvertError(f"{params_path}: expected a JSON object")

        def num(key: str, default: int | None = None) -> int:
            return config_int(params.get(key), f"{params_path}: {key}", default)

        def real(key: str, default: float) -> float:
            return config_float(params.get(key), f"{params_path}: {key}", default)

        self.description = str(folder)
        self._used: list[Any] = []  # torch tensors read since the last release()
        self._shards: list[dict[str, Any]] = [
            torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in shards
        ]
        first = self._shards[0]
        for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
            if key not in first:
                raise ConvertError(f"{shards[0]}: tensor {key} not found (not a Meta checkpoint?)")
        vocab = num("vocab_size", -1)
        if vocab <= 0:
            # the embedding rows are never split across shards: they give the vocabulary size
            vocab = int(first["tok_embeddings.weight"].shape[0])
            from_tok = _vocab_from_tokenizer(folder)
            if from_tok is not None and from_tok != vocab:
                raise ConvertError(
                    f"{folder}: the tokenizer has {from_tok} tokens but tok_embeddings has {vocab} rows"
                )
        n_heads = num("n_heads")
        self.fields = base_fields(
            dim=num("dim"),
            hidden_dim=int(first["layers.0.feed_forward.w1.weight"].shape[0]) * len(shards),
            n_layers=num("n_layers"),
            n_heads=n_heads,
            n_kv_heads=num("n_kv_heads", n_heads) or n_heads,
            vocab_size=vocab,
            max_seq_len=max_seq_len
            or num("max_seq_len", DEFAULT_MAX_SEQ_LEN)
            or DEFAULT_MAX_SEQ_LEN,
            rope_theta=real("rope_theta", 10000.0),
            norm_epsilon=real("norm_eps", 1e-5),
            source=str(params_path),
        )
        if params.get("use_scaled_rope"):
            # llama-models' apply_scaling constants for Llama 3.1
            set_llama3_scaling(
                self.fields,
                real("rope_scaling_factor", 8.0),
                1.0,
                4.0,
                8192,
            )

    def _joined(self, key: str) -> F32Array:
        parts = []
        for i, shard in enumerate(self._shards):
            if key not in shard:
                raise ConvertError(f"{self.description}: tensor {key} missing from shard {i}")
            parts.append(shard[key])
        self._used += parts
        if len(parts) == 1 or parts[0].dim() == 1:
            joined = parts[0]
        else:
            import torch

            axis = 1 if key.endswith(_COLUMN_SPLIT) else 0
            joined = torch.cat(parts, dim=axis)
        return np.asarray(joined.float().numpy(), dtype=np.float32)

    def tensor(self, name: str) -> F32Array:
        if name == "embedding":
            return self._joined("tok_embeddings.weight")
        if name == "norm":
            return self._joined("norm.weight")
        if name == "wcls":
            return self._joined("output.weight")
        _, i, short = name.split(".")
        return self._joined(f"layers.{i}.{_KEYS[short]}")

    def release(self) -> None:
        for t in self._used:
            storage = t.untyped_storage()
            drop_pages(storage.data_ptr(), storage.nbytes())
        self._used.clear()

    def close(self) -> None:
        self._shards.clear()
