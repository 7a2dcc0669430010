//! dllama core: everything that is not Python.
//!
//! - [`format`]: distributed-llama's `.m` model and `.t` tokenizer files, the legacy `.bin`.
//! - [`kernels`]: Q40 / Q80 blocks (ggml Q4_0 / Q8_0 layout) and the dot-product kernels,
//!   scalar reference plus AVX2 / NEON versions picked at run time.
//! - [`ops`]: RMSNorm, RoPE, softmax, SiLU, attention.
//! - [`pool`]: the long-lived thread pool that splits matmuls across threads.
//! - [`model`]: memory-mapped weights, the per-node slice, KV cache and the Llama forward pass.
//! - [`net`]: the cluster protocol: handshake, framing, root and worker over TCP.

pub mod error;
pub mod format;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod net;
pub mod ops;
pub mod pool;

pub use error::{Error, Result};
