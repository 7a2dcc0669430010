"""Choosing the next token from the logits, shared by ``dllama run``, ``chat`` and ``serve``.

The logits of one step go through, in this order (the order of llama.cpp and vLLM):

1. ``logit_bias``: a number added to the logit of chosen token ids;
2. ``repetition_penalty`` (Hugging Face's): the logit of every token already seen (prompt and
   generated) is divided by the penalty when positive, multiplied by it when negative;
3. ``presence_penalty`` and ``frequency_penalty`` (OpenAI's): subtracted from the logit of
   every generated token, once for being there and once per occurrence;
4. temperature 0 picks the most likely token; otherwise the logits are divided by the
   temperature and turned into probabilities, then
5. ``top_k`` keeps the k most likely tokens (0: all), ``top_p`` the smallest set of most likely
   tokens whose probabilities add up to ``top_p`` (0 or 1 or more: all), ``min_p`` the tokens at
   least ``min_p`` times as likely as the most likely one (0: all), and a token is drawn from
   what is left, renormalised. A ``seed`` makes the draws, and so the text, reproducible.

Log-probabilities (``logprobs``) are the model's own: the log-softmax of the raw logits,
before any of the steps above.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

#: most alternatives a caller can ask per token (OpenAI's limit for chat completions)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Every option of the sampler; :meth:`check` says which one is out of range."""

    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    #: token id -> number added to its logit (OpenAI's range: -100..100)
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def check(self, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the first option outside its range."""

        def finite(name: str, v: float, lo: float, hi: float, lo_open: bool = False) -> None:
            if not np.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
                bound = f"> {lo}" if lo_open else f">= {lo}"
                upper = "" if hi == np.inf else f" and <= {hi}"
                raise ValueError(f"{name} must be {bound}{upper}, got {v}")

        finite("temperature", self.temperature, 0.0, np.inf)
        finite("top_p", self.top_p, 0.0, np.inf)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        finite("min_p", self.min_p, 0.0, 1.0)
        finite("repetition_penalty", self.repetition_penalty, 0.0, np.inf, lo_open=True)
        finite("presence_penalty", self.presence_penalty, -2.0, 2.0)
        finite("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in 0..2^64-1, got {self.seed}")
        for tok, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= tok < vocab_size:
                raise ValueError(
                    f"logit_bias token {tok} is outside the vocabulary of {vocab_size} tokens"
                )
            finite(f"logit_bias[{tok}]", bias, -100.0, 100.0)


class Sampler:
    """Draws token ids from logits, remembering the tokens seen for the penalties.

    >>> s = Sampler(temperature=0.0)
    >>> s.sample(np.array([0.1, 2.0, -1.0], dtype=np.float32))
    1
    """

    def __init__(
        self,
        temperature: float = 0.0,
        top_p: float = 0.9,
        seed: int | None = None,
        *,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.params = SamplingParams(
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=top_k,
            min_p=float(min_p),
            repetition_penalty=float(repetition_penalty),
            presence_penalty=float(presence_penalty),
            frequency_penalty=float(frequency_penalty),
            seed=seed,
            logit_bias=dict(logit_bias or {}),
        )
        self.params.check(vocab_size)
        self._rng = np.random.default_rng(seed)
        #: tokens of the prompt (repetition penalty only) and generated (all penalties)
        self._seen: set[int] = set()
        self._generated: Counter[int] = Counter()
        #: float64 work arrays of the vocabulary's size, reused from step to step: a fresh
        #: array of a 150k vocabulary is a fresh mapping, and its page faults cost more than
        #: the arithmetic
        self._work: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None

    @classmethod
    def from_params(cls, p: SamplingParams, vocab_size: int | None = None) -> Sampler:
        return cls(
            p.temperature,
            p.top_p,
            p.seed,
            top_k=p.top_k,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logit_bias=p.logit_bias,
            vocab_size=vocab_size,
        )

    @property
    def temperature(self) -> float:
        return self.params.temperature

    def add_prompt(self, tokens: Iterable[int]) -> None:
        """The prompt's tokens count for the repetition penalty."""
        self._seen.update(tokens)

    def accept(self, token: int) -> None:
        """A token was generated: it counts for all the penalties from the next step on."""
        self._seen.add(token)
        self._generated[token] += 1

    def _unchanged(self) -> bool:
        """Whether steps 1-3 leave every logit as it is (no bias, no penalty in effect)."""
        p = self.params
        return (
            not p.logit_bias
            and (p.repetition_penalty == 1.0 or not self._seen)
            and (not (p.presence_penalty or p.frequency_penalty) or not self._generated)
        )

    def _buffers(self, n: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        if self._work is None or self._work[0].size != n:
            self._work = (np.empty(n, np.float64), np.empty(n, np.float64))
        return self._work

    def processed_logits(
        self, logits: npt.NDArray[np.float32], out: npt.NDArray[np.float64] | None = None
    ) -> npt.NDArray[np.float64]:
        """The logits after the bias and the penalties (steps 1-3), in float64 (into
        ``out`` when given)."""
        p = self.params
        if out is None:
            z = logits.astype(np.float64)
        else:
            z = out
            np.copyto(z, logits)
        for tok, bias in p.logit_bias.items():
            if tok < z.size:
                z[tok] += bias
        if p.repetition_penalty != 1.0 and self._seen:
            ids = np.fromiter(self._seen, dtype=np.int64)
            ids = ids[ids < z.size]
            v = z[ids]
            z[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._generated:
            ids = np.fromiter(self._generated.keys(), dtype=np.int64)
            counts = np.fromiter(self._generated.values(), dtype=np.float64)
            keep = ids < z.size
            z[ids[keep]] -= p.presence_penalty + p.frequency_penalty * counts[keep]
        return z

    def probabilities(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Softmax of the processed logits over the temperature (temperature > 0)."""
        return self._probabilities(logits, np.empty(logits.size, np.float64))

    def _probabilities(
        self, logits: npt.NDArray[np.float32], out: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """:meth:`probabilities` computed in ``out``, operation for operation."""
        z = self.processed_logits(logits, out)
        np.divide(z, self.params.temperature, out=z)
        z -= z.max()
        np.exp(z, out=z)
        np.divide(z, z.sum(), out=z)
        return z

    def sample(self, logits: npt.NDArray[np.float32]) -> int:
        """The next token id for these logits (1-D, vocab_size); call :meth:`accept` with it
        for the penalties to see it (``generate`` does)."""
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
        # all finite iff the least and the greatest are (a NaN propagates to both): two
        # reductions, no temporary array of the vocabulary's size
        if not (np.isfinite(logits.min()) and np.isfinite(logits.max())):
            raise ValueError("logits contain NaN or infinity")
        p_ = self.params
        if p_.temperature == 0.0:
            if self._unchanged():
                # float32 -> float64 is exact and keeps the order: the same first maximum
                return int(np.argmax(logits))
            return int(np.argmax(self.processed_logits(logits)))
        work, spare = self._buffers(logits.size)
        p = self._probabilities(logits, work)
        u = float(self._rng.random())
        n = p.size
        truncate = 0.0 < p_.top_p < 1.0 or 0 < p_.top_k < n or p_.min_p > 0.0
        if not truncate or n == 1:
            i = int(np.searchsorted(np.cumsum(p, out=spare), u, side="right"))
            return min(i, n - 1)
        # candidates, most likely first. Only tokens with p >= (1 - top_p) / (n - 1) can be in
        # the nucleus (the others together hold less than 1 - top_p), so only those are sorted
        nucleus = 0.0 < p_.top_p < 1.0
        if 0 < p_.top_k < n:
            cand = np.argpartition(np.negative(p, out=spare), p_.top_k - 1)[: p_.top_k]
            order = _most_likely_first(p, cand)
        elif nucleus:
            cand = np.flatnonzero(p >= (1.0 - p_.top_p) / (n - 1))
            order = _nucleus_order(p, cand, p_.top_p)
        else:
            order = _most_likely_first(p, np.flatnonzero(p >= p_.min_p * p.max()))
        kept = p[order]
        last = kept.size
        if nucleus:
            # the smallest prefix whose mass reaches top_p (of what top_k left, renormalised)
            mass = kept.sum() if 0 < p_.top_k < n else 1.0
            last = min(int(np.searchsorted(np.cumsum(kept), p_.top_p * mass)) + 1, last)
        if p_.min_p > 0.0:
            last = min(last, max(1, int(np.count_nonzero(kept >= p_.min_p * kept[0]))))
        kept = kept[:last]
        i = int(np.searchsorted(np.cumsum(kept), u * kept.sum(), side="right"))
        return int(order[min(i, last - 1)])


def _most_likely_first(
    p: npt.NDArray[np.float64], cand: npt.NDArray[np.intp]
) -> npt.NDArray[np.intp]:
    """``cand`` ordered by probability, most likely first, equal ones kept in their order."""
    order: npt.NDArray[np.intp] = cand[np.argsort(-p[cand], kind="stable")]
    return order


def _nucleus_order(
    p: npt.NDArray[np.float64], cand: npt.NDArray[np.intp], top_p: float
) -> npt.NDArray[np.intp]:
    """The first entries of ``cand[np.argsort(-p[cand], kind="stable")]`` (candidates
    ascending, most likely first, ties by index), as many as hold the nucleus of mass
    ``top_p``: the m most likely are found by partition (m = 64, then 4 times more while
    their mass falls short) and only they are sorted. Ties at the m-th probability keep
    the lowest indices, as the stable sort does, so the prefix is the full sort's."""
    pc = p[cand]
    m = 64
    while m < cand.size:
        v = np.partition(pc, cand.size - m)[cand.size - m]  # the m-th largest
        above = pc > v
        tied = np.flatnonzero(pc == v)[: m - int(np.count_nonzero(above))]
        above[tied] = True
        order = _most_likely_first(p, cand[above])  # cand[above] ascending, as cand
        # the prefix holds the nucleus when its mass reaches top_p before its end
        cut = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
        if cut <= order.size:
            return order
        m *= 4
    return _most_likely_first(p, cand)


def logprobs(
    logits: npt.NDArray[np.float32], token: int, top_n: int
) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` and its ``top_n`` most likely alternatives
    (id, log-probability), most likely first: the log-softmax of the raw logits."""
    if not 0 <= top_n <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_n}")
    z = logits.astype(np.float64)
    z -= z.max()
    lse = float(np.log(np.exp(z).sum()))
    top: list[tuple[int, float]] = []
    if top_n:
        idx = np.argpartition(-z, top_n - 1)[:top_n]
        idx = idx[np.argsort(-z[idx], kind="stable")]
        top = [(int(i), float(z[i]) - lse) for i in idx]
    return float(z[token]) - lse, top
