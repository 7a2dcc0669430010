"""Cycles per 32-weight block of each kernel's inner loop, from llvm-mca on the compiled code.

Where seconds cannot be had (no Pi here, qemu-user does not time like the CPU it emulates),
count what the CPU must do: compile dllama-core for aarch64 (and x86_64) to assembly, find the
innermost loops of each NEON (AVX2) kernel, and let llvm-mca's model of the core schedule
them, assuming every load hits L1: the compute bound of the kernel, per 32-weight block.

CPU models (llvm-mca of LLVM 22): `neoverse-n1` is a real model of the Pi 5's core family
(Cortex-A76 and Neoverse N1 share the microarchitecture); `cortex-a72` and `cortex-a76` fall
back to the Cortex-A57 model (its resources are named `A57Unit*`), the closest there is to the
Pi 4's A72 (same pipeline family, A72 clocks higher and has a few shorter latencies). On x86
`znver3`, `znver4` (no hardware of either here now) and `sapphirerapids` (the Xeon of 7 Dec
2026).

    python benchmarks/kernel_cycles.py                 # the tables, markdown
    python benchmarks/kernel_cycles.py --asm-only out  # keep the loop bodies fed to llvm-mca

Builds with Debian's rustc-web for aarch64 (scripts/aarch64-rust.sh) and the cargo
toolchain for x86_64; needs llvm-22 (`apt-get install llvm-22`) for llvm-mca.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MCA = "/usr/lib/llvm-22/bin/llvm-mca"

#: (label, demangled-path regex, signature mnemonic regex, signature count per 32 weights)
#: The signature instructions are those the source issues a fixed number of per block,
#: so a loop's blocks per iteration = its signature count / this number, however LLVM
#: unrolled it.
AARCH64_KERNELS = [
    ("Q40×Q80 NEON (Pi 4)", r"neon::plain::matmul_q40_q80$", r"smull2?", 4),
    ("Q40×Q80 NEON+sdot (Pi 5)", r"neon::dotprod::matmul_q40_q80$", r"sdot", 2),
    # packed Q40 (8 rows per cell): one loop per token count of the tile (8 row-blocks per
    # token per iteration); the 1-token loop is generation's
    (
        "Q40×Q80 packed NEON (Pi 4)",
        r"neon::plain::(matmul_q40x8_q80|group_tile)$",
        r"smull2?|smlal2?",
        4,
    ),
    (
        "Q40×Q80 packed NEON+sdot (Pi 5)",
        r"neon::dotprod::(matmul_q40x8_q80|group_tile)$",
        r"sdot",
        2,
    ),
    ("Q80×Q80 NEON (Pi 4)", r"neon::plain::matmul_q80_q80$", r"smull2?", 4),
    ("Q80×Q80 NEON+sdot (Pi 5)", r"neon::dotprod::matmul_q80_q80$", r"sdot", 2),
    ("F32 matmul", r"neon::matmul_f32$", r"fmla", 8),
    ("F16 matmul", r"neon::(matmul_f16|dot_f16)$", r"fmla", 8),
    ("attention scores (per 32 key values)", r"neon::attn_scores$", r"fmla", 8),
    ("attention values (per 32 values)", r"neon::(attn_values|axpy)$", r"fmla", 8),
    ("softmax (per 32 scores)", r"::softmax$", r"fmla|bl|fmul|fmax", 0),
]

X86_KERNELS = [
    ("Q40×Q80 AVX2", r"maddubs::matmul_q40_q80$", r"vpmaddubsw", 1),
    ("Q40×Q80 AVX2 packed", r"maddubs::matmul_q40x8_q80$", r"vpmaddubsw", 1),
    # the VNNI packed kernels: the 1-token loop (4 groups a pass) is generation's
    ("Q40×Q80 AVX-VNNI packed", r"avxvnni::matmul_q40x8_q80$", r"vpdpbusd", 1),
    ("Q40×Q80 AVX-512 VNNI packed (256-bit)", r"avx512vnni::matmul_q40x8_q80$", r"vpdpbusd", 1),
    ("Q80×Q80 AVX2", r"avx2::matmul_q80_q80$", r"vpmaddubsw|vpdpbusd", 1),
    ("F32 matmul", r"avx2::matmul_f32$", r"vfmadd\w+ps", 4),
    ("softmax (per 32 scores)", r"avx2::softmax$", r"vfmadd\w+ps|vmulps", 0),
]


def demangle(sym: str) -> str:
    """Rust legacy mangling `_ZN` (len name)* `17h<hash>E` → `a::b::c`."""
    if not sym.startswith("_ZN"):
        return sym
    s, parts, i = sym[3:], [], 0
    while i < len(s) and s[i].isdigit():
        j = i
        while s[j].isdigit():
            j += 1
        n = int(s[i:j])
        parts.append(s[j : j + n])
        i = j + n
    if parts and re.fullmatch(r"h[0-9a-f]{16}", parts[-1]):
        parts.pop()
    return "::".join(p.replace("$LT$", "<").replace("$GT$", ">").replace("..", "::") for p in parts)


def functions(asm: str) -> dict[str, list[str]]:
    """Demangled name → the function's lines (label to `.Lfunc_end`)."""
    out: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in asm.splitlines():
        m = re.match(r"^([A-Za-z_.$][\w.$]*):", line)
        if m and not m.group(1).startswith(".L"):
            cur = []
            out[demangle(m.group(1))] = cur
            continue
        if cur is not None:
            if line.startswith(".Lfunc_end"):
                cur = None
            else:
                cur.append(line)
    return out


