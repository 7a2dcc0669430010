"""Writes a `Source` to a `.m` file, one tensor at a time.

The header and the tensor list (names, shapes, types, offsets) come from the Rust core
(`_core.encode_model_header`, `_core.model_tensors`), so the writer and every reader agree on
the layout; each tensor is quantized by `_core.quantize` in row chunks and written at once.
Q4_0 tensors of a GGUF are copied unchanged when the output is q40. The file is written as
`<out>.partial` and renamed when complete, so a failed conversion leaves no truncated model.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllama import _core
from dllama.convert.progress import ConvertProgress
from dllama.convert.source import ConvertError, Source

#: The format's weights types and their header codes, as the core names them.
FLOAT_TYPES = _core.FLOAT_TYPES
_CHUNK_VALUES = 1 << 22  # quantize ~16 MB of float32 at a time


@dataclass
class WriteStats:
    path: Path
    file_size: int
    n_tensors: int
    n_copied_q40: int  # tensors copied byte for byte from Q4_0 input


def parse_float_type(name: str) -> int:
    key = name.lower()
    if key not in FLOAT_TYPES:
        raise ConvertError(f"unknown weights type {name!r}; choose one of {', '.join(FLOAT_TYPES)}")
    return FLOAT_TYPES[key]


def write_model(
    source: Source, out: str | Path, float_type: str, progress: bool = True
) -> WriteStats:
    """Converts `source` into the `.m` file `out` with weights of `float_type`."""
    out = Path(out)
    fields = dict(source.fields)
    fields["weights_float_type"] = parse_float_type(float_type)
    try:  # the core validates the header (bounds of every dimension, the format's codes)
        header = _core.encode_model_header(fields)
        specs = _core.model_tensors(fields)
    except ValueError as e:
        raise ConvertError(f"{source.description}: {e}") from e
    total = len(header) + sum(spec.nbytes for spec in specs)
    partial = out.with_name(out.name + ".partial")
    copied = 0
    try:
        with (
            _terminate_as_exit(),
            open(partial, "wb") as f,
            ConvertProgress(total, progress, str(out.name)) as bar,
        ):
            f.write(header)
            bar.advance(len(header))
            for name, rows, cols, ftype, offset, nbytes in specs:
                bar.tensor(name)
                if f.tell() != offset:
                    raise ConvertError(
                        f"internal: {name} would start at {f.tell()}, header says {offset}"
                    )
                raw = source.raw_q40(name) if ftype == "q40" else None
                if raw is not None and len(raw) == nbytes:
                    f.write(raw)
                    copied += 1
                else:
                    _write_quantized(f, source, name, ftype, rows, cols, nbytes)
                source.release()
                bar.advance(nbytes)
            size = f.tell()
        if size != total:
            raise ConvertError(f"internal: wrote {size} bytes, the header implies {total}")
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return WriteStats(out, size, len(specs), copied)


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (a `kill`, a service stopping) raises SystemExit while a file is written, so
    the partial file is removed as on Ctrl-C, instead of the process dying at once. Only on
    the main thread, and only where nobody else handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_quantized(
    f: object, source: Source, name: str, ftype: str, rows: int, cols: int, nbytes: int
) -> None:
    t = source.checked(name).reshape(-1)  # (rows * cols,)
    if not np.isfinite(t).all():
        bad = int(np.flatnonzero(~np.isfinite(t))[0])
        raise ConvertError(
            f"{source.description}: tensor {name} holds {t[bad]} at index {bad} "
            "(weights must be finite)"
        )
    if t.size != rows * cols:
        raise ConvertError(
            f"{source.description}: tensor {name} has {t.size} values, expected {rows * cols}"
        )
    step = max(1, _CHUNK_VALUES // max(cols, 1)) * cols  # whole rows per chunk
    written = 0
    for start in range(0, t.size, step):
        data = _core.quantize(t[start : start + step], ftype)
        f.write(data)  # type: ignore[attr-defined]
        written += len(data)
    if written != nbytes:
        raise ConvertError(
            f"internal: tensor {name} took {written} bytes, the header implies {nbytes}"
        )
