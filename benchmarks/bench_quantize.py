"""Throughput of dllama._core.quantize / dequantize on a Llama 2 7B w1-sized matrix.

Run: python benchmarks/bench_quantize.py  (after `maturin develop --release`)
"""

from __future__ import annotations

import time

import numpy as np
from dllama import _core


def main() -> None:
    x = np.random.default_rng(0).standard_normal((11008, 4096)).astype(np.float32)
    for ft in ["f16", "q40", "q80"]:
        start = time.perf_counter()
        data = _core.quantize(x, ft)
        quant = time.perf_counter() - start
        start = time.perf_counter()
        _core.dequantize(data, ft)
        dequant = time.perf_counter() - start
        print(
            f"{ft}: quantize {x.nbytes / quant / 1e9:.2f} GB/s of float32 ({quant:.3f} s), "
            f"dequantize {dequant:.3f} s"
        )


if __name__ == "__main__":
    main()
