"""The forward pass against transformers (offline, random LlamaForCausalLM models).

- F32 weights: our logits at every position of a 16-token prompt equal transformers' within
  1e-4 relative (max |ours - theirs| / max |theirs|), token by token and batched; full
  attention and GQA, tied and untied classifier, the three RoPE layouts.
- Q40 weights with Q80 activations against transformers running the same (dequantized)
  weights in f32: the only difference left is the 8-bit quantization of the activations.
  Stated bound: max logit error <= 2.5% of the largest logit magnitude (Q80_LOGIT_BOUND), and
  top-1 agreement on at least 99% of the positions where the answer is decisive.
- MistralForCausalLM from its HF folder: head_dim apart from dim / n_heads, and a sliding
  window (the file stops at it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from dllama import _core
from forward_utils import dequantized_copy, hf_logits, random_llama, write_legacy_bin, write_m

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# (id, model kwargs, rope_type of the .m file)
CONFIGS: list[tuple[str, dict[str, Any], int]] = [
    ("full-attention-untied", {"heads": 4, "kv_heads": 4, "tied": False}, 0),
    ("gqa-tied", {"heads": 4, "kv_heads": 2, "tied": True}, 0),
    ("gqa-untied-neox", {"heads": 8, "kv_heads": 2, "tied": False}, 1),
    (
        "mqa-llama31",
        {"heads": 4, "kv_heads": 1, "rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0},
        2,
    ),
]

#: Q40 weights with Q80 activations vs the same weights in f32: max |logit error| relative to
#: the largest logit (measured 0.007 to 0.014 on these models)
Q80_LOGIT_BOUND = 0.025

PROMPT = [1, 17, 99, 3, 42, 42, 7, 120, 64, 5, 88, 23, 0, 127, 31, 9]


def rel_err(ours: npt.NDArray[np.float32], ref: npt.NDArray[np.float32]) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("cid,kwargs,rope_type", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_f32_logits_equal_transformers(
    tmp_path: Path, cid: str, kwargs: dict[str, Any], rope_type: int
) -> None:
    model = random_llama(seed=1, **kwargs)
    path = tmp_path / "m.m"
    write_m(model, path, "f32", rope_type)
    ref = hf_logits(model, PROMPT)
    node = _core.Node(str(path), nthreads=2)
    for pos, tok in enumerate(PROMPT):
        logits = node.forward([tok], pos)
        assert logits.dtype == np.float32 and logits.shape == (model.config.vocab_size,)
        e = rel_err(logits, ref[pos])
        assert e < 1e-4, f"{cid} position {pos}: relative error {e:.2e}"
    # the whole prompt at once (batched prefill) gives the last position's logits
    fresh = _core.Node(str(path), nthreads=1)
    e = rel_err(fresh.forward(PROMPT, 0), ref[-1])
    assert e < 1e-4, f"{cid} batched: relative error {e:.2e}"
    # a prefill in two parts continues the same sequence
    fresh.forward(PROMPT[:5], 0)
    e = rel_err(fresh.forward(PROMPT[5:], 5), ref[-1])
    assert e < 1e-4, f"{cid} two-part prefill: relative error {e:.2e}"


def test_q40_weights_q80_buffers(tmp_path: Path) -> None:
    """Random models have near-ties among their logits, so top-1 is only asked where the
    reference's top-1 margin exceeds twice the error bound (the real model's plain top-1
    agreement is in test_forward_smollm2.py); elsewhere our pick must be within the bound of
    the reference's best."""
    bound = Q80_LOGIT_BOUND
    decisive = agree = 0
    worst = 0.0
    prompt = [(i * 37 + 11) % 128 for i in range(48)]
    for cid, kwargs, rope_type in CONFIGS:
        model = random_llama(seed=2, **kwargs)
        path = tmp_path / f"{cid}.m"
        write_m(model, path, "q40", rope_type)
        ref = hf_logits(dequantized_copy(model, "q40"), prompt)
        node = _core.Node(str(path), nthreads=2, buffer_float_type="q80")
        for pos, tok in enumerate(prompt):
            logits = node.forward([tok], pos)
            r = ref[pos]
            scale = float(np.max(np.abs(r)))
            worst = max(worst, rel_err(logits, r))
            ours = int(np.argmax(logits))
            assert r[ours] >= r.max() - 2 * bound * scale, f"{cid} position {pos}: picked {ours}"
            top2 = np.sort(r)[-2:]
            if top2[1] - top2[0] > 2 * bound * scale:
                decisive += 1
                agree += int(ours == int(np.argmax(r)))
        # f32 buffers: the same weights, no activation quantization, so nearly exact
        node32 = _core.Node(str(path), buffer_float_type="f32")
        e = rel_err(node32.forward(prompt, 0), ref[-1])
        assert e < 1e-4, f"{cid} q40 weights, f32 buffers: relative error {e:.2e}"
    assert worst <= bound, f"max relative logit error {worst:.4f} > {bound}"
    assert decisive >= 20, f"only {decisive} decisive positions"
    assert agree / decisive >= 0.99, f"top-1 agreement {agree}/{decisive}"


