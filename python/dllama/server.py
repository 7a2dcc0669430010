"""`dllama serve`: an OpenAI-compatible HTTP API (and a small chat page) over one model.

The model computes one request at a time (one KV cache): an :class:`Engine` thread takes the
requests from a bounded first-in first-out queue (past its size: 429 with ``Retry-After``).
A request stops at the next token when its client goes away or its time is up. The KV cache
is kept from one request to the next, so a conversation that grows turn by turn only runs its
new tokens through the model (``usage.prompt_tokens_details.cached_tokens`` says how many
were reused).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming as
server-sent events, ``data: [DONE]`` last), ``GET /v1/models``, ``GET /health``, the page at
``/`` and the OpenAPI schema at ``/openapi.json``. Errors are OpenAI's error objects.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dllama import __version__
from dllama.chat_template import ChatTemplate
from dllama.generate import LLM, Piece, Summary
from dllama.sampler import MAX_TOP_LOGPROBS, SamplingParams

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ------------------------------------------------------------------------- requests -----


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """The sampling fields both endpoints take (OpenAI's, and top_k, min_p,
    repetition_penalty as vLLM and llama.cpp's server take them)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    max_tokens: int | None = Field(None, ge=1)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    user: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    #: extra variables for the chat template, e.g. {"enable_thinking": false} (as vLLM)
    chat_template_kwargs: dict[str, bool | int | float | str] | None = None


class CompletionRequest(_Request):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[int], Field(min_length=1)]
    )
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            },
            status_code=self.status,
            headers=self.headers,
        )


# --------------------------------------------------------------------------- engine -----


@dataclass
class Job:
    """One request as the engine runs it; events go back to the request's event loop."""

    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str]
    top_logprobs: int | None
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: set when the engine takes the job off the queue
    started: bool = False

    def stop_now(self) -> bool:
        """Whether the engine should drop the job: its client went away or its time is up."""
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    def post(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    """The model's only user: a thread that runs the queued jobs one after the other.

    With ``reload`` (how the model was loaded: a cluster's root), a cluster that loses a node
    is not the end of the server: the request gets 503, /health says the cluster is down, and
    the next request loads the model again (the workers reconnected, their slices shipped
    again if they have no copy of their own), or gets 503 while a node is still away."""

    def __init__(
        self,
        llm: LLM,
        template: ChatTemplate,
        max_queue: int = 16,
        reload: Callable[[], LLM] | None = None,
    ) -> None:
        self.llm = llm
        self.reload = reload
        #: why the model cannot run (its cluster lost a node), until a reload succeeds
        self.down: str | None = None
        self._lost = ""  # how the cluster went down
        self.template = template
        # read once: the node is busy (mutably borrowed) in the engine thread while it runs a
        # forward pass, so the request handlers must not touch it
        self.max_seq_len = llm.node.max_seq_len
        self.vocab_size = llm.vocab_size
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._busy = False
        self._recent_s: list[float] = []
        #: totals since start: prompt tokens, and those of them reused from the KV cache
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="dllama-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self._busy

    def retry_after(self) -> int:
        """Seconds a client refused with 429 should wait: the recent request time times
        the queue ahead of it."""
        mean = sum(self._recent_s) / len(self._recent_s) if self._recent_s else 1.0
        return max(1, round(mean * (self.queued + 1)))

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                429,
                f"the server is busy: {self.max_queue} requests are waiting; retry later",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            ) from None

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            if time.monotonic() > job.deadline:
                job.post("error", _timed_out(job))
                continue
            job.started = True
            self._busy = True
            t0 = time.monotonic()
            try:
                if self.down is None or self._revive():
                    self._generate(job)
                else:
                    job.post("error", self._down_error())
            except Exception as e:  # noqa: BLE001 - the request gets the error, the server lives
                if self.reload is not None and isinstance(e, OSError):
                    # a node of the cluster went away (its process, its machine, the network:
                    # dllama._core.ProtocolError and every socket error are OSErrors)
                    self._lost = self.down = str(e)
                    job.post("error", self._down_error())
                else:
                    job.post("error", ApiError(500, f"generation failed: {e}", "server_error"))
            finally:
                self._busy = False
                self._recent_s = [*self._recent_s[-9:], time.monotonic() - t0]

    def _revive(self) -> bool:
        """Load the model again after its cluster went down; whether it worked."""
        assert self.reload is not None
        del self.llm  # the old root's memory and sockets go first
        try:
            self.llm = self.reload()
        except Exception as e:  # noqa: BLE001 - said by the request's 503 and /health
            self.down = f"{self._lost}; reconnecting failed: {e}"
            self.llm = _Gone()  # type: ignore[assignment]
            return False
        self.down = None
        return True

    def _down_error(self) -> ApiError:
        return ApiError(
            503,
            f"the cluster is down: {self.down} (the next request tries to reconnect)",
            "server_error",
            code="cluster_down",
        )

    def _generate(self, job: Job) -> None:
        llm = self.llm
        pieces = llm.generate(
            job.prompt,
            job.max_tokens,
            sampling=job.sampling,
            stop=job.stop,
            stop_tokens=self.template.end_of_turn_ids,
            top_logprobs=job.top_logprobs,
            cancel=job.stop_now,  # between the slices of a long prompt's prefill
        )
        for piece in pieces:
            if job.stop_now():
                break
            job.post("piece", piece)
        pieces.close()
        summary = llm.last_summary
        if summary is not None:
            self.requests += 1
            self.prompt_tokens += summary.prompt_tokens
            self.cached_tokens += summary.cached_tokens
        if summary is None or summary.stop_reason == "cancelled":
            job.post("error", _timed_out(job))
        else:
            job.post("done", summary)


