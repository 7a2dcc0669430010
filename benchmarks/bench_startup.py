"""Start-up: wall time from launching `dllama run` to its first generated token (issue 5 §4).

Runs `dllama run --json --steps 1` on the random 7B-shape Q40 model of `bench_single.py`
(in --dir; run that script first to write it) with a 32000-token SentencePiece tokenizer,
--runs times with --gap seconds between runs, and prints each time and the median. The time is
taken when the first JSON line of a generated token reaches our pipe, so it covers the Python
start, the imports, the tokenizer, loading (and repacking) the weights and the prefill.

The file is read once first, so it is in the page cache as the target says. On a VM the
anonymous memory the weights are repacked into may come fresh from the host, which makes
back-to-back runs faster than runs a few seconds apart: --gap keeps the runs apart.

Run: `python benchmarks/bench_startup.py` (about a minute). Not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def default_tokenizer() -> Path | None:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    return p if p.exists() else None


def first_token_s(cmd: list[str]) -> float:
    """Seconds from starting `cmd` to its first JSON line with a generated token."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    elapsed = None
    for line in proc.stdout:
        d = json.loads(line)
        if elapsed is None and int(d.get("token", -1)) >= 0:
            elapsed = time.perf_counter() - t0
    if proc.wait() != 0 or elapsed is None:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("/tmp/dllama-bench/llama2-7b-q40.m"))
    ap.add_argument("--tokenizer", type=Path, default=default_tokenizer())
    ap.add_argument("--nthreads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gap", type=float, default=5.0, help="seconds between runs")
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model} not found: run benchmarks/bench_single.py first")
    if args.tokenizer is None:
        raise SystemExit("no tokenizer: pass --tokenizer (a 32000-token SentencePiece model)")
    exe = shutil.which("dllama") or sys.exit("the dllama command is not installed")
    with open(args.model, "rb") as f:  # into the page cache
        while f.read(1 << 24):
            pass
    cmd = [
        exe,
        "run",
        "--model",
        str(args.model),
        "--tokenizer",
        str(args.tokenizer),
        "--prompt",
        "Hello",
        "--steps",
        "1",
        "--temperature",
        "0",
        "--nthreads",
        str(args.nthreads),
        "--max-seq-len",
        "256",
        "--json",
    ]
    times = []
    for i in range(args.runs):
        if i:
            time.sleep(args.gap)
        times.append(first_token_s(cmd))
        print(f"run {i + 1}: {times[-1]:.2f} s to the first token", flush=True)
    print(
        f"start-up, {args.model.name}, {args.nthreads} threads: median {statistics.median(times):.2f} s"
        f" (min {min(times):.2f}, max {max(times):.2f}) over {len(times)} runs"
    )


if __name__ == "__main__":
    main()
