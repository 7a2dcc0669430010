//! This node's weights: its slice of every layer, the final norm and its rows of the
//! classifier (plus the embedding on the root).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use super::config::ModelConfig;
use super::split::NodeSlice;
use super::tensor::Tensor;
use crate::format::{FloatType, ModelHeader};
use crate::kernels::{BlockQ40, PackedQ40};
use crate::pool::ThreadPool;
use crate::{Error, Result};

/// One transformer block, this node's slice of it.
pub struct LayerWeights {
    pub wq: Tensor,               // (n_heads_local * head_dim, dim)
    pub wk: Tensor,               // (n_kv_heads_local * head_dim, dim)
    pub wv: Tensor,               // (n_kv_heads_local * head_dim, dim)
    pub wo: Tensor,               // (dim, n_heads_local * head_dim)
    pub q_norm: Option<Vec<f32>>, // (head_dim) Qwen3's per-head norm of q, shared by the heads
    pub k_norm: Option<Vec<f32>>, // (head_dim) and of k
    pub ffn: Ffn,
    pub attn_norm: Vec<f32>, // (dim)
    pub ffn_norm: Vec<f32>,  // (dim)
    /// When packing (SIMD kernels, Q40 weights, Q80 buffers): the rows of wq, wk, wv repacked as one
    /// (q_local + 2 kv_local, dim) matrix, so they are one matmul (one dispatch to the pool
    /// instead of three). The plain tensors then stay mapped but unread (pages released).
    pub qkv_packed: Option<Arc<PackedQ40>>,
}

/// One SwiGLU feed-forward network (the dense FFN, or one expert), this node's hidden units.
pub struct SwiGlu {
    pub w1: Tensor, // (hidden_local, dim), gate
    pub w2: Tensor, // (dim, hidden_local), down
    pub w3: Tensor, // (hidden_local, dim), up
    /// When packing: the rows of w1, w3 as one (2 hidden_local, dim) matrix.
    pub w13_packed: Option<Arc<PackedQ40>>,
}

impl SwiGlu {
    fn nbytes(&self) -> usize {
        self.w1.nbytes() + self.w2.nbytes() + self.w3.nbytes()
    }
}

/// The feed-forward part of a block.
pub enum Ffn {
    Dense(SwiGlu),
    /// A router picks `n_active` experts per token; every node holds its hidden units of
    /// every expert (tensor parallelism inside the experts).
    Moe {
        router: Tensor,       // (n_experts, dim) F32
        experts: Vec<SwiGlu>, // n_experts
        n_active: usize,
    },
}

/// The rows of Q40 `parts` (same columns) repacked as one matrix (on `pool`'s threads when
/// given); the parts' mapped pages are released afterwards.
fn pack_rows(parts: &[&Tensor], pool: Option<&mut ThreadPool>) -> Result<Arc<PackedQ40>> {
    let cols = parts[0].cols;
    let rows: usize = parts.iter().map(|t| t.rows).sum();
    let mut blocks: Vec<BlockQ40> = Vec::with_capacity(rows * cols / 32);
    for t in parts {
        if t.dtype != FloatType::Q40 || t.cols != cols {
            return Err(Error::invalid(
                "only Q40 tensors of the same width are packed together",
            ));
        }
        blocks.extend_from_slice(t.as_q40());
    }
    let packed = match pool {
        Some(pool) => PackedQ40::pack_with(pool, &blocks, rows, cols)?,
        None => PackedQ40::pack(&blocks, rows, cols)?,
    };
    for t in parts {
        t.release();
    }
    Ok(Arc::new(packed))
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
    /// Q40 has the same size): for a MoE layer the router (as held: bf16 when exact) and
    /// `n_active` experts.
    pub fn matmul_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let att: usize = [&l.wq, &l.wk, &l.wv, &l.wo]
                    .iter()
                    .map(|t| t.nbytes())
                    .sum();
                att + match &l.ffn {
                    Ffn::Dense(f) => f.nbytes(),
                    Ffn::Moe {
                        router,
                        experts,
                        n_active,
                    } => router.read_bytes() + n_active * experts[0].nbytes(),
                }
            })
            .sum();
        layers + self.wcls.nbytes()
    }
}

/// Which part of a `.m` tensor a node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Whole,
    Rows(Range<usize>),
    Cols(Range<usize>),
}

