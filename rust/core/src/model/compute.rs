//! The narrow interface between the forward pass and the kernels: matmul of a weight tensor
//! by a batch of activations, quantization of activations, and the small vector ops.
//! Everything the forward pass computes goes through here, so the kernel paths can change
//! without touching `forward.rs`.

use super::config::{DType, RopeConfig, RopeType};
use super::tensor::Tensor;
use crate::quant::block::{f16_to_f32, quantize_q80};
use crate::quant::{BlockQ40, BlockQ80, QK};
use crate::{Error, Result};

/// A batch of matmul inputs: (n_tokens, cols), as f32 values or Q80 blocks.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    F32(&'a [f32]),
    Q80(&'a [BlockQ80]),
}

/// Quantize `x` (n_tokens, cols) into Q80 blocks `out` (n_tokens, cols / 32).
pub fn quantize_batch(x: &[f32], out: &mut [BlockQ80]) {
    quantize_q80(x, out);
}

/// `out[t, r] = sum_c w[r, c] * x[t, c]` for every token `t` of the batch.
/// w: (rows, cols); x: (n_tokens, cols); out: (n_tokens, rows).
pub fn matmul(w: &Tensor, x: Input<'_>, n_tokens: usize, out: &mut [f32]) -> Result<()> {
    let (rows, cols) = (w.rows, w.cols);
    debug_assert_eq!(out.len(), n_tokens * rows);
    match (w.dtype, x) {
        (DType::Q40, Input::Q80(xq)) => {
            let nb = cols / QK;
            let wq = w.as_q40();
            for r in 0..rows {
                let wr = &wq[r * nb..(r + 1) * nb];
                for t in 0..n_tokens {
                    out[t * rows + r] = dot_q40_q80(wr, &xq[t * nb..(t + 1) * nb]);
                }
            }
        }
        (DType::Q80, Input::Q80(xq)) => {
            let nb = cols / QK;
            let wq = w.as_q80();
            for r in 0..rows {
                let wr = &wq[r * nb..(r + 1) * nb];
                for t in 0..n_tokens {
                    out[t * rows + r] = dot_q80_q80(wr, &xq[t * nb..(t + 1) * nb]);
                }
            }
        }
        (DType::Q40, Input::F32(xf)) => {
            let nb = cols / QK;
            let wq = w.as_q40();
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                crate::quant::block::dequantize_q40(&wq[r * nb..(r + 1) * nb], &mut row);
                for t in 0..n_tokens {
                    out[t * rows + r] = dot_f32(&row, &xf[t * cols..(t + 1) * cols]);
                }
            }
        }
        (DType::Q80, Input::F32(xf)) => {
            let nb = cols / QK;
            let wq = w.as_q80();
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                crate::quant::block::dequantize_q80(&wq[r * nb..(r + 1) * nb], &mut row);
                for t in 0..n_tokens {
                    out[t * rows + r] = dot_f32(&row, &xf[t * cols..(t + 1) * cols]);
                }
            }
        }
        (DType::F32, Input::F32(xf)) => {
            let wf = w.as_f32();
            for r in 0..rows {
                let wr = &wf[r * cols..(r + 1) * cols];
                for t in 0..n_tokens {
                    out[t * rows + r] = dot_f32(wr, &xf[t * cols..(t + 1) * cols]);
                }
            }
        }
        (DType::F16, Input::F32(xf)) => {
            let wh = w.as_f16();
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                for (o, &h) in row.iter_mut().zip(&wh[r * cols..(r + 1) * cols]) {
                    *o = f16_to_f32(h);
                }
                for t in 0..n_tokens {
                    out[t * rows + r] = dot_f32(&row, &xf[t * cols..(t + 1) * cols]);
                }
            }
        }
        (dt, Input::Q80(_)) => {
            return Err(Error::invalid(format!(
                "no matmul for {} weights by a Q80 input",
                dt.name()
            )));
        }
    }
    Ok(())
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dot_q40_q80(w: &[BlockQ40], x: &[BlockQ80]) -> f32 {
    let mut sum = 0.0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut s = 0i32;
        for j in 0..QK / 2 {
            s += ((wb.qs[j] & 0x0F) as i32 - 8) * xb.qs[j] as i32;
            s += ((wb.qs[j] >> 4) as i32 - 8) * xb.qs[j + QK / 2] as i32;
        }
        sum += s as f32 * f16_to_f32(wb.d) * f16_to_f32(xb.d);
    }
    sum
}

fn dot_q80_q80(w: &[BlockQ80], x: &[BlockQ80]) -> f32 {
    let mut sum = 0.0f32;
    for (wb, xb) in w.iter().zip(x) {
        let s: i32 = wb
            .qs
            .iter()
            .zip(&xb.qs)
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum();
        sum += s as f32 * f16_to_f32(wb.d) * f16_to_f32(xb.d);
    }
    sum
}

// ---- vector ops ----

/// out = x / rms(x) * w, for each row of x (n_tokens, dim).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// out = silu(gate) * up, element-wise; the result replaces `gate`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// The rotation frequencies of one head: (head_dim / 2).
pub fn rope_frequencies(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| {
            let freq = 1.0 / rope.theta.powf((2 * j) as f32 / head_dim as f32);
            if rope.rope_type != RopeType::Llama31 {
                return freq;
            }
            // Llama 3.1: long wavelengths slowed down by `scaling_factor`, short ones kept,
            // a smooth blend in between.
            let old = rope.orig_max_seq_len as f32;
            let low_wavelen = old / rope.low_freq_factor;
            let high_wavelen = old / rope.high_freq_factor;
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / rope.scaling_factor
            } else {
                let smooth = (old / wavelen - rope.low_freq_factor)
                    / (rope.high_freq_factor - rope.low_freq_factor);
                (1.0 - smooth) * freq / rope.scaling_factor + smooth * freq
            }
        })
        .collect()
}

/// Rotate every head of `x` (n_heads * head_dim) at position `pos`; `cos_sin` is the
/// table row of `pos`: (head_dim / 2) pairs.
pub fn rope(rope_type: RopeType, x: &mut [f32], head_dim: usize, cos_sin: &[(f32, f32)]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (j, &(c, s)) in cos_sin.iter().enumerate() {
            let (a, b) = match rope_type {
                RopeType::Llama | RopeType::Llama31 => (2 * j, 2 * j + 1),
                RopeType::Falcon => (j, j + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

/// One head's attention at position `pos`: q (head_dim); keys / values of positions
/// `0..=pos` read through `k_at(p)` / `v_at(p)` (head_dim each); `att` scratch (>= pos + 1);
/// out (head_dim).
pub fn attention_head<'a>(
    q: &[f32],
    pos: usize,
    k_at: impl Fn(usize) -> &'a [f32],
    v_at: impl Fn(usize) -> &'a [f32],
    att: &mut [f32],
    out: &mut [f32],
) {
    let scale = 1.0 / (q.len() as f32).sqrt();
    let att = &mut att[..pos + 1];
    for (p, a) in att.iter_mut().enumerate() {
        *a = dot_f32(q, k_at(p)) * scale;
    }
    softmax(att);
    out.fill(0.0);
    for (p, &a) in att.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(v_at(p)) {
            *o += a * v;
        }
    }
}
