//! The engine's view of a model header: the shapes and constants the forward pass needs.

use crate::format::{ArchType, FloatType, HiddenAct, ModelHeader};
use crate::ops::{RopeConfig, RopeScaling, RopeType};

/// The mixture-of-experts FFN of qwen3_moe: a router picks `n_active` of `n_experts` SwiGLU
/// experts per token (each of `ModelConfig::hidden_dim` hidden units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    pub n_experts: usize,
    pub n_active: usize,
    /// Renormalise the top-k router probabilities so they sum to 1.
    pub norm_topk_prob: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: ArchType,
    pub dim: usize,
    /// Hidden units of the FFN (of one expert for a MoE model).
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The model's own context length (from the header).
    pub max_seq_len: usize,
    pub norm_epsilon: f32,
    pub hidden_act: HiddenAct,
    pub rope: RopeConfig,
    /// Storage type of the matmul weights (embedding, norms and router are always F32).
    pub weights_float_type: FloatType,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Some for a mixture-of-experts FFN.
    pub moe: Option<MoeConfig>,
}

/// Quantized types store values in blocks of 32.
pub fn is_quantized(ft: FloatType) -> bool {
    ft.block_values() > 1
}

/// Bytes taken by `n` values of `ft` (`n` a whole number of blocks).
pub fn bytes_for(ft: FloatType, n: usize) -> usize {
    n / ft.block_values() * ft.block_bytes()
}

impl ModelConfig {
    /// From a validated `.m` header (`ModelHeader::parse`, `from_fields` and the legacy
    /// layout all validate): every check of what this engine runs lives there, once.
    pub fn from_header(h: &ModelHeader) -> ModelConfig {
        let moe = (h.arch_type == ArchType::Qwen3Moe).then_some(MoeConfig {
            n_experts: h.n_experts,
            n_active: h.n_active_experts,
            norm_topk_prob: h.norm_topk_prob,
        });
        let rope_type = h.rope_type;
        ModelConfig {
            arch: h.arch_type,
            dim: h.dim,
            hidden_dim: h.ffn_hidden_dim(),
            n_layers: h.n_layers,
            n_heads: h.n_heads,
            n_kv_heads: h.n_kv_heads,
            head_dim: h.head_dim,
            vocab_size: h.vocab_size,
            max_seq_len: h.max_seq_len,
            norm_epsilon: h.norm_epsilon,
            hidden_act: h.hidden_act,
            rope: RopeConfig {
                rope_type,
                head_dim: h.head_dim,
                theta: h.rope_theta as f32,
                scaling: (rope_type == RopeType::Llama31).then_some(RopeScaling {
                    factor: h.rope_scaling_factor as f32,
                    low_freq_factor: h.rope_scaling_low_freq_factor as f32,
                    high_freq_factor: h.rope_scaling_high_freq_factor as f32,
                    orig_max_seq_len: h.rope_scaling_orig_max_seq_len as u32,
                }),
            },
            weights_float_type: h.weights_float_type,
            qk_norm: h.arch_type.has_qk_norm(),
            moe,
        }
    }

    /// n_heads * head_dim: rows of wq, columns of wo.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// n_kv_heads * head_dim: rows of wk and wv.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}
