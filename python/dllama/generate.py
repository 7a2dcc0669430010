"""The library API: load a model and its tokenizer, generate text as it comes.

>>> from dllama.generate import LLM
>>> llm = LLM("model.m", "tokenizer.t", nthreads=2)            # doctest: +SKIP
>>> for piece in llm.generate("Once upon a time", steps=32):   # doctest: +SKIP
...     print(piece.text, end="", flush=True)
>>> llm.last_summary                                            # doctest: +SKIP

``generate`` yields one :class:`Piece` per generated token: its id, the text it adds (empty
while a multi-byte character is incomplete) and its timings. It stops at ``steps`` tokens,
at an end-of-sequence token, or at the end of the KV cache; the prompt and the generated
tokens together must fit in ``max_seq_len``. Each call starts a new sequence at position 0.
``dllama run`` is built on this API.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from dllama import _core
from dllama.sampler import Sampler
from dllama.tokenizer import Tokenizer


@dataclass(frozen=True)
class Piece:
    """One generated token and what it cost (the seed's per-token stats line).

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

    def to_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


@dataclass(frozen=True)
class Summary:
    """Totals of one ``generate`` call."""

    prompt_tokens: int
    #: the prefill: all prompt tokens through the model, giving the first generated token
    prompt_ms: float
    generated_tokens: int
    #: forward passes after the prefill (one per generated token after the first) and
    #: their wall time: the decode speed
    decode_steps: int
    decode_ms: float
    #: why generation stopped: "steps", "eos" or "max_seq_len"
    stop_reason: str

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / (self.prompt_ms / 1000) if self.prompt_ms > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        return self.decode_ms / self.decode_steps if self.decode_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token if self.ms_per_token > 0 else 0.0

    def to_dict(self) -> dict[str, int | float | str]:
        d: dict[str, int | float | str] = dict(asdict(self))
        d["prompt_tokens_per_s"] = self.prompt_tokens_per_s
        d["ms_per_token"] = self.ms_per_token
        d["tokens_per_s"] = self.tokens_per_s
        return d


class LLM:
    """A model (``.m``) and tokenizer (``.t`` or SentencePiece ``.model``) ready to generate.

    ``nthreads``: threads of the matmuls; ``buffer_float_type``: ``"q80"`` (activations
    quantized to 8 bits for Q40 weights, as llama.cpp) or ``"f32"``; ``max_seq_len``: KV
    cache length, 0 for the model's own capped at 4096; ``weights_float_type``: only for a
    legacy seed ``.bin`` file, whose header does not say it.
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
    ) -> None:
        self.tokenizer = Tokenizer(str(tokenizer))
        self.node = node or _core.Node(
            str(model),
            nthreads=nthreads,
            buffer_float_type=buffer_float_type,
            max_seq_len=max_seq_len,
            weights_float_type=weights_float_type,
            workers=workers,
            secret=secret,
        )
        if self.tokenizer.vocab_size > self.node.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                f"{self.node.vocab_size}: they do not belong together"
            )
        self.last_summary: Summary | None = None

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids (with BOS when the tokenizer's file says to add one)."""
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompt: str,
        steps: int = 256,
        temperature: float = 0.8,
        topp: float = 0.9,
        seed: int | None = None,
    ) -> Iterator[Piece]:
        """Generate up to ``steps`` tokens after ``prompt``, one :class:`Piece` at a time.

        After the iterator ends, ``self.last_summary`` holds the totals.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        sampler = Sampler(temperature, topp, seed)
        tokens = self.encode(prompt)
        if not tokens:
            raise ValueError("the prompt encodes to no tokens")
        max_seq_len = self.node.max_seq_len
        if len(tokens) >= max_seq_len:
            raise ValueError(
                f"the prompt is {len(tokens)} tokens, which leaves no room in max_seq_len "
                f"{max_seq_len} (raise --max-seq-len)"
            )
        eos = set(self.tokenizer.eos_ids)
        decoder = self.tokenizer.decoder()
        self.last_summary = None

        # prefill: the whole prompt in one call (batched inside the node)
        t0 = time.perf_counter()
        logits = self.node.forward(tokens, 0)
        prompt_ms = (time.perf_counter() - t0) * 1000
        pos = len(tokens)
        generated = 0
        decode_ms = 0.0
        stop = "steps"
        step_start = time.perf_counter()
        inference_ms = self.node.last_inference_ms
        transfer_ms, sent, recv = self._net_stats()
        # the first token comes from the prompt's logits; its cost is the prefill's
        first = True
        while True:
            token = sampler.sample(logits)
            if token in eos:
                stop = "eos"
                break
            text = decoder.feed(token)
            if first:
                total_ms = prompt_ms + (time.perf_counter() - step_start) * 1000
                first = False
            else:
                total_ms = (time.perf_counter() - step_start) * 1000
                decode_ms += total_ms
            generated += 1
            yield Piece(token, text, total_ms, inference_ms, transfer_ms, sent / 1000, recv / 1000)
            if generated >= steps:
                stop = "steps"
                break
            if pos >= max_seq_len:
                stop = "max_seq_len"
                break
            step_start = time.perf_counter()
            logits = self.node.forward([token], pos)
            inference_ms = self.node.last_inference_ms
            transfer_ms, sent, recv = self._net_stats()
            pos += 1
        tail = decoder.flush()
        if tail:
            yield Piece(-1, tail, 0.0, 0.0, 0.0, 0.0, 0.0)
        self.last_summary = Summary(
            len(tokens), prompt_ms, generated, max(generated - 1, 0), decode_ms, stop
        )

    def _net_stats(self) -> tuple[float, int, int]:
        n = self.node
        return n.last_transfer_ms, n.last_sent_bytes, n.last_recv_bytes
