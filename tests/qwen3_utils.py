"""Random tiny Qwen3 / Qwen3-MoE models from transformers (offline), saved as safetensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

#: dim 64 with 4 heads of head_dim 32 (not dim / n_heads = 16), GQA 2 KV heads
BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 128,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_bias": False,
}


def random_qwen3(
    *,
    moe: bool = False,
    tied: bool = False,
    n_experts: int = 4,
    top_k: int = 2,
    norm_topk_prob: bool = True,
    moe_hidden: int = 64,
    seed: int = 0,
    router_scale: float = 1.0,
    overrides: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A random Qwen3ForCausalLM (or Qwen3MoeForCausalLM) in f32 with non-trivial norms;
    router weights of std `router_scale` (large enough that the top-k choice is decisive)."""
    torch.manual_seed(seed)
    base = {**BASE, **(overrides or {})}
    model: PreTrainedModel
    if moe:
        cfg = Qwen3MoeConfig(
            **base,
            tie_word_embeddings=tied,
            num_experts=n_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=moe_hidden,
            norm_topk_prob=norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        model = Qwen3MoeForCausalLM(cfg)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**base, tie_word_embeddings=tied))
    model = model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(router_scale * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save(model: PreTrainedModel, folder: Path, **kw: Any) -> Path:
    model.save_pretrained(str(folder), **kw)
    return folder
