"""The `.m` / `.t` functions of `dllama._core`: round trips and the error mapping."""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dllama import ModelFormatError, _core

FIELDS: dict[str, int | float] = {
    "dim": 64,
    "hidden_dim": 96,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 40,
    "max_seq_len": 32,
    "weights_float_type": 2,
}

FLOAT_TYPES = {code: name for name, code in _core.FLOAT_TYPES.items()}


def write_model(path: Path, fields: dict[str, int | float], seed: int = 0) -> dict[str, Any]:
    """Writes a `.m` file with random tensors; returns each tensor's float32 values."""
    rng = np.random.default_rng(seed)
    values: dict[str, Any] = {}
    with open(path, "wb") as f:
        f.write(_core.encode_model_header(fields))
        for name, rows, cols, ft, offset, nbytes in _core.model_tensors(fields):
            assert f.tell() == offset, name
            x = rng.standard_normal(rows * cols).astype(np.float32)
            data = _core.quantize(x, ft)
            assert len(data) == nbytes
            f.write(data)
            values[name] = x
    return values


# ------------------------------------------------------------------------------------------
# Model header and tensors
# ------------------------------------------------------------------------------------------


def test_header_fields_round_trip(tmp_path: Path) -> None:
    fields: dict[str, int | float] = {
        **FIELDS,
        "version": 0,
        "arch_type": 0xABCD00,
        "hidden_act": 0,
        "rope_theta": 500000,
        "rope_scaling_factor": 8,
        "rope_scaling_low_freq_factor": 1,
        "rope_scaling_high_freq_factor": 4,
        "rope_scaling_orig_max_seq_len": 8192,
        "rope_type": 2,
        "head_dim": 32,
        "norm_epsilon": 1e-6,
        "moe_hidden_dim": 0,
        "n_experts": 0,
        "n_active_experts": 0,
        "norm_topk_prob": 1,
    }
    path = tmp_path / "all.m"
    write_model(path, fields)
    back = _core.read_model_header(path)
    header = _core.encode_model_header(fields)
    assert back.pop("header_size") == len(header)
    assert back.pop("file_size") == os.path.getsize(path)
    assert back == fields
    assert isinstance(back["norm_epsilon"], float)
    # the dict read back (with header_size and file_size) describes the same tensors
    assert _core.model_tensors(_core.read_model_header(str(path))) == _core.model_tensors(fields)


def test_header_bytes() -> None:
    header = _core.encode_model_header(FIELDS)
    magic, size = struct.unpack_from("<ii", header)
    assert magic == 0x0A00ABCD and size == len(header)
    pairs = dict(struct.iter_unpack("<ii", header[8:]))
    assert pairs[2] == 64 and pairs[13] == 2 and pairs[19] == 16  # head_dim = dim / n_heads
    assert pairs[20] == 5  # norm epsilon 1e-5 by default


@pytest.mark.parametrize("weights", [0, 1, 2, 3])
def test_tensors_round_trip(tmp_path: Path, weights: int) -> None:
    fields = {**FIELDS, "weights_float_type": weights}
    path = tmp_path / f"m-{weights}.m"
    values = write_model(path, fields, seed=weights)
    tensors = _core.model_tensors(fields)
    assert [t[0] for t in tensors[:3]] == ["embedding", "layers.0.q", "layers.0.k"]
    assert tensors[-1][0] == "wcls" and tensors[-1][3] == FLOAT_TYPES[weights]
    assert os.path.getsize(path) == tensors[-1][4] + tensors[-1][5]
    for name, rows, cols, ft, _offset, _nbytes in tensors:
        got = _core.read_model_tensor(path, name)
        expected = _core.dequantize(_core.quantize(values[name], ft), ft)
        if name.endswith("norm"):
            assert got.shape == (cols,) and ft == "f32"
        else:
            assert got.shape == (rows, cols)
        np.testing.assert_array_equal(got.reshape(-1), expected)


def test_typed_seam() -> None:
    """The names Python takes from the core: the float types with the `.m` header codes, the
    tensor specs as a NamedTuple, the tokenizer dict with exactly TokenizerDict's keys."""
    assert _core.FLOAT_TYPES == {"f32": 0, "f16": 1, "q40": 2, "q80": 3}
    specs = _core.model_tensors(FIELDS)
    assert all(type(t) is _core.TensorSpec for t in specs)
    assert _core.TensorSpec._fields == ("name", "rows", "cols", "float_type", "offset", "nbytes")
    wcls = specs[-1]
    assert (wcls.name, wcls.rows, wcls.cols, wcls.float_type) == ("wcls", 40, 64, "q40")
    assert wcls.nbytes == 40 * 64 // 32 * 18 and wcls == tuple(wcls)
    assert [t.offset for t in specs[1:]] == [t.offset + t.nbytes for t in specs[:-1]]


