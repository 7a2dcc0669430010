//! The non-matmul operations of the Llama forward pass, on f32 activations.
//!
//! They are O(dim) per token (attention O(dim · pos)), next to O(dim²) for the matmuls: the
//! elementwise ones are written with 8 independent accumulators so the compiler vectorizes
//! them for the baseline ISA; attention uses the dispatched dot / axpy kernels.

pub mod activation;
pub mod attention;
pub mod moe;
pub mod norm;
pub mod rope;

pub use activation::{gelu_mul, silu_mul, softmax};
pub use attention::{attention, AttentionShape};
pub use moe::{route_top_k, Routes};
pub use norm::{rmsnorm, rmsnorm_heads, rmsnorm_rows};
pub use rope::{RopeConfig, RopeScaling, RopeTable, RopeType};
