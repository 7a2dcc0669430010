"""The library API: load a model and its tokenizer, generate text as it comes.

>>> from dllama.generate import LLM
>>> llm = LLM("model.m", "tokenizer.t", nthreads=2)            # doctest: +SKIP
>>> for piece in llm.generate("Once upon a time", steps=32):   # doctest: +SKIP
...     print(piece.text, end="", flush=True)
>>> llm.last_summary                                            # doctest: +SKIP

``generate`` yields one :class:`Piece` per generated token: its id, the text it adds (empty
while a multi-byte character is incomplete, or while it may be the start of a stop string)
and its timings. It stops at ``steps`` tokens, at an end-of-sequence (or end-of-turn) token,
at a stop string (never emitted), or at the end of the KV cache; the prompt and the generated
tokens together must fit in ``max_seq_len``.

The KV cache is kept between calls: a prompt that starts with the tokens of the previous
call (prompt and generated text, as in a chat) only runs its new tokens through the model
(``Summary.cached_tokens`` says how many were reused). ``dllama run``, ``chat`` and ``serve``
are built on this API.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dllama import _core
from dllama.sampler import MAX_TOP_LOGPROBS, Sampler, SamplingParams, logprobs
from dllama.tokenizer import Tokenizer

#: Prompt tokens per forward pass of a prefill (a multiple of the core's batch of 32, so the
#: result is the same as in one pass): between two, ``generate`` asks its ``cancel`` callback
#: whether to go on, so a long prompt can be abandoned (a server's client gone, its time up).
PREFILL_SLICE = 256


class StopStrings:
    """Finds stop strings in generated text, across token boundaries.

    ``feed`` returns the text that can be shown: text that may be the start of a stop string
    is held back until the next tokens decide; at a stop string, the text before it (and
    ``hit`` is set). ``flush`` gives back what is held at the end.

    >>> s = StopStrings(["\\n\\nUser:"])
    >>> s.feed("Hi!\\n"), s.feed("\\nUs"), s.feed("er: yo"), s.hit
    ('Hi!', '', '', '\\n\\nUser:')
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hit: str | None = None
        self._held = ""

    def feed(self, text: str) -> str:
        if not self.stops or self.hit is not None:
            return text if self.hit is None else ""
        buf = self._held + text
        at = -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (at < 0 or i < at):
                at, self.hit = i, s
        if at >= 0:
            self._held = ""
            return buf[:at]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass(frozen=True)
class Piece:
    """One generated token and what it cost (distributed-llama's per-token stats line).

    A last piece with ``token == -1`` and zero timings may follow the generated tokens: the
    decoder's flush, when generation stopped in the middle of a multi-byte character.
    """

    token: int
    text: str
    #: G: wall time of the step (forward pass + sampling + decoding), ms
    total_ms: float
    #: I: time inside the forward pass, ms
    inference_ms: float
    #: T: time spent waiting on the network (0 on one machine), ms
    transfer_ms: float
    #: S / R: kB sent to / received from workers during the step
    sent_kb: float
    recv_kb: float
    #: the model's log-probability of the token and its most likely alternatives (id,
    #: log-probability), when asked for
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        if self.logprob is None:
            del d["logprob"], d["top_logprobs"]
        return d


@dataclass(frozen=True)
class Summary:
    """Totals of one ``generate`` call."""

    prompt_tokens: int
    #: the prefill: the prompt's new tokens through the model, giving the first generated token
    prompt_ms: float
    generated_tokens: int
    #: forward passes after the prefill (one per generated token after the first) and
    #: their wall time: the decode speed
    decode_steps: int
    decode_ms: float
    #: why generation stopped: "steps", "eos" (also an end-of-turn token), "stop" (a stop
    #: string), "max_seq_len", or "cancelled" (the caller stopped iterating)
    stop_reason: str
    #: prompt tokens whose keys and values were already in the KV cache (not run again)
    cached_tokens: int = 0

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens that went through the model."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prefill_tokens / (self.prompt_ms / 1000) if self.prompt_ms > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        return self.decode_ms / self.decode_steps if self.decode_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token if self.ms_per_token > 0 else 0.0

    def to_dict(self) -> dict[str, int | float | str]:
        d: dict[str, int | float | str] = dict(asdict(self))
        d["prefill_tokens"] = self.prefill_tokens
        d["prompt_tokens_per_s"] = self.prompt_tokens_per_s
        d["ms_per_token"] = self.ms_per_token
        d["tokens_per_s"] = self.tokens_per_s
        return d


