//! Build a node's `Model`: its slice of the weights from a model file (`.m`, or
//! distributed-llama's legacy `.bin`) or from the bytes the root shipped, whether Q40 is
//! repacked, the KV cache. The one loader of the engine: the root, a worker with its own copy
//! of the file and a worker that was shipped its slice all come through `load_weights`.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use memmap2::Mmap;

use super::config::ModelConfig;
use super::forward::{effective_max_seq_len, seq_memory_bytes, BufferType, Model};
use super::split::NodeSlice;
use super::tensor::{AlignedBytes, ByteSource, Tensor};
use super::weights::{check_shape, slice_bytes, tensor_part, Part, Weights};
use crate::error::IoContext;
use crate::format::model_file::read_at;
use crate::format::{FloatType, ModelFile};
use crate::kernels::prefers_packed_q40;
use crate::{Error, Result};

/// How to build a node.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub buffer_type: BufferType,
    /// 0: the model's own context length, capped at 4096.
    pub max_seq_len: usize,
    /// Only for a legacy `.bin`, whose header does not say.
    pub legacy_weights: Option<FloatType>,
    pub nthreads: usize,
    /// Most bytes of memory this node's slice may take (see `check_node_memory`); `None`: the
    /// memory available when it is built.
    pub max_memory: Option<u64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            buffer_type: BufferType::Q80,
            max_seq_len: 0,
            legacy_weights: None,
            nthreads: 1,
            max_memory: None,
        }
    }
}

/// A tensor the root shipped to a worker: its name and its part's bytes.
pub struct ShippedTensor {
    pub name: String,
    pub data: AlignedBytes,
}

/// Where a node's weights come from.
pub enum WeightSource<'a> {
    /// A model file on this machine (the root's, or a worker's own copy): rows stay mapped,
    /// column slices are read with positioned reads.
    File(&'a ModelFile),
    /// The parts of this node's slice, shipped by the root (names and shapes checked).
    Shipped(Vec<ShippedTensor>),
}

/// Whether this node repacks its Q40 weights for the kernels: SIMD kernels (x86_64 and
/// aarch64, where the packed kernels are faster) with Q80 buffers.
pub fn packs_q40(cfg: &ModelConfig, buffer_type: BufferType) -> bool {
    prefers_packed_q40()
        && buffer_type == BufferType::Q80
        && cfg.weights_float_type == FloatType::Q40
}

/// Open a model file: `.m`, or a legacy `.bin` when `legacy_weights` is given.
pub fn open_model_file(path: &Path, legacy_weights: Option<FloatType>) -> Result<ModelFile> {
    match legacy_weights {
        None => ModelFile::open(path),
        Some(ft) => ModelFile::open_legacy(path, ft),
    }
}

/// Open `path` and build the whole model on this machine.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<Model> {
    build_node(&open_model_file(path, opts.legacy_weights)?, 0, 1, opts)
}

/// Node `node_index` of `n_nodes` from an opened file: its slice of the weights, KV cache and
/// buffers. Node 0 (the root) also holds the embedding.
pub fn build_node(
    file: &ModelFile,
    node_index: usize,
    n_nodes: usize,
    opts: &LoadOptions,
) -> Result<Model> {
    let cfg = ModelConfig::from_header(&file.header);
    let slice = NodeSlice::new(&cfg, node_index, n_nodes)?;
    check_node_memory(file, &cfg, &slice, opts)?;
    let (bt, nthreads) = (opts.buffer_type, opts.nthreads);
    let source = WeightSource::File(file);
    let w = load_weights(&cfg, &slice, source, node_index == 0, bt, nthreads, None)?;
    Model::new(cfg, slice, w, bt, opts.max_seq_len, nthreads)
}

