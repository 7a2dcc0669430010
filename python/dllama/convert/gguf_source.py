"""GGUF checkpoints of the llama architecture (llama.cpp's files) as a conversion source.

llama.cpp permutes Q and K to Meta's interleaved-pair order when it writes a GGUF, so they are
taken unchanged (tests/test_convert_gguf.py checks this against transformers' GGUF loader).
Q4_0 tensors are copied byte for byte when the output is q40.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dllama.convert.gguf_file import GGUFError, GGUFFile
from dllama.convert.source import ConvertError, F32Array, Source, base_fields, set_llama3_scaling

_KEYS = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "wo": "attn_output",
    "w1": "ffn_gate",
    "w2": "ffn_down",
    "w3": "ffn_up",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
GGML_Q4_0 = 2


def llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, orig: int
) -> list[float]:
    """The per-frequency divisors that llama.cpp stores as `rope_freqs.weight`."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


class GGUFSource(Source):
    """A llama-architecture GGUF file."""

    def __init__(self, path: str | Path, max_seq_len: int | None = None) -> None:
        try:
            self.gguf = GGUFFile(path)
        except GGUFError as e:
            raise ConvertError(str(e)) from e
        g = self.gguf
        self.description = str(path)
        self._used: set[str] = set()
        arch = g.get("general.architecture")
        if arch != "llama":
            raise ConvertError(f"{path}: unsupported GGUF architecture {arch!r} (only llama)")
        if "token_embd.weight" not in g.tensors:
            raise ConvertError(
                f"{path}: no token_embd.weight (a vocabulary-only GGUF has no model)"
            )

        def key(name: str) -> int:
            value = g.get(f"llama.{name}")
            if value is None:
                raise ConvertError(f"{path}: metadata llama.{name} is missing")
            return int(value)

        dim, n_heads = key("embedding_length"), key("attention.head_count")
        head_dim = int(g.get("llama.attention.key_length") or dim // n_heads)
        theta = float(g.get("llama.rope.freq_base") or 10000.0)
        self.fields = base_fields(
            dim=dim,
            hidden_dim=key("feed_forward_length"),
            n_layers=key("block_count"),
            n_heads=n_heads,
            n_kv_heads=int(g.get("llama.attention.head_count_kv") or n_heads),
            vocab_size=int(g.tensors["token_embd.weight"].shape[0]),
            max_seq_len=int(max_seq_len or key("context_length")),
            rope_theta=theta,
            norm_epsilon=float(g.get("llama.attention.layer_norm_rms_epsilon") or 1e-5),
            head_dim=head_dim,
        )
        if "rope_freqs.weight" in g.tensors:
            self._rope_scaling(g.tensor("rope_freqs.weight"), head_dim, theta)
        self.tied = "output.weight" not in g.tensors

    def _rope_scaling(self, stored: F32Array, head_dim: int, theta: float) -> None:
        # llama.cpp keeps Llama 3.1/3.2 scaling only as precomputed factors: find the constants
        for factor, orig in ((8.0, 8192), (32.0, 8192), (16.0, 8192), (4.0, 8192)):
            want = llama3_rope_factors(head_dim, theta, factor, 1.0, 4.0, orig)
            if stored.shape == (len(want),) and np.allclose(stored, want, rtol=1e-4):
                set_llama3_scaling(self.fields, factor, 1.0, 4.0, orig)
                return
        raise ConvertError(
            f"{self.description}: rope_freqs.weight matches no known llama3 rope scaling"
        )

    def _gguf_name(self, name: str) -> str:
        if name == "embedding":
            return "token_embd.weight"
        if name == "norm":
            return "output_norm.weight"
        if name == "wcls":
            return "token_embd.weight" if self.tied else "output.weight"
        _, i, short = name.split(".")
        return f"blk.{i}.{_KEYS[short]}.weight"

    def tensor(self, name: str) -> F32Array:
        try:
            self._used.add(self._gguf_name(name))
            return self.gguf.tensor(self._gguf_name(name))
        except GGUFError as e:
            raise ConvertError(str(e)) from e

    def release(self) -> None:
        for name in self._used:
            self.gguf.release(name)
        self._used.clear()

    def raw_q40(self, name: str) -> bytes | None:
        gname = self._gguf_name(name)
        info = self.gguf.tensors.get(gname)
        if info is None or info.ggml_type != GGML_Q4_0:
            return None
        self._used.add(gname)
        return self.gguf.raw(gname).tobytes()

    def close(self) -> None:
        try:
            self.gguf.close()
        except BufferError:
            pass  # a caller still holds a view; the map is released when it is collected
