//! Quantized blocks and kernels.

pub mod block;

pub use block::{BlockQ40, BlockQ80, QK};
