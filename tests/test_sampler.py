"""The sampler: greedy, temperature, top-p, reproducible seeds."""

from __future__ import annotations

import numpy as np
import pytest
from dllama.sampler import Sampler


def test_temperature_zero_is_argmax() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        assert Sampler(temperature=0.0).sample(logits) == int(np.argmax(logits))


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    logits = np.linspace(-1, 1, 50).astype(np.float32)
    s1, s2, s3 = Sampler(1.0, 0.9, seed=42), Sampler(1.0, 0.9, seed=42), Sampler(1.0, 0.9, seed=7)
    d1 = [s1.sample(logits) for _ in range(50)]
    d2 = [s2.sample(logits) for _ in range(50)]
    d3 = [s3.sample(logits) for _ in range(50)]
    assert d1 == d2
    assert d1 != d3


def test_top_p_keeps_only_the_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps tokens 0 and 1 only
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p).astype(np.float32)
    s = Sampler(temperature=1.0, topp=0.7, seed=1)
    draws = [s.sample(logits) for _ in range(2000)]
    assert set(draws) == {0, 1}
    # within the nucleus the ratio follows the renormalised probabilities 0.625 / 0.375
    share0 = draws.count(0) / len(draws)
    assert 0.57 < share0 < 0.68


def test_full_distribution_when_topp_is_one() -> None:
    p = np.array([0.4, 0.3, 0.2, 0.1])
    s = Sampler(temperature=1.0, topp=1.0, seed=3)
    draws = np.array([s.sample(np.log(p).astype(np.float32)) for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    assert np.all(np.abs(freq - p) < 0.03), freq


def test_temperature_sharpens() -> None:
    logits = np.array([1.0, 0.0], dtype=np.float32)
    cold = Sampler(temperature=0.1).probabilities(logits)
    hot = Sampler(temperature=10.0).probabilities(logits)
    assert cold[0] > 0.9999
    assert 0.5 < hot[0] < 0.53


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"temperature": float("nan")}, {"topp": -0.5}],
)
def test_bad_options(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Sampler(**kwargs)  # type: ignore[arg-type]


def test_bad_logits() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Sampler(1.0).sample(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        Sampler(0.0).sample(np.zeros((2, 2), dtype=np.float32))


def test_top_p_candidates_filter_changes_nothing() -> None:
    """The nucleus found among the pre-filtered candidates is the one a full sort finds."""

    def full_sort_sample(p: np.ndarray, topp: float, u: float) -> int:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        last = min(int(np.searchsorted(cum, topp)) + 1, p.size)
        kept = p[order][:last]
        i = int(np.searchsorted(np.cumsum(kept), u * kept.sum(), side="right"))
        return int(order[min(i, last - 1)])

    rng = np.random.default_rng(5)
    for trial in range(200):
        logits = (rng.normal(size=500) * rng.uniform(0.5, 5)).astype(np.float32)
        topp = float(rng.uniform(0.05, 0.99))
        s = Sampler(temperature=0.9, topp=topp, seed=trial)
        u = float(np.random.default_rng(trial).random())  # the sampler's first draw
        want = full_sort_sample(s.probabilities(logits), topp, u)
        assert s.sample(logits) == want
