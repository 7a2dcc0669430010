"""Hostile peers against real `dllama serve-worker` processes: a Setup with absurd sizes, a
Tensor frame announcing 4 GiB, weights or a Setup dribbled a byte at a time, more pre-auth
connections than the cap, a fake worker's refusal full of control characters. Each is refused
or dropped with a clear message within a bounded time, and the same worker then serves a real
root whose greedy tokens equal a single node's."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import repeat
from pathlib import Path

import pytest
from cluster_utils import Worker, dllama_cmd, write_random_model
from dllama import ProtocolError, _core
from test_cluster import PROMPT, greedy, mistral_tokenizer

pytestmark = pytest.mark.slow

# frame kinds (docs/PROTOCOL.md)
HELLO, ROOT_HELLO, AUTH_OK, SETUP, ACCEPT, REFUSE, TENSOR, DATA = 1, 2, 3, 4, 5, 6, 7, 8
# .m header keys (distributed-llama's LlmHeaderKey)
N_LAYERS, N_HEADS, N_KV_HEADS = 4, 5, 6

# Short worker deadlines, so that each dribbling peer is dropped within seconds.
HANDSHAKE_S = 2.0
BUILD_S = 2.0
FAST = ("--handshake-timeout", str(HANDSHAKE_S), "--build-timeout", str(BUILD_S))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("hostile_worker") / "tiny.m")


@pytest.fixture(scope="module")
def small_header(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The header of a model like `tiny` with a 512-token vocabulary: its worker slice (the
    shipping budget) is small, so the shipping deadline comes soon."""
    p = write_random_model(tmp_path_factory.mktemp("hostile_small") / "small.m", vocab=512)
    return model_header(p)


@pytest.fixture(scope="module")
def single_node_tokens(tiny: Path) -> list[int]:
    node = _core.Node(str(tiny), buffer_float_type="f32")
    tokens, _ = greedy(node, PROMPT, 6)
    assert len(set(tokens)) > 1, tokens  # a spread of ids, not one repeated
    return tokens


@pytest.fixture
def worker() -> Iterator[Worker]:
    """A worker without a model of its own (the root ships its slice), with short deadlines."""
    with Worker(extra=FAST) as w:
        yield w


def assert_serves(w: Worker, tiny: Path, expected: list[int]) -> None:
    """The worker is alive and serves a real root: greedy tokens equal the single node's."""
    assert w.proc.poll() is None, w.lines
    node = _core.Node(str(tiny), buffer_float_type="f32", workers=[w.addr])
    try:
        tokens, _ = greedy(node, PROMPT, 6)
    finally:
        del node
    assert tokens == expected


class RawRoot:
    """A hand-driven root: the preamble, then frames of our choosing."""

    def __init__(self, addr: str) -> None:
        host, port = addr.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(b"DLMA" + struct.pack("<I", _core.PROTOCOL_VERSION))

    def send(self, kind: int, payload: bytes) -> None:
        self.sock.sendall(frame(kind, payload))

    def read_frame(self) -> tuple[int, bytes]:
        head = self._exact(5)
        kind, n = head[0], struct.unpack("<I", head[1:])[0]
        return kind, self._exact(n)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def handshake(self) -> None:
        """Hello, then our RootHello without a secret, then the worker's AuthOk."""
        kind, _ = self.read_frame()
        assert kind == HELLO
        self.send(ROOT_HELLO, bytes(32) + struct.pack("<I", 0))
        kind, _ = self.read_frame()
        assert kind == AUTH_OK

    def closed_within(self, seconds: float) -> float:
        """Seconds until the worker closes the connection (reading and dropping what it sends)."""
        t0 = time.monotonic()
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        return time.monotonic() - t0

    def close(self) -> None:
        self.sock.close()


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("<BI", kind, len(payload)) + payload


