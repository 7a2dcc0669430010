"""A small memory-mapped GGUF reader: header, metadata, tensor infos and numpy views.

The runtime needs no `gguf` package for the common types (F32, F16, BF16, Q4_0, Q4_1, Q8_0);
k-quants and the other ggml types are dequantized with `gguf.quants.dequantize` when that
package is importable.

Layout (little-endian): magic "GGUF", u32 version (2 or 3), u64 n_tensors, u64 n_kv;
n_kv × (string key, u32 value type, value); n_tensors × (string name, u32 n_dims,
u64 dims[n_dims] (innermost first), u32 ggml type, u64 offset); padding to
`general.alignment` (default 32); tensor data. Strings are u64 length + UTF-8 bytes.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian

# ggml tensor types: code -> (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
}

# metadata value types
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY_SCALARS: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING = 8
_ARRAY = 9
_MAX_ARRAY_DEPTH = 8  # llama.cpp's files nest at most 2 deep (arrays of token strings)


class GGUFError(ValueError):
    """A GGUF file that is malformed or uses something this reader does not support."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first (rows, cols) for matrices
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated GGUF file (needs {self.pos + n} bytes, has {len(self.buf)})"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, size: int) -> Any:
        return struct.unpack(fmt, self.take(size))[0]

    def u32(self) -> int:
        return int(self.scalar("<I", 4))

    def u64(self) -> int:
        return int(self.scalar("<Q", 8))

    def string(self) -> str:
        n = self.u64()
        self.check_length(n, 1, "a string")
        return self.take(n).decode("utf-8", errors="replace")

    def check_length(self, n: int, size: int, what: str) -> None:
        """`n` items of `size` bytes at the cursor fit in the file: a length past the end is
        a truncated file when it is of a plausible size (an array of a large vocabulary, cut
        short), garbage otherwise."""
        if n * size <= len(self.buf) - self.pos:
            return
        if n < 1 << 32:
            raise GGUFError(
                f"{self.path}: truncated GGUF file ({what} of {n} items at offset "
                f"{self.pos - 8} runs past its end at {len(self.buf)} bytes)"
            )
        raise GGUFError(f"{self.path}: absurd length {n} of {what} at offset {self.pos - 8}")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.scalar(fmt, size)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.u32()
            n = self.u64()
            # every item takes at least a byte (a string its 8-byte length)
            self.check_length(n, _SCALARS[itype][1] if itype in _SCALARS else 8, "an array")
            if itype in _NUMPY_SCALARS:
                size = _SCALARS[itype][1]
                arr = np.frombuffer(self.take(n * size), dtype=_NUMPY_SCALARS[itype])
                return [bool(v) for v in arr] if itype == 7 else arr.tolist()
            if itype == _ARRAY and depth >= _MAX_ARRAY_DEPTH:
                raise GGUFError(
                    f"{self.path}: arrays nested deeper than {_MAX_ARRAY_DEPTH} at offset "
                    f"{self.pos - 12}"
                )
            return [self.value(itype, depth + 1) for _ in range(n)]
        raise GGUFError(
            f"{self.path}: unknown metadata value type {vtype} at offset {self.pos - 4}"
        )


