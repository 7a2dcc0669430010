"""Qwen3 speed on one machine: dllama against llama.cpp on the same random Q40 weights.

Shapes: Qwen3-30B-A3B (dim 2048, 32 heads, 4 KV heads, head_dim 128, 128 experts, 8 active,
moe_hidden 768, vocab 151 936; 48 layers, `--moe-layers` reduces them so two copies of the
weights fit this machine's memory and disk next to other jobs) and Qwen3-8B (dense: dim 4096,
36 layers, 32 heads, 8 KV heads, head_dim 128, hidden 12 288; `--dense-layers` likewise).

For each shape the script writes a `.m` file of random Q40 weights (random F32 router with
bf16 values, as converted from a bf16 checkpoint: dllama holds it as bf16), the very
same Q4_0 blocks as a llama.cpp GGUF (qwen3 / qwen3moe, the experts stacked into
`ffn_{gate,up,down}_exps`), then per thread count alternates `--repeat` times: the memory
bandwidth with as many reading processes as threads, dllama's median ms/token (one token at a
time after a 16-token prompt), llama.cpp's (xllamacpp server timings) on the same number of
tokens; then the prefill of a `--prefill`-token prompt in both. Each engine runs in a child
process, so its peak RSS is its own. Prints a table: ms/token, ratio to llama.cpp, weight
bytes read per token (for a MoE the router and the 8 active experts), the bandwidth floor
(those bytes / the best bandwidth measured in that row) and floor / ms.
Run: `python benchmarks/bench_qwen3.py` (--shapes 30b-a3b for one). Not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_single import (
    add_filler_vocab,
    add_m_tensor,
    finish_gguf,
    read_bandwidth,
    time_dllama,
    time_dllama_prefill,
    time_llamacpp,
    time_llamacpp_prefill,
    write_random_model,
)
from dllama import _core
from dllama.convert.gguf_source import gguf_tensor_name


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    vocab: int = 151936
    experts: int = 0
    active: int = 0
    moe_hidden: int = 0
    seq_len: int = 2048


def shapes(moe_layers: int, dense_layers: int) -> dict[str, Shape]:
    return {
        "30b-a3b": Shape(
            f"qwen3-30b-a3b-{moe_layers}l", 2048, 6144, moe_layers, 32, 4,
            experts=128, active=8, moe_hidden=768,
        ),
        "8b": Shape(f"qwen3-8b-{dense_layers}l", 4096, 12288, dense_layers, 32, 8),
    }  # fmt: skip


def fields(s: Shape) -> dict[str, int | float]:
    return {
        "version": 0,
        "arch_type": 0xABCD02 if s.experts else 0xABCD01,
        "dim": s.dim,
        "hidden_dim": s.hidden,
        "n_layers": s.layers,
        "n_heads": s.heads,
        "n_kv_heads": s.kv_heads,
        "n_experts": s.experts,
        "n_active_experts": s.active,
        "moe_hidden_dim": s.moe_hidden,
        "vocab_size": s.vocab,
        "max_seq_len": s.seq_len,
        "hidden_act": 1,
        "rope_theta": 1000000,
        "weights_float_type": 2,
        "rope_type": 1,
        "head_dim": s.head_dim,
        "norm_epsilon": 1e-6,
    }


def write_gguf(s: Shape, m_path: Path, path: Path) -> None:
    """The same weights as a qwen3 / qwen3moe GGUF (Q4_0 matmuls, F32 embedding, norms and
    router), each expert's blocks copied into the stacked 3-D tensors."""
    if path.exists():
        return
    import gguf

    print(f"writing {path} (the same weights as GGUF Q4_0)...", flush=True)
    arch = "qwen3moe" if s.experts else "qwen3"
    mm = np.memmap(m_path, dtype=np.uint8, mode="r")
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_context_length(s.seq_len)
    w.add_embedding_length(s.dim)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.hidden)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    if s.experts:
        w.add_expert_count(s.experts)
        w.add_expert_used_count(s.active)
        w.add_expert_feed_forward_length(s.moe_hidden)
    add_filler_vocab(w, s.vocab)
    experts: dict[str, list[Any]] = {}
    for t in _core.model_tensors(fields(s)):
        raw = mm[t.offset : t.offset + t.nbytes]
        gname = gguf_tensor_name(t.name)
        parts = t.name.split(".")
        if len(parts) == 5 and parts[2] == "experts":  # layers.i.experts.e.wN: stacked at e's last
            experts.setdefault(gname, []).append(raw.reshape(t.rows, t.cols // 32 * 18))
            if int(parts[3]) == s.experts - 1:
                q4 = gguf.GGMLQuantizationType.Q4_0
                w.add_tensor(gname, np.stack(experts.pop(gname)), raw_dtype=q4)
            continue
        add_m_tensor(w, gname, raw, t)
    finish_gguf(w, tmp, path)


def _in_child(fn: Any, *args: Any) -> tuple[Any, float]:
    """fn(*args) in a fresh process: (its result, its peak RSS in GB)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_run_measured, (fn, *args))  # type: ignore[no-any-return]


def _run_measured(fn: Any, *args: Any) -> tuple[Any, float]:
    res = fn(*args)
    # VmHWM: this process's own peak (ru_maxrss would include the parent's, kept over exec)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return res, hwm / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=["30b-a3b", "8b"], default=["30b-a3b", "8b"])
    ap.add_argument("--moe-layers", type=int, default=8, help="of Qwen3-30B-A3B's 48")
    ap.add_argument("--dense-layers", type=int, default=36, help="of Qwen3-8B's 36")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dllama-bench"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for key in args.shapes:
        s = shapes(args.moe_layers, args.dense_layers)[key]
        m_path, g_path = args.dir / f"{s.name}-q40.m", args.dir / f"{s.name}-q4_0.gguf"
        write_random_model(fields(s), m_path)
        write_gguf(s, m_path, g_path)
        for n in args.threads:
            ours, refs, bws = [], [], []
            for _ in range(args.repeat):
                bws.append(read_bandwidth(n))
                ours.append(_in_child(time_dllama, m_path, n, args.tokens))
                refs.append(_in_child(time_llamacpp, g_path, n, args.tokens))
                print(f"{s.name} {n}t: dllama {ours[-1][0][0]:.1f} ms/token "
                      f"(rss {ours[-1][1]:.2f} GB), llama.cpp {refs[-1][0]:.1f} ms/token "
                      f"(rss {refs[-1][1]:.2f} GB), bandwidth {bws[-1] / 1e9:.1f} GB/s",
                      flush=True)  # fmt: skip
            (ms, _pre, kernels, nbytes), rss = min(ours, key=lambda r: r[0][0])
            ref, ref_rss = min(refs, key=lambda r: r[0])
            med = statistics.median(r[0][0] for r in ours)
            med_ref = statistics.median(r[0] for r in refs)
            pre = [_in_child(time_dllama_prefill, m_path, n, args.prefill)[0]]
            pre_ref = [_in_child(time_llamacpp_prefill, g_path, n, args.prefill, s.vocab)[0]]
            floor = nbytes / max(bws) * 1000
            rows.append((s.name, n, kernels, ms, ref, nbytes, floor, pre[0], pre_ref[0], rss,
                         ref_rss, med, med_ref))  # fmt: skip
    print()
    print("| shape | threads | kernels | dllama ms/token best (median) | llama.cpp ms/token "
          "best (median) | ratio best (medians) | weight MB/token | floor ms | floor / dllama "
          "| prefill tok/s dllama / llama.cpp | peak RSS GB dllama / llama.cpp |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, kern, ms, ref, nb, floor, pre, pre_ref, rss, ref_rss, med, med_ref in rows:
        print(f"| {name} | {n} | {kern} | {ms:.1f} ({med:.1f}) | {ref:.1f} ({med_ref:.1f}) | "
              f"{ms / ref:.2f} ({med / med_ref:.2f}) | {nb / 1e6:.0f} | {floor:.1f} | "
              f"{floor / ms:.2f} | {pre:.1f} / {pre_ref:.1f} | {rss:.2f} / {ref_rss:.2f} |")  # fmt: skip
    print(f"\n{statistics.mean([r[3] / r[4] for r in rows]):.2f} mean ratio dllama / llama.cpp")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