def setup_payload(header: bytes, *, max_seq_len: int = 64, file_size: int = 1 << 20) -> bytes:
    """Node 1 of 2, Q80 buffers, the model header verbatim (a worker without its own file
    checks no fingerprint)."""
    return (
        struct.pack("<IIBIQ", 1, 2, 3, max_seq_len, file_size)
        + bytes(32)
        + struct.pack("<I", len(header))
        + header
    )


def patched(header: bytes, changes: dict[int, int]) -> bytes:
    """The .m header with the i32 values of some keys replaced."""
    size = struct.unpack("<i", header[4:8])[0]
    pairs = list(struct.iter_unpack("<ii", header[8:size]))
    pairs = [(k, changes.get(k, v)) for k, v in pairs]
    return header[:8] + b"".join(struct.pack("<ii", k, v) for k, v in pairs)


def model_header(path: Path) -> bytes:
    data = path.read_bytes()
    size = struct.unpack("<i", data[4:8])[0]
    return data[:size]


def refusal_after_setup(w: Worker, header: bytes, **kw: int) -> tuple[str, float]:
    """Send one Setup; the worker's refusal reason and how long it took."""
    r = RawRoot(w.addr)
    try:
        r.handshake()
        t0 = time.monotonic()
        r.send(SETUP, setup_payload(header, **kw))
        kind, reason = r.read_frame()
        elapsed = time.monotonic() - t0
    finally:
        r.close()
    assert kind == REFUSE, (kind, reason)
    return reason.decode(), elapsed


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------------------------
# absurd sizes in the Setup


def test_a_setup_with_2_31_layers_is_refused_at_once(
    worker: Worker, tiny: Path, single_node_tokens: list[int]
) -> None:
    # before: the pre-weights check built 9 names per layer, billions of strings: the worker died
    header = patched(model_header(tiny), {N_LAYERS: 2**31 - 1})
    reason, elapsed = refusal_after_setup(worker, header)
    assert "n_layers = 2147483647 is beyond what dllama accepts (at most 4096)" in reason
    assert elapsed < 2, elapsed
    worker.wait_for("n_layers = 2147483647")
    assert_serves(worker, tiny, single_node_tokens)


def test_a_setup_with_2_26_heads_is_refused_at_once(
    worker: Worker, tiny: Path, single_node_tokens: list[int]
) -> None:
    # before: valid_node_counts was O(n^2) in the heads: the handler spun forever, busy for
    # every later root, deaf to Ctrl-C
    header = patched(model_header(tiny), {N_HEADS: 2**26, N_KV_HEADS: 2**26})
    reason, elapsed = refusal_after_setup(worker, header)
    assert "n_heads = 67108864 is beyond what dllama accepts (at most 4096)" in reason, reason
    assert elapsed < 2, elapsed
    assert_serves(worker, tiny, single_node_tokens)


def test_a_huge_max_seq_len_with_valid_weights_is_refused_naming_the_memory(
    worker: Worker, tiny: Path, single_node_tokens: list[int], tmp_path: Path
) -> None:
    # before: a real root shipped the (valid) weights, then the worker's KV cache for 2^24
    # positions aborted the process. Now refused at the setup, before any weight moves. Per
    # position: K and V of 16 layers x 2 KV heads (of 4) x head_dim 16 in f32, plus a RoPE row
    # of 16 f32: 4160 bytes, x 2^24 = 65.0 GiB. (The root, which refuses its own 65 GiB up
    # front, is given a 1 TiB budget here so that the setup reaches the worker.)
    big = write_random_model(tmp_path / "long.m", layers=16, vocab=512, max_seq_len=1 << 24)
    with pytest.raises(ProtocolError) as e:
        _core.Node(
            str(big),
            buffer_float_type="f32",
            max_seq_len=1 << 24,
            workers=[worker.addr],
            max_memory=1 << 40,
        )
    msg = str(e.value)
    assert "worker 1" in msg and "refused: this worker's slice needs 65.0 GiB (0.7 MiB of " in msg
    assert "+ 65.0 GiB of KV cache and RoPE table at max_seq_len 16777216); " in msg, msg
    assert msg.endswith("GiB available"), msg
    worker.wait_for("needs 65.0 GiB")
    assert not any("received" in line for line in worker.lines), worker.lines
    assert_serves(worker, tiny, single_node_tokens)


