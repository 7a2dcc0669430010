//! Build a node's `Model` from a `.m` file (or a legacy seed `.bin`).

use std::path::Path;

use super::config::ModelConfig;
use super::forward::{BufferType, Model};
use super::split::NodeSlice;
use super::tensor::Tensor;
use super::weights::Weights;
use crate::format::{FloatType, ModelFile};
use crate::kernels::prefers_packed_q40;
use crate::Result;

/// How to build a node.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub buffer_type: BufferType,
    /// 0: the model's own context length, capped at 4096.
    pub max_seq_len: usize,
    /// Only for a legacy `.bin`, whose header does not say.
    pub legacy_weights: Option<FloatType>,
    pub nthreads: usize,
    pub node_index: usize,
    pub n_nodes: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            buffer_type: BufferType::Q80,
            max_seq_len: 0,
            legacy_weights: None,
            nthreads: 1,
            node_index: 0,
            n_nodes: 1,
        }
    }
}

/// A tensor of the file by name, memory-mapped (no copy).
pub fn file_tensor(file: &ModelFile, name: &str) -> Result<Tensor> {
    let spec = file.tensor(name)?;
    let start = spec.offset as usize;
    Tensor::new(
        spec.float_type,
        spec.rows,
        spec.cols,
        file.map(),
        start..start + spec.nbytes as usize,
    )
}

/// Open a model file: `.m`, or a legacy `.bin` when `legacy_weights` is given.
pub fn open_model_file(path: &Path, legacy_weights: Option<FloatType>) -> Result<ModelFile> {
    match legacy_weights {
        None => ModelFile::open(path),
        Some(ft) => ModelFile::open_legacy(path, ft),
    }
}

/// This node's model from an opened file: its slice of the weights (mapped), KV cache and
/// buffers. The root (node 0) also holds the embedding.
pub fn build_model(file: &ModelFile, opts: &LoadOptions) -> Result<Model> {
    let cfg = ModelConfig::from_header(&file.header)?;
    let slice = NodeSlice::new(&cfg, opts.node_index, opts.n_nodes)?;
    let get = |name: &str| file_tensor(file, name);
    // pack Q40 rows for the x86_64 kernels when they will get Q80 inputs
    // (on the node's threads)
    let pack = prefers_packed_q40()
        && opts.buffer_type == BufferType::Q80
        && cfg.weights_float_type == FloatType::Q40;
    let pack_threads = if pack { opts.nthreads.max(1) } else { 0 };
    let weights = Weights::load(&cfg, &slice, opts.node_index == 0, pack_threads, &get)?;
    Model::new(
        cfg,
        slice,
        weights,
        opts.buffer_type,
        opts.max_seq_len,
        opts.nthreads,
    )
}

/// Open `path` and build this node's model.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<Model> {
    build_model(&open_model_file(path, opts.legacy_weights)?, opts)
}
