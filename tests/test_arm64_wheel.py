"""The aarch64 wheel, installed in an arm64 Debian root and run under qemu-user as on a Pi.

scripts/test.sh builds the wheel (scripts/build-wheels.sh aarch64), prepares the root and
installs the wheel into it (scripts/arm64-root.sh), then sets DLLAMA_ARM64_WHEEL (the
installed wheel's id) for this module; without it the module is skipped. The default model (SmolLM2-135M-Instruct, Q80
weights), converted on the host, is bound read-only into the root.

- `dllama --version` there prints the host's version.
- `dllama run --temperature 0` on a Pi 4 (QEMU_CPU=cortex-a72) with DLLAMA_KERNELS=scalar:
  the greedy tokens equal the x86_64 scalar run's exactly (the same portable code).
- The same on a Pi 4 with its NEON kernels and on a Pi 5 (cortex-a76, NEON + sdot), up to the
  first near-tie. The margin rule: teacher-forced along the x86 scalar tokens, every logit
  of the aarch64 run lies within B = LOGIT_BOUND of the x86 scalar one (checked). Then an
  argmax can differ only at a step where the scalar top-1/top-2 gap is below 2·B; the greedy
  tokens must be equal at every step before the first such near-tie, and where they first
  differ (if they do) that step's gap must be below 2·(the measured maximum difference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT_SH = REPO / "scripts" / "arm64-root.sh"
PROMPT = "The Raspberry Pi is"
STEPS = 16
#: bound on |logit(aarch64 path) - logit(x86 scalar)| along the same tokens; the Q80 dots
#: are exact integers on every path, so only f32 summation order and libm differ
LOGIT_BOUND = 0.05

pytestmark = [
    pytest.mark.slow,
    # each test runs the model twice under qemu (minutes on a busy 2-core machine)
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        not os.environ.get("DLLAMA_ARM64_WHEEL"),
        reason="no arm64 root with the wheel (scripts/test.sh prepares it; "
        "DLLAMA_SKIP_AARCH64=1 skips it)",
    ),
]


@pytest.fixture(scope="module")
def model() -> tuple[Path, Path]:
    from dllama import models

    return models.default_model(progress=False)


def _greedy_cmd(model: tuple[Path, Path], m: str, t: str) -> list[str]:
    del model
    return [
        "dllama",
        "run",
        "--json",
        "--temperature",
        "0",
        "--steps",
        str(STEPS),
        "--nthreads",
        "2",
        "--max-seq-len",
        "256",
        "--model",
        m,
        "--tokenizer",
        t,
        "--prompt",
        PROMPT,
    ]


def _tokens(stdout: str) -> list[int]:
    out = []
    for line in stdout.splitlines():
        d = json.loads(line)
        if "token" in d and d["token"] >= 0:
            out.append(int(d["token"]))
    return out


def _in_root(model: tuple[Path, Path], out_dir: Path, env: dict[str, str], cmd: list[str]) -> str:
    """CMD in the arm64 root, the model dir at /mnt/model, tests at /mnt/tests, out_dir
    (writable) at /mnt/out."""
    r = subprocess.run(
        [
            "bash",
            str(ROOT_SH),
            "run",
            "-b",
            f"{model[0].parent}:/mnt/model",
            "-b",
            f"{REPO / 'tests'}:/mnt/tests",
            "-w",
            f"{out_dir}:/mnt/out",
            "env",
            *[f"{k}={v}" for k, v in env.items()],
            *cmd,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert r.returncode == 0, f"{cmd} in the arm64 root failed:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def x86_scalar(
    model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[int], npt.NDArray[np.float32]]:
    """The x86_64 scalar run: greedy tokens (the CLI) and the logits along them."""
    env = dict(os.environ, DLLAMA_KERNELS="scalar")
    m, t = str(model[0]), str(model[1])
    r = subprocess.run(
        _greedy_cmd(model, m, t), capture_output=True, text=True, env=env, check=True
    )
    tokens = _tokens(r.stdout)
    assert len(tokens) == STEPS
    out = tmp_path_factory.mktemp("x86") / "logits.npy"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "arm64_probe.py"),
            m,
            t,
            PROMPT,
            ",".join(map(str, tokens)),
            str(out),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return tokens, np.load(out)


def _arm_run(
    model: tuple[Path, Path], tmp: Path, cpu: str, kernels: str, forced: list[int]
) -> tuple[list[int], npt.NDArray[np.float32], str]:
    """On qemu -cpu CPU with DLLAMA_KERNELS=KERNELS: the greedy tokens of `dllama run`, the
    logits along `forced`, and the kernel path the node chose."""
    env = {"QEMU_CPU": cpu, "DLLAMA_KERNELS": kernels}
    m, t = f"/mnt/model/{model[0].name}", f"/mnt/model/{model[1].name}"
    tokens = _tokens(_in_root(model, tmp, env, _greedy_cmd(model, m, t)))
    probe = _in_root(
        model,
        tmp,
        env,
        [
            "python",
            "/mnt/tests/arm64_probe.py",
            m,
            t,
            PROMPT,
            ",".join(map(str, forced)),
            "/mnt/out/logits.npy",
        ],
    )
    return tokens, np.load(tmp / "logits.npy"), json.loads(probe.splitlines()[-1])["kernels"]


def test_version_in_root(model: tuple[Path, Path], tmp_path: Path) -> None:
    host = subprocess.run(["dllama", "--version"], capture_output=True, text=True, check=True)
    arm = _in_root(model, tmp_path, {"QEMU_CPU": "cortex-a72"}, ["dllama", "--version"])
    assert arm.strip() == host.stdout.strip()
    machine = _in_root(
        model, tmp_path, {}, ["python", "-c", "import platform; print(platform.machine())"]
    )
    assert machine.strip() == "aarch64"


def test_scalar_on_pi4_equals_x86_scalar(
    model: tuple[Path, Path],
    x86_scalar: tuple[list[int], npt.NDArray[np.float32]],
    tmp_path: Path,
) -> None:
    ref_tokens, ref_logits = x86_scalar
    tokens, logits, kernels = _arm_run(model, tmp_path, "cortex-a72", "scalar", ref_tokens)
    assert kernels == "scalar"
    assert tokens == ref_tokens
    diff = float(np.abs(logits - ref_logits).max())
    print(f"aarch64 scalar vs x86 scalar: max |logit diff| {diff:.3g}")
    assert diff <= LOGIT_BOUND


def near_tie_prefix(ref_logits: npt.NDArray[np.float32], margin: float) -> int:
    """Steps before the first one whose top-1/top-2 gap is below `margin` (all: none is)."""
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    gaps = top2[:, 1] - top2[:, 0]
    close = np.nonzero(gaps < margin)[0]
    return int(close[0]) if len(close) else len(gaps)


@pytest.mark.parametrize(
    "cpu, path", [("cortex-a72", "neon"), ("cortex-a76", "neon+dotprod")], ids=["pi4", "pi5"]
)
def test_neon_equals_scalar_up_to_first_near_tie(
    model: tuple[Path, Path],
    x86_scalar: tuple[list[int], npt.NDArray[np.float32]],
    tmp_path: Path,
    cpu: str,
    path: str,
) -> None:
    ref_tokens, ref_logits = x86_scalar
    tokens, logits, kernels = _arm_run(model, tmp_path, cpu, "auto", ref_tokens)
    assert kernels == path
    diff = float(np.abs(logits - ref_logits).max())
    n_sure = near_tie_prefix(ref_logits, 2 * LOGIT_BOUND)
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b),
        min(len(tokens), len(ref_tokens)),
    )
    print(
        f"{path} on {cpu}: max |logit diff| {diff:.3g}; tokens equal for {first_diff} of "
        f"{len(ref_tokens)} steps; first near-tie (gap < {2 * LOGIT_BOUND}) at step {n_sure}"
    )
    assert diff <= LOGIT_BOUND
    assert first_diff >= n_sure, (tokens, ref_tokens)
    if first_diff < len(ref_tokens):
        top2 = np.sort(ref_logits[first_diff])[-2:]
        assert top2[1] - top2[0] < 2 * diff
    else:
        assert len(tokens) == len(ref_tokens)