@pytest.mark.parametrize("float_type", ["f16", "q80"])
def test_f16_and_q80_weights(tmp_path: Path, float_type: str) -> None:
    """F16 weights run with f32 inputs: equal to transformers on the f16-rounded weights.
    Q80 weights always take Q80 inputs: within the Q80 bound of the same weights in f32."""
    model = random_llama(seed=6, heads=4, kv_heads=2)
    write_m(model, tmp_path / "m.m", float_type, 0)
    ref = hf_logits(dequantized_copy(model, float_type), PROMPT)
    for buffers in ("f32", "q80"):
        node = _core.Node(str(tmp_path / "m.m"), buffer_float_type=buffers)
        assert node.weights_float_type == float_type
        e = rel_err(node.forward(PROMPT, 0), ref[-1])
        bound = 1e-4 if float_type == "f16" else Q80_LOGIT_BOUND
        assert e < bound, f"{float_type} weights, {buffers} buffers: relative error {e:.2e}"


def test_bad_calls_raise_value_error(tmp_path: Path) -> None:
    model = random_llama(seed=3, max_pos=32)
    path = tmp_path / "m.m"
    write_m(model, path, "f32", 0)
    node = _core.Node(str(path))
    assert node.max_seq_len == 32
    assert node.model_max_seq_len == 32
    with pytest.raises(ValueError, match="token 128 out of range"):
        node.forward([128], 0)
    with pytest.raises(ValueError, match="token -1 out of range"):
        node.forward([-1], 0)
    with pytest.raises(ValueError, match="negative"):
        node.forward([1], -1)
    with pytest.raises(ValueError, match="exceed max_seq_len 32"):
        node.forward([1, 2], 31)
    with pytest.raises(ValueError, match="at least one token"):
        node.forward([], 0)
    with pytest.raises(ValueError, match="buffer float type"):
        _core.Node(str(path), buffer_float_type="q40")
    with pytest.raises(ValueError, match="nthreads"):
        _core.Node(str(path), nthreads=0)
    with pytest.raises(FileNotFoundError):
        _core.Node(str(tmp_path / "missing.m"))
    # a truncated file is a ModelFormatError
    bad = tmp_path / "short.m"
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(_core.ModelFormatError):
        _core.Node(str(bad))
    # the node still works after the errors
    assert node.forward([1, 2, 3], 0).shape == (128,)


def test_forward_into_out(tmp_path: Path) -> None:
    """`out` receives the logits a fresh array would hold; a wrong `out` is refused before
    the step runs (the KV cache is left as it was)."""
    model = random_llama(seed=6, max_pos=32)
    path = tmp_path / "m.m"
    write_m(model, path, "q40", 0)
    a, b = _core.Node(str(path), nthreads=2), _core.Node(str(path), nthreads=2)
    out = np.full(128, np.nan, np.float32)
    for pos, toks in [(0, [1, 2, 3]), (3, [7]), (4, [9])]:
        want = a.forward(toks, pos)
        got = b.forward(toks, pos, out)
        assert got is out
        np.testing.assert_array_equal(out, want)
    for bad, match in [
        (np.zeros(127, np.float32), "127 values, the logits are 128"),
        (np.zeros(256, np.float32)[::2], "contiguous"),
        (np.zeros(128, np.float32), "not writeable|readonly|read-only"),
    ]:
        if "contiguous" not in match and bad.size == 128:
            bad.flags.writeable = False
        with pytest.raises(ValueError, match=match):
            b.forward([5], 5, bad)
    with pytest.raises(TypeError):
        b.forward([5], 5, np.zeros(128, np.float64))  # type: ignore[arg-type]
    # nothing ran: position 5 follows position 4 as on the other node
    np.testing.assert_array_equal(b.forward([5], 5, out), a.forward([5], 5))


