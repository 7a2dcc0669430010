"""The checkpoint readers: HF safetensors, Meta .pth shards and GGUF, before any writing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from assets import smollm2_gguf
from convert_fixtures import (
    TINY,
    make_checkpoints,
    make_hf,
    meta_key,
    meta_params,
    write_meta,
)
from dllama.convert import convert_model
from dllama.convert.gguf_file import GGUFError, GGUFFile
from dllama.convert.gguf_source import GGUFSource
from dllama.convert.hf import HFSource
from dllama.convert.meta import MetaSource
from dllama.convert.source import ConvertError, permute_hf_to_meta, tensor_names

N_LAYERS = TINY["num_hidden_layers"]


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, dict[str, np.ndarray]]:
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("n_shards", [1, 8])
def test_meta_shard_counts(tmp_path: Path, checkpoints: Any, n_shards: int) -> None:
    hf_dir, _, meta = checkpoints
    write_meta(tmp_path / "meta", meta, n_shards, meta_params())
    with HFSource(hf_dir) as hf, MetaSource(tmp_path / "meta") as m:
        assert hf.fields == m.fields
        for name in tensor_names(N_LAYERS):
            np.testing.assert_array_equal(m.checked(name), hf.checked(name), err_msg=name)


@pytest.mark.parametrize(
    "type_name", ["F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"]
)
def test_dequantize_equals_gguf_on_random_blocks(type_name: str) -> None:
    gguf = pytest.importorskip("gguf")
    from dllama.convert.gguf_file import GGML_TYPES, dequantize

    code = next(c for c, (n, _, _) in GGML_TYPES.items() if n == type_name)
    _, block, block_bytes = GGML_TYPES[code]
    rng = np.random.default_rng(code)
    raw = rng.integers(0, 256, size=(4, 2 * block_bytes), dtype=np.uint8)
    if type_name not in ("F16", "BF16"):
        # keep the f16 scales finite: clear the exponent's top bit of every byte pair
        raw.reshape(-1, 2)[:, 1] &= 0x3B
    ours = dequantize(raw.reshape(-1), code)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(code)).reshape(-1)
    assert ours.shape == ref.shape == (4 * 2 * block_bytes // block_bytes * block,)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


def test_hf_and_two_shard_meta_give_the_same_tensors(checkpoints: Any) -> None:
    hf_dir, meta_dir, meta = checkpoints
    with HFSource(hf_dir) as hf, MetaSource(meta_dir) as m:
        assert hf.fields == m.fields
        assert hf.fields["vocab_size"] == TINY["vocab_size"]  # resolved from vocab_size: -1
        assert hf.fields["hidden_dim"] == TINY["intermediate_size"]
        assert hf.fields["n_kv_heads"] == 2 and hf.fields["head_dim"] == 16
        assert hf.fields["norm_epsilon"] == 1e-5 and hf.fields["rope_theta"] == 10000
        names = [n for n, _ in hf.iter_tensors()]
        assert names == tensor_names(N_LAYERS)
        for name in names:
            a, b = hf.checked(name), m.checked(name)
            np.testing.assert_array_equal(a, b, err_msg=name)
            np.testing.assert_array_equal(a, meta[meta_key(name)], err_msg=name)


def _rope_hf(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    # transformers: rotate_half over the two halves of each head
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.concatenate([pos * inv, pos * inv])
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * np.cos(ang) + np.concatenate([-x2, x1], axis=-1) * np.sin(ang)


def _rope_meta(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    # Meta / distributed-llama: rotate interleaved pairs (2i, 2i+1)
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def test_permutation_turns_half_split_rope_into_interleaved_rope() -> None:
    """Attention scores with HF weights + HF RoPE equal Meta-ordered weights + Meta RoPE."""
    rng = np.random.default_rng(1)
    n_heads, hd, dim = 4, 16, 64
    wq = rng.standard_normal((n_heads * hd, dim)).astype(np.float32)
    wk = rng.standard_normal((n_heads * hd, dim)).astype(np.float32)
    x, y = rng.standard_normal(dim), rng.standard_normal(dim)
    mq, mk = permute_hf_to_meta(wq, n_heads), permute_hf_to_meta(wk, n_heads)
    for p1, p2 in ((0, 0), (3, 1), (17, 5)):
        hf_q = _rope_hf((wq @ x).reshape(n_heads, hd), p1, 1e4)
        hf_k = _rope_hf((wk @ y).reshape(n_heads, hd), p2, 1e4)
        me_q = _rope_meta((mq @ x).reshape(n_heads, hd), p1, 1e4)
        me_k = _rope_meta((mk @ y).reshape(n_heads, hd), p2, 1e4)
        np.testing.assert_allclose(
            (hf_q * hf_k).sum(-1), (me_q * me_k).sum(-1), rtol=1e-9, atol=1e-9
        )


def test_hf_bf16_tied_and_llama3_scaling(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    sd = make_hf(tmp_path, tied=True, dtype="bfloat16", rope_scaling=scaling, rope_theta=500000.0)
    with HFSource(tmp_path) as hf:
        f = hf.fields
        assert (f["rope_type"], f["rope_scaling_factor"], f["rope_scaling_low_freq_factor"]) == (
            2,
            8,
            1,
        )
        assert (f["rope_scaling_high_freq_factor"], f["rope_scaling_orig_max_seq_len"]) == (4, 128)
        assert f["rope_theta"] == 500000
        np.testing.assert_array_equal(hf.checked("wcls"), sd["model.embed_tokens.weight"])
        np.testing.assert_array_equal(
            hf.checked("layers.1.w2"), sd["model.layers.1.mlp.down_proj.weight"]
        )


def test_gguf_reader_equals_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    path = smollm2_gguf()
    ref = gguf.GGUFReader(str(path))
    with GGUFFile(path) as g:
        assert len(g.tensors) == len(ref.tensors) == 272
        assert g.get("llama.block_count") == 30
        assert g.get("tokenizer.ggml.tokens")[:2] == ["<|endoftext|>", "<|im_start|>"]
        types = set()
        for t in ref.tensors:
            ours = g.tensor(t.name)
            types.add(g.tensors[t.name].type_name)
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
            np.testing.assert_array_equal(ours, want, err_msg=t.name)
        assert types == {"F32", "Q4_1", "Q8_0"}


def test_gguf_q_k_are_already_interleaved() -> None:
    """transformers un-permutes GGUF Q/K to HF order; our permutation of that must give back
    exactly what our GGUF reader yields unchanged."""
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2_gguf()
    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    sd = {k: v.float().numpy() for k, v in loaded["tensors"].items()}
    with GGUFSource(path) as src:
        f = src.fields
        assert (f["dim"], f["hidden_dim"], f["n_layers"], f["n_heads"], f["n_kv_heads"]) == (
            576,
            1536,
            30,
            9,
            3,
        )
        assert (f["vocab_size"], f["max_seq_len"], f["rope_theta"], f["head_dim"]) == (
            49152,
            8192,
            100000,
            64,
        )
        assert f["norm_epsilon"] == 1e-5 and f["rope_type"] == 0 and src.tied
        for i in (0, 29):
            p = f"model.layers.{i}.self_attn."
            np.testing.assert_allclose(
                src.checked(f"layers.{i}.q"),
                permute_hf_to_meta(sd[p + "q_proj.weight"], 9),
                rtol=1e-6,
                atol=1e-7,
            )
            np.testing.assert_allclose(
                src.checked(f"layers.{i}.k"),
                permute_hf_to_meta(sd[p + "k_proj.weight"], 3),
                rtol=1e-6,
                atol=1e-7,
            )
            np.testing.assert_allclose(
                src.checked(f"layers.{i}.w2"),
                sd[f"model.layers.{i}.mlp.down_proj.weight"],
                rtol=1e-6,
                atol=1e-7,
            )
        np.testing.assert_allclose(
            src.checked("embedding"), sd["model.embed_tokens.weight"], rtol=1e-6, atol=1e-7
        )


# ------------------------------------------------------------------- bad input ----


def test_bad_checkpoints(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvertError, match="no params.json"):
        MetaSource(empty)
    with pytest.raises(ConvertError, match="no config.json"):
        HFSource(empty)
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"], "model_type": "bert"})
    )
    with pytest.raises(ConvertError, match="unsupported architecture"):
        HFSource(bad)
    shardless = tmp_path / "shardless"
    shardless.mkdir()
    (shardless / "params.json").write_text("{}")
    with pytest.raises(ConvertError, match=r"no consolidated\.\*\.pth"):
        MetaSource(shardless)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"GGML" + b"\0" * 60)
    with pytest.raises(ConvertError, match="not a GGUF file"):
        GGUFSource(notgguf)
    truncated = tmp_path / "t.gguf"
    whole = smollm2_gguf().read_bytes()
    # cut in the tensor data, in the header's lists, right after the counts: each a truncated
    # file, not "absurd" lengths
    for cut in (2_000_000, 5000, 1100, 24):
        truncated.write_bytes(whole[:cut])
        with pytest.raises(GGUFError, match="truncated GGUF file|past the end of the file"):
            GGUFFile(truncated)
    # converting it with its tokenizer: the model's fault is named, not a missing tokenizer
    with pytest.raises((ConvertError, GGUFError), match="truncated"):
        convert_model(truncated, tmp_path / "t.m", tokenizer_out=tmp_path / "t.t", progress=False)


def test_meta_llama31_params(tmp_path: Path, checkpoints: Any) -> None:
    _, _, meta = checkpoints
    params = meta_params()
    del params["max_seq_len"]  # Meta's params.json usually has none: 4096 unless --max-seq-len
    params.update(use_scaled_rope=True, rope_theta=500000.0, norm_eps=1e-6)
    write_meta(tmp_path / "m", meta, 1, params)
    with MetaSource(tmp_path / "m") as m:
        f = m.fields
        assert (f["rope_type"], f["rope_scaling_factor"], f["rope_scaling_low_freq_factor"]) == (
            2,
            8,
            1,
        )
        assert (f["rope_scaling_high_freq_factor"], f["rope_scaling_orig_max_seq_len"]) == (4, 8192)
        assert (f["rope_theta"], f["norm_epsilon"], f["max_seq_len"]) == (500000, 1e-6, 4096)
    with MetaSource(tmp_path / "m", max_seq_len=1024) as m:
        assert m.fields["max_seq_len"] == 1024
