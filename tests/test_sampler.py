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
    s = Sampler(temperature=1.0, top_p=0.7, seed=1)
    draws = [s.sample(logits) for _ in range(2000)]
    assert set(draws) == {0, 1}
    # within the nucleus the ratio follows the renormalised probabilities 0.625 / 0.375
    share0 = draws.count(0) / len(draws)
    assert 0.57 < share0 < 0.68


def test_full_distribution_when_topp_is_one() -> None:
    p = np.array([0.4, 0.3, 0.2, 0.1])
    s = Sampler(temperature=1.0, top_p=1.0, seed=3)
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
    [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": -0.5}],
)
def test_bad_options(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Sampler(**kwargs)  # type: ignore[arg-type]


def test_bad_logits() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Sampler(1.0).sample(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        Sampler(0.0).sample(np.zeros((2, 2), dtype=np.float32))
    # one bad value anywhere, at either temperature, greedy or not
    for bad in (np.nan, np.inf, -np.inf):
        for t in (0.0, 0.7):
            for at in (0, 4, 9):
                z = np.linspace(-3, 3, 10, dtype=np.float32)
                z[at] = bad
                with pytest.raises(ValueError, match="NaN or infinity"):
                    Sampler(t).sample(z)


def test_greedy_takes_the_first_maximum_with_and_without_penalties() -> None:
    z = np.array([1.0, 5.0, -2.0, 5.0, 4.9], dtype=np.float32)
    s = Sampler(0.0, repetition_penalty=1.5)
    assert s.sample(z) == 1  # nothing seen yet: the logits as they are, first of the tie
    s.accept(1)
    assert s.sample(z) == 3  # 5.0 / 1.5 for token 1 now
    assert Sampler(0.0, logit_bias={4: 0.2}).sample(z) == 4


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
    for trial in range(300):
        n = (500, 5000)[trial % 2]
        logits = (rng.normal(size=n) * rng.uniform(0.5, 5)).astype(np.float32)
        if trial % 3 == 0:
            # coarse logits: ties everywhere, also where the sampler's partial sort cuts
            logits = np.round(logits * 2) / 2
        topp = float(rng.uniform(0.05, 0.99))
        s = Sampler(temperature=0.9, top_p=topp, seed=trial)
        u = float(np.random.default_rng(trial).random())  # the sampler's first draw
        want = full_sort_sample(s.probabilities(logits), topp, u)
        assert s.sample(logits) == want


# --- every option against an independent numpy reference ------------------------------------


def reference_sample(
    logits: np.ndarray,
    u: float,
    prompt: list[int],
    generated: list[int],
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> int:
    """Hugging Face's order of warpers, written out with a full sort and masks. The draw is
    the inverse CDF at the sampler's uniform number ``u``: over the token ids when nothing is
    truncated, over the kept tokens most likely first otherwise (the sampler's convention)."""
    z = logits.astype(np.float64).copy()
    for t, b in (logit_bias or {}).items():
        z[t] += b
    for t in set(prompt) | set(generated):
        z[t] = z[t] / repetition_penalty if z[t] > 0 else z[t] * repetition_penalty
    for t in set(generated):
        z[t] -= presence_penalty + frequency_penalty * generated.count(t)
    if temperature == 0:
        return int(np.argmax(z))
    z = z / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if not (0 < top_k < p.size or 0 < top_p < 1 or min_p > 0):
        return min(int(np.searchsorted(np.cumsum(p), u, side="right")), p.size - 1)
    order = np.argsort(-p, kind="stable")
    q = p[order]
    keep = np.ones(q.size, dtype=bool)
    if 0 < top_k < q.size:
        keep[top_k:] = False
    if 0 < top_p < 1:
        r = np.where(keep, q, 0.0)
        r /= r.sum()
        before = np.cumsum(r) - r  # mass of the more likely tokens
        keep &= before < top_p * (1 - 1e-12)
    if min_p > 0:
        keep &= q >= min_p * q[0]
    keep[0] = True
    kept = q[keep]
    i = int(np.searchsorted(np.cumsum(kept), u * kept.sum(), side="right"))
    return int(order[np.flatnonzero(keep)[min(i, kept.size - 1)]])


OPTIONS: list[dict[str, object]] = [
    {"temperature": 0.7},
    {"temperature": 1.0, "top_k": 5},
    {"temperature": 1.3, "top_k": 40, "top_p": 0.8},
    {"temperature": 0.9, "top_p": 0.5},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 1.0, "min_p": 0.05, "top_p": 0.95, "top_k": 20},
    {"temperature": 0.0, "repetition_penalty": 1.3},
    {"temperature": 1.0, "repetition_penalty": 1.5},
    {"temperature": 0.8, "repetition_penalty": 0.7},
    {"temperature": 0.0, "presence_penalty": 1.5},
    {"temperature": 1.0, "presence_penalty": -1.0, "frequency_penalty": 0.7},
    {"temperature": 0.0, "frequency_penalty": 2.0},
    {"temperature": 0.0, "logit_bias": {3: 100.0}},
    {"temperature": 1.0, "logit_bias": {0: -100.0, 7: 5.0, 11: 2.5}},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_each_option_matches_the_numpy_reference(opts: dict[str, object]) -> None:
    opts = {"top_p": 1.0, **opts}
    rng = np.random.default_rng(11)
    vocab = 64
    for trial in range(30):
        # few distinct tokens in the prompt and a peaked distribution, so that the
        # penalties and the truncations change the draws
        logits = (rng.normal(size=vocab) * rng.uniform(0.5, 4)).astype(np.float32)
        prompt = [int(t) for t in rng.integers(0, vocab, size=6)]
        s = Sampler(seed=trial, **opts)  # type: ignore[arg-type]
        s.add_prompt(prompt)
        draws = np.random.default_rng(trial)
        generated: list[int] = []
        for _ in range(12):
            got = s.sample(logits)
            u = float(draws.random()) if s.temperature > 0 else 0.0
            want = reference_sample(logits, u, prompt, generated, **opts)  # type: ignore[arg-type]
            assert got == want, (trial, generated)
            s.accept(got)
            generated.append(got)


def test_top_k_and_min_p_distributions() -> None:
    p = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = np.log(p).astype(np.float32)
    s = Sampler(1.0, 1.0, seed=2, top_k=2)
    d = np.bincount([s.sample(logits) for _ in range(3000)], minlength=5) / 3000
    assert d[2:].sum() == 0 and abs(d[0] - 4 / 7) < 0.03
    s = Sampler(1.0, 1.0, seed=2, min_p=0.2)  # keeps p >= 0.08: the first three
    d = np.bincount([s.sample(logits) for _ in range(3000)], minlength=5) / 3000
    assert d[3:].sum() == 0 and abs(d[0] - 0.4 / 0.9) < 0.03


def test_penalties_stop_a_greedy_repetition() -> None:
    logits = np.array([3.0, 2.9, 1.0], dtype=np.float32)
    plain = Sampler(0.0)
    assert [plain.sample(logits) for _ in range(3)] == [0, 0, 0]
    s = Sampler(0.0, presence_penalty=0.5)
    seq = []
    for _ in range(3):
        seq.append(s.sample(logits))
        s.accept(seq[-1])
    assert seq == [0, 1, 0]  # 2.5 vs 2.9, then both penalised once: 2.5 vs 2.4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"min_p": 1.5}, "min_p must be >= 0.0 and <= 1.0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0.0"),
        ({"presence_penalty": 2.5}, "presence_penalty must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty must be"),
        ({"logit_bias": {5: 101.0}}, r"logit_bias\[5\] must be >= -100.0 and <= 100.0"),
        ({"logit_bias": {99: 1.0}, "vocab_size": 10}, "logit_bias token 99 is outside"),
        ({"seed": -1}, "seed must be in"),
    ],
)
def test_out_of_range_options_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sampler(1.0, **kwargs)  # type: ignore[arg-type]


def test_logprobs_are_the_log_softmax_of_the_raw_logits() -> None:
    from dllama.sampler import logprobs

    rng = np.random.default_rng(4)
    logits = rng.normal(size=300).astype(np.float32) * 3
    ref = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    lp, top = logprobs(logits, 17, 5)
    assert abs(lp - ref[17]) < 1e-9
    want = np.argsort(-ref)[:5]
    assert [t for t, _ in top] == list(want)
    assert np.allclose([v for _, v in top], ref[want])
    with pytest.raises(ValueError, match="top_logprobs must be in 0..20"):
        logprobs(logits, 0, 21)


def test_stop_strings_across_token_boundaries() -> None:
    from dllama.generate import StopStrings

    s = StopStrings(["END", "\n\nUser:"])
    out = [s.feed(t) for t in ["Hello", " E", "N", "x", "\n", "\nUs", "er:", " more"]]
    assert "".join(out) == "Hello ENx" and s.hit == "\n\nUser:"
    s = StopStrings(["stop"])
    assert s.feed("no st") == "no " and s.flush() == "st" and s.hit is None
    s = StopStrings(["ab", "b"])  # the earliest match wins
    assert s.feed("xab") == "x" and s.hit == "ab"
