//! This node's weights: its slice of every layer, the final norm and its rows of the
//! classifier (plus the embedding on the root).

use super::config::ModelConfig;
use super::split::NodeSlice;
use super::tensor::Tensor;
use crate::format::FloatType;
use crate::{Error, Result};

/// One transformer block, this node's slice of it.
pub struct LayerWeights {
    pub wq: Tensor,          // (n_heads_local * head_dim, dim)
    pub wk: Tensor,          // (n_kv_heads_local * head_dim, dim)
    pub wv: Tensor,          // (n_kv_heads_local * head_dim, dim)
    pub wo: Tensor,          // (dim, n_heads_local * head_dim)
    pub w1: Tensor,          // (hidden_local, dim), gate
    pub w2: Tensor,          // (dim, hidden_local), down
    pub w3: Tensor,          // (hidden_local, dim), up
    pub attn_norm: Vec<f32>, // (dim)
    pub ffn_norm: Vec<f32>,  // (dim)
}

pub struct Weights {
    /// (vocab_size, dim) F32; only the root embeds tokens.
    pub embedding: Option<Tensor>,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>, // (dim)
    pub wcls: Tensor,   // (vocab_local, dim)
}

impl Weights {
    /// Bytes of weight matrices this node reads per token (for bandwidth figures; packed
    /// Q40 has the same size).
    pub fn matmul_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3]
                    .iter()
                    .map(|t| t.nbytes())
                    .sum::<usize>()
            })
            .sum();
        layers + self.wcls.nbytes()
    }
}

/// Check a whole tensor of the file against the shape and type the header implies.
fn expect(t: Tensor, name: &str, dtype: FloatType, rows: usize, cols: usize) -> Result<Tensor> {
    if t.dtype != dtype || t.rows != rows || t.cols != cols {
        return Err(Error::format(format!(
            "tensor {name} is {} {}x{}, expected {} {rows}x{cols}",
            t.dtype.name(),
            t.rows,
            t.cols,
            dtype.name()
        )));
    }
    Ok(t)
}

/// A 1-D F32 tensor copied into a vector (norm weights are tiny).
fn vector(t: Tensor, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = expect(t, name, FloatType::F32, 1, len)?;
    Ok(t.as_f32().to_vec())
}

impl Weights {
    /// Take this node's slice of every tensor. `get(name)` returns the whole tensor of the
    /// file by its `.m` name (norms as 1 x dim), memory-mapped: row slices stay mapped,
    /// column slices (wo, w2 when `n_nodes > 1`) are copied. With `pack`, Q40 matrices are
    /// repacked for the x86_64 kernels, tensor by tensor, releasing the mapped pages of each.
    pub fn load(
        cfg: &ModelConfig,
        slice: &NodeSlice,
        with_embedding: bool,
        pack: bool,
        get: &dyn Fn(&str) -> Result<Tensor>,
    ) -> Result<Weights> {
        let fin = |t: Tensor| if pack { t.packed_q40() } else { Ok(t) };
        let wt = cfg.weights_float_type;
        let (dim, hid, q_dim, kv_dim) = (cfg.dim, cfg.hidden_dim, cfg.q_dim(), cfg.kv_dim());
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let m = |name: &str, rows: usize, cols: usize| -> Result<Tensor> {
                let full = format!("layers.{i}.{name}");
                expect(get(&full)?, &full, wt, rows, cols)
            };
            let v = |name: &str| -> Result<Vec<f32>> {
                let full = format!("layers.{i}.{name}");
                vector(get(&full)?, &full, dim)
            };
            layers.push(LayerWeights {
                wq: fin(m("q", q_dim, dim)?.rows(slice.q_rows.clone()))?,
                wk: fin(m("k", kv_dim, dim)?.rows(slice.kv_rows.clone()))?,
                wv: fin(m("v", kv_dim, dim)?.rows(slice.kv_rows.clone()))?,
                wo: fin(m("wo", dim, q_dim)?.columns(slice.q_rows.clone())?)?,
                w1: fin(m("w1", hid, dim)?.rows(slice.hidden.clone()))?,
                w2: fin(m("w2", dim, hid)?.columns(slice.hidden.clone())?)?,
                w3: fin(m("w3", hid, dim)?.rows(slice.hidden.clone()))?,
                attn_norm: v("attn_norm")?,
                ffn_norm: v("ffn_norm")?,
            });
        }
        let embedding = if with_embedding {
            Some(expect(
                get("embedding")?,
                "embedding",
                FloatType::F32,
                cfg.vocab_size,
                dim,
            )?)
        } else {
            None
        };
        Ok(Weights {
            embedding,
            layers,
            norm: vector(get("norm")?, "norm", dim)?,
            wcls: fin(
                expect(get("wcls")?, "wcls", wt, cfg.vocab_size, dim)?.rows(slice.vocab.clone())
            )?,
        })
    }
}