class _Gone:
    """Stands for a model that could not be loaded again (see `Engine._revive`)."""


def _timed_out(job: Job) -> ApiError:
    """The error of a job whose time ran out (in the queue, or running)."""
    if job.started:
        return ApiError(504, "the request timed out", "timeout")
    return ApiError(504, "timed out waiting in the queue", "timeout")


# ------------------------------------------------------------------------ middleware -----


class BodyLimit:
    """413 for a request body larger than ``max_bytes`` (declared or actually sent)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(
            413, f"the request body is larger than {self.max_bytes} bytes", code="body_too_large"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await too_big.response()(scope, receive, send)
                    return
        # the whole body is read here, before the app sees it: a body sent in chunks that
        # grows past the limit gets the same 413 (and the app, not a half-read stream)
        parts: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away before its body was in
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                await too_big.response()(scope, receive, send)
                return
            parts.append(body)
            if not msg.get("more_body", False):
                break
        whole: Message | None = {
            "type": "http.request",
            "body": b"".join(parts),
            "more_body": False,
        }

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                msg, whole = whole, None
                return msg
            return await receive()

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------- app -----


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    timeout_s: float = 600.0


def _text(s: str, param: str) -> str:
    """``s``, checked to be Unicode text (JSON can carry lone UTF-16 surrogates, which no
    tokenizer can encode)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"{param}: holds a lone UTF-16 surrogate (U+{ord(s[e.start]):04X} at {e.start}), "
            "which is not Unicode text",
            param=param,
            code="invalid_value",
        ) from None
    return s


def _param_of(loc: Any) -> str | None:
    # pydantic names the member of a union it tried ("str", "list[TextPart]"): not a field
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and _union_member(p))]
    return ".".join(parts) or None


def _union_member(p: str) -> bool:
    return "[" in p or p in ("str", "int", "float", "bool")


def _most_telling(errs: Sequence[Any]) -> dict[str, Any]:
    """The error to report of a request's validation errors: a union (``stop``: a string or
    a list) fails once per member, and the member of the input's own type says what is wrong
    (a list too long), where the others only say it is not of their type."""
    if not errs:
        return {}
    for e in errs:
        t = str(e.get("type", ""))
        if not t.endswith(("_type", "_parsing")):
            return dict(e)
    return dict(errs[0])


