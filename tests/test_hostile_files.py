"""Malformed and hostile checkpoints: every one is a ConvertError naming the file and the field
(or, from the CLI, a one-line error), never a traceback; plus property-based fuzzing of the
Hugging Face config reader and the GGUF parser with hypothesis."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from convert_fixtures import TINY, gguf_name, hf_to_meta_names, make_hf, meta_key
from dllama.cli import app
from dllama.convert import ConvertError, convert_model
from dllama.convert.gguf_file import GGUFError, GGUFFile
from dllama.convert.source import tensor_names
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

N_LAYERS = TINY["num_hidden_layers"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("hostile") / "hf"
    sd = make_hf(folder)
    return folder, sd


def _variant(hf_dir: Path, dest: Path, config_text: str | None = None) -> Path:
    """A copy of the HF folder (weights linked) with config.json replaced by `config_text`."""
    dest.mkdir()
    for p in hf_dir.iterdir():
        (dest / p.name).symlink_to(p)
    if config_text is not None:
        (dest / "config.json").unlink()
        (dest / "config.json").write_text(config_text)
    return dest


def _config(hf_dir: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((hf_dir / "config.json").read_text())
    return cfg


def _convert_error(src: Path, tmp: Path, *needles: str) -> str:
    with pytest.raises(ConvertError) as e:
        convert_model(src, tmp / "out.m", "f32", progress=False)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    assert not (tmp / "out.m").exists()
    return msg


# ------------------------------------------------------------------ Hugging Face configs ----


def _edited(cfg: dict[str, Any], key: str, value: Any) -> str:
    out = dict(cfg)
    if key in ("rope_scaling", "rope_theta"):
        out.pop("rope_parameters", None)  # transformers >= 5 writes both there
    if value is _DROP:
        out.pop(key)
    else:
        out[key] = value
    return json.dumps(out)


_DROP = object()

HF_CASES: list[tuple[str, Any, str]] = [
    ("num_attention_heads", _DROP, "num_attention_heads is missing"),
    ("hidden_size", [64], "hidden_size must be an integer"),
    ("hidden_size", 64.5, "hidden_size must be an integer, got 64.5"),
    ("num_hidden_layers", "2", "num_hidden_layers must be an integer"),
    ("vocab_size", True, "vocab_size must be an integer"),
    ("num_key_value_heads", 3, "n_heads 4 is not a multiple of n_kv_heads 3"),
    ("num_attention_heads", 0, "invalid n_heads: 0"),
    ("intermediate_size", -128, "invalid hidden_dim: -128"),
    ("num_hidden_layers", 2**40, "n_layers = 1099511627776 does not fit"),
    ("rms_norm_eps", "small", "rms_norm_eps must be a number"),
    ("rope_scaling", "linear", "rope_scaling must be an object"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4}, "unsupported rope_scaling type 'yarn'"),
    (
        "rope_scaling",
        {"rope_type": "llama3", "factor": 8},
        "rope_scaling.low_freq_factor is missing",
    ),
    (
        "rope_scaling",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": [4],
            "original_max_position_embeddings": 8192,
        },
        "rope_scaling.high_freq_factor must be a number",
    ),
    ("architectures", "LlamaForCausalLM", "unsupported architecture"),
    ("head_dim", 1 << 30, "head_dim = 1073741824 is beyond"),
]


@pytest.mark.parametrize(("key", "value", "needle"), HF_CASES)
def test_malformed_hf_config(
    hf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, key: str, value: Any, needle: str
) -> None:
    src = _variant(hf[0], tmp_path / "v", _edited(_config(hf[0]), key, value))
    _convert_error(src, tmp_path, needle, "config.json" if "beyond" not in needle else "hf")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ('"hidden_size": 1e400', "hidden_size must be an integer, got inf"),
        ('"rope_theta": Infinity', "rope_theta must be a finite number"),
        ('"rope_theta": NaN', "rope_theta must be a finite number"),
        ('"rope_theta": 1e12', "rope_theta 1000000000000.0 is out of range"),
        ('"rms_norm_eps": -1', "norm_epsilon -1.0 must be a positive number"),
    ],
)
def test_non_finite_numbers_in_hf_config(
    hf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, raw: str, needle: str
) -> None:
    cfg = _config(hf[0])
    key = raw.split('"')[1]
    cfg.pop(key, None)
    cfg.pop("rope_parameters", None)
    text = json.dumps(cfg)[:-1] + ", " + raw + "}"
    src = _variant(hf[0], tmp_path / "v", text)
    _convert_error(src, tmp_path, needle, "config.json")


def _safetensors(path: Path, header: Any, data: bytes = b"") -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ([1, 2, 3], "the safetensors header is not a JSON object"),
        ({"model.norm.weight": {"shape": [64], "data_offsets": [0, 256]}}, "no dtype"),
        ({"model.norm.weight": "F32"}, "header entry is not an object"),
        (
            {"model.norm.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 256]}},
            "is not a list of sizes",
        ),
        (
            {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [256, 0]}},
            "are not [begin, end]",
        ),
    ],
)
def test_malformed_safetensors_header(
    hf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, header: Any, needle: str
) -> None:
    src = _variant(hf[0], tmp_path / "v")
    _safetensors(src / "zz-extra.safetensors", header, b"\0" * 256)
    _convert_error(src, tmp_path, needle, "zz-extra.safetensors")


def test_cli_prints_one_line(hf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    src = _variant(hf[0], tmp_path / "v", _edited(_config(hf[0]), "hidden_size", 64.5))
    r = CliRunner().invoke(app, ["convert", str(src), "--out", str(tmp_path / "o.m")])
    assert r.exit_code == 1, r.output
    assert "hidden_size must be an integer" in r.output and "Traceback" not in r.output


# --------------------------------------------------------------------------------- GGUF ----


def _gguf(
    path: Path,
    sd: dict[str, np.ndarray],
    *,
    f64: bool = False,
    head_count: int = TINY["num_attention_heads"],
    freq_base: float = TINY["rope_theta"],
    n_tokens: int | None = None,
    scale: float = 1.0,
) -> Path:
    gguf = pytest.importorskip("gguf")
    meta = hf_to_meta_names(sd, N_LAYERS)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(head_count)
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_freq_base(freq_base)
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    if n_tokens is not None:
        w.add_token_list([f"t{i}" for i in range(n_tokens)])
    for name in tensor_names(N_LAYERS):
        t = meta[meta_key(name)]
        w.add_tensor(gguf_name(name), (t.astype(np.float64) * scale) if f64 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_f64_tensors_convert(hf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    from dllama import _core

    src = _gguf(tmp_path / "f64.gguf", hf[1], f64=True)
    convert_model(src, tmp_path / "f64.m", "f32", progress=False)
    got = _core.read_model_tensor(str(tmp_path / "f64.m"), "layers.1.w2")
    np.testing.assert_array_equal(got, hf[1]["model.layers.1.mlp.down_proj.weight"])
    # values beyond float32 become inf: refused, naming the tensor
    big = _gguf(tmp_path / "big.gguf", hf[1], f64=True, scale=1e300)
    _convert_error(big, tmp_path, "big.gguf", "tensor embedding holds", "must be finite")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"freq_base": math.inf}, "llama.rope.freq_base must be a finite number"),
        ({"freq_base": -5.0}, "rope_theta -5.0 is out of range"),
        ({"head_count": 0}, "llama.attention.head_count = 0 must be positive"),
        ({"n_tokens": 200}, "token_embd.weight has 96 rows but the vocabulary"),
    ],
)
def test_malformed_gguf(
    hf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, kwargs: dict[str, Any], needle: str
) -> None:
    src = _gguf(tmp_path / "m.gguf", hf[1], **kwargs)
    _convert_error(src, tmp_path, needle, "m.gguf")


def _gguf_bytes(kv: list[bytes], n_tensors: int = 0) -> bytes:
    return struct.pack("<IIQQ", 0x46554747, 3, n_tensors, len(kv)) + b"".join(kv)


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def test_gguf_deeply_nested_arrays(tmp_path: Path) -> None:
    depth = 5000
    value = struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1) * (depth - 1))
    value += struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)
    p = tmp_path / "nested.gguf"
    p.write_bytes(_gguf_bytes([_gguf_string("general.architecture") + value]))
    with pytest.raises(GGUFError, match="arrays nested deeper than 8"):
        GGUFFile(p)
    _convert_error(p, tmp_path, "nested.gguf", "arrays nested deeper")


# ------------------------------------------------------------------------------ fuzzing ----

_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_CONFIG_KEYS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "head_dim",
    "hidden_act",
    "architectures",
    "tie_word_embeddings",
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=st.dictionaries(st.sampled_from(_CONFIG_KEYS), _JSON_VALUES, min_size=1, max_size=3))
def test_fuzz_hf_config(
    hf: tuple[Path, dict[str, np.ndarray]],
    tmp_path_factory: pytest.TempPathFactory,
    edits: dict[str, Any],
) -> None:
    """Any values in config.json: the reader either accepts the folder or raises ConvertError."""
    from dllama.convert.hf import HFSource

    cfg = {**_config(hf[0]), **edits}
    d = _variant(hf[0], tmp_path_factory.mktemp("fz") / "v", json.dumps(cfg))
    try:
        HFSource(d).close()
    except ConvertError as e:
        assert str(d) in str(e), e
    finally:
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def gguf_seed(
    hf: tuple[Path, dict[str, np.ndarray]], tmp_path_factory: pytest.TempPathFactory
) -> bytes:
    p = _gguf(tmp_path_factory.mktemp("seed") / "s.gguf", hf[1], n_tokens=96)
    return p.read_bytes()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2047), st.integers(min_value=0, max_value=255)
        ),
        min_size=1,
        max_size=8,
    ),
    cut=st.none() | st.integers(min_value=0, max_value=4096),
)
def test_fuzz_gguf_parser(
    gguf_seed: bytes,
    tmp_path_factory: pytest.TempPathFactory,
    flips: list[tuple[int, int]],
    cut: int | None,
) -> None:
    """Bytes of the metadata and tensor infos changed (and the file cut): the reader opens it or
    raises GGUFError; the converter's source opens it or raises ConvertError."""
    from dllama.convert.gguf_source import GGUFSource

    data = bytearray(gguf_seed)
    for pos, val in flips:
        data[pos % len(data)] = val
    if cut is not None:
        data = data[:cut]
    p = tmp_path_factory.mktemp("gz") / "f.gguf"
    p.write_bytes(bytes(data))
    try:
        GGUFFile(p).close()
    except GGUFError:
        pass
    try:
        GGUFSource(p).close()
    except ConvertError:
        pass


