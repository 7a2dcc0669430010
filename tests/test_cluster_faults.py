"""Faults with real processes: a worker killed mid-generation, the root
killed, garbage / an old protocol version / a wrong secret, a port in use, an unreachable
worker, a worker with another model. Each gives one clear message; workers keep serving."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from cluster_utils import Worker, dllama_cmd, free_port, write_random_model
from dllama import AuthenticationError, ProtocolError, _core
from test_cluster import mistral_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model slow enough (~10 ms/token) to be caught mid-generation, and another one of the
    same shape with other weights."""
    d = tmp_path_factory.mktemp("faults")
    kw = {"dim": 512, "hidden": 1536, "layers": 6, "heads": 8, "kv_heads": 4, "max_seq_len": 1024}
    a = write_random_model(d / "a.m", seed=1, **kw)  # type: ignore[arg-type]
    b = write_random_model(d / "b.m", seed=2, **kw)  # type: ignore[arg-type]
    return a, b


def root_cmd(
    model: Path, *workers: str, steps: int = 900, extra: tuple[str, ...] = ()
) -> list[str]:
    return dllama_cmd(
        "run", "--model", str(model), "--tokenizer", str(mistral_tokenizer()),
        "--prompt", "The cluster", "--steps", str(steps), "--temperature", "0",
        "--json", "--workers", *workers, *extra,
    )  # fmt: skip


def start_root(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def first_token(root: subprocess.Popen[str]) -> str:
    assert root.stdout is not None
    line = root.stdout.readline()
    assert line.startswith("{"), line
    return line


def finish(root: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    _, err = root.communicate(timeout=timeout)
    return root.returncode, err


def run_root(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    return p.returncode, p.stderr


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("error:")]


def test_worker_killed_mid_generation_stops_the_root_naming_it(models: tuple[Path, Path]) -> None:
    model, _ = models
    with Worker(model=model) as w1, Worker() as w2:
        root = start_root(root_cmd(model, w1.addr, w2.addr))
        first_token(root)
        # freeze worker 2 so the root is surely mid-generation, then kill it
        w2.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        w2.proc.kill()
        t0 = time.monotonic()
        code, err = finish(root, timeout=30)
        assert time.monotonic() - t0 < 5
        assert code != 0
        assert "Traceback" not in err
        errs = error_lines(err)
        assert len(errs) == 1, err
        assert f"worker 2 ({w2.addr})" in errs[0], errs
        # the surviving worker saw its root go and listens again
        w1.wait_for("listening again")


def test_root_killed_the_worker_says_so_and_serves_the_next_root(
    models: tuple[Path, Path],
) -> None:
    model, _ = models
    with Worker() as w:
        root = start_root(root_cmd(model, w.addr))
        first_token(root)
        root.send_signal(signal.SIGSTOP)
        root.kill()
        root.communicate(timeout=10)
        line = w.wait_for("went away")
        assert "listening again" in line
        # a new root can use it at once
        code, err = run_root(root_cmd(model, w.addr, steps=4))
        assert code == 0, err
        w.wait_for("finished after")
        assert w.count("connected: node 1 of 2") == 2


def refusal(addr: str, payload: bytes) -> tuple[int, str]:
    """Send `payload` raw, read the worker's answer frame: (kind, reason)."""
    host, port = addr.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(payload)
        head = b""
        while len(head) < 5:
            chunk = s.recv(5 - len(head))
            assert chunk, "closed without a refusal"
            head += chunk
        kind, n = head[0], struct.unpack("<I", head[1:])[0]
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            assert chunk
            body += chunk
        return kind, body.decode()


def test_garbage_old_version_and_wrong_secret_are_refused_and_logged(
    models: tuple[Path, Path],
) -> None:
    model, _ = models
    with Worker(model=model, secret="s3cret") as w:
        assert refusal(w.addr, b"GET / HTTP/1.1\r\n\r\n") == (6, "not a dllama root (bad magic)")
        w.wait_for("bad magic")
        kind, why = refusal(w.addr, b"DLMA" + struct.pack("<I", 0))
        assert kind == 6 and "protocol version 0 is not supported" in why
        assert f"speaks version {_core.PROTOCOL_VERSION}" in why
        w.wait_for("protocol version 0")

        code, err = run_root(root_cmd(model, w.addr, steps=2, extra=("--secret", "wrong")))
        assert code == 1 and "wrong shared secret" in err and "worker 1" in err, err
        w.wait_for("wrong shared secret")
        code, err = run_root(root_cmd(model, w.addr, steps=2))
        assert code == 1 and "requires a shared secret" in err, err
        assert "Traceback" not in err

        # the Python API raises the matching classes
        with pytest.raises(AuthenticationError, match="wrong shared secret"):
            _core.Node(str(model), workers=[w.addr], secret="wrong")
        with pytest.raises(AuthenticationError, match="requires a shared secret"):
            _core.Node(str(model), workers=[w.addr])

        # still serving: the right secret from the environment works
        env = dict(os.environ, DLLAMA_SECRET="s3cret")
        code, err = run_root(root_cmd(model, w.addr, steps=2), env=env)
        assert code == 0, err
        assert w.proc.poll() is None


def test_port_in_use_is_named() -> None:
    with Worker() as w:
        p = subprocess.run(
            dllama_cmd("serve-worker", "--host", "127.0.0.1", "--port", str(w.port)),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert p.returncode == 1
        assert f"port {w.port} is already in use" in p.stderr, p.stderr


def test_unreachable_worker_is_named(models: tuple[Path, Path]) -> None:
    model, _ = models
    addr = f"127.0.0.1:{free_port()}"
    code, err = run_root(root_cmd(model, addr, steps=2))
    assert code == 1
    assert error_lines(err) == [
        (
            f"error: cannot reach worker 1 ({addr}): connection refused: "
            "is `dllama serve-worker` running there, on that port?"
        )
    ], err
    with pytest.raises(ConnectionError, match="cannot reach worker 1"):
        _core.Node(str(model), workers=[addr])


def test_worker_with_another_model_refuses_and_keeps_serving(models: tuple[Path, Path]) -> None:
    model, other = models
    with Worker(model=other) as w:
        code, err = run_root(root_cmd(model, w.addr, steps=2))
        assert code == 1
        assert "wrong model" in err and "different weights" in err and "worker 1" in err, err
        w.wait_for("wrong model")
        with pytest.raises(ProtocolError, match="wrong model"):
            _core.Node(str(model), workers=[w.addr])
        code, err = run_root(root_cmd(other, w.addr, steps=2))
        assert code == 0, err


def test_a_node_count_that_does_not_fit_lists_the_valid_counts(models: tuple[Path, Path]) -> None:
    model, _ = models  # 4 KV heads: 1 to 4 nodes
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(4)]
    code, err = run_root(root_cmd(model, *addrs, steps=2))
    assert code == 1
    assert "5 nodes" in err and "valid node counts: 1, 2, 3, 4" in err, err