def test_node_info(tmp_path: Path) -> None:
    model = random_llama(seed=4, heads=4, kv_heads=2, max_pos=8192)
    path = tmp_path / "m.m"
    write_m(model, path, "q40", 0)
    node = _core.Node(str(path), nthreads=2)
    assert (node.dim, node.hidden_dim, node.n_layers) == (64, 128, 2)
    assert (node.n_heads, node.n_kv_heads, node.head_dim, node.vocab_size) == (4, 2, 16, 128)
    assert node.weights_float_type == "q40"
    assert node.buffer_float_type == "q80"
    assert node.nthreads == 2
    # the model's 8192 positions are capped at 4096 by default
    assert node.max_seq_len == 4096 and node.model_max_seq_len == 8192
    # keys and values: layers * positions * kv_dim * 2 * 4 bytes
    assert node.kv_cache_bytes == 2 * 4096 * 32 * 2 * 4
    assert isinstance(node.kernels, str) and node.kernels
    node.forward([1, 2], 0)
    assert node.last_inference_ms > 0
    assert node.last_transfer_ms == 0 and node.last_sent_bytes == 0
    assert _core.Node(str(path), max_seq_len=100).max_seq_len == 100


@pytest.mark.parametrize("float_type", ["f32", "q40"])
def test_legacy_bin_runs_like_the_m_file(tmp_path: Path, float_type: str) -> None:
    model = random_llama(seed=5, heads=4, kv_heads=2)
    write_m(model, tmp_path / "m.m", float_type, 0)
    write_legacy_bin(model, tmp_path / "m.bin", float_type)
    a = _core.Node(str(tmp_path / "m.m"))
    b = _core.Node(str(tmp_path / "m.bin"), weights_float_type=float_type)
    assert b.weights_float_type == float_type
    np.testing.assert_array_equal(a.forward(PROMPT, 0), b.forward(PROMPT, 0))
    if float_type == "f32":
        assert rel_err(b.forward([3], len(PROMPT)), hf_logits(model, [*PROMPT, 3])[-1]) < 1e-4
    # without the weights type, the legacy file is not a .m file
    with pytest.raises(_core.ModelFormatError):
        _core.Node(str(tmp_path / "m.bin"))
    with pytest.raises(ValueError, match="unknown float type"):
        _core.Node(str(tmp_path / "m.bin"), weights_float_type="q4")


@pytest.mark.parametrize(
    "head_dim,window", [(32, None), (None, 8)], ids=["nemo-head-dim", "v01-window"]
)
def test_mistral_from_hf_equals_transformers(
    tmp_path: Path, head_dim: int | None, window: int | None
) -> None:
    """A random MistralForCausalLM converts from its HF folder and gives transformers' logits
    at every position: with head_dim 32 of dim 64 / 4 heads (Mistral Nemo's kind: head_dim is
    not dim / n_heads), and with a sliding window of 8 (Mistral 7B v0.1's kind), whose file
    stops at the window (past it transformers attends to fewer positions than this engine)."""
    import torch
    from dllama.convert import convert_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    cfg = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        sliding_window=window,
        vocab_size=96,
        max_position_embeddings=256,
        rope_theta=1e6,
    )
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(tmp_path / "hf"))
    out = tmp_path / "mistral.m"
    convert_model(tmp_path / "hf", out, "f32", progress=False)
    h = _core.read_model_header(str(out))
    assert h["max_seq_len"] == (window or 256) and h["head_dim"] == (head_dim or 16)
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 96, 16)]
    ref = hf_logits(model, prompt)
    node = _core.Node(str(out), buffer_float_type="f32")
    n = min(len(prompt), window or len(prompt))
    for pos in range(n):
        e = rel_err(node.forward([prompt[pos]], pos), ref[pos])
        assert e < 1e-4, f"position {pos}: relative error {e:.2e}"
    with pytest.raises(ValueError):  # past the window: refused, not a different answer
        node.forward([prompt[n - 1]], h["max_seq_len"])