/// Refuse, before anything is mapped or allocated, a node whose slice does not fit in
/// `opts.max_memory` (or the memory available now): its weights plus its KV cache and RoPE
/// table at the effective max_seq_len. The weights count whole, whether mapped from the file
/// or copied: decoding reads all of them (a MoE's experts over a few tokens), so all must
/// stay resident to decode at speed (page cache the system could evict counts as available
/// there and as needed here). The embedding table, read one row per token, is not counted.
pub fn check_node_memory(
    file: &ModelFile,
    cfg: &ModelConfig,
    slice: &NodeSlice,
    opts: &LoadOptions,
) -> Result<()> {
    let seq = effective_max_seq_len(cfg, opts.max_seq_len);
    let weights = slice_bytes(&file.header, cfg, slice)?;
    let kv = seq_memory_bytes(cfg, slice, seq);
    let (limit, what) = match opts.max_memory {
        Some(m) => (m, "allowed by --max-memory"),
        None => match crate::memory::available_bytes() {
            Some(a) => (a, "available"),
            None => return Ok(()),
        },
    };
    let need = weights.saturating_add(kv);
    if need > limit {
        let human = crate::memory::human;
        return Err(Error::invalid(format!(
            "this model needs {} for weights + {} for KV cache and RoPE table at --max-seq-len \
             {seq} on this node; {} {what} (weights count whole, mapped or copied: \
             decoding reads them all; lower --max-seq-len or add workers)",
            human(weights),
            human(kv),
            human(limit),
        )));
    }
    Ok(())
}

/// This node's weights from `source`. Q40 matrices are repacked (`packs_q40`) on `nthreads`
/// threads, tensor by tensor, releasing the pages of each. Given up, before its next tensor,
/// once `stop` is set (an interrupted worker).
pub fn load_weights(
    cfg: &ModelConfig,
    slice: &NodeSlice,
    source: WeightSource<'_>,
    with_embedding: bool,
    buffer_type: BufferType,
    nthreads: usize,
    stop: Option<&AtomicBool>,
) -> Result<Weights> {
    let pack = packs_q40(cfg, buffer_type);
    let pack_threads = if pack { nthreads.max(1) } else { 0 };
    match source {
        WeightSource::File(file) => {
            let f = File::open(&file.path)
                .context(|| format!("cannot open model file {}", file.path.display()))?;
            let get_part = |name: &str| {
                check_stop(stop)?;
                file_part(file, &f, cfg, slice, name, pack)
            };
            Weights::from_parts(cfg, slice, with_embedding, pack_threads, &get_part)
        }
        WeightSource::Shipped(shipped) => {
            let parts = if pack {
                spill_to_file(shipped, stop)?
            } else {
                let mut parts = ShippedParts::new();
                for t in shipped {
                    let len = t.data.len();
                    insert_part(&mut parts, t.name, Arc::new(t.data), 0..len)?;
                }
                parts
            };
            let get_part = |name: &str| -> Result<Tensor> {
                check_stop(stop)?;
                let (src, range) = parts.get(name).ok_or_else(|| {
                    Error::Protocol(format!("the root did not ship tensor {name}"))
                })?;
                let (part, ft, rows, cols) = tensor_part(cfg, slice, name)?;
                let (r, c) = part.shape(rows, cols);
                Tensor::new(ft, r, c, src.clone(), range.clone())
                    .map_err(|e| Error::Protocol(format!("shipped tensor {name}: {e}")))
            };
            Weights::from_parts(cfg, slice, with_embedding, pack_threads, &get_part)
        }
    }
}