# ---------------------------------------------------------------------------------------------
# shipped weights


def announce(w: Worker, header: bytes, nbytes: int) -> RawRoot:
    """A raw root that has set up node 1 of 2 of the model of `header` and announced a tensor
    of `nbytes`."""
    r = RawRoot(w.addr)
    r.handshake()
    r.send(SETUP, setup_payload(header))
    kind, accept = r.read_frame()
    assert (kind, accept) == (ACCEPT, b"\x01")  # weights to ship
    tensor = frame(TENSOR, struct.pack("<I", 9) + b"layer0.wq" + struct.pack("<Q", nbytes))
    assert len(tensor) == 26
    r.sock.sendall(tensor)
    return r


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (struct.pack("<BI", ROOT_HELLO, (1 << 32) - 1), "more than the 128 allowed"),
        (frame(SETUP, b"x"), "sent Setup where we expected the root's hello"),
        (frame(ROOT_HELLO, b"short"), "RootHello"),
    ],
)
def test_a_bad_root_hello_gets_its_reason(
    worker: Worker, tiny: Path, single_node_tokens: list[int], message: bytes, reason: str
) -> None:
    # before: the worker logged the reason and closed; the root saw a bare EOF or a reset
    r = RawRoot(worker.addr)
    try:
        assert r.read_frame()[0] == HELLO
        r.sock.sendall(message)
        kind, said = r.read_frame()
        assert kind == REFUSE and reason in said.decode(), said
    finally:
        r.close()
    assert_serves(worker, tiny, single_node_tokens)


def test_a_tensor_frame_announcing_4_gib_is_refused_before_any_allocation(
    worker: Worker, tiny: Path, single_node_tokens: list[int]
) -> None:
    # before: the 26-byte frame made the worker allocate and zero 4 GiB at once, and a 1-byte
    # Data frame every 30 s held it (and the worker) for ever
    before = rss_mib(worker.proc.pid)
    r = announce(worker, model_header(tiny), 1 << 32)
    try:
        kind, reason = r.read_frame()
        assert kind == REFUSE
        assert rss_mib(worker.proc.pid) - before < 64
    finally:
        r.close()
    assert "ships more weight bytes (4294967296) than this worker's slice takes" in reason.decode()
    assert_serves(worker, tiny, single_node_tokens)


def dribble(
    worker: Worker,
    send: Callable[[bytes], object],
    chunks: Iterable[bytes],
    until: str,
    limit: float = float("inf"),
) -> float:
    """Send `chunks` 0.3 s apart until the worker logs a line containing `until`, drops the
    connection, or `limit` seconds pass; returns the seconds it took."""
    t0 = time.monotonic()
    for chunk in chunks:
        if time.monotonic() - t0 >= limit:
            break
        try:
            send(chunk)
        except OSError:
            break
        if any(until in line for line in worker.lines):
            break
        time.sleep(0.3)
    return time.monotonic() - t0


def test_weights_dribbled_a_byte_at_a_time_are_dropped_by_the_shipping_deadline(
    worker: Worker, tiny: Path, small_header: bytes, single_node_tokens: list[int]
) -> None:
    # the slice's size, from the refusal of more
    r = announce(worker, small_header, 1 << 32)
    reason = r.read_frame()[1].decode()
    r.close()
    budget = int(reason.rsplit("(", 1)[1].rstrip(")"))
    # the deadline: --build-timeout plus the slice's bytes at 256 KiB/s
    deadline = BUILD_S + budget / (256 * 1024)

    # a tensor of a plausible size, then one byte every 0.3 s
    r = announce(worker, small_header, 4096)
    try:
        elapsed = dribble(
            worker, lambda c: r.send(DATA, c), repeat(b"\x00"), "too slowly", deadline + 10
        )
    finally:
        r.close()
    assert deadline - 0.5 < elapsed < deadline + 2, (elapsed, deadline)
    line = worker.wait_for("shipping the weights too slowly")
    assert "given up" in line
    assert_serves(worker, tiny, single_node_tokens)