def test_model_tensor_shapes() -> None:
    t = {name: (rows, cols, ft) for name, rows, cols, ft, _, _ in _core.model_tensors(FIELDS)}
    assert t["embedding"] == (40, 64, "f32")
    assert t["layers.1.q"] == (64, 64, "q40")
    assert t["layers.1.k"] == (32, 64, "q40")
    assert t["layers.1.v"] == (32, 64, "q40")
    assert t["layers.1.wo"] == (64, 64, "q40")
    assert t["layers.1.w1"] == (96, 64, "q40")
    assert t["layers.1.w2"] == (64, 96, "q40")
    assert t["layers.1.w3"] == (96, 64, "q40")
    assert t["layers.1.attn_norm"] == (1, 64, "f32")
    assert t["norm"] == (1, 64, "f32")
    assert t["wcls"] == (40, 64, "q40")
    assert len(t) == 1 + 2 * 9 + 2


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------

TOKENIZER: dict[str, Any] = {
    "vocab": [b"<unk>", b"<s>", b"</s>", b"\xff", " h\u00e9llo".encode(), "\U0001f600".encode()],
    "scores": [0.0, -1.0, -2.5, -1e9, 3.25, 7.0],
    "max_token_length": 7,
    "bos_id": 1,
    "eos_ids": [2, 5],
    "pad_id": 0,
    "chat_eos_id": -1,
    "chat_template": "{% for m in messages %}\u2764{{ m.content }}{% endfor %}",
    "add_bos": False,
    "version": 1,
}


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tok.t"
    _core.write_tokenizer(path, TOKENIZER)
    assert _core.read_tokenizer(path) == TOKENIZER
    # defaults: max_token_length computed, add_bos true, no template, no special ids
    _core.write_tokenizer(path, {"vocab": [b"a", b"bcd"], "scores": [0.0, 1.0]})
    back = _core.read_tokenizer(str(path))
    assert back["max_token_length"] == 3 and back["add_bos"] is True
    assert back["chat_template"] is None and back["bos_id"] == -1 and back["eos_ids"] == []
    assert set(back) == set(_core.TokenizerDict.__annotations__)


def sentencepiece_model() -> str | None:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", "tokenizer.model.v1")
    return path if os.path.exists(path) else None


def test_real_sentencepiece_vocabulary_round_trips(tmp_path: Path) -> None:
    model = sentencepiece_model()
    if model is None:
        pytest.skip("mistral_common's tokenizer.model.v1 is not installed")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    n = sp.get_piece_size()
    vocab = [sp.id_to_piece(i).encode() for i in range(n)]
    tok: dict[str, Any] = {
        "vocab": vocab,
        "scores": [float(np.float32(sp.get_score(i))) for i in range(n)],
        "bos_id": sp.bos_id(),
        "eos_ids": [sp.eos_id()],
    }
    path = tmp_path / "mistral.t"
    _core.write_tokenizer(path, tok)
    back = _core.read_tokenizer(path)
    assert back["vocab"] == tok["vocab"] and back["scores"] == tok["scores"]
    assert (back["bos_id"], back["eos_ids"]) == (1, [2])
    assert back["max_token_length"] == max(len(v) for v in vocab)


def test_llama2c_tokenizer_bin(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.bin"
    tokens = [b"<unk>", b"<s>", b"</s>", b"hi"]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", 5))
        f.writelines(struct.pack("<fi", -float(i), len(t)) + t for i, t in enumerate(tokens))
    back = _core.read_tokenizer(path)
    assert back["vocab"] == tokens and back["version"] == 0
    assert (back["bos_id"], back["eos_ids"], back["max_token_length"]) == (1, [2], 5)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.fixture
def model_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "ok.m"
    write_model(path, FIELDS)
    return path.read_bytes()


def patched_header(fields: dict[str, int | float], pairs: dict[int, int]) -> bytes:
    """Header bytes with some (key, value) pairs replaced or added (bypassing validation)."""
    good = _core.encode_model_header(fields)
    current = dict(struct.iter_unpack("<ii", good[8:]))
    current.update(pairs)
    body = b"".join(struct.pack("<ii", k, v) for k, v in current.items())
    return struct.pack("<ii", 0x0A00ABCD, 8 + len(body)) + body


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "1 byte short of the"),
        (lambda b: b[:1000], "bytes short of the"),
        (lambda b: b + b"\x00" * 5, "has 5 extra bytes"),
        (lambda b: b"\x00\x00\x00\x00" + b[4:], "not a distributed-llama .m model"),
        (lambda b: b[:4] + struct.pack("<i", 1 << 20) + b[8:], "absurd header size"),
        (lambda b: b[:4] + struct.pack("<i", -8) + b[8:], "absurd header size"),
        (lambda b: b[:6], "too short"),
        (lambda b: b"", "too short"),
        (
            lambda b: patched_header(FIELDS, {99: 1}) + b[len(patched_header(FIELDS, {})) :],
            "unknown header key 99",
        ),
        (
            lambda b: patched_header(FIELDS, {2: 0}) + b[len(patched_header(FIELDS, {})) :],
            "dim is missing or zero",
        ),
        (
            lambda b: patched_header(FIELDS, {6: 3}) + b[len(patched_header(FIELDS, {})) :],
            "n_kv_heads 3 does not divide",
        ),
        (
            lambda b: patched_header(FIELDS, {13: 9}) + b[len(patched_header(FIELDS, {})) :],
            "unknown weights_float_type 9",
        ),
    ],
)
def test_bad_model_files_raise_model_format_error(
    tmp_path: Path, model_bytes: bytes, mutate: Any, message: str
) -> None:
    path = tmp_path / "bad.m"
    path.write_bytes(mutate(model_bytes))
    with pytest.raises(ModelFormatError, match=message) as info:
        _core.read_model_header(path)
    assert isinstance(info.value, ValueError)
    assert "bad.m" in str(info.value)
    with pytest.raises(ModelFormatError, match=message):
        _core.read_model_tensor(path, "embedding")