BRANCH = re.compile(r"^\s+(b\.\w+|b|cbn?z|tbn?z|j\w+)\s+(?:.*,\s*)?(\.LBB\w+)\s*$")
LABEL = re.compile(r"^(\.LBB\w+):")


def instructions(lines: list[str]) -> list[str]:
    """The instruction lines: no labels, directives, comments."""
    out = []
    for ln in lines:
        s = ln.split("//")[0]
        # a mnemonic, or an encoding prefix before one (`{vex}`)
        if re.match(r"^\s+([a-z]|\{)", s) and not re.match(r"^\s+\.", s):
            out.append(s.rstrip())
    return out


def mnemonic(line: str) -> str:
    """An instruction line's mnemonic, past an encoding prefix such as `{vex}`."""
    words = line.split()
    return words[1] if words[0].startswith("{") else words[0]


@dataclass
class Loop:
    body: list[str]  # instruction lines, label to backward branch inclusive


def innermost_loops(lines: list[str]) -> list[Loop]:
    """Loops closed by a backward branch that contain no other such loop."""
    labels = {}
    spans = []
    for i, ln in enumerate(lines):
        m = LABEL.match(ln)
        if m:
            labels[m.group(1)] = i
        b = BRANCH.match(ln)
        if b and b.group(2) in labels:
            spans.append((labels[b.group(2)], i))
    inner = [
        (a, z)
        for a, z in spans
        if not any(a <= a2 and z2 <= z and (a2, z2) != (a, z) for a2, z2 in spans)
    ]
    return [Loop(instructions(lines[a : z + 1])) for a, z in inner]