def _is_gguf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False  # the core reports a missing or unreadable file


class LLM:
    """A model (``.m``) and tokenizer (``.t`` or SentencePiece ``.model``) ready to generate.

    ``nthreads``: threads of the matmuls; ``buffer_float_type``: ``"q80"`` (activations
    quantized to 8 bits for Q40 weights, as llama.cpp) or ``"f32"``; ``max_seq_len``: KV
    cache length, 0 for the model's own capped at 4096; ``weights_float_type``: only for a
    distributed-llama legacy ``.bin`` file, whose header does not say it; ``workers``,
    ``secret``, ``ready_timeout``: the cluster's, as for :class:`dllama._core.Node`;
    ``max_memory``: most bytes this machine's slice may take (``None``: the memory available).
    """

    def __init__(
        self,
        model: str | Path,
        tokenizer: str | Path,
        *,
        nthreads: int = 1,
        buffer_float_type: str = "q80",
        max_seq_len: int = 0,
        weights_float_type: str | None = None,
        node: _core.Node | None = None,
        workers: list[str] | None = None,
        secret: str | None = None,
        ready_timeout: float = 600.0,
        max_memory: int | None = None,
    ) -> None:
        if node is None and _is_gguf(model):
            raise ValueError(
                f"{model} is a GGUF file; dllama runs .m models: convert it first with "
                f"`dllama convert {model} -o model.m -t tokenizer.t`"
            )
        self.tokenizer = Tokenizer(str(tokenizer))
        self.node = node or _core.Node(
            str(model),
            nthreads=nthreads,
            buffer_float_type=buffer_float_type,
            max_seq_len=max_seq_len,
            weights_float_type=weights_float_type,
            workers=workers,
            secret=secret,
            ready_timeout=ready_timeout,
            max_memory=max_memory,
        )
        if self.tokenizer.vocab_size > self.node.vocab_size:
            # the tokenizer would give ids past the embedding
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                f"{self.node.vocab_size}: they do not belong together"
            )
        #: the ids model and tokenizer share: a model may pad its embedding past the
        #: tokenizer (Qwen3: 151 936 rows for 151 669 tokens); the padding is never sampled
        self.vocab_size = self.tokenizer.vocab_size
        self.last_summary: Summary | None = None
        #: the tokens whose keys and values are in the KV cache, at positions 0, 1, ...
        self._cached: list[int] = []

    def encode(self, prompt: str, parse_special: bool = False) -> list[int]:
        """The prompt's token ids (with BOS when the tokenizer's file says to add one);
        ``parse_special`` turns the text of special tokens (``<|im_start|>``) into their ids."""
        return self.tokenizer.encode(prompt, parse_special=parse_special)

    def reset(self) -> None:
        """Forget the KV cache: the next call prefills its whole prompt."""
        self._cached = []

    def generate(
        self,
        prompt: str | Sequence[int],
        steps: int = 256,
        temperature: float = 0.8,
        topp: float = 0.9,
        seed: int | None = None,
        *,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        stop_tokens: Iterable[int] = (),
        top_logprobs: int | None = None,
        parse_special: bool = False,
        cancel: Callable[[], bool] | None = None,
    ) -> Generator[Piece, None, None]:
        """Generate up to ``steps`` tokens after ``prompt`` (text, or token ids), one
        :class:`Piece` at a time.

        ``sampling`` (all the sampler's options) replaces ``temperature``, ``topp`` and
        ``seed``; ``stop``: strings that end the text (not included); ``stop_tokens``: ids that
        end it besides the end-of-sequence ones (a chat template's end of turn);
        ``top_logprobs``: give each piece its log-probability and that many alternatives;
        ``cancel``: asked between the prefill's slices of ``PREFILL_SLICE`` tokens, True ends
        the call before its first piece (stop reason "cancelled"). After the iterator ends,
        ``self.last_summary`` holds the totals.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        params = sampling or SamplingParams(temperature=temperature, top_p=topp, seed=seed)
        sampler = Sampler.from_params(params, self.vocab_size)
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
        if isinstance(prompt, str):
            tokens = self.encode(prompt, parse_special=parse_special)
        else:
            tokens = [int(t) for t in prompt]
            vocab = self.vocab_size
            if any(not 0 <= t < vocab for t in tokens):
                raise ValueError(f"a prompt token is outside the vocabulary of {vocab} tokens")
        if not tokens:
            raise ValueError("the prompt encodes to no tokens")
        max_seq_len = self.node.max_seq_len
        if len(tokens) >= max_seq_len:
            raise ValueError(
                f"the prompt is {len(tokens)} tokens, which leaves no room in max_seq_len "
                f"{max_seq_len} (raise --max-seq-len)"
            )
        eos = set(self.tokenizer.eos_ids) | set(stop_tokens)
        decoder = self.tokenizer.decoder()
        stops = StopStrings(stop)
        sampler.add_prompt(tokens)
        self.last_summary = None

        # prefill: the prompt's tokens after the longest prefix already in the KV cache (at
        # least its last token, whose logits give the first generated one), in slices
        cached = _common_prefix(self._cached, tokens)
        cached = min(cached, len(tokens) - 1)
        t0 = time.perf_counter()
        # every step's logits land in this one array (no fresh array per token)
        out = np.empty(self.node.vocab_size, np.float32)
        done = cached
        while True:
            end = min(done + PREFILL_SLICE, len(tokens))
            self._cached = tokens[:done]  # all the cache holds if this pass fails
            logits = self.node.forward(tokens[done:end], done, out)[: self.vocab_size]
            done = end
            if done == len(tokens):
                break
            if cancel is not None and cancel():
                self._cached = tokens[:done]
                prompt_ms = (time.perf_counter() - t0) * 1000
                self.last_summary = Summary(len(tokens), prompt_ms, 0, 0, 0.0, "cancelled", cached)
                return
        prompt_ms = (time.perf_counter() - t0) * 1000
        self._cached = list(tokens)
        pos = len(tokens)
        generated = 0
        decode_ms = 0.0
        step_start = time.perf_counter()
        inference_ms = self.node.last_inference_ms
        transfer_ms, sent, recv = self._net_stats()
        # the first token comes from the prompt's logits; its cost is the prefill's
        first = True
        stop_reason = "cancelled"  # unless the loop ends by itself
        try:
            while True:
                token = sampler.sample(logits)
                if token in eos:
                    stop_reason = "eos"
                    break
                sampler.accept(token)
                text = stops.feed(decoder.feed(token))
                lp: float | None = None
                top: tuple[tuple[int, float], ...] | None = None
                if top_logprobs is not None:
                    lp, alts = logprobs(logits, token, top_logprobs)
                    top = tuple(alts)
                if first:
                    total_ms = prompt_ms + (time.perf_counter() - step_start) * 1000
                    first = False
                else:
                    total_ms = (time.perf_counter() - step_start) * 1000
                    decode_ms += total_ms
                generated += 1
                yield Piece(
                    token, text, total_ms, inference_ms, transfer_ms, sent / 1000, recv / 1000,
                    lp, top,
                )  # fmt: skip
                if stops.hit is not None:
                    stop_reason = "stop"
                    break
                if generated >= steps:
                    stop_reason = "steps"
                    break
                if pos >= max_seq_len:
                    stop_reason = "max_seq_len"
                    break
                step_start = time.perf_counter()
                logits = self.node.forward([token], pos, out)[: self.vocab_size]
                self._cached.append(token)
                inference_ms = self.node.last_inference_ms
                transfer_ms, sent, recv = self._net_stats()
                pos += 1
            if stops.hit is None:
                tail = stops.feed(decoder.flush())
                if stops.hit is None:
                    tail += stops.flush()
                else:
                    stop_reason = "stop"
                if tail:
                    yield Piece(-1, tail, 0.0, 0.0, 0.0, 0.0, 0.0)
        finally:
            # also when the caller stops early (closes the iterator): "cancelled"
            self.last_summary = Summary(
                len(tokens),
                prompt_ms,
                generated,
                max(generated - 1, 0),
                decode_ms,
                stop_reason,
                cached,
            )

    def _net_stats(self) -> tuple[float, int, int]:
        n = self.node
        return n.last_transfer_ms, n.last_sent_bytes, n.last_recv_bytes


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