impl Part {
    /// This part of `whole`: rows share its bytes, columns are copied.
    pub fn take(&self, whole: Tensor) -> Result<Tensor> {
        match self {
            Part::Whole => Ok(whole),
            Part::Rows(r) => Ok(whole.rows(r.clone())),
            Part::Cols(c) => whole.columns(c.clone()),
        }
    }
    /// (rows, cols) of this part of a (rows, cols) tensor.
    pub fn shape(&self, rows: usize, cols: usize) -> (usize, usize) {
        match self {
            Part::Whole => (rows, cols),
            Part::Rows(r) => (r.len(), cols),
            Part::Cols(c) => (rows, c.len()),
        }
    }
}

/// The part of tensor `name` that `slice`'s node holds, and the whole tensor's type and
/// (rows, cols) as the header implies them (norms are 1 x dim).
pub fn tensor_part(
    cfg: &ModelConfig,
    slice: &NodeSlice,
    name: &str,
) -> Result<(Part, FloatType, usize, usize)> {
    let (wt, f32) = (cfg.weights_float_type, FloatType::F32);
    let (dim, hid, q_dim, kv_dim) = (cfg.dim, cfg.hidden_dim, cfg.q_dim(), cfg.kv_dim());
    let n_experts = cfg.moe.map_or(0, |m| m.n_experts);
    // "experts.<e>.<w>" of a MoE model, with e < n_experts
    fn expert(t: &str, n_experts: usize) -> Option<&str> {
        let (e, w) = t.strip_prefix("experts.")?.split_once('.')?;
        e.parse::<usize>().ok().filter(|&e| e < n_experts)?;
        Some(w)
    }
    let part = match name {
        "embedding" => (Part::Whole, f32, cfg.vocab_size, dim),
        "norm" => (Part::Whole, f32, 1, dim),
        "wcls" => (Part::Rows(slice.vocab.clone()), wt, cfg.vocab_size, dim),
        _ => {
            let layer = name
                .strip_prefix("layers.")
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(i, t)| {
                    i.parse::<usize>()
                        .ok()
                        .filter(|&i| i < cfg.n_layers)
                        .map(|_| t)
                });
            let moe = cfg.moe.is_some();
            let ffn = match layer {
                Some(t) if moe => expert(t, n_experts),
                Some(t) if !moe => Some(t),
                _ => None,
            };
            match (layer, ffn) {
                (Some("q"), _) => (Part::Rows(slice.q_rows.clone()), wt, q_dim, dim),
                (Some("k" | "v"), _) => (Part::Rows(slice.kv_rows.clone()), wt, kv_dim, dim),
                (Some("wo"), _) => (Part::Cols(slice.q_rows.clone()), wt, dim, q_dim),
                (_, Some("w1" | "w3")) => (Part::Rows(slice.hidden.clone()), wt, hid, dim),
                (_, Some("w2")) => (Part::Cols(slice.hidden.clone()), wt, dim, hid),
                (Some("q_norm" | "k_norm"), _) if cfg.qk_norm => {
                    (Part::Whole, f32, 1, cfg.head_dim)
                }
                (Some("moe_gate"), _) if moe => (Part::Whole, f32, n_experts, dim),
                (Some("attn_norm" | "ffn_norm"), _) => (Part::Whole, f32, 1, dim),
                _ => {
                    return Err(Error::invalid(format!(
                        "no tensor named {name:?} in this model"
                    )))
                }
            }
        }
    };
    // a node with the whole model takes every tensor whole
    if slice.n_nodes == 1 {
        return Ok((Part::Whole, part.1, part.2, part.3));
    }
    Ok(part)
}

/// Bytes of weights in the slice of node `slice`: every tensor of the file but the embedding
/// (what a worker is shipped).
pub fn slice_bytes(header: &ModelHeader, cfg: &ModelConfig, slice: &NodeSlice) -> Result<u64> {
    let mut total = 0u64;
    for spec in header.tensors().iter().filter(|t| t.name != "embedding") {
        let (part, ft, rows, cols) = tensor_part(cfg, slice, &spec.name)?;
        let (r, c) = part.shape(rows, cols);
        total += r as u64 * ft.bytes_for(c as u64)?;
    }
    Ok(total)
}

/// Check that tensor `name`, `got` = (type, rows, cols), has the type and shape the header
/// implies, `want`.
pub(crate) fn check_shape(
    name: &str,
    got: (FloatType, usize, usize),
    want: (FloatType, usize, usize),
) -> Result<()> {
    if got != want {
        let ((gt, gr, gc), (wt, wr, wc)) = (got, want);
        return Err(Error::format(format!(
            "tensor {name} is {gt} {gr}x{gc}, expected {wt} {wr}x{wc}"
        )));
    }
    Ok(())
}

