//! RMSNorm: out = x / sqrt(mean(x²) + eps) * weight.

use crate::{Error, Result};

/// Sum of squares with 8 independent lanes (vectorizes; same order on every path).
#[inline]
pub(crate) fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in rest {
        s += v * v;
    }
    s
}

/// One vector: x (dim), weight (dim), out (dim).
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    if x.len() != weight.len() || out.len() != x.len() || x.is_empty() {
        return Err(Error::invalid(format!(
            "rmsnorm: x has {}, weight {}, out {} values (must be equal and non-zero)",
            x.len(),
            weight.len(),
            out.len()
        )));
    }
    let inv = 1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
    Ok(())
}

/// Every row of x (n_tokens, dim) into out (n_tokens, dim).
pub fn rmsnorm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let dim = weight.len();
    if dim == 0 || !x.len().is_multiple_of(dim) || out.len() != x.len() {
        return Err(Error::invalid(format!(
            "rmsnorm_rows: x has {} and out {} values, not rows of dim {dim}",
            x.len(),
            out.len()
        )));
    }
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        rmsnorm(xr, weight, eps, or)?;
    }
    Ok(())
}

/// In place, every head of x (n_tokens · n_heads, head_dim) normalised with the shared
/// weight (head_dim): Qwen3's q / k norm.
pub fn rmsnorm_heads(x: &mut [f32], weight: &[f32], eps: f32) -> Result<()> {
    let hd = weight.len();
    if hd == 0 || !x.len().is_multiple_of(hd) {
        return Err(Error::invalid(format!(
            "rmsnorm_heads: {} values are not heads of {hd}",
            x.len()
        )));
    }
    for head in x.chunks_exact_mut(hd) {
        let inv = 1.0 / (sum_squares(head) / hd as f32 + eps).sqrt();
        for (v, &w) in head.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
    Ok(())
}
