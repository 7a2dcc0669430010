//! The engine's view of a model header: the shapes and constants the forward pass needs.

use crate::format::{ArchType, FloatType, HiddenAct, ModelHeader};
use crate::ops::{RopeConfig, RopeScaling, RopeType};
use crate::{Error, Result};

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
    /// From a parsed `.m` header; refuses what this engine does not run.
    pub fn from_header(h: &ModelHeader) -> Result<ModelConfig> {
        let moe = (h.arch_type == ArchType::Qwen3Moe).then_some(MoeConfig {
            n_experts: h.n_experts,
            n_active: h.n_active_experts,
            norm_topk_prob: h.norm_topk_prob,
        });
        let rope_type = RopeType::from_code(h.rope_type.code())?;
        let cfg = ModelConfig {
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
        };
        cfg.validate()?;
        Ok(cfg)
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

    /// Check what the forward pass relies on (the header parser checks the file's consistency).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::format(m));
        if self.dim == 0
            || self.hidden_dim == 0
            || self.n_layers == 0
            || self.vocab_size == 0
            || self.max_seq_len == 0
        {
            return bad(format!(
                "model has a zero dimension (dim {}, hidden_dim {}, n_layers {}, vocab_size {}, max_seq_len {})",
                self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.max_seq_len
            ));
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
            || self.rope.head_dim != self.head_dim
        {
            return bad(format!(
                "head_dim {} must be even and non-zero (RoPE rotates pairs)",
                self.head_dim
            ));
        }
        if is_quantized(self.weights_float_type)
            && (!self.dim.is_multiple_of(32)
                || !self.hidden_dim.is_multiple_of(32)
                || !self.q_dim().is_multiple_of(32))
        {
            return bad(format!(
                "quantized weights need dim ({}), hidden_dim ({}) and n_heads*head_dim ({}) to be multiples of 32",
                self.dim,
                self.hidden_dim,
                self.q_dim()
            ));
        }
        if let Some(m) = self.moe {
            if m.n_active == 0 || m.n_active > m.n_experts {
                return bad(format!(
                    "{} active experts of {}: need 0 < n_active_experts <= n_experts",
                    m.n_active, m.n_experts
                ));
            }
        }
        self.rope
            .frequencies()
            .map_err(|e| Error::format(format!("bad RoPE settings in the header: {e}")))?;
        Ok(())
    }
}