def mca(body: list[str], triple: str, cpu: str, mattr: str) -> tuple[float, str]:
    """llvm-mca cycles per iteration of `body`, and its resource names."""
    src = ("\t.text\n" if triple.startswith("x86") else "") + "\n".join(body) + "\n"
    args = [MCA, f"-mtriple={triple}", f"-mcpu={cpu}", "-iterations=200", "-resource-pressure"]
    if mattr:
        args.append(f"-mattr={mattr}")
    r = subprocess.run(args, check=False, input=src, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llvm-mca -mcpu={cpu}: {r.stderr.strip()[:300]}")
    it = int(re.search(r"Iterations:\s+(\d+)", r.stdout).group(1))  # type: ignore[union-attr]
    cyc = int(re.search(r"Total Cycles:\s+(\d+)", r.stdout).group(1))  # type: ignore[union-attr]
    res = re.findall(r"^\[\d+(?:\.\d+)?\]\s+-\s+(\w+)", r.stdout, re.MULTILINE)
    unit = res[0].rstrip("B").replace("Unit", "") if res else "?"
    return cyc / it, unit


def build_asm(target: str) -> str:
    """Assembly of dllama-core's lib for `target` (fastbuild profile, one codegen unit)."""
    env = dict(os.environ, CARGO_INCREMENTAL="0")
    tdir = ROOT / "target" / "kernel-cycles"
    env["CARGO_TARGET_DIR"] = str(tdir)
    if target.startswith("aarch64"):
        out = subprocess.run(
            [
                "bash",
                "-c",
                '. scripts/aarch64-rust.sh && aarch64_rust >&2 && echo "$AARCH64_RUSTFLAGS"',
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        env["RUSTC"] = "/usr/bin/rustc"
        env["CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS"] = out
    for old in glob.glob(str(tdir / target / "fastbuild" / "deps" / "dllama_core-*.s")):
        os.unlink(old)
    # cargo emits the assembly only when it compiles the crate: forget the last build
    for fp in glob.glob(str(tdir / target / "fastbuild" / ".fingerprint" / "dllama-core-*")):
        shutil.rmtree(fp)
    subprocess.run(
        [
            "cargo",
            "rustc",
            "-q",
            "-p",
            "dllama-core",
            "--lib",
            "--profile",
            "fastbuild",
            "--target",
            target,
            "--",
            "--emit",
            "asm",
            "-C",
            "codegen-units=1",
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    (s,) = glob.glob(str(tdir / target / "fastbuild" / "deps" / "dllama_core-*.s"))
    return Path(s).read_text()


@dataclass
class Row:
    label: str
    desc: str
    instr_per_block: float
    blocks_per_iter: float
    cycles: list[str]  # per block, one per CPU model (or the error)


def measure(
    asm: str,
    kernels: list[tuple[str, str, str, int]],
    triple: str,
    cpus: list[tuple[str, str, str]],
    keep: Path | None = None,
) -> list[Row]:
    funcs = functions(asm)
    rows = []
    for label, pat, sig, per_block in kernels:
        names = [n for n in funcs if re.search(pat, n)]
        if not names:
            rows.append(Row(label, f"not found ({pat})", 0, 0, [""] * len(cpus)))
            continue
        for name in names:
            for k, loop in enumerate(innermost_loops(funcs[name])):
                mnems = [mnemonic(ln) for ln in loop.body]
                n_sig = sum(1 for m in mnems if re.fullmatch(sig, m))
                if n_sig == 0:
                    continue
                calls = [
                    ln.split()[-1] for ln in loop.body if mnemonic(ln) in ("bl", "call", "callq")
                ]
                if per_block == 0:  # an elementwise loop: elements per iteration / 32
                    blocks = _elements_per_iter(loop.body) / 32
                else:
                    blocks = n_sig / per_block
                if blocks <= 0:
                    continue
                short = name.split("::")[-2] + "::" + name.split("::")[-1]
                desc = f"{short} #{k}: {len(loop.body)} instr, {blocks:g} blocks/iter"
                if calls:
                    desc += ", calls " + ", ".join(sorted(set(calls))) + " (not modelled)"
                cells = []
                for _, cpu, mattr in cpus:
                    try:
                        c, _unit = mca(loop.body, triple, cpu, mattr)
                        cells.append(f"{c / blocks:.1f}")
                    except RuntimeError as e:
                        cells.append(f"({str(e)[:60]})")
                rows.append(Row(label, desc, len(loop.body) / blocks, blocks, cells))
                if keep:
                    keep.mkdir(parents=True, exist_ok=True)
                    fname = re.sub(r"\W+", "_", f"{triple}_{short}_{k}") + ".s"
                    (keep / fname).write_text("\n".join(loop.body) + "\n")
    return rows


def table(rows: list[Row], cpus: list[tuple[str, str, str]]) -> list[str]:
    out = [
        "| kernel | loop | instructions / block | "
        + " | ".join(f"{title} cycles / block" for title, _, _ in cpus)
        + " |",
        "|---|---|---|" + "---|" * len(cpus),
    ]
    for r in rows:
        out.append(
            f"| {r.label} | {r.desc} | {r.instr_per_block:.1f} | " + " | ".join(r.cycles) + " |"
        )
    return out


AARCH64_CPUS = [
    ("Pi 4 (cortex-a72 → A57 model)", "cortex-a72", "+dotprod"),
    ("Pi 5 (neoverse-n1 model)", "neoverse-n1", ""),
]


def q40_cycles_per_block() -> tuple[float, float]:
    """Q40×Q80 cycles per block of generation's kernel, the packed one for one token (8 rows
    per iteration): (Pi 4 without sdot, Pi 5 with)."""
    asm = build_asm("aarch64-unknown-linux-gnu")
    packed = [k for k in AARCH64_KERNELS if k[0].startswith("Q40×Q80 packed")]
    rows = measure(asm, packed, "aarch64-linux-gnu", AARCH64_CPUS)
    (pi4,) = [r for r in rows if "(Pi 4)" in r.label and r.blocks_per_iter == 8]
    (pi5,) = [r for r in rows if "sdot" in r.label and r.blocks_per_iter == 8]
    return float(pi4.cycles[0]), float(pi5.cycles[1])


def _elements_per_iter(body: list[str]) -> float:
    """f32 elements a one-pass loop handles per iteration, from its pointer increment."""
    for ln in body:
        m = re.match(r"\s+add\s+x\d+,\s*x\d+,\s*#(\d+)", ln) or re.match(
            r"\s+addq?\s+\$(\d+),\s*%r\w+", ln
        )
        if m:
            return int(m.group(1)) / 4
    vec = any(re.search(r"\.4s|%ymm|%xmm", ln) for ln in body)
    return 4.0 if vec else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--asm-only", type=Path, default=None, help="also write each loop body here")
    ap.add_argument("--no-x86", action="store_true")
    ap.add_argument("--no-aarch64", action="store_true")
    args = ap.parse_args()
    if not shutil.which(MCA):
        sys.exit(f"{MCA} not found: apt-get install llvm-22")
    if not args.no_aarch64:
        print("## aarch64 (llvm-mca; A57 = the Cortex-A57 model cortex-a72/-a76 fall back to)\n")
        asm = build_asm("aarch64-unknown-linux-gnu")
        rows = measure(asm, AARCH64_KERNELS, "aarch64-linux-gnu", AARCH64_CPUS, args.asm_only)
        print("\n".join(table(rows, AARCH64_CPUS)))
    if not args.no_x86:
        print("\n## x86_64 (llvm-mca)\n")
        asm = build_asm("x86_64-unknown-linux-gnu")
        cpus = [
            ("Zen 3 (znver3)", "znver3", ""),
            ("Zen 4 (znver4)", "znver4", ""),
            ("Sapphire Rapids (sapphirerapids)", "sapphirerapids", ""),
        ]
        rows = measure(asm, X86_KERNELS, "x86_64-unknown-linux-gnu", cpus, args.asm_only)
        print("\n".join(table(rows, cpus)))


if __name__ == "__main__":
    main()
