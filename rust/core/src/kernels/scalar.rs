//! Portable kernels: the reference every SIMD version is tested against (ggml's `_generic`).
//!
//! Shapes: a matmul multiplies weights `w` (n_rows, cols) by inputs `x` (n_tokens, cols) into
//! `out` (n_tokens, n_rows): out[t, r] = sum_c w[r, c] * x[t, c]. Quantized rows are blocks of
//! 32 values along the row, so w is (n_rows, cols / 32) blocks and x (n_tokens, cols / 32).

use super::block::{bf16_to_f32, f16_to_f32, BlockQ40, BlockQ80, QK};
use super::shape::{matmul_rows, packed_shape};

pub use super::block::quantize_q80;

/// Dot product of one Q40 row with one Q80 row (same number of blocks).
#[inline]
pub fn dot_q40_q80(w: &[BlockQ40], x: &[BlockQ80]) -> f32 {
    let mut acc = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let lo = (a.qs[j] & 0x0F) as i32 - 8;
            let hi = (a.qs[j] >> 4) as i32 - 8;
            sumi += lo * b.qs[j] as i32 + hi * b.qs[j + QK / 2] as i32;
        }
        acc += sumi as f32 * (f16_to_f32(a.d) * f16_to_f32(b.d));
    }
    acc
}

/// Dot product of two Q80 rows.
#[inline]
pub fn dot_q80_q80(w: &[BlockQ80], x: &[BlockQ80]) -> f32 {
    let mut acc = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let sumi: i32 =
            a.qs.iter()
                .zip(&b.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        acc += sumi as f32 * (f16_to_f32(a.d) * f16_to_f32(b.d));
    }
    acc
}

#[inline]
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a * b).sum()
}

/// y += a * x.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (v, &u) in y.iter_mut().zip(x) {
        *v += a * u;
    }
}

#[inline]
pub fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(&a, b)| f16_to_f32(a) * b).sum()
}

/// out (n_tokens, n_rows) = w (n_rows, bpr) Q40 × x (n_tokens, bpr) Q80.
pub fn matmul_q40_q80(w: &[BlockQ40], x: &[BlockQ80], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, 1, dot_q40_q80)
}

/// out (n_tokens, n_rows) = w (n_rows, bpr) Q80 × x (n_tokens, bpr) Q80.
pub fn matmul_q80_q80(w: &[BlockQ80], x: &[BlockQ80], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, 1, dot_q80_q80)
}

/// out (n_tokens, n_rows) = w (n_rows, cols) F32 × x (n_tokens, cols) F32.
pub fn matmul_f32(w: &[f32], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, 1, dot_f32)
}

/// out (n_tokens, n_rows) = w (n_rows, cols) F16 bits × x (n_tokens, cols) F32.
pub fn matmul_f16(w: &[u16], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, 1, dot_f16)
}

/// The same sums as [`dot_f32`] of the f32 values whose high halves `w` holds.
#[inline]
pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(&a, b)| bf16_to_f32(a) * b).sum()
}

/// out (n_tokens, n_rows) = w (n_rows, cols) bf16 bits × x (n_tokens, cols) F32: bit for bit
/// [`matmul_f32`] of the same values.
pub fn matmul_bf16(w: &[u16], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, 1, dot_bf16)
}

/// Dot product of one Q40 row with an F32 vector (the f32-buffer path).
#[inline]
pub fn dot_q40_f32(w: &[BlockQ40], x: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (a, xb) in w.iter().zip(x.chunks_exact(QK)) {
        let mut s = 0.0f32;
        for j in 0..QK / 2 {
            s += ((a.qs[j] & 0x0F) as i32 - 8) as f32 * xb[j]
                + ((a.qs[j] >> 4) as i32 - 8) as f32 * xb[j + QK / 2];
        }
        acc += s * f16_to_f32(a.d);
    }
    acc
}

/// out (n_tokens, n_rows) = w (n_rows, bpr) Q40 × x (n_tokens, cols) F32. Portable on every
/// path: the f32-buffer mode trades speed for exactness and is not the one that is tuned.
pub fn matmul_q40_f32(w: &[BlockQ40], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, QK, dot_q40_f32)
}

/// out (n_tokens, n_rows) = packed w × x (n_tokens, bpr) Q80: each row unpacked, then
/// `dot_q40_q80` (the reference for the packed SIMD kernels).
pub fn matmul_q40x8_q80(
    cells: &[u8],
    bpr: usize,
    x: &[BlockQ80],
    out: &mut [f32],
    n_tokens: usize,
) {
    use super::packed::{CELL, GROUP};
    let (n_rows, _) = packed_shape(cells.len(), bpr, x.len(), out.len(), n_tokens);
    let mut row = vec![BlockQ40::default(); bpr];
    for r in 0..n_rows {
        let (g, j) = (r / GROUP, r % GROUP);
        for (b, blk) in row.iter_mut().enumerate() {
            let cell = &cells[(g * bpr + b) * CELL..];
            blk.d = u16::from_le_bytes([cell[2 * j], cell[2 * j + 1]]);
            for q in 0..4 {
                let o = 16 + 32 * q + 4 * j;
                blk.qs[4 * q..4 * q + 4].copy_from_slice(&cell[o..o + 4]);
            }
        }
        for t in 0..n_tokens {
            out[t * n_rows + r] = dot_q40_q80(&row, &x[t * bpr..(t + 1) * bpr]);
        }
    }
}

/// Attention scores of one head: scores[p] = (q · k[p·stride .. p·stride + q.len()]) · scale.
pub fn attn_scores(q: &[f32], k: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    let hd = q.len();
    for (p, s) in scores.iter_mut().enumerate() {
        *s = dot_f32(q, &k[p * stride..p * stride + hd]) * scale;
    }
}

/// x = exp(x - max x) / sum, in place (the reference: `f32::exp`).
pub fn softmax(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SwiGLU's gate, in place: gate = silu(gate) · up, silu(v) = v / (1 + exp(-v)) (the
/// reference: `f32::exp`), over the shorter length.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Weighted sum of one head's values: out += sum_p att[p] · v[p·stride .. p·stride + out.len()].
pub fn attn_values(att: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    for (p, &a) in att.iter().enumerate() {
        axpy(a, &v[p * stride..p * stride + hd], out);
    }
}

/// out (n_tokens, n_rows) = w (n_rows, bpr) Q80 × x (n_tokens, cols) F32 (the f32-buffer path
/// for Q80 weights; portable on every path, like `matmul_q40_f32`).
pub fn matmul_q80_f32(w: &[BlockQ80], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, QK, dot_q80_f32)
}

/// Dot product of one Q80 row with an F32 vector.
#[inline]
pub fn dot_q80_f32(w: &[BlockQ80], x: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (a, xb) in w.iter().zip(x.chunks_exact(QK)) {
        let s: f32 = a.qs.iter().zip(xb).map(|(&q, &v)| q as f32 * v).sum();
        acc += s * f16_to_f32(a.d);
    }
    acc
}
