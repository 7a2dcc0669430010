"""Llama 3.2 stays covered: a random model of Llama 3.2's kind (tied embeddings, llama3 RoPE
scaling with factor 32 over 8192 original positions, rope_theta 5e5, GQA, Meta's 128 256-token
vocabulary) with Meta's tiktoken tokenizer from `llama-models`.

- As a Hugging Face folder (safetensors, plus the tokenizer.json that transformers'
  TikTokenConverter makes from Meta's tokenizer.model, with Llama 3's bos post-processor and
  side files) and as the llama GGUF llama.cpp writes (Q/K in Meta's order, `rope_freqs.weight`,
  no `output.weight`, the gpt2 vocabulary with merges).
- Both `.m` files give transformers' logits within 1e-4 relative at every position of a
  16-token prompt (token by token and batched), and are the same bytes.
- Both `.t` files encode like Meta's tokenizer (bos included), specials too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from assets import TEST_STRINGS, llama3_tiktoken_model
from convert_fixtures import add_gguf_hparams
from dllama import _core
from dllama.convert import convert_model
from dllama.tokenizer import Tokenizer
from forward_utils import hf_logits, permute, random_llama
from tiktoken_json import write_tokenizer_json

SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
BOS, EOS_IDS = 128000, [128001, 128008, 128009]
TEXT = "Hello world, 12345 日本語 it's 😀 code: def f(x):\n    return x"
CHAT = "<|start_header_id|>user<|end_header_id|>\n\nHi 123456<|eot_id|>"


def rel_err(ours: npt.NDArray[np.float32], ref: npt.NDArray[np.float32]) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def meta_tok() -> Any:
    pytest.importorskip("tiktoken")
    from llama_models.llama3.tokenizer import Tokenizer as Llama3Tokenizer

    return Llama3Tokenizer(llama3_tiktoken_model())


@pytest.fixture(scope="module")
def llama32(tmp_path_factory: pytest.TempPathFactory, meta_tok: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("llama32")
    model = random_llama(
        dim=64,
        hidden=128,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab=meta_tok.n_words,
        tied=True,
        rope_scaling=SCALING,
        rope_theta=500000.0,
        max_pos=131072,
        init=0.05,
        seed=7,
    )
    model.config.bos_token_id, model.config.eos_token_id = BOS, EOS_IDS
    hf = root / "hf"
    model.save_pretrained(str(hf))
    specials = sorted(meta_tok.special_tokens, key=meta_tok.special_tokens.__getitem__)
    tj = write_tokenizer_json(
        llama3_tiktoken_model(),
        meta_tok.pat_str,
        specials,
        hf,
        bos="<|begin_of_text|>",
        tokenizer_config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        generation_config={"bos_token_id": BOS, "eos_token_id": EOS_IDS},
    )
    hf_m, hf_t = root / "hf.m", root / "hf.t"
    r = convert_model(hf, hf_m, "f32", tokenizer_out=hf_t, progress=False)
    gguf_path = _write_gguf(model, tj, root / "m.gguf")
    gguf_m, gguf_t = root / "gguf.m", root / "gguf.t"
    convert_model(gguf_path, gguf_m, "f32", tokenizer_out=gguf_t, progress=False)
    prompt = meta_tok.encode(TEXT, bos=True, eos=False)[:16]
    assert len(prompt) == 16
    return {
        "model": model,
        "fields": r.fields,
        "files": {"hf": (hf_m, hf_t), "gguf": (gguf_m, gguf_t)},
        "prompt": prompt,
        "ref": hf_logits(model, prompt),
    }


def _rope_freqs(model: Any) -> npt.NDArray[np.float32]:
    """llama.cpp's `rope_freqs.weight`: the divisor of each RoPE frequency, here derived from
    transformers' own llama3 and default inverse frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = model.config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    hd = cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    return (plain / scaled.to(torch.float64)).numpy().astype(np.float32)


