"""Start-up: wall time from launching `dllama run` to its first generated token.

Runs `dllama run --json --steps 1` on the random 7B-shape Q40 model of `bench_single.py`
(in --dir; run that script first to write it) with a 32000-token SentencePiece tokenizer,
--runs times with --gap seconds between runs, and prints each time and the median. The time is
taken when the first JSON line of a generated token reaches our pipe, so it covers the Python
start, the imports, the tokenizer, loading (and repacking) the weights and the prefill.

The file is read once first, so it is in the page cache as the target says. On a VM the
anonymous memory the weights are repacked into may come fresh from the host, which makes
back-to-back runs faster than runs a few seconds apart: --gap keeps the runs apart.

With --cluster it instead times a root and one worker (`dllama serve-worker` on loopback, 1
thread each), the worker once with its own copy of the file and once with the weights shipped
by the root (a fresh worker per run).

Run: `python benchmarks/bench_startup.py [--cluster]` (about a minute). Not a test.
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


def start_worker(port: int, model: Path | None) -> subprocess.Popen[str]:
    """A 1-thread worker on loopback; with `model` it maps its own copy, else the root ships."""
    args = [sys.executable, "-m", "dllama.cli", "serve-worker", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--nthreads", "1"]
    if model is not None:
        args += ["--model", str(model)]
    w = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    assert w.stderr is not None
    line = w.stderr.readline()
    if "listening on" not in line:
        w.kill()
        raise SystemExit(f"worker did not start: {line}")
    return w


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=Path("/tmp/dllama-bench/llama2-7b-q40.m"))
    ap.add_argument("--tokenizer", type=Path, default=default_tokenizer())
    ap.add_argument("--nthreads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gap", type=float, default=5.0, help="seconds between runs")
    ap.add_argument("--cluster", action="store_true", help="root + 1 worker, 1 thread each")
    ap.add_argument("--port", type=int, default=29871)
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
    if not args.cluster:
        report(f"{args.nthreads} threads", cmd, args)
        return
    cmd[cmd.index("--nthreads") + 1] = "1"
    cmd += ["--workers", f"127.0.0.1:{args.port}"]
    for what, model in (("local", args.model), ("shipped", None)):
        report(f"root + worker, {what} weights, 1 thread each", cmd, args, (model,))


def report(
    label: str, cmd: list[str], args: argparse.Namespace, worker: tuple[Path | None] | None = None
) -> None:
    """Time --runs launches of `cmd`; with `worker` = (model or None,), a fresh worker each."""
    times = []
    for i in range(args.runs):
        if i:
            time.sleep(args.gap)
        w = start_worker(args.port, worker[0]) if worker is not None else None
        try:
            times.append(first_token_s(cmd))
        finally:
            if w is not None:
                w.terminate()
                w.wait(30)
        print(f"{label}, run {i + 1}: {times[-1]:.2f} s to the first token", flush=True)
    print(
        f"start-up, {args.model.name}, {label}: median {statistics.median(times):.2f} s"
        f" (min {min(times):.2f}, max {max(times):.2f}) over {len(times)} runs",
        flush=True,
    )


if __name__ == "__main__":
    main()
