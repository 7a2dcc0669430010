//! Quantized blocks and the matmul kernels.
//!
//! - [`block`]: Q40 / Q80 blocks (ggml Q4_0 / Q8_0 layout), scalar quantize / dequantize.
//! - [`scalar`]: portable kernels, the reference.
//! - `avx2` (x86_64), `neon` (aarch64): SIMD versions, picked at run time by [`dispatch`].
//! - [`matmul`]: the checked, multi-threaded entry points the engine calls.

pub mod block;
pub mod dispatch;
pub mod matmul;
pub mod packed;
pub mod scalar;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx2_q40;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;

pub use block::{
    as_q40, as_q80, dequantize_q40, dequantize_q80, quantize_q40, BlockQ40, BlockQ80, QK,
};
pub use dispatch::{active_path, KernelPath, Kernels};
pub use matmul::{matmul, prefers_packed_q40, quantize_q80, Input, Weights};
pub use packed::PackedQ40;

/// The shape of a kernel call `out (n_tokens, n_rows) = w (n_rows, w_width) × x (n_tokens,
/// x_width)`, derived from the slice lengths: `(n_rows, x_width, w_width)`, where each weight
/// element (a block) covers `x_per_w` input elements (1 for blocks × blocks or floats × floats,
/// 32 for blocks × floats). Panics on lengths that do not fit: the checked entry point
/// (`matmul::matmul`) has already returned `Error::Invalid` for those.
#[inline]
pub(crate) fn kernel_shape(
    w_len: usize,
    x_len: usize,
    out_len: usize,
    n_tokens: usize,
    x_per_w: usize,
) -> (usize, usize, usize) {
    let n_rows = out_len / n_tokens;
    let x_width = x_len / n_tokens;
    let w_width = x_width / x_per_w;
    assert!(
        n_rows * n_tokens == out_len
            && x_width * n_tokens == x_len
            && w_width * x_per_w == x_width
            && w_len == n_rows * w_width,
        "kernel shapes: {w_len} weights, {x_len} inputs, {out_len} outputs, {n_tokens} tokens"
    );
    (n_rows, x_width, w_width)
}