# ------------------------------------------------------------------------- model files ----


def test_kv_cache_beyond_the_machines_memory_is_refused(tmp_path: Path) -> None:
    """A valid file whose max_seq_len (2^24) with 64 layers asks 512 GiB of KV cache: refused
    up front naming the need and the available memory, not an abort."""
    from dllama import _core
    from forward_utils import random_llama, write_m

    path = tmp_path / "long.m"
    write_m(random_llama(layers=64, max_pos=1 << 24), path, "f32", 0)
    with pytest.raises(
        ValueError,
        match=r"needs \d+\.\d MiB for weights \+ 51\d\.\d GiB for KV cache and RoPE table at --max-seq-len 16777216 on this node; .* available",
    ):
        _core.Node(str(path), max_seq_len=1 << 24)
    # the same file with the default length runs
    node = _core.Node(str(path))
    assert node.max_seq_len == 4096


def test_hostile_model_headers(tmp_path: Path) -> None:
    """n_layers = 2^31 - 1 with tiny dims (.m) and head_dim 2^30: errors, no allocation."""
    from dllama import _core

    fields: dict[str, int | float] = {
        "dim": 64, "hidden_dim": 96, "n_layers": 2**31 - 1, "n_heads": 4, "n_kv_heads": 2,
        "vocab_size": 50, "max_seq_len": 16, "weights_float_type": 0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="n_layers = 2147483647 is beyond"):
        _core.encode_model_header(fields)
    with pytest.raises(ValueError, match="head_dim = 1073741824 is beyond"):
        _core.encode_model_header({**fields, "n_layers": 2, "head_dim": 1 << 30})
