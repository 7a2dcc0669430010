//! The Llama model on one node: configuration, this node's slice, weights, KV cache and the
//! forward pass.
pub mod collective;
pub mod compute;
pub mod config;
mod experts;
pub mod forward;
pub mod kv_cache;
pub mod load;
pub mod split;
pub mod tensor;
pub mod weights;

pub use collective::{Collective, Local};
pub use config::{ModelConfig, MoeConfig};
pub use forward::{BufferType, Model};
pub use load::{load_model, LoadOptions, ShippedTensor, WeightSource};
pub use split::NodeSlice;
pub use tensor::Tensor;
pub use weights::{Ffn, LayerWeights, SwiGlu, Weights};

#[cfg(test)]
mod tests;
