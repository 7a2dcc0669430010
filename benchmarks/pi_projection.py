"""A PROJECTION of dllama's generation speed on Raspberry Pi 4 and 5 clusters (no Pi measured).

Per token and node, from the model's shapes (Q40 weights, Q80 activations, as distributed-llama
runs them), each node holding 1/N of every matmul (tensor parallelism, the root also the
classifier's share):

- memory time = the weight bytes the node reads ÷ the Pi's memory read bandwidth;
- compute time = the node's 32-weight blocks × the kernel's cycles per block (llvm-mca's model
  of the core, `kernel_cycles.py`, all loads hitting L1) ÷ (clock × 4 cores);
- the node's time = max(memory, compute) when loads and arithmetic overlap (the kernels
  prefetch), up to memory + compute when they do not: both are shown;
- network (N > 1) = per layer two Q80 activation exchanges between the root and every worker
  (docs/PROTOCOL.md's byte counts): the root's link carries Σ over workers at Gigabit
  Ethernet's ≈ 117 MB/s each way, plus 2 · layers round trips of RTT (stated below).

Attention, norms, RoPE and the softmax are left out (at short contexts under 2% of the
matmul work on these shapes); threads are assumed to scale perfectly over 4 cores.

    python benchmarks/pi_projection.py                          # measures the cycles first
    python benchmarks/pi_projection.py --cycles-pi4 9.0 --cycles-pi5 3.0   # or takes them
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

Q40_BLOCK, Q80_BLOCK, QK = 18, 34, 32
GBE = 117e6  # bytes/s of Gigabit Ethernet payload, each direction


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    hidden: int  # FFN hidden size (per expert for a mixture of experts)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts_active: int = 0  # 0: dense

    def matmul_weights(self) -> int:
        """Weights read per token by the matmuls (active experts only; classifier included)."""
        q = self.dim * self.heads * self.head_dim
        kv = 2 * self.dim * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.dim
        ffn = 3 * self.dim * self.hidden * max(self.experts_active, 1)
        return self.layers * (q + kv + o + ffn) + self.vocab * self.dim


@dataclass(frozen=True)
class Pi:
    name: str
    clock_hz: float
    cores: int
    # memory read bandwidth, bytes/s: (low, high) of the published figures
    bandwidth: tuple[float, float]
    ram_gb: int  # the largest model sold


LLAMA2_7B = Shape("Llama 2 7B", 4096, 11008, 32, 32, 32, 128, 32000)
LLAMA2_13B = Shape("Llama 2 13B", 5120, 13824, 40, 40, 40, 128, 32000)
LLAMA31_8B = Shape("Llama 3.1 8B", 4096, 14336, 32, 32, 8, 128, 128256)
# 128 experts, 8 active per token, expert FFN 768; all weights = 30.5 B
QWEN3_30B_A3B = Shape("Qwen3-30B-A3B (MoE)", 2048, 768, 48, 32, 4, 128, 151936, experts_active=8)
QWEN3_30B_TOTAL_WEIGHTS = 30.5e9

# Pi 4: Cortex-A72 at 1.8 GHz (Pi 4 boards since 2020, Pi 400), LPDDR4-3200 on a 32-bit bus;
# tinymembench copy runs report 2.8-4 GB/s. Pi 5: Cortex-A76 at 2.4 GHz, LPDDR4X-4267,
# about 5-6 GB/s copy and up to ~11 GB/s read reported.
PI4 = Pi("Pi 4", 1.8e9, 4, (2.8e9, 4.0e9), 8)
PI5 = Pi("Pi 5", 2.4e9, 4, (5.0e9, 11.0e9), 16)

# distributed-llama's published figures (README, Pi 4 8 GB cluster, Q40 weights, Q80 buffer):
# ms/token on 1, 2, 4 nodes
PUBLISHED = {
    ("Llama 2 7B", "Pi 4"): {1: 1322.0, 2: 825.0, 4: 512.0},
    ("Llama 2 13B", "Pi 4"): {2: 1443.0, 4: 837.0},
}


def network_s(s: Shape, nodes: int, rtt_s: float) -> float:
    """Root-link transfer of one token's exchanges, plus the round trips."""
    if nodes == 1:
        return 0.0
    workers = nodes - 1
    q80 = s.dim // QK * Q80_BLOCK
    to_worker = 13 + 4 * s.dim + 2 * s.layers * q80
    from_worker = 2 * s.layers * q80 + 4 * (s.vocab // nodes)
    link = max(to_worker, from_worker) * workers / GBE  # full duplex: the larger direction
    return link + 2 * s.layers * rtt_s


def project(
    s: Shape, pi: Pi, nodes: int, cycles_per_block: float, rtt_s: float
) -> tuple[float, float, float, float, float]:
    """(memory ms at high / low bandwidth, compute ms, network ms, weight GB per node)."""
    blocks = s.matmul_weights() / QK / nodes
    node_bytes = blocks * Q40_BLOCK
    mem_hi = node_bytes / pi.bandwidth[1]
    mem_lo = node_bytes / pi.bandwidth[0]
    compute = blocks * cycles_per_block / (pi.clock_hz * pi.cores)
    return (
        mem_hi * 1e3,
        mem_lo * 1e3,
        compute * 1e3,
        network_s(s, nodes, rtt_s) * 1e3,
        node_bytes / 1e9,
    )


def stored_gb(s: Shape, nodes: int) -> float:
    """Weights each node stores (Q40; the MoE all experts), GB."""
    total = QWEN3_30B_TOTAL_WEIGHTS if s.experts_active else s.matmul_weights()
    return total * Q40_BLOCK / QK / nodes / 1e9


def table(cycles_pi4: float, cycles_pi5: float, rtt_ms: float) -> str:
    rows = [
        "| model | Pi | nodes | weights read / node (GB) | memory ms (high–low bandwidth) "
        + "| compute ms | network ms | **projected ms/token** | distributed-llama published |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, pi, cyc in [
        (LLAMA2_7B, PI4, cycles_pi4),
        (LLAMA2_13B, PI4, cycles_pi4),
        (LLAMA31_8B, PI5, cycles_pi5),
        (QWEN3_30B_A3B, PI5, cycles_pi5),
    ]:
        for n in (1, 2, 4):
            mem_hi, mem_lo, comp, net, gb = project(s, pi, n, cyc, rtt_ms / 1e3)
            fits = stored_gb(s, n) < pi.ram_gb - 1  # ~1 GB for the OS, KV cache, buffers
            best = max(mem_hi, comp) + net
            worst = mem_lo + comp + net
            pub = PUBLISHED.get((s.name, pi.name), {}).get(n)
            proj = (
                f"**{best:.0f}–{worst:.0f}**"
                if fits
                else (
                    f"({best:.0f}–{worst:.0f}; {stored_gb(s, n):.1f} GB per node does not fit "
                    f"a {pi.ram_gb} GB {pi.name})"
                )
            )
            rows.append(
                f"| {s.name} | {pi.name} | {n} | {gb:.2f} | {mem_hi:.0f}–{mem_lo:.0f} | "
                f"{comp:.0f} | {net:.1f} | {proj} | {f'{pub:.0f}' if pub else '—'} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cycles-pi4",
        type=float,
        default=None,
        help="Q40×Q80 NEON cycles per block (Pi 4, no sdot); default: measure",
    )
    ap.add_argument(
        "--cycles-pi5",
        type=float,
        default=None,
        help="Q40×Q80 NEON+sdot cycles per block (Pi 5); default: measure",
    )
    ap.add_argument(
        "--rtt-ms",
        type=float,
        default=0.25,
        help="round trip between two Pis on one Gigabit switch",
    )
    args = ap.parse_args()
    c4, c5 = args.cycles_pi4, args.cycles_pi5
    if c4 is None or c5 is None:
        from kernel_cycles import q40_cycles_per_block

        m4, m5 = q40_cycles_per_block()
        c4 = m4 if c4 is None else c4
        c5 = m5 if c5 is None else c5
    print(
        f"PROJECTION (no Pi measured): Q40×Q80 {c4:.2f} cycles/block on the Pi 4 "
        f"(A57 model, packed Q40, one token, no sdot), {c5:.2f} on the Pi 5 (Neoverse N1 "
        f"model, packed, sdot); "
        f"RTT {args.rtt_ms} ms; GbE {GBE / 1e6:.0f} MB/s\n"
    )
    print(table(c4, c5, args.rtt_ms))


if __name__ == "__main__":
    main()
