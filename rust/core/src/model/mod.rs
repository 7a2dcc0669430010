//! The Llama model: weights, slice, KV cache, forward pass (in progress).
pub mod collective;
pub use collective::{Collective, Local};
