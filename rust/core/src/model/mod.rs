//! The Llama model on one node: configuration, this node's slice, weights, KV cache and the
//! forward pass.
pub mod collective;
pub mod config;
pub mod split;

pub use collective::{Collective, Local};
pub use config::{DType, ModelConfig, RopeConfig, RopeType};
pub use split::NodeSlice;
pub mod compute;
pub mod forward;
pub mod kv_cache;
pub mod tensor;
pub mod weights;

pub use forward::{BufferType, Model};
pub use tensor::Tensor;
pub use weights::{LayerWeights, Weights};

#[cfg(test)]
mod tests;
