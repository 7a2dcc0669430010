"""GGUF checkpoints (llama.cpp's files) of the llama, qwen3 and qwen3moe architectures as a
conversion source.

For llama, llama.cpp permutes Q and K to Meta's interleaved-pair order when it writes a GGUF,
so they are taken unchanged (tests/test_convert_sources.py checks this against transformers'
GGUF loader); for qwen3 it does not permute (NeoX RoPE), which is the `.m` order of qwen3 too.
Qwen3-MoE experts are 3-D tensors (`ffn_{gate,up,down}_exps`, expert outermost): each `.m`
expert tensor reads only its slice. Q4_0 tensors are copied byte for byte when the output is
q40.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dllama.convert.gguf_file import GGUFError, GGUFFile
from dllama.convert.source import (
    ARCH_QWEN3,
    ARCH_QWEN3_MOE,
    ROPE_FALCON,
    ConvertError,
    F32Array,
    Source,
    base_fields,
    config_float,
    config_int,
    set_llama3_scaling,
)

#: `.m` layer tensor suffix -> llama.cpp's GGUF name (`blk.{i}.<name>.weight`).
GGUF_LAYER_NAMES = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "wo": "attn_output",
    "w1": "ffn_gate",
    "w2": "ffn_down",
    "w3": "ffn_up",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "moe_gate": "ffn_gate_inp",
}
#: An expert's `.m` matrix -> the GGUF tensor that stacks it with the layer's other experts.
GGUF_EXPERT_NAMES = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def gguf_tensor_name(name: str, tied: bool = False) -> str:
    """The GGUF tensor holding the `.m` tensor `name` (an expert's matrix: the layer's stacked
    one); `tied`: the classifier is the embedding."""
    if name == "embedding":
        return "token_embd.weight"
    if name == "norm":
        return "output_norm.weight"
    if name == "wcls":
        return "token_embd.weight" if tied else "output.weight"
    _, i, short = name.split(".", 2)
    if short.startswith("experts."):
        return f"blk.{i}.{GGUF_EXPERT_NAMES[short.rsplit('.', 1)[1]]}.weight"
    return f"blk.{i}.{GGUF_LAYER_NAMES[short]}.weight"


ARCHITECTURES = ("llama", "qwen3", "qwen3moe")
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
        if arch not in ARCHITECTURES:
            raise ConvertError(
                f"{path}: unsupported GGUF architecture {arch!r} (only {', '.join(ARCHITECTURES)})"
            )
        if "token_embd.weight" not in g.tensors:
            raise ConvertError(
                f"{path}: no token_embd.weight (a vocabulary-only GGUF has no model)"
            )

        def key(name: str, default: int | None = None) -> int:
            return config_int(g.get(f"{arch}.{name}"), f"{path}: metadata {arch}.{name}", default)

        def number(name: str, default: float) -> float:
            return config_float(g.get(f"{arch}.{name}"), f"{path}: metadata {arch}.{name}", default)

        dim, n_heads = key("embedding_length"), key("attention.head_count")
        if dim <= 0 or n_heads <= 0:
            raise ConvertError(
                f"{path}: metadata {arch}.embedding_length = {dim} and {arch}.attention.head_count"
                f" = {n_heads} must be positive"
            )
        head_dim = key("attention.key_length", 0) or dim // n_heads
        theta = number("rope.freq_base", 10000.0)
        embd = g.tensors["token_embd.weight"]
        if len(embd.shape) != 2:
            raise ConvertError(f"{path}: token_embd.weight has shape {embd.shape}, not a matrix")
        vocab = embd.shape[0]
        tokens = g.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and len(tokens) > vocab:
            raise ConvertError(
                f"{path}: token_embd.weight has {vocab} rows but the vocabulary "
                f"(tokenizer.ggml.tokens) has {len(tokens)} tokens"
            )
        moe = arch == "qwen3moe"
        self.fields = base_fields(
            dim=dim,
            hidden_dim=key("feed_forward_length", 0) or key("expert_feed_forward_length"),
            n_layers=key("block_count"),
            n_heads=n_heads,
            n_kv_heads=key("attention.head_count_kv", n_heads) or n_heads,
            vocab_size=vocab,
            max_seq_len=max_seq_len or key("context_length"),
            rope_theta=theta,
            norm_epsilon=number("attention.layer_norm_rms_epsilon", 1e-5),
            head_dim=head_dim,
            source=str(path),
        )
        self.arch = arch
        if arch != "llama":
            self.fields["arch_type"] = ARCH_QWEN3_MOE if moe else ARCH_QWEN3
            self.fields["rope_type"] = ROPE_FALCON
        if moe:
            self.fields["n_experts"] = key("expert_count")
            self.fields["n_active_experts"] = key("expert_used_count")
            self.fields["moe_hidden_dim"] = key("expert_feed_forward_length")
            # llama.cpp renormalises qwen3moe's top-k weights; newer files say so explicitly
            self.fields["norm_topk_prob"] = int(bool(g.get(f"{arch}.expert_weights_norm", True)))
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
        return gguf_tensor_name(name, self.tied)

    @staticmethod
    def _expert(name: str) -> int | None:
        """e of `layers.<i>.experts.<e>.<w>`, else None."""
        parts = name.split(".")
        return int(parts[3]) if len(parts) == 5 and parts[2] == "experts" else None

    def tensor(self, name: str) -> F32Array:
        gname = self._gguf_name(name)
        e = self._expert(name)
        try:
            self._used.add(gname)
            return self.gguf.tensor(gname) if e is None else self.gguf.tensor_slice(gname, e)
        except GGUFError as err:
            raise ConvertError(str(err)) from err

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
        e = self._expert(name)
        return (self.gguf.raw(gname) if e is None else self.gguf.raw_slice(gname, e)).tobytes()

    def close(self) -> None:
        try:
            self.gguf.close()
        except BufferError:
            pass  # a caller still holds a view; the map is released when it is collected