/// Check a tensor against the type and shape the header implies.
fn expect(t: Tensor, name: &str, dtype: FloatType, rows: usize, cols: usize) -> Result<Tensor> {
    check_shape(name, (t.dtype, t.rows, t.cols), (dtype, rows, cols))?;
    Ok(t)
}

impl Weights {
    /// This node's weights from its parts of every tensor: `get_part(name)` returns the part
    /// `tensor_part(..)` names of tensor `name` (mapped rows, copied columns, shipped bytes),
    /// checked here for type and shape. With `pack_threads > 0`, Q40 matrices are repacked for
    /// the SIMD kernels on that many threads (0: not repacked), tensor by tensor, releasing
    /// the pages of each.
    pub fn from_parts(
        cfg: &ModelConfig,
        slice: &NodeSlice,
        with_embedding: bool,
        pack_threads: usize,
        get_part: &dyn Fn(&str) -> Result<Tensor>,
    ) -> Result<Weights> {
        Self::build(cfg, with_embedding, pack_threads, &|name| {
            let (part, ft, rows, cols) = tensor_part(cfg, slice, name)?;
            let (r, c) = part.shape(rows, cols);
            expect(get_part(name)?, name, ft, r, c)
        })
    }

    /// Every tensor of this node by name through `part(name)`.
    fn build(
        cfg: &ModelConfig,
        with_embedding: bool,
        pack_threads: usize,
        part: &dyn Fn(&str) -> Result<Tensor>,
    ) -> Result<Weights> {
        let pack = pack_threads > 0 && cfg.weights_float_type == FloatType::Q40;
        // a temporary pool for the repacking (the model's own is created after the weights)
        let pool = if pack && pack_threads > 1 {
            Some(RefCell::new(ThreadPool::new(pack_threads)?))
        } else {
            None
        };
        let m = |name: &str| -> Result<Tensor> {
            let t = part(name)?;
            match (pack, &pool) {
                (false, _) => Ok(t),
                (true, Some(p)) => t.packed_q40_with(Some(&mut p.borrow_mut())),
                (true, None) => t.packed_q40_with(None),
            }
        };
        let pack_rows = |parts: &[&Tensor]| match &pool {
            Some(p) => pack_rows(parts, Some(&mut p.borrow_mut())),
            None => pack_rows(parts, None),
        };
        // norms are tiny: copied into vectors
        let v = |name: &str| -> Result<Vec<f32>> { Ok(part(name)?.as_f32().to_vec()) };
        // one SwiGLU whose tensors are named `<prefix>w1` etc.
        let swiglu = |prefix: &str| -> Result<SwiGlu> {
            let (w1, w3) = (part(&format!("{prefix}w1"))?, part(&format!("{prefix}w3"))?);
            let w13_packed = if pack {
                Some(pack_rows(&[&w1, &w3])?)
            } else {
                None
            };
            Ok(SwiGlu {
                w1,
                w2: m(&format!("{prefix}w2"))?,
                w3,
                w13_packed,
            })
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |t: &str| format!("layers.{i}.{t}");
            let (wq, wk, wv) = (part(&n("q"))?, part(&n("k"))?, part(&n("v"))?);
            let qkv_packed = if pack {
                Some(pack_rows(&[&wq, &wk, &wv])?)
            } else {
                None
            };
            let ffn = match cfg.moe {
                None => Ffn::Dense(swiglu(&n(""))?),
                Some(moe) => Ffn::Moe {
                    // held as bf16 where that is exact (a router from a bf16 checkpoint)
                    router: part(&n("moe_gate"))?.held_as_bf16()?,
                    experts: (0..moe.n_experts)
                        .map(|e| swiglu(&n(&format!("experts.{e}."))))
                        .collect::<Result<_>>()?,
                    n_active: moe.n_active,
                },
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (Some(v(&n("q_norm"))?), Some(v(&n("k_norm"))?))
            } else {
                (None, None)
            };
            layers.push(LayerWeights {
                wq,
                wk,
                wv,
                wo: m(&n("wo"))?,
                q_norm,
                k_norm,
                ffn,
                attn_norm: v(&n("attn_norm"))?,
                ffn_norm: v(&n("ffn_norm"))?,
                qkv_packed,
            });
        }
        Ok(Weights {
            embedding: if with_embedding {
                Some(part("embedding")?)
            } else {
                None
            },
            layers,
            norm: v("norm")?,
            wcls: m("wcls")?,
        })
    }
}
