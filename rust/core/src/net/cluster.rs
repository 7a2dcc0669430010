//! The cluster on the real model: which bytes each worker is shipped, how a worker builds its
//! slice (from its own file or from shipped bytes), and the root's start-up.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use memmap2::Mmap;

use super::protocol::{ModelIdentity, Setup};
use super::root::{RootCollective, RootOptions};
use super::ship::{read_at, AlignedBytes, ShipTensor, ShippedTensor};
use super::worker::{ModelFactory, Weights as WorkerWeights, WorkerModel};
use crate::error::IoContext;
use crate::format::{FloatType, ModelFile, ModelHeader};
use crate::kernels::prefers_packed_q40;
use crate::model::load::file_tensor;
use crate::model::tensor::ByteSource;
use crate::model::weights::{tensor_names, tensor_part, Part};
use crate::model::{BufferType, Collective, Model, ModelConfig, NodeSlice, Tensor, Weights};
use crate::{Error, Result};

impl ByteSource for AlignedBytes {
    fn bytes(&self) -> &[u8] {
        self.as_ref()
    }
}

/// Whether this machine repacks Q40 weights for its kernels (as `load::build_model` does).
fn pack(cfg: &ModelConfig, buffer_type: BufferType) -> bool {
    prefers_packed_q40()
        && buffer_type == BufferType::Q80
        && cfg.weights_float_type == FloatType::Q40
}

/// Threads for `Weights::from_parts` to repack with: the node's, or 0 when not repacking.
fn pack_threads(cfg: &ModelConfig, buffer_type: BufferType, nthreads: usize) -> usize {
    if pack(cfg, buffer_type) {
        nthreads.max(1)
    } else {
        0
    }
}

// ---------------------------------------------------------------------------------------------
// what a worker is shipped

/// A tensor of a node's slice: name, the part taken, its type and the part's rows and cols.
type PlanEntry = (String, Part, FloatType, usize, usize);

/// The tensors a worker holds (every tensor of the file but the embedding), in file order,
/// with the part of each that node `slice` takes and the part's shape.
fn slice_plan(file: &ModelFile, cfg: &ModelConfig, slice: &NodeSlice) -> Result<Vec<PlanEntry>> {
    let mut out = Vec::new();
    for spec in file.tensors.iter().filter(|t| t.name != "embedding") {
        let (part, ft, rows, cols) = tensor_part(cfg, slice, &spec.name)?;
        let (r, c) = part.shape(rows, cols);
        out.push((spec.name.clone(), part, ft, r, c));
    }
    Ok(out)
}

/// Bytes of weights in the slice of node `slice` (what a worker is shipped).
pub fn slice_bytes(cfg: &ModelConfig, slice: &NodeSlice) -> Result<u64> {
    let names = tensor_names(cfg);
    let mut total = 0u64;
    for n in names {
        let (part, ft, rows, cols) = tensor_part(cfg, slice, &n)?;
        let (r, c) = part.shape(rows, cols);
        total += (r * ft.bytes_for(c as u64)? as usize) as u64;
    }
    Ok(total)
}

