//! `dllama._core.Node`: one node of the model (on one machine: the whole model).

use std::path::PathBuf;
use std::time::Instant;

use dllama_core::format::FloatType;
use dllama_core::model::{load, BufferType, Collective, Local, Model};
use dllama_core::net::{start_root, RootCollective, Timeouts};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::IntoPy;

/// Who a node computes with: nobody, or the workers of a cluster (its TCP collective).
enum Peers {
    Local(Local),
    Root(Box<RootCollective>),
}

/// A model loaded for inference: weights memory-mapped from the file (Q40 matrices repacked
/// into memory on x86_64 with q80 buffers), a KV cache, a pool of threads. `forward(tokens, pos)` runs
/// tokens at positions `pos..` and returns the logits of the last one.
#[pyclass(name = "Node", module = "dllama._core")]
pub struct PyNode {
    model: Model,
    peers: Peers,
    nthreads: usize,
    buffer_float_type: &'static str,
    last_inference_ms: f64,
    last_transfer_ms: f64,
    last_sent_bytes: u64,
    last_recv_bytes: u64,
}

#[pymethods]
impl PyNode {
    #[new]
    #[pyo3(signature = (model_path, *, nthreads=1, buffer_float_type="q80", max_seq_len=0, weights_float_type=None, workers=None, secret=None, ready_timeout=600.0, max_memory=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_path: PathBuf,
        nthreads: usize,
        buffer_float_type: &str,
        max_seq_len: usize,
        weights_float_type: Option<&str>,
        workers: Option<Vec<String>>,
        secret: Option<String>,
        ready_timeout: f64,
        max_memory: Option<u64>,
    ) -> PyResult<PyNode> {
        if nthreads == 0 {
            return Err(PyValueError::new_err("nthreads must be at least 1"));
        }
        let buffer_type = BufferType::parse(buffer_float_type).py()?;
        // how long each worker may take to receive and build its slice
        let timeouts = Timeouts {
            build: crate::net::secs(ready_timeout, "ready_timeout")?,
            ..Timeouts::default()
        };
        let legacy_weights = weights_float_type
            .map(FloatType::from_name)
            .transpose()
            .py()?;
        let opts = load::LoadOptions {
            buffer_type,
            max_seq_len,
            legacy_weights,
            nthreads,
            max_memory,
        };
        // the root of a cluster: connect the workers (shipping their slices), then load
        let workers = workers.unwrap_or_default();
        let (model, peers) = if workers.is_empty() {
            let m = py.detach(|| load::load_model(&model_path, &opts)).py()?;
            (m, Peers::Local(Local))
        } else {
            let mut progress = crate::net::shipping_progress(&workers);
            let (m, r) = py
                .detach(|| {
                    start_root(
                        &model_path,
                        &opts,
                        &workers,
                        secret,
                        timeouts,
                        &mut progress,
                    )
                })
                .py()?;
            (m, Peers::Root(Box::new(r)))
        };
        Ok(PyNode {
            model,
            peers,
            nthreads,
            buffer_float_type: if buffer_type == BufferType::Q80 {
                "q80"
            } else {
                "f32"
            },
            last_inference_ms: 0.0,
            last_transfer_ms: 0.0,
            last_sent_bytes: 0,
            last_recv_bytes: 0,
        })
    }

    /// Run `tokens` at positions `pos, pos + 1, ...`; the float32 logits of the last token,
    /// in a new array, or written into `out` (a writable contiguous float32 array of
    /// `vocab_size` values, checked before any work) and returned: a generation loop that
    /// passes the same array each step allocates nothing per token.
    #[pyo3(signature = (tokens, pos, out=None))]
    fn forward<'py>(
        &mut self,
        py: Python<'py>,
        tokens: Vec<i64>,
        pos: i64,
        out: Option<Bound<'py, PyArray1<f32>>>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        if let Some(a) = &out {
            let n = self.model.logits.len();
            with_out(a, |s| match s.len() {
                len if len == n => Ok(()),
                len => Err(PyValueError::new_err(format!(
                    "out holds {len} values, the logits are {n}"
                ))),
            })?;
        }
        // tokens and position are checked once, in the core, before any work
        let (model, peers) = (&mut self.model, &mut self.peers);
        let ms = py
            .detach(|| {
                let t0 = Instant::now();
                match peers {
                    Peers::Local(l) => model.step(&tokens, pos, l)?,
                    Peers::Root(r) => model.step(&tokens, pos, r.as_mut())?,
                }
                Ok(t0.elapsed().as_secs_f64() * 1000.0)
            })
            .py()?;
        self.last_inference_ms = ms;
        if let Peers::Root(r) = &self.peers {
            let s = r.step_stats();
            self.last_transfer_ms = s.transfer.as_secs_f64() * 1000.0;
            self.last_sent_bytes = s.sent;
            self.last_recv_bytes = s.received;
        }
        match out {
            Some(a) => {
                with_out(&a, |s| {
                    s.copy_from_slice(&self.model.logits);
                    Ok(())
                })?;
                Ok(a)
            }
            None => Ok(PyArray1::from_slice(py, &self.model.logits)),
        }
    }

    /// Wall time of the last `forward`, ms.
    #[getter]
    fn last_inference_ms(&self) -> f64 {
        self.last_inference_ms
    }
    /// Time the last `forward` spent on the network, ms (0 on one machine).
    #[getter]
    fn last_transfer_ms(&self) -> f64 {
        self.last_transfer_ms
    }
    #[getter]
    fn last_sent_bytes(&self) -> u64 {
        self.last_sent_bytes
    }
    #[getter]
    fn last_recv_bytes(&self) -> u64 {
        self.last_recv_bytes
    }
    #[getter]
    fn dim(&self) -> usize {
        self.model.cfg.dim
    }
    #[getter]
    fn hidden_dim(&self) -> usize {
        self.model.cfg.hidden_dim
    }
    #[getter]
    fn n_layers(&self) -> usize {
        self.model.cfg.n_layers
    }
    #[getter]
    fn n_heads(&self) -> usize {
        self.model.cfg.n_heads
    }
    #[getter]
    fn n_kv_heads(&self) -> usize {
        self.model.cfg.n_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.model.cfg.head_dim
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }
    /// Length of the KV cache: the most positions a sequence can use.
    #[getter]
    fn max_seq_len(&self) -> usize {
        self.model.max_seq_len()
    }
    /// The model's own context length (from its header).
    #[getter]
    fn model_max_seq_len(&self) -> usize {
        self.model.cfg.max_seq_len
    }
    #[getter]
    fn weights_float_type(&self) -> &'static str {
        self.model.cfg.weights_float_type.name()
    }
    #[getter]
    fn buffer_float_type(&self) -> &'static str {
        self.buffer_float_type
    }
    #[getter]
    fn nthreads(&self) -> usize {
        self.nthreads
    }
    /// Bytes of the KV cache (when full).
    #[getter]
    fn kv_cache_bytes(&self) -> usize {
        self.model.cache.nbytes()
    }
    /// Bytes of weight matrices read per generated token.
    #[getter]
    fn weight_bytes_per_token(&self) -> usize {
        self.model.weights.matmul_bytes()
    }
    /// Nodes computing the model: 1, or 1 + the workers of a cluster root.
    #[getter]
    fn n_nodes(&self) -> usize {
        match &self.peers {
            Peers::Local(_) => 1,
            Peers::Root(r) => r.n_nodes(),
        }
    }
    /// The active kernel path (e.g. "avx2", "scalar").
    #[getter]
    fn kernels(&self) -> String {
        dllama_core::model::compute::kernels_name()
    }

    fn __repr__(&self) -> String {
        format!(
            "Node(dim={}, n_layers={}, vocab_size={}, weights={}, max_seq_len={}, nthreads={})",
            self.model.cfg.dim,
            self.model.cfg.n_layers,
            self.model.cfg.vocab_size,
            self.model.cfg.weights_float_type.name(),
            self.model.max_seq_len(),
            self.nthreads
        )
    }
}

/// `f` on the values of `forward`'s `out`, borrowed writable: a ValueError when it is
/// read-only, borrowed elsewhere, or not contiguous.
fn with_out<R>(
    a: &Bound<'_, PyArray1<f32>>,
    f: impl FnOnce(&mut [f32]) -> PyResult<R>,
) -> PyResult<R> {
    let mut rw = a
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
    let s = rw
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("out must be a contiguous float32 array"))?;
    f(s)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNode>()
}