# ---------------------------------------------------------------------------------------------
# slow and many peers


def test_a_setup_dribbled_a_byte_at_a_time_is_dropped_by_the_handshake_deadline(
    worker: Worker, tiny: Path, single_node_tokens: list[int]
) -> None:
    # before: timeouts were per read, so a Setup at 1 byte / 8 s kept the worker "busy serving
    # root" for ever
    r = RawRoot(worker.addr)
    try:
        r.handshake()
        data = frame(SETUP, setup_payload(model_header(tiny)))
        elapsed = dribble(worker, r.sock.sendall, (bytes([b]) for b in data), "did not answer")
    finally:
        r.close()
    # one deadline for the whole handshake (before: one per frame header and one per body,
    # so a Setup could take twice the timeout, after a handshake as slow as it liked)
    assert elapsed < HANDSHAKE_S + 0.75, elapsed
    line = worker.wait_for("did not answer within 2 s")
    assert "the setup" in line, line
    assert_serves(worker, tiny, single_node_tokens)


def test_a_handshake_of_timely_messages_is_dropped_at_its_one_deadline(
    worker: Worker, tiny: Path, single_node_tokens: list[int]
) -> None:
    # before: each frame's header and body had their own timeout and the handshake none, so a
    # root whose every message came within the timeout held the worker as long as it liked
    t0 = time.monotonic()
    r = RawRoot(worker.addr)
    try:
        kind, _ = r.read_frame()
        assert kind == HELLO
        # the RootHello's header, then its body 0.6 of the timeout later: in time
        hello = frame(ROOT_HELLO, bytes(32) + struct.pack("<I", 0))
        r.sock.sendall(hello[:5])
        time.sleep(0.6 * HANDSHAKE_S)
        r.sock.sendall(hello[5:])
        kind, _ = r.read_frame()
        assert kind == AUTH_OK
        # the Setup's header, then nothing: the handshake's deadline (HANDSHAKE_S after the
        # connection) comes before this message's own would (HANDSHAKE_S after its header)
        r.sock.sendall(frame(SETUP, setup_payload(model_header(tiny)))[:5])
        r.closed_within(3 * HANDSHAKE_S)
        dropped = time.monotonic() - t0
    finally:
        r.close()
    assert HANDSHAKE_S - 0.1 < dropped < HANDSHAKE_S + 0.5, dropped
    line = worker.wait_for("did not answer within 2 s")
    assert "the setup" in line, line
    assert_serves(worker, tiny, single_node_tokens)


def test_silent_connections_in_every_handshake_slot_do_not_keep_a_root_out(
    worker: Worker, tiny: Path, single_node_tokens: list[int]
) -> None:
    # before the cap: 500 connections held 502 threads and 305 MB (with or without --secret);
    # with a plain cap, 16 silent connections refused every root until their deadline
    idle = [socket.create_connection(("127.0.0.1", worker.port)) for _ in range(16)]
    try:
        time.sleep(0.3)  # accepted and counted
        # a root gets in at once: the connection that waited longest made room
        assert_serves(worker, tiny, single_node_tokens)
        idle[0].settimeout(5)
        try:
            assert idle[0].recv(1) == b""
        except ConnectionResetError:
            pass
        idle[-1].settimeout(0.2)
        with pytest.raises(TimeoutError):
            idle[-1].recv(1)  # the newest still waits for its hello
    finally:
        for s in idle:
            s.close()


# ---------------------------------------------------------------------------------------------
# a fake worker against a real root


