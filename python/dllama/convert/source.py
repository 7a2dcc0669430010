"""What every checkpoint reader provides to the writer.

A `Source` knows the `.m` header fields of its model (all but `weights_float_type`, which the
writer sets) and hands out one float32 tensor at a time by its `.m` name (see DESIGN.md):
`embedding`, `layers.{i}.{q,k,v,wo,w1,w2,w3,attn_norm,ffn_norm}`, `norm`, `wcls`; Qwen3 adds
`layers.{i}.{q_norm,k_norm}` and Qwen3-MoE has `layers.{i}.moe_gate` and
`layers.{i}.experts.{e}.{w1,w2,w3}` in place of w1/w2/w3. Matrices come as (rows, cols), norms
as (n,). Q and K rows are in the order the header's RoPE expects: Meta's interleaved pairs
for llama, Hugging Face's halves for qwen3 (falcon RoPE). Tensors are read from memory maps on demand, so only one is resident at a time.
"""

from __future__ import annotations

import abc
import ctypes
import math
import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from dllama import _core

F32Array = npt.NDArray[np.float32]
HeaderFields = dict[str, int | float]

ARCH_LLAMA = 0xABCD00
ARCH_QWEN3 = 0xABCD01
ARCH_QWEN3_MOE = 0xABCD02
HIDDEN_ACT_SILU = 1
ROPE_LLAMA = 0
ROPE_FALCON = 1
ROPE_LLAMA3_1 = 2


class ConvertError(ValueError):
    """A checkpoint or tokenizer that cannot be converted; the message names the problem."""


def config_int(value: Any, what: str, default: int | None = None) -> int:
    """An integer read from a config or metadata value; `what` names the file and the field.
    Absent (None) takes `default`, or is an error without one; integral floats (64.0) pass."""
    if value is None:
        if default is None:
            raise ConvertError(f"{what} is missing")
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConvertError(f"{what} must be an integer, got {value!r}"[:300])
    return value