def create_app(engine: Engine, cfg: ServerConfig) -> FastAPI:
    app = FastAPI(
        title="dllama",
        version=__version__,
        description="An OpenAI-compatible API over one dllama model.",
    )
    fingerprint = f"dllama-{__version__}"
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = _most_telling(exc.errors())
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            return ApiError(400, msg.rstrip(": "), code="invalid_json").response()
        param = _param_of(first.get("loc", ()))
        if param is None:
            return ApiError(
                400, "the request body must be a JSON object (Content-Type: application/json)",
                code="invalid_json",
            ).response()  # fmt: skip
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        return ApiError(400, msg, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    async def authorized(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), cfg.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send Authorization: Bearer KEY",
                code="invalid_api_key",
            )

    auth = [Depends(authorized)]

    @app.api_route(
        "/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False
    )
    async def page() -> HTMLResponse:
        html = resources.files("dllama").joinpath("web/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        body: dict[str, Any] = {
            "status": "ok" if engine.down is None else "cluster_down",
            "model": cfg.model_name,
            "busy": engine.busy,
            "queued": engine.queued,
            "requests": engine.requests,
            "prompt_tokens": engine.prompt_tokens,
            "cached_prompt_tokens": engine.cached_tokens,
        }
        if engine.down is not None:
            body["error"] = engine.down
        return JSONResponse(body, status_code=200 if engine.down is None else 503)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "dllama"}
            ],
        }

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != cfg.model_name:
            raise ApiError(
                404,
                f"the model {model_id!r} does not exist: this server runs {cfg.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "dllama"}

    def prompt_param(req: _Request) -> str:
        return "messages" if isinstance(req, ChatCompletionRequest) else "prompt"

    def job_for(
        req: _Request,
        prompt: list[int],
        max_tokens: int | None,
        top_logprobs: int | None,
        loop: asyncio.AbstractEventLoop,
    ) -> Job:
        limit = engine.max_seq_len
        if not prompt:
            raise ApiError(400, "the prompt encodes to no tokens", param=prompt_param(req))
        if len(prompt) >= limit:
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens, more than the context of {limit} allows",
                param=prompt_param(req),
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens must be at most {cfg.max_tokens_limit}, got {max_tokens}",
                param="max_tokens",
                code="invalid_value",
            )
        vocab = engine.vocab_size
        bias: dict[int, float] = {}
        for k, v in (req.logit_bias or {}).items():
            try:
                tok = int(k)
            except ValueError:
                tok = -1
            if not 0 <= tok < vocab:
                raise ApiError(
                    400,
                    f"logit_bias: {k!r} is not a token id of this model (0..{vocab - 1})",
                    param="logit_bias",
                    code="invalid_value",
                )
            bias[tok] = v
        # top_p 0 keeps only the most likely token, as in OpenAI's API (the sampler's own 0,
        # as llama2.c's, means no cut at all)
        greedy = req.top_p == 0
        sampling = SamplingParams(
            temperature=0.0 if greedy else 1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=None if req.seed is None else req.seed % 2**64,
            logit_bias=bias,
        )
        try:
            sampling.check(vocab)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        for s in stop:
            _text(s, "stop")
        room = limit - len(prompt)
        return Job(
            prompt=prompt,
            sampling=sampling,
            max_tokens=min(max_tokens or room, room, cfg.max_tokens_limit),
            stop=stop,
            top_logprobs=top_logprobs,
            deadline=time.monotonic() + cfg.timeout_s,
            loop=loop,
        )

    def usage(s: Summary | None, prompt_len: int) -> dict[str, Any]:
        gen = s.generated_tokens if s else 0
        cached = s.cached_tokens if s else 0
        return {
            "prompt_tokens": prompt_len,
            "completion_tokens": gen,
            "total_tokens": prompt_len + gen,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def finish_reason(s: Summary | None) -> str:
        return "stop" if s is not None and s.stop_reason in ("eos", "stop") else "length"

    tok = engine.llm.tokenizer

    def token_text(t: int) -> tuple[str, list[int]]:
        b = tok.piece_bytes(t)
        return b.decode("utf-8", "replace"), list(b)

    def chat_logprob(p: Piece) -> dict[str, Any]:
        text, raw = token_text(p.token)
        return {
            "token": text,
            "logprob": p.logprob,
            "bytes": raw,
            "top_logprobs": [
                {"token": token_text(t)[0], "logprob": lp, "bytes": token_text(t)[1]}
                for t, lp in (p.top_logprobs or ())
            ],
        }

    async def events(job: Job, request: Request) -> AsyncIterator[tuple[str, Any]]:
        """The job's events; cancels it when the client goes away or the caller stops."""
        try:
            while True:
                # the deadline holds even while the engine is busy elsewhere (another job, a
                # long prefill): the engine drops the job at its next look (`Job.stop_now`)
                left = job.deadline - time.monotonic()
                if left <= 0 and job.events.empty():
                    raise _timed_out(job)
                try:
                    kind, value = await asyncio.wait_for(
                        job.events.get(), min(0.5, max(left, 0.01))
                    )
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            job.cancelled.set()

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(
        job: Job,
        request: Request,
        chunk: Callable[[str, Piece | None, str | None], dict[str, Any]],
        include_usage: bool,
        first: dict[str, Any] | None,
    ) -> AsyncIterator[str]:
        if first is not None:
            yield sse(first)
        summary: Summary | None = None
        try:
            async for kind, value in events(job, request):
                if kind == "piece":
                    yield sse(chunk(value.text, value, None))
                else:
                    summary = value
            yield sse(chunk("", None, finish_reason(summary)))
            if include_usage:
                last = chunk("", None, None)
                last["choices"] = []
                last["usage"] = usage(summary, len(job.prompt))
                yield sse(last)
        except ApiError as e:
            yield sse({"error": {"message": e.message, "type": e.type, "code": e.code}})
        yield "data: [DONE]\n\n"

    async def collect(job: Job, request: Request) -> tuple[list[Piece], Summary | None]:
        pieces: list[Piece] = []
        summary: Summary | None = None
        async for kind, value in events(job, request):
            if kind == "piece":
                pieces.append(value)
            else:
                summary = value
        return pieces, summary

    def start(job: Job) -> None:
        engine.submit(job)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        messages = [
            {"role": m.role, "content": _text(m.text(), f"messages.{i}.content")}
            for i, m in enumerate(req.messages)
        ]
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        extra = req.chat_template_kwargs or {}
        for k, v in extra.items():
            if k in ChatTemplate.VARIABLES:
                raise ApiError(
                    400,
                    f"chat_template_kwargs: {k!r} is set by the server, not by the request",
                    param="chat_template_kwargs",
                    code="invalid_value",
                )
            if isinstance(v, str):
                _text(v, f"chat_template_kwargs.{k}")
        try:
            prompt = engine.template.encode(messages, True, **extra)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(
                400,
                "top_logprobs needs logprobs: true",
                param="top_logprobs",
                code="invalid_value",
            )
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = job_for(
            req,
            prompt,
            req.max_completion_tokens or req.max_tokens,
            top,
            asyncio.get_running_loop(),
        )
        start(job)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        base = {
            "id": cid,
            "created": now,
            "model": cfg.model_name,
            "system_fingerprint": fingerprint,
        }
        if req.stream:

            def chunk(text: str, p: Piece | None, finish: str | None) -> dict[str, Any]:
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": text} if finish is None else {},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                if p is not None and p.logprob is not None:
                    choice["logprobs"] = {"content": [chat_logprob(p)]}
                return {**base, "object": "chat.completion.chunk", "choices": [choice]}

            first = chunk("", None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream(job, request, chunk, include, first), media_type="text/event-stream"
            )
        pieces, summary = await collect(job, request)
        logprobs = None
        if req.logprobs:
            logprobs = {"content": [chat_logprob(p) for p in pieces if p.logprob is not None]}
        return JSONResponse(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(p.text for p in pieces),
                        },
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(summary),
                    }
                ],
                "usage": usage(summary, len(prompt)),
            }
        )

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        if isinstance(req.prompt, list) and isinstance(req.prompt[0], int):
            prompt = [int(t) for t in req.prompt]
            vocab = engine.vocab_size
            if not prompt or any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt: token ids must be in 0..{vocab - 1}", param="prompt")
        else:
            text = req.prompt if isinstance(req.prompt, str) else str(req.prompt[0])
            prompt = tok.encode(_text(text, "prompt"), parse_special=True)
        job = job_for(req, prompt, req.max_tokens or 16, req.logprobs, asyncio.get_running_loop())
        start(job)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": cfg.model_name,
            "system_fingerprint": fingerprint,
        }

        def completion_logprobs(ps: list[Piece], offset: int) -> dict[str, Any]:
            ps = [p for p in ps if p.logprob is not None]
            tokens = [token_text(p.token)[0] for p in ps]
            # each token's place in the text its tokens spell (as OpenAI counts: the pieces'
            # own texts, not what the stop-string matcher let through at that step)
            offsets = []
            for t in tokens:
                offsets.append(offset)
                offset += len(t)
            return {
                "tokens": tokens,
                "token_logprobs": [p.logprob for p in ps],
                "top_logprobs": [
                    {token_text(t)[0]: lp for t, lp in (p.top_logprobs or ())} for p in ps
                ],
                "text_offset": offsets,
            }

        if req.stream:
            offset = [0]

            def chunk(text: str, p: Piece | None, finish: str | None) -> dict[str, Any]:
                lp = None
                if p is not None and p.logprob is not None:
                    lp = completion_logprobs([p], offset[0])
                    offset[0] += len(lp["tokens"][0])
                return {
                    **base,
                    "choices": [
                        {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
                    ],
                }

            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream(job, request, chunk, include, None), media_type="text/event-stream"
            )
        pieces, summary = await collect(job, request)
        return JSONResponse(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "text": "".join(p.text for p in pieces),
                        "logprobs": completion_logprobs(pieces, 0)
                        if req.logprobs is not None
                        else None,
                        "finish_reason": finish_reason(summary),
                    }
                ],
                "usage": usage(summary, len(prompt)),
            }
        )

    # the body limit inside CORS, so that a browser also reads a 413 (its CORS headers)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
        )
    return app