def fake_refusing_worker(reason: bytes) -> tuple[str, threading.Thread]:
    """Accepts one root, reads its preamble and refuses with `reason` (verbatim)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    addr = f"127.0.0.1:{srv.getsockname()[1]}"

    def serve() -> None:
        with srv:
            srv.settimeout(60)
            s, _ = srv.accept()
            with s:
                s.recv(8)
                try:
                    s.sendall(frame(REFUSE, reason))
                    s.shutdown(socket.SHUT_WR)
                    s.settimeout(5)
                    while s.recv(4096):
                        pass
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return addr, t


def run_root_against(addr: str, tiny: Path) -> subprocess.CompletedProcess[str]:
    cmd = dllama_cmd(
        "run", "--model", str(tiny), "--tokenizer", str(mistral_tokenizer()),
        "--prompt", "hello", "--steps", "2", "--workers", addr,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DLLAMA_SECRET"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_a_fake_workers_refusal_is_printed_on_one_line_escaped_and_bounded(tiny: Path) -> None:
    # before: the reason (up to 1 MiB, with \r\n and escapes) went verbatim to the terminal
    addr, t = fake_refusing_worker(b"no\r\nerror: FAKE \x1b[31mred\x1b[0m" + b"x" * 2000)
    p = run_root_against(addr, tiny)
    t.join(10)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, p.stderr
    assert f"worker 1 ({addr}) refused: no\\u{{d}}\\u{{a}}error: FAKE \\u{{1b}}[31mred" in errors[0]
    assert "\x1b" not in p.stderr and "\r" not in p.stderr
    assert errors[0].endswith("...") and len(errors[0]) < 600, len(errors[0])

    # a refusal longer than MAX_REASON is not even read
    addr, t = fake_refusing_worker(b"y" * (1 << 20))
    p = run_root_against(addr, tiny)
    t.join(10)
    assert p.returncode == 1, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "more than the 4096 allowed" in errors[0], p.stderr
    assert len(errors[0]) < 400


def fake_worker_never_ready(n_roots: int) -> tuple[str, threading.Thread]:
    """Handshakes with `n_roots` roots in turn, accepts their setup (no weights to ship), then
    never says Ready; holds each connection until the root closes it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    addr = f"127.0.0.1:{srv.getsockname()[1]}"

    def read_frame(s: socket.socket) -> tuple[int, bytes]:
        def exact(n: int) -> bytes:
            out = b""
            while len(out) < n:
                chunk = s.recv(n - len(out))
                if not chunk:
                    raise ConnectionError("closed")
                out += chunk
            return out

        head = exact(5)
        return head[0], exact(struct.unpack("<I", head[1:])[0])

    def serve() -> None:
        with srv:
            srv.settimeout(60)
            for _ in range(n_roots):
                s, _ = srv.accept()
                with s:
                    s.settimeout(60)
                    try:
                        s.recv(8)  # the preamble
                        hello = struct.pack("<IB", _core.PROTOCOL_VERSION, 0) + bytes(32)
                        s.sendall(frame(HELLO, hello))
                        assert read_frame(s)[0] == ROOT_HELLO
                        s.sendall(frame(AUTH_OK, struct.pack("<I", 0)))
                        assert read_frame(s)[0] == SETUP
                        s.sendall(frame(ACCEPT, b"\x00"))
                        while s.recv(4096):  # silent until the root gives up
                            pass
                    except OSError:
                        pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return addr, t


