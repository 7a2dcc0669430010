//! The engine's view of a model header: the shapes and constants the forward pass needs.

use crate::{Error, Result};

/// How RoPE rotates a head's values (the `.m` header's `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeType {
    /// 0: Meta's layout, pairs `(2i, 2i + 1)` rotate together (the converter permutes
    /// HF's q/k rows into it).
    Llama,
    /// 1: GPT-NeoX layout, pairs `(i, i + head_dim / 2)`.
    Falcon,
    /// 2: as `Llama`, with Llama 3.1's frequency scaling.
    Llama31,
}

impl RopeType {
    pub fn from_code(code: u32) -> Result<RopeType> {
        match code {
            0 => Ok(RopeType::Llama),
            1 => Ok(RopeType::Falcon),
            2 => Ok(RopeType::Llama31),
            _ => Err(Error::format(format!(
                "unknown rope_type {code} (0 llama, 1 falcon, 2 llama3.1)"
            ))),
        }
    }
}

/// RoPE constants (Llama 3.1 scaling fields are used only by `RopeType::Llama31`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub rope_type: RopeType,
    pub theta: f32,
    pub scaling_factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub orig_max_seq_len: usize,
}

/// Storage type of a tensor, by the `.m` header's codes (`weights_float_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    Q40,
    Q80,
}

impl DType {
    pub fn from_code(code: u32) -> Result<DType> {
        match code {
            0 => Ok(DType::F32),
            1 => Ok(DType::F16),
            2 => Ok(DType::Q40),
            3 => Ok(DType::Q80),
            _ => Err(Error::format(format!(
                "unknown float type code {code} (0 f32, 1 f16, 2 q40, 3 q80)"
            ))),
        }
    }
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q40 | DType::Q80)
    }
    /// Bytes taken by `n` values (`n` a multiple of 32 for the quantized types).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            DType::F32 => n * 4,
            DType::F16 => n * 2,
            DType::Q40 => n / 32 * 18,
            DType::Q80 => n / 32 * 34,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Q40 => "q40",
            DType::Q80 => "q80",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The model's own context length (from the header).
    pub max_seq_len: usize,
    pub norm_epsilon: f32,
    pub rope: RopeConfig,
    pub weights_float_type: DType,
}

impl ModelConfig {
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

    /// Check what the forward pass relies on; the file parser checks the rest.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::format(m));
        if self.dim == 0 || self.hidden_dim == 0 || self.n_layers == 0 || self.vocab_size == 0 {
            return bad(format!(
                "model has a zero dimension (dim {}, hidden_dim {}, n_layers {}, vocab_size {})",
                self.dim, self.hidden_dim, self.n_layers, self.vocab_size
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
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and non-zero (RoPE rotates pairs)",
                self.head_dim
            ));
        }
        if self.weights_float_type.is_quantized()
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
        Ok(())
    }
}
