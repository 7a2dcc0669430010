"""Tiny random checkpoints for the converter tests: a transformers LlamaForCausalLM saved as
safetensors, and the same weights written as a Meta-style 2-shard .pth checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA
    "vocab_size": 96,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def make_hf(
    folder: Path,
    *,
    tied: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    **extra: Any,
) -> dict[str, np.ndarray]:
    """Saves a random LlamaForCausalLM; returns its float32 state dict (HF names)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **extra}, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # norms are ones at init: make them random too
            p.copy_(torch.randn_like(p) * 0.5)
    model = model.to(getattr(torch, dtype))
    if max_shard_size:
        model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    else:
        model.save_pretrained(str(folder))
    return {k: v.float().numpy().copy() for k, v in model.state_dict().items()}


def hf_to_meta_names(sd: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """The Meta-named, Meta-ordered tensors of a HF state dict."""
    from dllama.convert.source import permute_hf_to_meta

    nh, nkv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = permute_hf_to_meta(
            sd[p + "self_attn.q_proj.weight"], nh
        )
        out[f"layers.{i}.attention.wk.weight"] = permute_hf_to_meta(
            sd[p + "self_attn.k_proj.weight"], nkv
        )
        out[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def write_meta(
    folder: Path, meta: dict[str, np.ndarray], n_shards: int, params: dict[str, Any]
) -> None:
    """Splits the tensors the way Meta's model-parallel checkpoints are split."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    column = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
    shards: list[dict[str, Any]] = [{} for _ in range(n_shards)]
    for name, t in meta.items():
        if t.ndim == 1:
            parts = [t] * n_shards
        else:
            parts = np.split(t, n_shards, axis=1 if name.endswith(column) else 0)
        for s, part in zip(shards, parts):
            s[name] = torch.from_numpy(np.ascontiguousarray(part)).to(
                torch.bfloat16 if params.get("_bf16") else torch.float32
            )
    for i, s in enumerate(shards):
        s["rope.freqs"] = torch.ones(8)
        torch.save(s, folder / f"consolidated.{i:02d}.pth")
    with open(folder / "params.json", "w") as f:
        json.dump({k: v for k, v in params.items() if not k.startswith("_")}, f)


def meta_params() -> dict[str, Any]:
    return {
        "dim": TINY["hidden_size"],
        "n_layers": TINY["num_hidden_layers"],
        "n_heads": TINY["num_attention_heads"],
        "n_kv_heads": TINY["num_key_value_heads"],
        "vocab_size": -1,
        "multiple_of": 32,
        "norm_eps": TINY["rms_norm_eps"],
        "rope_theta": TINY["rope_theta"],
        "max_seq_len": TINY["max_position_embeddings"],
    }


def make_checkpoints(root: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """The tiny model as `root/hf` (safetensors) and `root/meta` (2 shards): (hf dir, meta dir,
    the tensors by Meta name)."""
    sd = make_hf(root / "hf")
    meta = hf_to_meta_names(sd, TINY["num_hidden_layers"])
    write_meta(root / "meta", meta, 2, meta_params())
    return root / "hf", root / "meta", meta


def meta_key(name: str) -> str:
    """The Meta checkpoint key of a `.m` tensor name (`embedding`, `layers.0.q`, ...)."""
    if name == "embedding":
        return "tok_embeddings.weight"
    if name == "norm":
        return "norm.weight"
    if name == "wcls":
        return "output.weight"
    _, i, short = name.split(".")
    key = {
        "q": "attention.wq",
        "k": "attention.wk",
        "v": "attention.wv",
        "wo": "attention.wo",
        "w1": "feed_forward.w1",
        "w2": "feed_forward.w2",
        "w3": "feed_forward.w3",
        "attn_norm": "attention_norm",
        "ffn_norm": "ffn_norm",
    }[short]
    return f"layers.{i}.{key}.weight"


# the tests' own GGUF name table, independent of convert.gguf_source.GGUF_LAYER_NAMES on
# purpose: a wrong name in the package must fail here, not be copied
_GGUF_GLOBAL = {"embedding": "token_embd", "norm": "output_norm", "wcls": "output"}
_GGUF_LAYER = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "wo": "attn_output"}
_GGUF_LAYER |= {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
_GGUF_LAYER |= {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(name: str) -> str:
    """llama.cpp's GGUF tensor name of a `.m` tensor name (`layers.0.q` -> `blk.0.attn_q.weight`)."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name] + ".weight"
    _, i, s = name.split(".")
    return f"blk.{i}.{_GGUF_LAYER[s]}.weight"


def add_gguf_hparams(w: Any, cfg: Any) -> None:
    """The hyper-parameters of a transformers config `cfg` that convert_hf_to_gguf.py writes
    for every Llama-family architecture, into the gguf.GGUFWriter `w`."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