def test_missing_paths_raise_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        _core.read_model_header(missing)
    with pytest.raises(FileNotFoundError):
        _core.read_model_tensor(missing, "embedding")
    with pytest.raises(FileNotFoundError):
        _core.read_tokenizer(missing)
    with pytest.raises(FileNotFoundError):
        _core.write_tokenizer(missing / "sub" / "tok.t", TOKENIZER)


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    path = tmp_path / "ok.m"
    write_model(path, FIELDS)
    cases: list[tuple[Any, str]] = [
        (
            lambda: _core.encode_model_header({**FIELDS, "dimm": 3}),
            'unknown model header field "dimm"',
        ),
        (
            lambda: _core.encode_model_header({**FIELDS, "weights_float_type": 7}),
            "unknown weights_float_type",
        ),
        (lambda: _core.encode_model_header({**FIELDS, "dim": 65}), "not divisible by n_heads"),
        (lambda: _core.encode_model_header({**FIELDS, "dim": 2.5}), "must be an integer"),
        (lambda: _core.encode_model_header({**FIELDS, "header_size": 8}), "header_size 8"),
        (lambda: _core.model_tensors({**FIELDS, "hidden_dim": 0}), "hidden_dim is missing or zero"),
        (lambda: _core.model_tensors({**FIELDS, "file_size": 1}), "does not match"),
        (lambda: _core.read_model_tensor(path, "layers.9.q"), 'no tensor "layers.9.q"'),
        (
            lambda: _core.write_tokenizer(tmp_path / "t.t", {**TOKENIZER, "eos_ids": [99]}),
            "eos id 99",
        ),
        (
            lambda: _core.write_tokenizer(tmp_path / "t.t", {**TOKENIZER, "bos": 1}),
            'unknown tokenizer field "bos"',
        ),
        (
            lambda: _core.write_tokenizer(tmp_path / "t.t", {"vocab": [b"a"]}),
            "needs vocab and scores",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert not isinstance(info.value, ModelFormatError), message
    with pytest.raises(TypeError, match="int or a float"):
        _core.encode_model_header({**FIELDS, "dim": "64"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="list of bytes"):
        _core.write_tokenizer(tmp_path / "t.t", {**TOKENIZER, "vocab": ["a", "b"]})


def write_t(path: Path, pairs: list[tuple[int, int]], tail: bytes = b"") -> None:
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    tokens = b"".join(struct.pack("<fI", 0.0, 1) + bytes([65 + i]) for i in range(3))
    path.write_bytes(struct.pack("<ii", 0x567124, 8 + len(body)) + body + tail + tokens)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([(0, 2), (1, 3), (2, 1)], "tokenizer version 2 is not supported"),
        ([(0, 0), (1, 3), (2, 1)], "tokenizer version 0 is not supported"),
        ([(1, 3), (2, 1)], "no version"),
        ([(0, 1), (1, 4), (2, 1)], "truncated"),
        ([(0, 1), (1, 2), (2, 1)], "extra bytes"),
        ([(0, 1), (1, 3), (2, 1), (12, 0)], "unknown tokenizer header key 12"),
        ([(0, 1), (1, -3), (2, 1)], "absurd vocab_size"),
    ],
)
def test_bad_tokenizer_files(tmp_path: Path, pairs: list[tuple[int, int]], message: str) -> None:
    path = tmp_path / "bad.t"
    write_t(path, pairs)
    with pytest.raises(ModelFormatError, match=message):
        _core.read_tokenizer(path)
    write_t(path, [(0, 1), (1, 3), (2, 1)])
    assert len(_core.read_tokenizer(path)["vocab"]) == 3  # the same file, fixed, is fine