def _write_gguf(model: Any, tokenizer_json: Path, path: Path) -> Path:
    """`model` as llama.cpp's convert_hf_to_gguf.py writes a Llama 3.2 GGUF (F32)."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    add_gguf_hparams(w, cfg)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    # the vocabulary as llama.cpp takes it from tokenizer.json: specials are CONTROL tokens
    tj = json.loads(tokenizer_json.read_text())
    tokens = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].__getitem__)
    added = sorted(tj["added_tokens"], key=lambda t: t["id"])
    assert [t["id"] for t in added] == list(range(len(tokens), len(tokens) + len(added)))
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(added)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens + [t["content"] for t in added])
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS_IDS[-1])
    w.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def add(name: str, x: Any) -> None:
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("rope_freqs.weight", _rope_freqs(model))
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, g, heads in (
            ("self_attn.q_proj", "attn_q", cfg.num_attention_heads),
            ("self_attn.k_proj", "attn_k", cfg.num_key_value_heads),
            ("self_attn.v_proj", "attn_v", 0),
            ("self_attn.o_proj", "attn_output", 0),
            ("mlp.gate_proj", "ffn_gate", 0),
            ("mlp.up_proj", "ffn_up", 0),
            ("mlp.down_proj", "ffn_down", 0),
            ("input_layernorm", "attn_norm", 0),
            ("post_attention_layernorm", "ffn_norm", 0),
        ):
            assert names.get_name(p + hf) == b + g  # llama.cpp's own name map (gguf package)
            x = sd[f"{p}{hf}.weight"]
            add(f"{b}{g}.weight", permute(x, heads) if heads else x)  # Q/K: Meta's order
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_says_llama32(llama32: dict[str, Any]) -> None:
    for source, (m, _) in llama32["files"].items():
        h = _core.read_model_header(str(m))
        assert (h["arch_type"], h["rope_type"], h["rope_theta"]) == (0xABCD00, 2, 500000), source
        assert (h["rope_scaling_factor"], h["rope_scaling_orig_max_seq_len"]) == (32, 8192)
        assert (h["rope_scaling_low_freq_factor"], h["rope_scaling_high_freq_factor"]) == (1, 4)
        assert h["vocab_size"] == 128256 and h["max_seq_len"] == 131072
        # tied: the classifier is the embedding
        np.testing.assert_array_equal(
            _core.read_model_tensor(str(m), "wcls"),
            llama32["model"].model.embed_tokens.weight.detach().numpy(),
        )
    hf_m, gguf_m = llama32["files"]["hf"][0], llama32["files"]["gguf"][0]
    assert hf_m.read_bytes() == gguf_m.read_bytes()


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_f32_logits_equal_transformers(llama32: dict[str, Any], source: str) -> None:
    m = str(llama32["files"][source][0])
    prompt, ref = llama32["prompt"], llama32["ref"]
    node = _core.Node(m, nthreads=2, buffer_float_type="f32", max_seq_len=32)
    for pos, tok in enumerate(prompt):
        e = rel_err(node.forward([tok], pos), ref[pos])
        assert e < 1e-4, f"{source} position {pos}: relative error {e:.2e}"
    batched = _core.Node(m, nthreads=1, buffer_float_type="f32", max_seq_len=32)
    e = rel_err(batched.forward(prompt, 0), ref[-1])
    assert e < 1e-4, f"{source} batched: relative error {e:.2e}"


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_tokenizer_encodes_like_meta(llama32: dict[str, Any], meta_tok: Any, source: str) -> None:
    t = llama32["files"][source][1]
    d = _core.read_tokenizer(str(t))
    assert len(d["vocab"]) == 128256 and d["bos_id"] == BOS and d["add_bos"]
    # tokenizer_config's eos and generation_config's list; a GGUF holds one eos id
    assert sorted(d["eos_ids"]) == EOS_IDS if source == "hf" else d["eos_ids"] == [EOS_IDS[-1]]
    tok = Tokenizer(t)
    assert tok.scheme == "llama3" and len(tok.special_ids) == 256
    for s in [*TEST_STRINGS, TEXT]:
        ids = meta_tok.encode(s, bos=True, eos=False)
        assert tok.encode(s) == ids, repr(s)
        assert tok.decode(ids[1:]) == meta_tok.decode(ids[1:])
    want = meta_tok.encode(CHAT, bos=True, eos=False, allowed_special="all")
    assert tok.encode(CHAT, parse_special=True) == want
