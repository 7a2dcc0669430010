//! The numeric kernels: quantized blocks, matmuls and the attention / softmax / axpy inner
//! loops, one file per architecture.
//!
//! - [`block`]: Q40 / Q80 blocks (ggml Q4_0 / Q8_0 layout), scalar quantize / dequantize.
//! - [`scalar`]: portable kernels, the reference every SIMD kernel is tested against.
//! - `avx2` (AVX2 + FMA + F16C), `avx2_vnni` (Q40 × Q80 in maddubs / AVX-VNNI / AVX-512 VNNI
//!   variants), `avx512` (512-bit packed Q40 × Q80): x86_64. `neon`: aarch64.
//! - [`packed`]: Q40 rows repacked at load time for the SIMD kernels.
//! - [`dispatch`]: the one run-time choice of a path ([`Kernels`]).
//! - `shape`: the shapes of kernel calls and the shared row loop.
//! - [`matmul`]: the checked, multi-threaded entry points the engine calls.

pub mod block;
pub mod dispatch;
pub mod matmul;
pub mod packed;
pub mod scalar;
pub(crate) mod shape;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx2_vnni;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;

pub use block::{
    as_q40, as_q80, dequantize_q40, dequantize_q80, quantize_q40, BlockQ40, BlockQ80, QK,
};
pub use dispatch::{active_path, KernelPath, Kernels};
pub use matmul::{matmul, prefers_packed_q40, quantize_q80, Input, Matrix};
pub use packed::{set_next_stream, PackedQ40, PassPlan};
