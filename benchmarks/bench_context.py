"""Long context: dllama against llama.cpp after a long prompt, on the same random Q40 weights.

`bench_single.py` times generation a few dozen positions in, where the weights are nearly all
that is read. Deep into a conversation every token also reads the whole KV cache and runs a
softmax over every past position, and a long prompt's prefill does attention over a growing
causal window. For each shape and thread count this script runs, in one process per engine:

1. the prefill of a --pos-token prompt from position 0 (tokens/s),
2. then --tokens generated tokens, one at a time (median ms/token for dllama; llama.cpp's own
   mean ms per generated token),

alternating the two engines --repeat times and keeping each one's best. It uses the `.m` and
`.gguf` files of `bench_single.py` (run that first to write them).

Run: `python benchmarks/bench_context.py` (about 5 minutes; --shapes tinyllama for a quick
run). Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import numpy as np
from bench_single import SHAPES, llamacpp_completion, prompt_ids
from dllama import _core


def time_dllama(path: Path, nthreads: int, pos: int, tokens: int) -> tuple[float, float]:
    """(prefill tokens/s of a pos-token prompt, median ms per generated token after it)."""
    node = _core.Node(str(path), nthreads=nthreads, max_seq_len=pos + tokens + 8)
    prompt = prompt_ids(pos, node.vocab_size)
    t0 = time.perf_counter()
    logits = node.forward(prompt, 0)
    prefill = pos / (time.perf_counter() - t0)
    times = []
    for i in range(tokens):
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        logits = node.forward([tok], pos + i)
        times.append((time.perf_counter() - t0) * 1000)
    del node
    gc.collect()
    return prefill, statistics.median(times)


def time_llamacpp(
    path: Path, nthreads: int, pos: int, tokens: int, vocab: int
) -> tuple[float, float]:
    """llama.cpp's own (prompt eval tokens/s, ms per generated token) for the same prompt."""
    req = {
        "prompt": prompt_ids(pos, vocab),
        "n_predict": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    t = llamacpp_completion(path, nthreads, pos + tokens + 8, req, warm_up=False)
    if t is None:
        raise SystemExit("pip install xllamacpp: this script compares against it")
    assert t["prompt_n"] == pos and t["predicted_n"] == tokens, t
    return float(t["prompt_per_second"]), float(t["predicted_per_token_ms"])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["tinyllama", "7b"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--pos", type=int, default=1000, help="prompt tokens before generating")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens timed")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dllama-bench"))
    ap.add_argument("--repeat", type=int, default=2, help="runs per engine; the best is kept")
    args = ap.parse_args()

    rows = []
    for key in args.shapes:
        s = SHAPES[key]
        m_path = args.dir / f"{s.name}-q40.m"
        g_path = args.dir / f"{s.name}-q4_0.gguf"
        if not m_path.exists() or not g_path.exists():
            raise SystemExit(f"{m_path} or {g_path} is missing: run bench_single.py first")
        for n in args.threads:
            ours, refs = [], []
            for _ in range(args.repeat):
                ours.append(time_dllama(m_path, n, args.pos, args.tokens))
                refs.append(time_llamacpp(g_path, n, args.pos, args.tokens, s.vocab))
            pre, gen = max(o[0] for o in ours), min(o[1] for o in ours)
            ref_pre, ref_gen = max(r[0] for r in refs), min(r[1] for r in refs)
            rows.append((s.name, n, pre, ref_pre, gen, ref_gen))
            print(
                f"{s.name} {n} thread(s), {args.pos}-token prompt: prefill dllama {pre:.1f} / "
                f"llama.cpp {ref_pre:.1f} tokens/s; then dllama {gen:.1f} / llama.cpp "
                f"{ref_gen:.1f} ms/token",
                flush=True,
            )

    print()
    print(
        f"| shape | threads | prefill of {args.pos} tokens: dllama tokens/s | llama.cpp "
        f"| dllama / llama.cpp | ms/token from position {args.pos}: dllama | llama.cpp "
        "| dllama / llama.cpp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, n, pre, ref_pre, gen, ref_gen in rows:
        print(
            f"| {name} | {n} | {pre:.1f} | {ref_pre:.1f} | {pre / ref_pre:.2f} | {gen:.1f} "
            f"| {ref_gen:.1f} | {gen / ref_gen:.2f} |"
        )


if __name__ == "__main__":
    main()
