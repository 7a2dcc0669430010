"""`_core.read_bandwidth` and `_core.BandwidthReader`, the benchmarks' reference for the
memory-bandwidth floor: they read, and refuse what is too small to time with a ValueError."""

from __future__ import annotations

import pytest
from dllama import _core


def test_reader_reads_its_buffer_again_and_again() -> None:
    r = _core.BandwidthReader(8 << 20, 2)
    assert all(r.read() > 1e8 for _ in range(3))
    assert _core.read_bandwidth(8 << 20, 1, 1) > 1e8


@pytest.mark.parametrize(("nbytes", "nthreads"), [(100, 1), (8 << 20, 0)])
def test_too_little_to_time_is_refused(nbytes: int, nthreads: int) -> None:
    with pytest.raises(ValueError, match="too little to time"):
        _core.BandwidthReader(nbytes, nthreads)
    with pytest.raises(ValueError, match="too little to time"):
        _core.read_bandwidth(nbytes, nthreads, 1)


def test_zero_rounds_is_refused() -> None:
    with pytest.raises(ValueError, match="0 rounds"):
        _core.read_bandwidth(8 << 20, 1, 0)
