"""Helpers of the cluster tests: random `.m` models, worker processes on 127.0.0.1, ports."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from dllama import _core
from typing_extensions import Self


def write_random_model(
    path: Path,
    *,
    dim: int = 128,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 8,
    kv_heads: int = 4,
    vocab: int = 32000,
    weights: str = "q40",
    seed: int = 0,
    max_seq_len: int = 256,
) -> Path:
    """A random Llama `.m` file: weights ~ U(-2, 2)/sqrt(cols) (activations of order 1, so
    the logits are well spread), norms ~ 1."""
    fields: dict[str, int | float] = {
        "version": 0,
        "arch_type": 0xABCD00,
        "dim": dim,
        "hidden_dim": hidden,
        "n_layers": layers,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": vocab,
        "max_seq_len": max_seq_len,
        "hidden_act": 1,
        "rope_theta": 10000,
        "weights_float_type": _core.FLOAT_TYPES[weights],
        "rope_type": 0,
        "head_dim": dim // heads,
        "norm_epsilon": 1e-5,
    }
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(_core.encode_model_header(fields))
        for name, rows, cols, ft, offset, nbytes in _core.model_tensors(fields):
            assert f.tell() == offset, (name, f.tell(), offset)
            if rows == 1:
                x = (1.0 + rng.uniform(-0.1, 0.1, cols)).astype(np.float32)
            else:
                x = (rng.uniform(-2.0, 2.0, (rows, cols)) / np.sqrt(cols)).astype(np.float32)
            data = _core.quantize(x.reshape(-1), ft)
            assert len(data) == nbytes, (name, len(data), nbytes)
            f.write(data)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def dllama_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dllama.cli", *args]


class Stopped:
    """A context manager that calls `stop()` on the way out."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def end_process(proc: subprocess.Popen[Any], sig: int, grace: float) -> None:
    """Sends `sig` to a running `proc`, and kills it if it has not exited within `grace` s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Worker(Stopped):
    """`dllama serve-worker` in a child process; its stderr is collected line by line."""

    def __init__(
        self,
        *,
        model: Path | None = None,
        secret: str | None = None,
        port: int | None = None,
        nthreads: int = 1,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        args = ["serve-worker", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--nthreads", str(nthreads), *extra]
        if model is not None:
            args += ["--model", str(model)]
        if secret is not None:
            args += ["--secret", secret]
        env = dict(os.environ)
        env.pop("DLLAMA_SECRET", None)
        self.proc = subprocess.Popen(
            dllama_cmd(*args), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.wait_for("listening on", timeout=30)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line)

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        """The first log line (from the start) containing `needle`, waiting for it."""
        end = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None and self._q.empty():
                self._reader.join(1)
                for line in list(self.lines):
                    if needle in line:
                        return line
                raise AssertionError(
                    f"worker exited ({self.proc.returncode}) without {needle!r}: {self.lines}"
                )
            if time.monotonic() > end:
                raise AssertionError(
                    f"no worker log line with {needle!r} in {timeout}s: {self.lines}"
                )
            try:
                self._q.get(timeout=0.1)
            except queue.Empty:
                pass

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.lines)

    def stop(self) -> None:
        end_process(self.proc, signal.SIGINT, 10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Workers(Stopped):
    """Several workers, stopped together."""

    def __init__(self, n: int, **kw: object) -> None:
        self.items: list[Worker] = []
        try:
            for _ in range(n):
                self.items.append(Worker(**kw))  # type: ignore[arg-type]
        except BaseException:
            self.stop()
            raise

    @property
    def addrs(self) -> list[str]:
        return [w.addr for w in self.items]

    def stop(self) -> None:
        for w in self.items:
            w.stop()
