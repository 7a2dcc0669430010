"""Time of one sampling step (`dllama.sampler.Sampler.sample`) at the vocabularies dllama runs.

Between two tokens the generation loop samples in Python while the node's threads (and a
cluster's workers) wait, so at Qwen3's 151 936 logits the sampler is part of every token's time.
For each vocabulary (32 000: Llama 2, Mistral; 151 936: Qwen3) and each option set (greedy, the
CLI's default temperature 0.8 with top_p 0.9, temperature alone, top_k 20 with top_p 0.95 as
Qwen3's card suggests, min_p 0.05), the script draws --steps tokens from random logits (normal,
standard deviation 3 and 6: a flat and a peaked distribution; fixed seeds) and prints the median
ms per step. Run: `python benchmarks/bench_sampler.py`. Not a test: the numbers depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
from dllama.sampler import Sampler

OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("greedy", {"temperature": 0.0}),
    ("temperature 0.8, top_p 0.9 (the CLI's default)", {"temperature": 0.8, "top_p": 0.9}),
    ("temperature 0.7", {"temperature": 0.7, "top_p": 1.0}),
    ("temperature 0.6, top_k 20, top_p 0.95", {"temperature": 0.6, "top_k": 20, "top_p": 0.95}),
    ("temperature 0.7, min_p 0.05", {"temperature": 0.7, "top_p": 1.0, "min_p": 0.05}),
]


def time_sampler(vocab: int, spread: float, kwargs: dict[str, Any], steps: int) -> float:
    """Median ms of `steps` draws from one Sampler on fixed random logits."""
    logits = (np.random.default_rng(7).standard_normal(vocab) * spread).astype(np.float32)
    s = Sampler(seed=1, **kwargs)
    s.sample(logits)  # the work arrays are made once
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        s.sample(logits)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="draws per figure")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    a = ap.parse_args()
    print("| options | vocabulary | ms/step, logits std 3 | ms/step, logits std 6 |")
    print("|---|---|---|---|")
    for name, kwargs in OPTIONS:
        for vocab in a.vocab:
            ms = [time_sampler(vocab, spread, kwargs, a.steps) for spread in (3.0, 6.0)]
            print(f"| {name} | {vocab} | {ms[0]:.3f} | {ms[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
