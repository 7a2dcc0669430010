"""`dllama serve` in a child process on a free port, for the server tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cluster_utils import Stopped, end_process, free_port


class Server(Stopped):
    """``dllama serve ARGS`` on 127.0.0.1:<free port>; ``url`` once /health answers."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"dllama-serve-{self.port}.log"
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        full_env.pop("DLLAMA_API_KEY", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dllama.cli", "serve", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"dllama serve exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"dllama serve did not answer in {timeout}s: {self.output()}")

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")

    def health(self) -> dict[str, object]:
        r = httpx.get(self.url + "/health", timeout=10)
        r.raise_for_status()
        out: dict[str, object] = r.json()
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict[str, object]:
        """/health once the model is neither busy nor has a queue (a cancelled request ends
        at its next token)."""
        end = time.monotonic() + timeout
        while True:
            h = self.health()
            if not h["busy"] and h["queued"] == 0:
                return h
            if time.monotonic() > end:
                raise AssertionError(f"the server stayed busy for {timeout}s: {h}")
            time.sleep(0.1)

    def stop(self) -> None:
        end_process(self.proc, signal.SIGTERM, 20)
        self._log.close()
        self.log.unlink(missing_ok=True)