def config_float(value: Any, what: str, default: float | None = None) -> float:
    """A finite number read from a config or metadata value (see `config_int`)."""
    if value is None:
        if default is None:
            raise ConvertError(f"{what} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConvertError(f"{what} must be a number, got {value!r}"[:300])
    try:
        f = float(value)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ConvertError(f"{what} must be a finite number, got {value!r}"[:300])
    return f


def tensor_names(n_layers: int, fields: HeaderFields | None = None) -> list[str]:
    """Every `.m` tensor name in file order (of a llama model, or of the model of `fields`)."""
    if fields is not None:
        return [spec.name for spec in _core.model_tensors({**fields, "weights_float_type": 0})]
    names = ["embedding"]
    for i in range(n_layers):
        names += [
            f"layers.{i}.{n}"
            for n in ("q", "k", "v", "wo", "w1", "w2", "w3", "attn_norm", "ffn_norm")
        ]
    return names + ["norm", "wcls"]


def base_fields(
    *,
    dim: int,
    hidden_dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    vocab_size: int,
    max_seq_len: int,
    rope_theta: float,
    norm_epsilon: float,
    head_dim: int | None = None,
    source: str = "model",
) -> HeaderFields:
    """The header of a llama-architecture model, without the weights type and rope scaling.
    `source` (the file or folder) starts every error message."""
    for key, value in (
        ("dim", dim),
        ("hidden_dim", hidden_dim),
        ("n_layers", n_layers),
        ("n_heads", n_heads),
        ("n_kv_heads", n_kv_heads),
        ("vocab_size", vocab_size),
        ("max_seq_len", max_seq_len),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConvertError(f"{source}: invalid {key}: {value!r} (must be a positive integer)")
        if value > 2**31 - 1:
            raise ConvertError(f"{source}: {key} = {value} does not fit the format (int32)")
    if n_heads % n_kv_heads:
        raise ConvertError(
            f"{source}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}"
        )
    if head_dim is None:
        if dim % n_heads:
            raise ConvertError(f"{source}: dim {dim} is not a multiple of n_heads {n_heads}")
        head_dim = dim // n_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ConvertError(f"{source}: invalid head_dim: {head_dim!r} (must be a positive integer)")
    if not (math.isfinite(rope_theta) and 1 <= rope_theta <= 2**31 - 1):
        raise ConvertError(f"{source}: rope_theta {rope_theta!r} is out of range (1 .. 2^31 - 1)")
    if not (math.isfinite(norm_epsilon) and norm_epsilon > 0):
        raise ConvertError(f"{source}: norm_epsilon {norm_epsilon!r} must be a positive number")
    return {
        "version": 0,
        "arch_type": ARCH_LLAMA,
        "dim": dim,
        "hidden_dim": hidden_dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "n_experts": 0,
        "n_active_experts": 0,
        "vocab_size": vocab_size,
        "max_seq_len": max_seq_len,
        "hidden_act": HIDDEN_ACT_SILU,
        "rope_theta": int(rope_theta),
        # distributed-llama scales RoPE frequencies whenever the factor is not 1 (0 gives NaN)
        "rope_scaling_factor": 1,
        "rope_scaling_low_freq_factor": 0,
        "rope_scaling_high_freq_factor": 0,
        "rope_scaling_orig_max_seq_len": 0,
        "rope_type": ROPE_LLAMA,
        "head_dim": head_dim,
        "norm_epsilon": float(f"{norm_epsilon:.6g}"),  # f32 metadata: 9.9999997e-06 -> 1e-05
        "moe_hidden_dim": 0,
    }


def set_llama3_scaling(
    fields: HeaderFields, factor: float, low: float, high: float, orig_max_seq_len: int
) -> None:
    """Llama 3.1 RoPE frequency scaling (rope_type 2)."""
    fields["rope_type"] = ROPE_LLAMA3_1
    fields["rope_scaling_factor"] = int(factor)
    fields["rope_scaling_low_freq_factor"] = int(low)
    fields["rope_scaling_high_freq_factor"] = int(high)
    fields["rope_scaling_orig_max_seq_len"] = int(orig_max_seq_len)


def expected_shape(fields: HeaderFields, name: str) -> tuple[int, ...]:
    """The (rows, cols) or (n,) shape a `.m` tensor must have."""
    dim, hidden = int(fields["dim"]), int(fields["hidden_dim"])
    hd, vocab = int(fields["head_dim"]), int(fields["vocab_size"])
    q_rows, kv_rows = int(fields["n_heads"]) * hd, int(fields["n_kv_heads"]) * hd
    if name in ("embedding", "wcls"):
        return (vocab, dim)
    if name == "norm":
        return (dim,)
    short = name.rsplit(".", 1)[-1]
    if ".experts." in name:
        hidden = int(fields["moe_hidden_dim"])
    if short in ("q_norm", "k_norm"):
        return (hd,)
    if short == "moe_gate":
        return (int(fields["n_experts"]), dim)
    return {
        "q": (q_rows, dim),
        "k": (kv_rows, dim),
        "v": (kv_rows, dim),
        "wo": (dim, q_rows),
        "w1": (hidden, dim),
        "w2": (dim, hidden),
        "w3": (hidden, dim),
        "attn_norm": (dim,),
        "ffn_norm": (dim,),
    }[short]


def permute_hf_to_meta(w: F32Array, n_heads: int) -> F32Array:
    """Reorders Q/K rows from Hugging Face's half-split RoPE order to Meta's interleaved pairs.

    Within each head HF keeps the first halves of the pairs, then the second halves;
    Meta interleaves them: (n_heads, 2, head_dim/2, cols) -> (n_heads, head_dim/2, 2, cols).
    """
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


_PAGE = mmap.PAGESIZE


def _libc_madvise() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.madvise
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    f.restype = ctypes.c_int
    return f


_MADVISE = _libc_madvise()
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def drop_pages(address: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside [address, address + nbytes) of a
    read-only file mapping: they leave the resident set and fault back in from the file."""
    if _MADVISE is None or nbytes <= 0:
        return
    start = (address + _PAGE - 1) // _PAGE * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end > start:
        _MADVISE(start, end - start, MADV_DONTNEED)


def drop_mmap_range(m: mmap.mmap, offset: int, nbytes: int) -> None:
    """The same for a range of a Python mmap object."""
    if not hasattr(m, "madvise"):
        return
    start = offset // _PAGE * _PAGE
    end = min(len(m), (offset + nbytes + _PAGE - 1) // _PAGE * _PAGE)
    if end > start:
        m.madvise(MADV_DONTNEED, start, end - start)


class Source(abc.ABC):
    """A checkpoint opened for conversion."""

    fields: HeaderFields
    description: str

    @abc.abstractmethod
    def tensor(self, name: str) -> F32Array:
        """The float32 tensor with this `.m` name."""

    def release(self) -> None:
        """Drops the pages of the tensors read so far from this process's resident set (they
        stay in the page cache). Called by the writer after each tensor, so the resident size
        stays near one tensor instead of growing to the whole memory-mapped model."""

    def raw_q40(self, name: str) -> bytes | memoryview | None:
        """The tensor's bytes when the source already holds it as Q4_0 (copied unchanged)."""
        return None

    def close(self) -> None:
        """Releases the memory maps."""

    def iter_tensors(self) -> Iterator[tuple[str, F32Array]]:
        """Every tensor in `.m` file order, one at a time."""
        for name in tensor_names(int(self.fields["n_layers"]), self.fields):
            yield name, self.tensor(name)

    def checked(self, name: str) -> F32Array:
        """`tensor(name)` as a contiguous float32 array of the shape the header implies."""
        t = np.ascontiguousarray(self.tensor(name), dtype=np.float32)
        want = expected_shape(self.fields, name)
        if t.shape != want:
            raise ConvertError(
                f"{self.description}: tensor {name} has shape {t.shape}, expected {want}"
            )
        return t

    def __enter__(self) -> Source:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
