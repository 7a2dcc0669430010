//! Rotary position embeddings, the three rope types of the `.m` header:
//! - `Llama` (0): rotate interleaved pairs (x[2i], x[2i+1]) of each head;
//! - `Falcon` (1): rotate halves (x[i], x[i + head_dim/2]) (GPT-NeoX / HF layout);
//! - `Llama31` (2): interleaved pairs with Llama 3.1 frequency scaling.
//!
//! Pair i of a head turns by pos · f_i with f_i = theta^(-2i/head_dim) (scaled for Llama31).
//! The table holds cos / sin for every position up to max_seq_len, computed once.

use crate::{Error, Result};

pub use crate::format::RopeType;

/// Llama 3.1 frequency scaling (HF `rope_type: llama3`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub orig_max_seq_len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub rope_type: RopeType,
    pub head_dim: usize,
    pub theta: f32,
    /// Used by `Llama31` only.
    pub scaling: Option<RopeScaling>,
}

impl RopeConfig {
    /// The head_dim/2 rotation frequencies, as HF computes them in f32:
    /// 1 / theta^(2i / head_dim), then the Llama 3.1 scaling.
    pub fn frequencies(&self) -> Result<Vec<f32>> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "rope: head_dim must be even and non-zero, got {}",
                self.head_dim
            )));
        }
        if self.theta.is_nan() || self.theta <= 0.0 {
            return Err(Error::invalid(format!(
                "rope: theta must be positive, got {}",
                self.theta
            )));
        }
        let half = self.head_dim / 2;
        let mut f: Vec<f32> = (0..half)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f32 / self.head_dim as f32))
            .collect();
        if self.rope_type == RopeType::Llama31 {
            let s = self
                .scaling
                .ok_or_else(|| Error::invalid("rope: llama3.1 rope needs scaling parameters"))?;
            if s.factor.is_nan()
                || s.factor <= 0.0
                || s.orig_max_seq_len == 0
                || s.high_freq_factor == s.low_freq_factor
            {
                return Err(Error::invalid(format!("rope: bad llama3.1 scaling {s:?}")));
            }
            let old = s.orig_max_seq_len as f32;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for v in f.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *v;
                if wavelen < high_wavelen {
                    // high frequency: unchanged
                } else if wavelen > low_wavelen {
                    *v /= s.factor;
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *v = (1.0 - smooth) * *v / s.factor + smooth * *v;
                }
            }
        }
        Ok(f)
    }
}

/// cos / sin of every (position, pair), and how to apply them.
pub struct RopeTable {
    pub config: RopeConfig,
    pub max_seq_len: usize,
    cos: Vec<f32>, // (max_seq_len, head_dim / 2)
    sin: Vec<f32>, // (max_seq_len, head_dim / 2)
}

impl RopeTable {
    pub fn new(config: RopeConfig, max_seq_len: usize) -> Result<RopeTable> {
        let freqs = config.frequencies()?;
        let half = freqs.len();
        let mut cos = Vec::with_capacity(max_seq_len * half);
        let mut sin = Vec::with_capacity(max_seq_len * half);
        for pos in 0..max_seq_len {
            for &f in &freqs {
                // angle in f32 as HF (pos * inv_freq), cos / sin correctly rounded
                let a = (pos as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(RopeTable {
            config,
            max_seq_len,
            cos,
            sin,
        })
    }

    /// Rotate x (n_heads, head_dim) in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) -> Result<()> {
        let hd = self.config.head_dim;
        let half = hd / 2;
        if pos >= self.max_seq_len {
            return Err(Error::invalid(format!(
                "rope: position {pos} is beyond max_seq_len {}",
                self.max_seq_len
            )));
        }
        if !x.len().is_multiple_of(hd) {
            return Err(Error::invalid(format!(
                "rope: {} values are not whole heads of {hd}",
                x.len()
            )));
        }
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(hd) {
            match self.config.rope_type {
                RopeType::Llama | RopeType::Llama31 => {
                    for (i, p) in head.chunks_exact_mut(2).enumerate() {
                        let (a, b) = (p[0], p[1]);
                        p[0] = a * cos[i] - b * sin[i];
                        p[1] = a * sin[i] + b * cos[i];
                    }
                }
                RopeType::Falcon => {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
        Ok(())
    }

    /// Rotate x (n_tokens, n_heads · head_dim) for positions pos0, pos0 + 1, ...
    pub fn apply_rows(&self, x: &mut [f32], row_len: usize, pos0: usize) -> Result<()> {
        if row_len == 0 || !x.len().is_multiple_of(row_len) {
            return Err(Error::invalid(format!(
                "rope: {} values are not rows of {row_len}",
                x.len()
            )));
        }
        for (t, row) in x.chunks_exact_mut(row_len).enumerate() {
            self.apply(row, pos0 + t)?;
        }
        Ok(())
    }
}
