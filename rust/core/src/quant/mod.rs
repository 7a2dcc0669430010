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