class GGUFFile:
    """A memory-mapped GGUF file. `metadata` holds every key; `tensors` every tensor info."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise GGUFError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._mmap, self.path)
        magic = cur.u32()
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic:#010x})")
        self.version = cur.u32()
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version} (2 or 3)")
        n_tensors = cur.u64()
        n_kv = cur.u64()
        if n_tensors >= 1 << 32 or n_kv >= 1 << 32:
            raise GGUFError(f"{self.path}: absurd counts ({n_tensors} tensors, {n_kv} keys)")
        # a key takes at least 12 bytes (length, type), a tensor's info 24 (name length,
        # dimensions, type, offset)
        if 12 * n_kv + 24 * n_tensors > size - 24:
            raise GGUFError(
                f"{self.path}: truncated GGUF file (its header lists {n_kv} keys and "
                f"{n_tensors} tensors, more than its {size} bytes hold)"
            )
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.u32())
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.u32()
            if n_dims > 8:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
            dims = tuple(cur.u64() for _ in range(n_dims))
            ggml_type = cur.u32()
            offset = cur.u64()
            infos.append((name, dims, ggml_type, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment {alignment} is not a power of two")
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ggml_type, offset in infos:
            if ggml_type not in GGML_TYPES:
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown ggml type {ggml_type}")
            _, block, block_bytes = GGML_TYPES[ggml_type]
            n = math.prod(dims)
            if dims and dims[0] % block:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} row of {dims[0]} is not a multiple of "
                    f"the {GGML_TYPES[ggml_type][0]} block ({block})"
                )
            nbytes = n // block * block_bytes
            start = data_start + offset
            if start + nbytes > size:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} ends at byte {start + nbytes}, "
                    f"past the end of the file ({size} bytes): truncated"
                )
            self.tensors[name] = GGUFTensor(name, tuple(reversed(dims)), ggml_type, start, nbytes)

    def close(self) -> None:
        self._mmap.close()

    def __enter__(self) -> GGUFFile:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        """The tensor's bytes as a read-only view of the memory map (no copy)."""
        t = self.tensor_info(name)
        return np.frombuffer(self._mmap, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def tensor_info(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name!r} not found")
        return self.tensors[name]

    def release(self, name: str) -> None:
        """Drops the tensor's pages from the resident set (see source.drop_mmap_range)."""
        from dllama.convert.source import drop_mmap_range

        t = self.tensor_info(name)
        drop_mmap_range(self._mmap, t.offset, t.nbytes)

    def raw_slice(self, name: str, index: int) -> npt.NDArray[np.uint8]:
        """The bytes of `tensor(name)[index]` (one expert of a 3-D tensor), no copy."""
        t = self.tensor_info(name)
        if len(t.shape) < 2 or not 0 <= index < t.shape[0]:
            raise GGUFError(f"{self.path}: tensor {name!r} {t.shape} has no slice {index}")
        step = t.nbytes // t.shape[0]
        return np.frombuffer(self._mmap, dtype=np.uint8, count=step, offset=t.offset + index * step)

    def tensor_slice(self, name: str, index: int) -> npt.NDArray[np.float32]:
        """`tensor(name)[index]` dequantized, reading only that slice."""
        t = self.tensor_info(name)
        return dequantize(self.raw_slice(name, index), t.ggml_type).reshape(t.shape[1:])

    def tensor(self, name: str) -> npt.NDArray[np.float32]:
        """The tensor dequantized to float32, in numpy shape (outermost first)."""
        t = self.tensor_info(name)
        flat = dequantize(self.raw(name), t.ggml_type)
        return flat.reshape(t.shape)


def _f16(raw: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return raw.view("<f2").astype(np.float32)


def dequantize(raw: npt.NDArray[np.uint8], ggml_type: int) -> npt.NDArray[np.float32]:
    """Dequantizes ggml bytes to a flat float32 array."""
    if ggml_type == 0:
        return raw.view("<f4").astype(np.float32)
    if ggml_type == 1:
        return _f16(raw)
    if ggml_type == 28:  # F64: values beyond float32's range become +-inf (refused later)
        with np.errstate(over="ignore"):
            return raw.view("<f8").astype(np.float32)
    if ggml_type == 30:  # BF16: the high half of an f32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if ggml_type == 2:  # Q4_0: {f16 d; u8 qs[16]}, (nibble - 8) * d
        blocks = raw.reshape(-1, 18)
        d = _f16(blocks[:, :2].copy().reshape(-1))[:, None]
        q = _nibbles(blocks[:, 2:]).astype(np.float32) - 8.0
        return (q * d).reshape(-1)
    if ggml_type == 3:  # Q4_1: {f16 d; f16 m; u8 qs[16]}, nibble * d + m
        blocks = raw.reshape(-1, 20)
        dm = _f16(blocks[:, :4].copy().reshape(-1)).reshape(-1, 2)
        q = _nibbles(blocks[:, 4:]).astype(np.float32)
        return (q * dm[:, :1] + dm[:, 1:]).reshape(-1)
    if ggml_type == 8:  # Q8_0: {f16 d; i8 qs[32]}
        blocks = raw.reshape(-1, 34)
        d = _f16(blocks[:, :2].copy().reshape(-1))[:, None]
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    name = GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else str(ggml_type)
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize
    except ImportError as e:
        raise GGUFError(
            f"tensor type {name} needs the `gguf` package to dequantize: pip install gguf"
        ) from e
    try:
        out = gguf_dequantize(np.asarray(raw), GGMLQuantizationType(ggml_type))
    except (NotImplementedError, ValueError, TypeError) as e:
        raise GGUFError(f"tensor type {name} cannot be dequantized: {e}") from e
    return np.asarray(out, dtype=np.float32).reshape(-1)


def _nibbles(qs: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    # (n_blocks, 16) -> (n_blocks, 32): value j in the low nibble of byte j, j+16 in the high
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)
