"""Hugging Face checkpoints: config.json + one or many *.safetensors (bf16, f16 or f32).

Supports LlamaForCausalLM, MistralForCausalLM, Qwen3ForCausalLM and Qwen3MoeForCausalLM. The safetensors files are parsed here and
memory-mapped (an 8-byte header length, a JSON header, then the raw tensors), so neither
torch nor the `safetensors` package is needed and a tensor is only read when it is written.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from dllama.convert.source import (
    ARCH_QWEN3,
    ARCH_QWEN3_MOE,
    ROPE_FALCON,
    ConvertError,
    F32Array,
    Source,
    base_fields,
    config_float,
    config_int,
    drop_mmap_range,
    permute_hf_to_meta,
    set_llama3_scaling,
)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)
_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


class SafetensorsFile:
    """One memory-mapped .safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                raise ConvertError(f"{path}: not a safetensors file ({size} bytes)")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self._mmap[:8])
        if n > size - 8:
            raise ConvertError(f"{path}: safetensors header of {n} bytes exceeds the file")
        try:
            header: Any = json.loads(self._mmap[8 : 8 + n])
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConvertError(f"{path}: unreadable safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise ConvertError(f"{path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._size = size
        self.entries: dict[str, dict[str, Any]] = {
            name: self._entry(name, e) for name, e in header.items()
        }

    def _entry(self, name: str, e: Any) -> dict[str, Any]:
        """One tensor's header entry, checked: dtype, shape, data_offsets inside the file."""
        what = f"{self.path}: tensor {name!r}"[:300]
        if not isinstance(e, dict):
            raise ConvertError(f"{what}: header entry is not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str):
            raise ConvertError(f"{what}: no dtype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ConvertError(f"{what}: shape {shape!r} is not a list of sizes"[:400])
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ConvertError(f"{what}: data_offsets {offsets!r} are not [begin, end]"[:400])
        return {"dtype": dtype, "shape": shape, "data_offsets": offsets}

    def tensor(self, name: str) -> F32Array:
        e = self.entries[name]
        dtype = e["dtype"]
        if dtype not in _DTYPES:
            raise ConvertError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = (self._data_start + int(o) for o in e["data_offsets"])
        if end > self._size:
            raise ConvertError(f"{self.path}: tensor {name} extends past the end (truncated file)")
        shape = tuple(int(s) for s in e["shape"])
        itemsize = 4 if dtype == "F32" else 2
        count = math.prod(shape)
        if count * itemsize != end - begin:
            raise ConvertError(
                f"{self.path}: tensor {name} has {end - begin} bytes for shape {shape}"
            )
        raw = np.frombuffer(self._mmap, dtype=_DTYPES[dtype], count=count, offset=begin)
        if dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        return out.reshape(shape)

    def release(self, name: str) -> None:
        begin, end = (self._data_start + int(o) for o in self.entries[name]["data_offsets"])
        drop_mmap_range(self._mmap, begin, end - begin)

    def close(self) -> None:
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the map is released when it is collected


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConvertError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


class HFSource(Source):
    """A Hugging Face model folder."""

    def __init__(self, folder: str | Path, max_seq_len: int | None = None) -> None:
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConvertError(f"{folder}: no config.json (not a Hugging Face model folder)")
        cfg = _load_json(config_path)
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not any(
            isinstance(a, str) and a in SUPPORTED_ARCHITECTURES for a in archs
        ):
            raise ConvertError(
                f"{config_path}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConvertError(f"{config_path}: unsupported hidden_act {act!r} (only silu)"[:300])
        files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
        if not files:
            raise ConvertError(f"{folder}: no *.safetensors files (pytorch .bin is not supported)")
        self.description = str(folder)
        # transformers >= 5 writes "rope_parameters" (with rope_theta inside); older "rope_scaling"
        rope: Any = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConvertError(f"{config_path}: rope_scaling must be an object, got {rope!r}"[:300])

        def num(key: str, default: int | None = None) -> int:
            return config_int(cfg.get(key), f"{config_path}: {key}", default)

        self.n_heads = num("num_attention_heads")
        self.n_kv_heads = num("num_key_value_heads", self.n_heads) or self.n_heads
        theta = rope.get("rope_theta")
        if theta is None:
            theta = cfg.get("rope_theta")
        self.fields = base_fields(
            dim=num("hidden_size"),
            hidden_dim=num("intermediate_size"),
            n_layers=num("num_hidden_layers"),
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            vocab_size=num("vocab_size"),
            max_seq_len=max_seq_len or num("max_position_embeddings", 4096) or 4096,
            rope_theta=config_float(theta, f"{config_path}: rope_theta", 10000.0),
            norm_epsilon=config_float(
                cfg.get("rms_norm_eps"), f"{config_path}: rms_norm_eps", 1e-5
            ),
            head_dim=num("head_dim", 0) or None,
            source=str(config_path),
        )
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "default":
            if kind != "llama3":
                raise ConvertError(
                    f"{config_path}: unsupported rope_scaling type {kind!r} (only llama3)"[:300]
                )

            def scaling(key: str) -> float:
                return config_float(rope.get(key), f"{config_path}: rope_scaling.{key}")

            set_llama3_scaling(
                self.fields,
                scaling("factor"),
                scaling("low_freq_factor"),
                scaling("high_freq_factor"),
                config_int(
                    rope.get("original_max_position_embeddings"),
                    f"{config_path}: rope_scaling.original_max_position_embeddings",
                ),
            )
        self.arch = next(a for a in archs if a in SUPPORTED_ARCHITECTURES)
        # Mistral 7B v0.1 attends to its last `sliding_window` positions only, this engine to
        # all of them: the file stops at the window, within which the two agree
        window = cfg.get("sliding_window") if self.arch == "MistralForCausalLM" else None
        if window is not None:
            w = config_int(window, f"{config_path}: sliding_window")
            if 0 < w < int(self.fields["max_seq_len"]):
                self.fields["max_seq_len"] = w
        if self.arch.startswith("Qwen3"):
            self._qwen3_fields(cfg, config_path)
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self._files = [SafetensorsFile(p) for p in files]
        self._where = {name: f for f in self._files for name in f.entries}
        self._used: set[str] = set()
        if "lm_head.weight" not in self._where:
            self.tied = True

    def _qwen3_fields(self, cfg: dict[str, Any], config_path: Path) -> None:
        """Qwen3: per-head q/k norms, NeoX RoPE on unpermuted q/k; Qwen3-MoE: the experts."""
        if cfg.get("attention_bias"):
            raise ConvertError(f"{config_path}: attention_bias is not supported")
        if cfg.get("use_sliding_window"):
            raise ConvertError(f"{config_path}: sliding-window attention is not supported")
        self.fields["rope_type"] = ROPE_FALCON
        self.fields["arch_type"] = ARCH_QWEN3
        if self.arch != "Qwen3MoeForCausalLM":
            return
        self.fields["arch_type"] = ARCH_QWEN3_MOE
        # transformers >= 5 writes num_local_experts, the Qwen checkpoints num_experts
        n_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        sparse_step = int(cfg.get("decoder_sparse_step", 1))
        if cfg.get("mlp_only_layers") or sparse_step != 1:
            raise ConvertError(
                f"{config_path}: dense layers inside a Qwen3-MoE (mlp_only_layers "
                f"{cfg.get('mlp_only_layers')}, decoder_sparse_step {sparse_step}) are not "
                "supported: every layer must be a mixture of experts"
            )
        self.fields["n_experts"] = n_experts
        self.fields["n_active_experts"] = int(cfg["num_experts_per_tok"])
        self.fields["moe_hidden_dim"] = int(cfg["moe_intermediate_size"])
        self.fields["norm_topk_prob"] = int(bool(cfg.get("norm_topk_prob", False)))

    def _get(self, key: str) -> F32Array:
        if key not in self._where:
            raise ConvertError(
                f"{self.description}: tensor {key} not found in the safetensors files"
            )
        self._used.add(key)
        return self._where[key].tensor(key)

    def release(self) -> None:
        for key in self._used:
            self._where[key].release(key)
        self._used.clear()

    def tensor(self, name: str) -> F32Array:
        if name == "embedding":
            return self._get("model.embed_tokens.weight")
        if name == "norm":
            return self._get("model.norm.weight")
        if name == "wcls":
            return self._get("model.embed_tokens.weight" if self.tied else "lm_head.weight")
        _, i, short = name.split(".", 2)
        p = f"model.layers.{i}."
        qwen3 = self.arch.startswith("Qwen3")  # q and k stay in HF's halves (falcon RoPE)
        if short == "q":
            w = self._get(p + "self_attn.q_proj.weight")
            return w if qwen3 else permute_hf_to_meta(w, self.n_heads)
        if short == "k":
            w = self._get(p + "self_attn.k_proj.weight")
            return w if qwen3 else permute_hf_to_meta(w, self.n_kv_heads)
        if short.startswith("experts."):
            _, e, which = short.split(".")
            proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}[which]
            return self._get(f"{p}mlp.experts.{e}.{proj}.weight")
        key = {
            "q_norm": "self_attn.q_norm.weight",
            "k_norm": "self_attn.k_norm.weight",
            "moe_gate": "mlp.gate.weight",
            "v": "self_attn.v_proj.weight",
            "wo": "self_attn.o_proj.weight",
            "w1": "mlp.gate_proj.weight",
            "w2": "mlp.down_proj.weight",
            "w3": "mlp.up_proj.weight",
            "attn_norm": "input_layernorm.weight",
            "ffn_norm": "post_attention_layernorm.weight",
        }[short]
        return self._get(p + key)

    def close(self) -> None:
        for f in self._files:
            f.close()