def test_a_fake_worker_that_never_says_ready_is_given_up_after_the_ready_timeout(
    tiny: Path,
) -> None:
    # before: the root waited 600 s, whatever the user wanted
    addr, t = fake_worker_never_ready(2)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as e:
        _core.Node(str(tiny), workers=[addr], ready_timeout=1.0)
    assert time.monotonic() - t0 < 4
    assert f"worker 1 ({addr}) did not answer within 1 s" in str(e.value), e.value
    assert "Ready" in str(e.value), e.value

    # and from the CLI: one line, exit 1
    cmd = dllama_cmd(
        "run", "--model", str(tiny), "--tokenizer", str(mistral_tokenizer()),
        "--prompt", "hello", "--steps", "2", "--workers", addr, "--ready-timeout", "1",
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DLLAMA_SECRET"}
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert p.returncode == 1, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "did not answer within 1 s" in errors[0], p.stderr
    t.join(10)


def test_max_memory_bounds_what_a_root_may_ask_of_the_worker(
    tiny: Path, single_node_tokens: list[int]
) -> None:
    # the slice of `tiny` (node 1 of 2) is ~1.2 MiB of weights plus its KV cache
    with Worker(extra=(*FAST, "--max-memory", "1M")) as w:
        with pytest.raises(ProtocolError) as e:
            _core.Node(str(tiny), buffer_float_type="f32", workers=[w.addr])
        msg = str(e.value)
        assert "worker 1" in msg and "this worker's slice needs" in msg, msg
        assert "of KV cache and RoPE table at max_seq_len 256" in msg, msg
        assert msg.endswith("1.0 MiB the worker's --max-memory"), msg
    with Worker(extra=(*FAST, "--max-memory", "64M")) as w:
        assert_serves(w, tiny, single_node_tokens)


@pytest.mark.parametrize("size", ["0", "-1G", "lots"])
def test_a_bad_max_memory_is_a_usage_error(size: str) -> None:
    p = subprocess.run(
        dllama_cmd("serve-worker", "--port", "1", "--max-memory", size),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: --max-memory:"), p.stderr


# ---------------------------------------------------------------------------------------------
# an interrupt, whatever the worker is doing


def interrupted_within(w: Worker, seconds: float) -> float:
    """SIGINT the worker; the seconds it took to exit (it must, with 130)."""
    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGINT)
    w.proc.wait(seconds)
    elapsed = time.monotonic() - t0
    assert w.proc.returncode == 130, (w.proc.returncode, w.lines)
    w.wait_for("interrupted, stopping", timeout=5)
    return elapsed


def test_an_interrupt_stops_a_worker_receiving_weights_at_once(small_header: bytes) -> None:
    with Worker(extra=FAST) as w:
        r = announce(w, small_header, 4096)  # then nothing: the worker waits for the data
        try:
            w.wait_for("shipped by the root")
            assert interrupted_within(w, 5) < 2
        finally:
            r.close()


def sparse_model(path: Path, layers: int) -> Path:
    """A Q40 .m of the 7B layer shape whose tensors are all zero, written as a sparse file (no
    time, no disk): slow to build (repacking ~0.45 GB per 8 layers and node) yet instant to
    make."""
    fields: dict[str, int | float] = {
        "version": 0, "arch_type": 0xABCD00, "dim": 4096, "hidden_dim": 11008,
        "n_layers": layers, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 32000,
        "max_seq_len": 64, "hidden_act": 1, "rope_theta": 10000, "weights_float_type": 2,
        "rope_type": 0, "head_dim": 128, "norm_epsilon": 1e-5,
    }  # fmt: skip
    specs = _core.model_tensors(fields)
    last = specs[-1]
    with open(path, "wb") as f:
        f.write(_core.encode_model_header(fields))
        f.truncate(last.offset + last.nbytes)
    return path


def test_an_interrupt_stops_a_worker_building_its_slice_at_once(tmp_path: Path) -> None:
    # before: the interrupt waited for the slice to be built (minutes for a big model on a Pi)
    big = sparse_model(tmp_path / "zeros.m", layers=16)
    with Worker(model=big, extra=FAST) as w:
        failed: list[BaseException] = []

        def root() -> None:
            try:
                _core.Node(str(big), workers=[w.addr], ready_timeout=60)
            except (ConnectionError, ValueError) as e:
                failed.append(e)

        t = threading.Thread(target=root, daemon=True)
        t.start()
        w.wait_for("mapped from the local model file", timeout=60)  # the build starts
        assert interrupted_within(w, 10) < 2
        t.join(30)
        assert failed, "the root did not notice the worker stopping"
        # it gave up the slice: it never said Ready
        assert not any("ready for" in line for line in w.lines), w.lines
