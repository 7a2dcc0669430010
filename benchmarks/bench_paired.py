"""Paired measurements for a machine whose memory bandwidth changes from one second to the
next as other tenants come and go (the shared 2-vCPU VMs: the two-reader bandwidth jumps
between levels, e.g. 42-52 and 60-66 GB/s on a Zen 5 host), where a figure measured a minute
before a run says little about the run itself.

`floor`: one node with N threads and a `_core.BandwidthReader` with N threads in one process,
taking turns: read, token, read, token, ..., read. Each token is paired with the reads just
before and after it (the faster of the two, so the floor stays strict): its share of the
floor is weight bytes per token / that bandwidth / the token's time. Prints the median share
over all tokens and its quartiles (target: >= 0.85 at one thread, >= 0.9 at two).

`cluster`: one node with 2 threads and root + 1 worker with 1 thread each (loopback, the
worker mapping its own copy), both loaded at once, taking turns in blocks of a few tokens, so
both see the same minute of the machine. Prints the two-node / one-node ratio of each pair of
blocks, its median and quartiles, and the ratio of the overall medians (target <= 1.05).

    python benchmarks/bench_paired.py floor MODEL.m [MODEL.m ...] [--threads 1 2] [--pairs 60]
    python benchmarks/bench_paired.py cluster MODEL.m [--blocks 30 --block-tokens 4]

Models: the `.m` files of `bench_single.py` and `bench_qwen3.py` in /tmp/dllama-bench.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench_cluster import free_port, start_worker, stop
from dllama import _core

PROMPT = 16


class Stepper:
    """A node generating greedily token by token, wrapping around its KV cache."""

    def __init__(self, node: _core.Node) -> None:
        self.node = node
        self.out = np.empty(node.vocab_size, np.float32)
        prompt = [(i * 7919) % node.vocab_size for i in range(PROMPT)]
        self.logits = node.forward(prompt, 0, self.out)
        self.pos = PROMPT

    def step(self) -> float:
        """ms of one token."""
        tok = int(np.argmax(self.logits))
        if self.pos >= self.node.max_seq_len:
            self.pos = PROMPT  # overwrite the cache from there on: the same work per token
        t0 = time.perf_counter()
        self.logits = self.node.forward([tok], self.pos, self.out)
        dt = (time.perf_counter() - t0) * 1000
        self.pos += 1
        return dt


def quartiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


def floor(models: list[Path], threads: list[int], pairs: int, reader_mb: int) -> None:
    rows = []
    for path in models:
        for nt in threads:
            node = _core.Node(str(path), nthreads=nt, max_seq_len=512)
            reader = _core.BandwidthReader(reader_mb << 20, nt)
            st = Stepper(node)
            for _ in range(3):  # warm up both
                st.step()
                reader.read()
            nbytes = node.weight_bytes_per_token
            reads = [reader.read()]
            ms: list[float] = []
            for _ in range(pairs):
                ms.append(st.step())
                reads.append(reader.read())
            shares = [nbytes / max(reads[i], reads[i + 1]) * 1000 / ms[i] for i in range(pairs)]
            kernels = node.kernels
            del st, node, reader
            gc.collect()
            r = (path.stem, nt, statistics.median(ms), min(ms), statistics.median(reads))
            rows.append((*r, nbytes, statistics.median(shares), quartiles(shares), kernels))
            print(
                f"{path.stem} {nt} thread(s): {r[2]:.2f} ms/token median, reads "
                f"{r[4] / 1e9:.1f} GB/s median, floor share {rows[-1][6]:.3f}",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\n| model | threads | ms/token median (best) | read GB/s median | weight MB/token "
        f"| floor / dllama, paired: median (quartiles) of {pairs} tokens | kernels |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, nt, med, best, bw, nbytes, share, q, kernels in rows:
        print(
            f"| {name} | {nt} | {med:.2f} ({best:.2f}) | {bw / 1e9:.1f} | {nbytes / 1e6:.0f} "
            f"| **{share:.3f}** ({q}) | {kernels} |"
        )


def cluster(model: Path, blocks: int, block_tokens: int) -> None:
    one = Stepper(_core.Node(str(model), nthreads=2, max_seq_len=512))
    port = free_port()
    w = start_worker(model, "127.0.0.1", port)
    try:
        root = _core.Node(str(model), nthreads=1, max_seq_len=512, workers=[f"127.0.0.1:{port}"])
        two = Stepper(root)
        for _ in range(3):  # warm up both
            one.step()
            two.step()
        ratios: list[float] = []
        all_one: list[float] = []
        all_two: list[float] = []
        for b in range(blocks):
            order = [(one, all_one), (two, all_two)]
            if b % 2:
                order.reverse()
            meds = {}
            for st, acc in order:
                ms = [st.step() for _ in range(block_tokens)]
                acc.extend(ms)
                meds[id(st)] = statistics.median(ms)
            ratios.append(meds[id(two)] / meds[id(one)])
        del two, root
    finally:
        stop(w)
    mo, mt = statistics.median(all_one), statistics.median(all_two)
    print(
        f"\n{model.stem}, one node x 2 threads against root + 1 worker x 1 thread each "
        f"(loopback, own copies), {blocks} alternating blocks of {block_tokens} tokens:\n"
        f"- two nodes / one node, per pair of blocks: median **{statistics.median(ratios):.3f}** "
        f"(quartiles {quartiles(ratios)}, best {min(ratios):.3f}) (target <= 1.05)\n"
        f"- ms/token over all tokens: one node {mo:.2f} (best {min(all_one):.2f}), two nodes "
        f"{mt:.2f} (best {min(all_two):.2f}); ratio of the medians {mt / mo:.3f}"
    )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("floor", help="tokens paired with reads of the memory bandwidth")
    f.add_argument("models", type=Path, nargs="+")
    f.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    f.add_argument("--pairs", type=int, default=60)
    f.add_argument("--reader-mb", type=int, default=512, help="the reader's buffer")
    c = sub.add_parser("cluster", help="one node x 2 threads against two nodes x 1 thread")
    c.add_argument("model", type=Path)
    c.add_argument("--blocks", type=int, default=30)
    c.add_argument("--block-tokens", type=int, default=4)
    a = ap.parse_args()
    if a.what == "floor":
        floor(a.models, a.threads, a.pairs, a.reader_mb)
    else:
        cluster(a.model, a.blocks, a.block_tokens)


if __name__ == "__main__":
    main()