/// This node's part of tensor `name` of `file` (opened as `f`): whole tensors and row slices
/// memory-mapped (no copy); column slices (wo, w2 with several nodes) read with positioned
/// reads, so the other nodes' columns never become resident here (into owned memory, or into
/// a temporary file when `pack`, so the repacking can release them).
fn file_part(
    file: &ModelFile,
    f: &File,
    cfg: &ModelConfig,
    slice: &NodeSlice,
    name: &str,
    pack: bool,
) -> Result<Tensor> {
    let (part, ft, rows, cols) = tensor_part(cfg, slice, name)?;
    let s = file.tensor(name)?;
    check_shape(name, (s.float_type, s.rows, s.cols), (ft, rows, cols))?;
    let start = s.offset as usize;
    let whole = || Tensor::new(ft, rows, cols, file.map(), start..start + s.nbytes as usize);
    match part {
        Part::Whole => whole(),
        Part::Rows(r) => Ok(whole()?.rows(r)),
        Part::Cols(c) => {
            let row = ft.bytes_for(s.cols as u64)?;
            let (b0, b1) = (ft.bytes_for(c.start as u64)?, ft.bytes_for(c.end as u64)?);
            let w = (b1 - b0) as usize;
            let mut buf = AlignedBytes::with_len(rows * w)?;
            for (r, dst) in buf.as_mut().chunks_exact_mut(w).enumerate() {
                read_at(f, dst, s.offset + r as u64 * row + b0)
                    .context(|| format!("cannot read {name} from {}", file.path.display()))?;
            }
            if pack {
                // repacked at load: keep the copy in a file the repacking can release
                let one = vec![ShippedTensor {
                    name: name.to_string(),
                    data: buf,
                }];
                let (src, range) = spill_to_file(one, None)?
                    .remove(name)
                    .expect("just spilled");
                Tensor::new(ft, rows, c.len(), src, range)
            } else {
                let len = buf.len();
                Tensor::new(ft, rows, c.len(), Arc::new(buf), 0..len)
            }
        }
    }
}

/// Fails once `stop` is set. Checked before each tensor of a slice being built, so that an
/// interrupted worker gives it up within one tensor's work.
fn check_stop(stop: Option<&AtomicBool>) -> Result<()> {
    if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
        return Err(Error::Connection(
            "the worker was interrupted while building its slice".into(),
        ));
    }
    Ok(())
}

/// Tensor bytes by name: where they live and their byte range there.
type ShippedParts = HashMap<String, (Arc<dyn ByteSource>, Range<usize>)>;

fn insert_part(
    parts: &mut ShippedParts,
    name: String,
    src: Arc<dyn ByteSource>,
    range: Range<usize>,
) -> Result<()> {
    if parts.contains_key(&name) {
        return Err(Error::Protocol(format!(
            "the root shipped tensor {name} twice"
        )));
    }
    parts.insert(name, (src, range));
    Ok(())
}

/// Move tensors into an unlinked temporary file and map it. Used where the weights are
/// repacked at load (SIMD kernels): the repacking then releases the mapped pages (they can come
/// back from the file), so the node does not keep the unpacked bytes beside the packed copy.
fn spill_to_file(tensors: Vec<ShippedTensor>, stop: Option<&AtomicBool>) -> Result<ShippedParts> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("dllama-shipped-{}-{seq}.bin", std::process::id()));
    let ctx = || format!("cannot spill shipped weights to {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .context(ctx)?;
    // unlinked now: the file lives as long as it is open or mapped
    let _ = std::fs::remove_file(&path);
    let mut ranges = Vec::with_capacity(tensors.len());
    let mut off = 0usize;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
    for t in tensors {
        check_stop(stop)?;
        let pad = off.next_multiple_of(64) - off;
        w.write_all(&[0u8; 64][..pad]).context(ctx)?;
        off += pad;
        w.write_all(t.data.as_ref()).context(ctx)?;
        ranges.push((t.name, off..off + t.data.len()));
        off += t.data.len();
        // t.data is freed here, tensor by tensor
    }
    w.flush().context(ctx)?;
    drop(w);
    // SAFETY: a private unlinked file nobody else can open or truncate.
    let map = Arc::new(unsafe { Mmap::map(&f) }.context(ctx)?);
    let mut parts = ShippedParts::new();
    for (name, r) in ranges {
        insert_part(&mut parts, name, map.clone(), r)?;
    }
    Ok(parts)
}
