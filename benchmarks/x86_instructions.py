"""Instructions per generated token on x86_64, counted by valgrind's callgrind (where the VM
gives no hardware counters to `perf stat`), and per 32-weight block of the matmuls.

Counts the whole process twice, generating A and B tokens after the same prompt; the
difference over B − A is the cost of one decode step (the start-up, the model load and the
prefill cancel out). One thread, so every instruction of a step is on the counted path.

    python benchmarks/x86_instructions.py                  # the default model (SmolLM2, Q80)
    python benchmarks/x86_instructions.py --q40            # the same converted to Q40 weights
    python benchmarks/x86_instructions.py --kernels scalar # DLLAMA_KERNELS

Needs valgrind (`apt-get install valgrind`); about 2 minutes per model and kernel path.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STEP_CODE = """
import sys
from dllama.generate import LLM
llm = LLM(sys.argv[1], sys.argv[2], nthreads=1, max_seq_len=64)
tokens = llm.encode("The Raspberry Pi is")
llm.node.forward(tokens, 0)
pos = len(tokens)
for i in range(int(sys.argv[3])):
    llm.node.forward([tokens[-1]], pos + i)
print(llm.node.kernels, llm.node.weight_bytes_per_token)
"""


def count(model: Path, tok: Path, steps: int, kernels: str, out: Path) -> tuple[int, str]:
    """Total instructions (callgrind's Ir) of a process running `steps` decode steps."""
    env = dict(os.environ, DLLAMA_KERNELS=kernels)
    r = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-c",
            STEP_CODE,
            str(model),
            str(tok),
            str(steps),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    m = re.search(r"Collected\s*:\s*(\d+)", r.stderr) or re.search(
        r"^summary:\s*(\d+)", out.read_text(), re.MULTILINE
    )
    assert m, r.stderr[-2000:]
    return int(m.group(1)), r.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--q40", action="store_true", help="Q40 weights instead of Q80")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--steps", type=int, nargs=2, default=(2, 6), metavar=("A", "B"))
    args = ap.parse_args()
    from dllama import models

    model, tok = models.default_model(progress=False)
    if args.q40:
        from dllama.convert import convert_gguf

        gguf = models.smollm2_gguf()
        assert gguf is not None
        q40 = models.cache_dir() / "smollm2-135m-instruct-q40.m"
        if not q40.exists():
            convert_gguf(gguf, q40, models.cache_dir() / "smollm2-q40.t", "q40", progress=False)
        model = q40
    with tempfile.TemporaryDirectory() as d:
        a, b = args.steps
        ia, info = count(model, tok, a, args.kernels, Path(d) / "a.out")
        ib, _ = count(model, tok, b, args.kernels, Path(d) / "b.out")
    path, wbytes = info.split()
    per_token = (ib - ia) / (b - a)
    block = 18 if args.q40 else 34
    blocks = int(wbytes) / block
    print(
        f"{model.name}, kernels {path}, 1 thread: {per_token / 1e6:.1f} M instructions per "
        f"token, {per_token / blocks:.2f} per 32-weight block of the matmuls "
        f"({blocks / 1e6:.2f} M blocks, {int(wbytes) / 1e6:.0f} MB per token)"
    )


if __name__ == "__main__":
    main()
