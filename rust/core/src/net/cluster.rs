//! The cluster on the real model: the factory that builds a worker's slice, and the root's
//! start-up (connect the workers, ship the slices of those without their own copy of the file,
//! build the root's own slice).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::auth::shared_secret;
use super::identity::ModelIdentity;
use super::protocol::Setup;
use super::root::{RootCollective, RootOptions};
use super::ship::ShipTensor;
use super::worker::{ModelFactory, WorkerModel};
use super::Timeouts;
use crate::error::IoContext;
use crate::format::{ModelFile, ModelHeader};
use crate::model::forward::{effective_max_seq_len, seq_memory_bytes};
use crate::model::load::{
    build_node, check_node_memory, load_weights, open_model_file, ShippedTensor, WeightSource,
};
use crate::model::weights::{slice_bytes, tensor_part, Part};
use crate::model::{Collective, LoadOptions, Model, ModelConfig, NodeSlice};
use crate::{Error, Result};

/// Where in the model file the bytes of node `slice` are (see docs/PROTOCOL.md): every tensor
/// of the file but the embedding, in file order.
pub fn ship_plan(
    file: &ModelFile,
    cfg: &ModelConfig,
    slice: &NodeSlice,
) -> Result<Vec<ShipTensor>> {
    let mut out = Vec::new();
    for s in file.tensors.iter().filter(|t| t.name != "embedding") {
        let (part, ft, _, _) = tensor_part(cfg, slice, &s.name)?;
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
        out.push(ShipTensor {
            name: s.name.clone(),
            parts,
        });
    }
    Ok(out)
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

    fn config_and_slice(setup: &Setup) -> Result<(ModelHeader, ModelConfig, NodeSlice)> {
        let header = ModelHeader::parse(&setup.model.header)?;
        let cfg = ModelConfig::from_header(&header);
        let slice = NodeSlice::new(&cfg, setup.node_index as usize, setup.n_nodes as usize)?;
        Ok((header, cfg, slice))
    }
}

impl ModelFactory for EngineFactory {
    fn local_identity(&self) -> Option<&ModelIdentity> {
        self.local.as_ref().map(|l| &l.1)
    }
    fn check(&self, setup: &Setup) -> Result<u64> {
        let (header, cfg, slice) = Self::config_and_slice(setup)?;
        slice_bytes(&header, &cfg, &slice)
    }
    fn working_memory(&self, setup: &Setup) -> Result<u64> {
        let (_, cfg, slice) = Self::config_and_slice(setup)?;
        let seq = effective_max_seq_len(&cfg, setup.max_seq_len as usize);
        Ok(seq_memory_bytes(&cfg, &slice, seq))
    }
    fn build(
        &self,
        setup: &Setup,
        shipped: Option<Vec<ShippedTensor>>,
    ) -> Result<Box<dyn WorkerModel>> {
        let (_, cfg, slice) = Self::config_and_slice(setup)?;
        let bt = setup.buffer_type;
        let source = match shipped {
            Some(t) => WeightSource::Shipped(t),
            None => WeightSource::File(
                &self
                    .local
                    .as_ref()
                    .ok_or_else(|| Error::invalid("no local model file"))?
                    .0,
            ),
        };
        let stop = Some(&*self.stop);
        let w = load_weights(&cfg, &slice, source, false, bt, self.nthreads, stop)?;
        let model = Model::new(cfg, slice, w, bt, setup.max_seq_len as usize, self.nthreads)?;
        Ok(Box::new(EngineWorker { model }))
    }
}

// ---------------------------------------------------------------------------------------------
// root

/// The root of a cluster: open the model at `path`, connect and handshake with every worker
/// (`secret`, or `$DLLAMA_SECRET` when `None`), ship the slices of workers without their own
/// copy (`progress(worker, done, total)`), wait until all are ready (within `timeouts`), then
/// build the root's own slice (node 0 of 1 + the workers).
pub fn start_root(
    path: &Path,
    opts: &LoadOptions,
    workers: &[String],
    secret: Option<String>,
    timeouts: Timeouts,
    progress: &mut dyn FnMut(usize, u64, u64),
) -> Result<(Model, RootCollective)> {
    let file = open_model_file(path, opts.legacy_weights)?;
    let cfg = ModelConfig::from_header(&file.header);
    // the root's own slice must fit before any worker is contacted
    let root_slice = NodeSlice::new(&cfg, 0, workers.len() + 1)?;
    check_node_memory(&file, &cfg, &root_slice, opts)?;
    let root_opts = RootOptions {
        secret: shared_secret(secret),
        buffer_type: opts.buffer_type,
        max_seq_len: effective_max_seq_len(&cfg, opts.max_seq_len) as u32,
        timeouts,
    };
    let root = connect_workers(&file, &cfg, workers, &root_opts, progress)?;
    let model = build_node(&file, 0, workers.len() + 1, opts)?;
    Ok((model, root))
}

/// The network half of `start_root`: check the node count, connect and handshake with every
/// worker, ship the slices of workers without their own copy, wait until all are ready.
pub fn connect_workers(
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
