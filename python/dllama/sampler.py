"""Choosing the next token from the logits: greedy, or temperature then top-p (nucleus).

Temperature 0 picks the most likely token. Otherwise the logits are divided by the
temperature, turned into probabilities, and a token is drawn from the smallest set of most
likely tokens whose probabilities add up to ``topp`` (all tokens when ``topp`` is 0 or 1 or
more). A ``seed`` makes the draws, and so the generated text, reproducible.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class Sampler:
    """Draws token ids from logits.

    >>> s = Sampler(temperature=0.0)
    >>> s.sample(np.array([0.1, 2.0, -1.0], dtype=np.float32))
    1
    """

    def __init__(
        self, temperature: float = 0.0, topp: float = 0.9, seed: int | None = None
    ) -> None:
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not np.isfinite(topp) or topp < 0:
            raise ValueError(f"topp must be >= 0, got {topp}")
        self.temperature = float(temperature)
        self.topp = float(topp)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def probabilities(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Softmax of ``logits / temperature`` (temperature > 0), in float64."""
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        return p

    def sample(self, logits: npt.NDArray[np.float32]) -> int:
        """The next token id for these logits (1-D, vocab_size)."""
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
        if not np.all(np.isfinite(logits)):
            raise ValueError("logits contain NaN or infinity")
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        p = self.probabilities(logits)
        u = float(self._rng.random())
        if 0.0 < self.topp < 1.0 and p.size > 1:
            # Only tokens with p >= (1 - topp) / (n - 1) can be in the nucleus (the others
            # together hold less than 1 - topp), so only those are sorted (as llama2.c).
            cand = np.flatnonzero(p >= (1.0 - self.topp) / (p.size - 1))
            order = cand[np.argsort(-p[cand], kind="stable")]
            sorted_p = p[order]
            cum = np.cumsum(sorted_p)
            # keep the smallest prefix whose mass reaches topp (at least one token)
            last = int(np.searchsorted(cum, self.topp)) + 1
            last = min(last, p.size)
            kept = sorted_p[:last]
            i = int(np.searchsorted(np.cumsum(kept), u * kept.sum(), side="right"))
            return int(order[min(i, last - 1)])
        i = int(np.searchsorted(np.cumsum(p), u, side="right"))
        return min(i, p.size - 1)