/// Where in the model file the bytes of node `slice` are (see docs/PROTOCOL.md).
pub fn ship_plan(
    file: &ModelFile,
    cfg: &ModelConfig,
    slice: &NodeSlice,
) -> Result<Vec<ShipTensor>> {
    let mut out = Vec::new();
    for (name, part, ft, _, _) in slice_plan(file, cfg, slice)? {
        let s = file.tensor(&name)?;
        let row = ft.bytes_for(s.cols as u64)?;
        let parts = match part {
            Part::Whole => vec![(s.offset, s.nbytes as usize)],
            Part::Rows(r) => vec![(
                s.offset + r.start as u64 * row,
                (r.len() as u64 * row) as usize,
            )],
            Part::Cols(c) => {
                let (b0, b1) = (ft.bytes_for(c.start as u64)?, ft.bytes_for(c.end as u64)?);
                (0..s.rows as u64)
                    .map(|r| (s.offset + r * row + b0, (b1 - b0) as usize))
                    .collect()
            }
        };
        out.push(ShipTensor { name, parts });
    }
    Ok(out)
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

/// Shipped bytes by tensor name: where they live and their byte range there.
type ShippedParts = HashMap<String, (Arc<dyn ByteSource>, std::ops::Range<usize>)>;

/// Move shipped tensors into an unlinked temporary file and map it. Used where the weights are
/// repacked at load (x86_64): the repacking then releases the mapped pages (they can come
/// back from the file), so the worker does not keep the shipped bytes beside the packed copy.
fn spill_to_file(shipped: Vec<ShippedTensor>, stop: Option<&AtomicBool>) -> Result<ShippedParts> {
    use std::io::Write;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    let mut ranges = Vec::with_capacity(shipped.len());
    let mut off = 0usize;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
    for t in shipped {
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
        let src: Arc<dyn ByteSource> = map.clone();
        if parts.insert(name.clone(), (src, r)).is_some() {
            return Err(Error::Protocol(format!(
                "the root shipped tensor {name} twice"
            )));
        }
    }
    Ok(parts)
}

/// A worker's weights from the tensors the root shipped (names and shapes checked); given up
/// once `stop` is set.
pub fn weights_from_shipped(
    cfg: &ModelConfig,
    slice: &NodeSlice,
    buffer_type: BufferType,
    shipped: Vec<ShippedTensor>,
    nthreads: usize,
    stop: Option<&AtomicBool>,
) -> Result<Weights> {
    let pack = pack(cfg, buffer_type);
    let parts = if pack {
        spill_to_file(shipped, stop)?
    } else {
        let mut parts = ShippedParts::new();
        for t in shipped {
            let len = t.data.len();
            let src: Arc<dyn ByteSource> = Arc::new(t.data);
            if parts.insert(t.name.clone(), (src, 0..len)).is_some() {
                return Err(Error::Protocol(format!(
                    "the root shipped tensor {} twice",
                    t.name
                )));
            }
        }
        parts
    };
    let get_part = |name: &str| -> Result<Tensor> {
        check_stop(stop)?;
        let (src, range) = parts
            .get(name)
            .ok_or_else(|| Error::Protocol(format!("the root did not ship tensor {name}")))?;
        let (part, ft, rows, cols) = tensor_part(cfg, slice, name)?;
        let (r, c) = part.shape(rows, cols);
        Tensor::new(ft, r, c, src.clone(), range.clone())
            .map_err(|e| Error::Protocol(format!("shipped tensor {name}: {e}")))
    };
    Weights::from_parts(
        cfg,
        slice,
        false,
        pack_threads(cfg, buffer_type, nthreads),
        &get_part,
    )
}

/// This node's weights from its own copy of the model file: rows memory-mapped (no copy);
/// column slices (wo, w2 with several nodes) read with positioned reads, so the other nodes'
/// columns never become resident here (into owned memory, or into a temporary file where
/// the weights are repacked at load, so the repacking can release them). Given up once `stop`
/// is set.
pub fn load_weights(
    file: &ModelFile,
    cfg: &ModelConfig,
    slice: &NodeSlice,
    with_embedding: bool,
    buffer_type: BufferType,
    nthreads: usize,
    stop: Option<&AtomicBool>,
) -> Result<Weights> {
    let f = File::open(&file.path)
        .context(|| format!("cannot open model file {}", file.path.display()))?;
    let packing = pack(cfg, buffer_type);
    let get_part = |name: &str| -> Result<Tensor> {
        check_stop(stop)?;
        let (part, ft, rows, cols) = tensor_part(cfg, slice, name)?;
        let s = file.tensor(name)?;
        if s.rows != rows || s.cols != cols || s.float_type != ft {
            return Err(Error::format(format!(
                "tensor {name} is {} {}x{}, expected {} {rows}x{cols}",
                s.float_type.name(),
                s.rows,
                s.cols,
                ft.name()
            )));
        }
        match part {
            Part::Whole => file_tensor(file, name),
            Part::Rows(r) => Ok(file_tensor(file, name)?.rows(r)),
            Part::Cols(c) => {
                let row = ft.bytes_for(s.cols as u64)?;
                let (b0, b1) = (ft.bytes_for(c.start as u64)?, ft.bytes_for(c.end as u64)?);
                let w = (b1 - b0) as usize;
                let mut buf = AlignedBytes::with_len(rows * w)?;
                for (r, dst) in buf.as_mut().chunks_exact_mut(w).enumerate() {
                    read_at(&f, dst, s.offset + r as u64 * row + b0)
                        .context(|| format!("cannot read {name} from {}", file.path.display()))?;
                }
                if packing {
                    // repacked at load: keep the copy in a file the repacking can release
                    let one = vec![ShippedTensor {
                        name: name.to_string(),
                        data: buf,
                    }];
                    let (src, range) = spill_to_file(one, stop)?
                        .remove(name)
                        .expect("just spilled");
                    Tensor::new(ft, rows, c.len(), src, range)
                } else {
                    let len = buf.len();
                    Tensor::new(ft, rows, c.len(), Arc::new(buf), 0..len)
                }
            }
        }
    };
    Weights::from_parts(
        cfg,
        slice,
        with_embedding,
        pack_threads(cfg, buffer_type, nthreads),
        &get_part,
    )
}

/// Node `node_index` of `n_nodes`, built from its own copy of the file (`load_weights`).
pub fn build_node(
    file: &ModelFile,
    cfg: &ModelConfig,
    node_index: usize,
    n_nodes: usize,
    buffer_type: BufferType,
    max_seq_len: usize,
    nthreads: usize,
) -> Result<Model> {
    let slice = NodeSlice::new(cfg, node_index, n_nodes)?;
    let w = load_weights(file, cfg, &slice, node_index == 0, buffer_type, nthreads, None)?;
    Model::new(cfg.clone(), slice, w, buffer_type, max_seq_len, nthreads)
}

// ---------------------------------------------------------------------------------------------
// worker

/// A worker's slice of the real model.
pub struct EngineWorker {
    pub model: Model,
}

impl WorkerModel for EngineWorker {
    fn forward(
        &mut self,
        x: &mut [f32],
        pos: usize,
        collective: &mut dyn Collective,
    ) -> Result<()> {
        self.model.forward(x, pos, collective)
    }
    fn dim(&self) -> usize {
        self.model.cfg.dim
    }
    fn max_seq_len(&self) -> usize {
        self.model.max_seq_len()
    }
}

/// Builds workers' slices: from the worker's own model file (`--model`) or shipped bytes.
pub struct EngineFactory {
    local: Option<(ModelFile, ModelIdentity)>,
    nthreads: usize,
    /// Set (by an interrupt) to give up a slice being built.
    stop: Arc<AtomicBool>,
}

impl EngineFactory {
    pub fn new(local: Option<ModelFile>, nthreads: usize) -> Result<EngineFactory> {
        let local = match local {
            Some(f) => {
                let id = ModelIdentity::of_model(&f)?;
                Some((f, id))
            }
            None => None,
        };
        Ok(EngineFactory {
            local,
            nthreads,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The flag that, once set, makes a build in progress fail before its next tensor (set it
    /// when the worker is interrupted: `serve` then returns without waiting for the build).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    fn config_and_slice(setup: &Setup) -> Result<(ModelConfig, NodeSlice)> {
        let header = ModelHeader::parse(&setup.model.header)?;
        let cfg = ModelConfig::from_header(&header)?;
        let slice = NodeSlice::new(&cfg, setup.node_index as usize, setup.n_nodes as usize)?;
        Ok((cfg, slice))
    }
}

impl ModelFactory for EngineFactory {
    fn local_identity(&self) -> Option<&ModelIdentity> {
        self.local.as_ref().map(|l| &l.1)
    }
    fn check(&self, setup: &Setup) -> Result<u64> {
        let (cfg, slice) = Self::config_and_slice(setup)?;
        slice_bytes(&cfg, &slice)
    }
    fn working_memory(&self, setup: &Setup) -> Result<u64> {
        let (cfg, slice) = Self::config_and_slice(setup)?;
        let seq = crate::model::forward::effective_max_seq_len(&cfg, setup.max_seq_len as usize);
        Ok(crate::model::forward::seq_memory_bytes(&cfg, &slice, seq))
    }
    fn build(&self, setup: &Setup, weights: WorkerWeights) -> Result<Box<dyn WorkerModel>> {
        let (cfg, slice) = Self::config_and_slice(setup)?;
        let bt = setup.buffer_type;
        let w = match weights {
            WorkerWeights::Local => {
                let (file, _) = self
                    .local
                    .as_ref()
                    .ok_or_else(|| Error::invalid("no local model file"))?;
                load_weights(file, &cfg, &slice, false, bt, self.nthreads, Some(&self.stop))?
            }
            WorkerWeights::Shipped(t) => {
                weights_from_shipped(&cfg, &slice, bt, t, self.nthreads, Some(&self.stop))?
            }
        };
        let model = Model::new(cfg, slice, w, bt, setup.max_seq_len as usize, self.nthreads)?;
        Ok(Box::new(EngineWorker { model }))
    }
}

// ---------------------------------------------------------------------------------------------
// root

impl ModelIdentity {
    /// The identity of an open model file: its canonical header and a sampled fingerprint.
    pub fn of_model(file: &ModelFile) -> Result<ModelIdentity> {
        ModelIdentity::of_file(&file.path, file.header.to_bytes())
    }
}

/// The root's start-up: check the node count, connect and handshake with every worker, ship
/// the slices of workers without their own copy (`progress(worker, done, total)`), wait until
/// all are ready.
pub fn start_root(
    file: &ModelFile,
    cfg: &ModelConfig,
    addrs: &[String],
    opts: &RootOptions,
    progress: &mut dyn FnMut(usize, u64, u64),
) -> Result<RootCollective> {
    let n = addrs.len() + 1;
    let slices: Vec<NodeSlice> = (0..n)
        .map(|i| NodeSlice::new(cfg, i, n))
        .collect::<Result<_>>()?;
    let identity = ModelIdentity::of_model(file)?;
    let mut root = RootCollective::connect(addrs, cfg.dim, &identity, opts)?;
    let f = File::open(&file.path)
        .context(|| format!("cannot open model file {}", file.path.display()))?;
    for w in 0..addrs.len() {
        if root.needs_weights(w) {
            let plan = ship_plan(file, cfg, &slices[w + 1])?;
            root.ship(w, &f, &plan, &mut |d, t| progress(w, d, t))?;
        }
    }
    root.wait_ready()?;
    root.set_vocab_ranges(slices.iter().map(|s| s.vocab.clone()).collect())?;
    Ok(root)
}
