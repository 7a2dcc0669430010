"""Random tiny Qwen3 / Qwen3-MoE models from transformers (offline), saved as safetensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from convert_fixtures import add_gguf_hparams
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


def write_gguf(model: PreTrainedModel, path: Path, *, q4_0_experts: bool = False) -> Path:
    """`model` as llama.cpp's convert_hf_to_gguf.py writes a qwen3 / qwen3moe GGUF (F32):
    q/k not permuted, the experts stacked into 3-D `ffn_{gate,up,down}_exps` tensors; with
    `q4_0_experts`, those three quantized to Q4_0 by gguf's reference quantizer."""
    import gguf
    import numpy as np

    cfg = model.config
    moe = cfg.model_type == "qwen3_moe"
    arch = "qwen3moe" if moe else "qwen3"
    w = gguf.GGUFWriter(str(path), arch)
    add_gguf_hparams(w, cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}

    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.QWEN3MOE if moe else gguf.MODEL_ARCH.QWEN3, cfg.num_hidden_layers
    )

    def add(name: str, x: Any) -> None:
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))

    def add_experts(name: str, x: Any) -> None:
        if not q4_0_experts:
            return add(name, x)
        q4 = gguf.GGMLQuantizationType.Q4_0
        q = gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), q4)
        w.add_tensor(name, q, raw_dtype=q4)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, g in (
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"),
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ):
            assert names.get_name(p + hf) == b + g  # llama.cpp's own name map (gguf package)
            add(f"{b}{g}.weight", sd[f"{p}{hf}.weight"])
        if moe:
            add(f"{b}ffn_gate_inp.weight", sd[f"{p}mlp.gate.weight"])
            gate_up = sd[f"{p}mlp.experts.gate_up_proj"]  # (n_experts, 2 hidden, dim)
            h = gate_up.shape[1] // 2
            add_experts(f"{b}ffn_gate_exps.weight", gate_up[:, :h])
            add_experts(f"{b}ffn_up_exps.weight", gate_up[:, h:])
            add_experts(f"{b}ffn_down_exps.weight", sd[f"{p}mlp.experts.down_proj"])
        else:
            add(f"{b}ffn_gate.weight", sd[f"{p}mlp.gate_proj.weight"])
            add(f"{b}ffn_up.weight", sd[f"{p}mlp.up_proj.weight"])
            add(f"{b}ffn_down.weight", sd[f"{p}mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
