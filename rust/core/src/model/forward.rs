//! The Llama / Qwen3 / Qwen3-MoE forward pass of one node, llama2.c style: it reads top to
//! bottom like the papers. Qwen3 adds an RMSNorm of each q and k head before RoPE; Qwen3-MoE
//! replaces the FFN by a router and top-k SwiGLU experts (Switch / Mixtral style).
//!
//! Every node holds the full residual stream `x` (n_tokens, dim) and computes its slice of
//! each layer (its heads, its hidden units); the collective sums the partial outputs of the
//! attention and FFN projections across nodes. With `Local` this is the one-machine model.

use std::sync::Mutex;

use super::collective::Collective;
use super::compute::{self, input};
use super::config::{is_quantized, ModelConfig};
use super::experts::{run_experts, ExpertLane, ExpertShape};
use super::kv_cache::KvCache;
use super::split::NodeSlice;
use super::weights::{Ffn, SwiGlu, Weights};
use crate::format::{FloatType, HiddenAct};
use crate::kernels::{self, BlockQ80, QK};
use crate::ops::{self, AttentionShape, RopeTable};
use crate::pool::ThreadPool;
use crate::{Error, Result};

/// Prompt tokens go through the layers in batches of at most this many: each weight row is
/// read once per batch.
pub const MAX_BATCH: usize = 32;

/// Default cap of the KV cache length when the caller does not ask for one.
pub const DEFAULT_MAX_SEQ_LEN: usize = 4096;

/// Type of the activations fed to quantized matmuls (and exchanged between nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferType {
    F32,
    Q80,
}

impl BufferType {
    /// The float type these buffers are stored in.
    pub fn float_type(self) -> FloatType {
        match self {
            BufferType::F32 => FloatType::F32,
            BufferType::Q80 => FloatType::Q80,
        }
    }
    /// The buffer type stored as `ft`, if there is one (F32 or Q80).
    pub fn from_float_type(ft: FloatType) -> Option<BufferType> {
        match ft {
            FloatType::F32 => Some(BufferType::F32),
            FloatType::Q80 => Some(BufferType::Q80),
            _ => None,
        }
    }
    pub fn parse(s: &str) -> Result<BufferType> {
        match s {
            "f32" => Ok(BufferType::F32),
            "q80" => Ok(BufferType::Q80),
            _ => Err(Error::invalid(format!(
                "unknown buffer float type {s:?} (expected \"q80\" or \"f32\")"
            ))),
        }
    }
}

/// Scratch buffers of one batch, sized for `MAX_BATCH` tokens.
struct Buffers {
    xb: Vec<f32>,           // (batch, dim) normed input of a block
    xq: Vec<BlockQ80>,      // (batch, max(dim, q_local, hidden_local) / 32) quantized matmul input
    q: Vec<f32>,            // (batch, q_local)
    k: Vec<f32>,            // (batch, kv_local)
    v: Vec<f32>,            // (batch, kv_local)
    att_out: Vec<f32>,      // (batch, q_local) attention output, input of wo
    proj: Vec<f32>,         // (batch, dim) partial output of wo / w2
    h1: Vec<f32>,           // (batch, hidden_local) gate, then silu(gate) * up
    h3: Vec<f32>,           // (batch, hidden_local) up
    logits_local: Vec<f32>, // (vocab_local) before gathering; empty on a node alone
    fused: Vec<f32>,        // (batch, max(q_local + 2 kv_local, 2 hidden_local)) fused matmul out
    router: Vec<f32>,       // (batch, n_experts) router logits, then probabilities (MoE)
    ye: Vec<f32>,           // (batch · n_active, dim) each picked expert's outputs (MoE)
    /// MoE: one per thread, the scratch buffers of a thread running experts
    lanes: Vec<Mutex<ExpertLane>>,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub slice: NodeSlice,
    pub weights: Weights,
    pub cache: KvCache,
    /// Quantized weights take Q80 inputs (llama.cpp's way); otherwise F32 inputs.
    q80_inputs: bool,
    rope: RopeTable, // cos / sin of (max_seq_len, head_dim / 2)
    pool: ThreadPool,
    bufs: Buffers,
    /// (vocab_size) logits of the last token, filled on the root.
    pub logits: Vec<f32>,
}

/// The KV cache length for a requested `max_seq_len` (0: the model's, capped at 4096).
pub fn effective_max_seq_len(cfg: &ModelConfig, requested: usize) -> usize {
    if requested == 0 {
        cfg.max_seq_len.min(DEFAULT_MAX_SEQ_LEN)
    } else {
        requested.min(cfg.max_seq_len)
    }
}

/// Bytes of node `slice`'s KV cache (f32 keys and values of its KV heads, every layer) and RoPE
/// table (a row of head_dim f32) for `seq` positions: the memory that grows with max_seq_len.
pub fn seq_memory_bytes(cfg: &ModelConfig, slice: &NodeSlice, seq: usize) -> u64 {
    let per_position = (cfg.n_layers as u64)
        .saturating_mul(slice.n_kv_heads() as u64 * cfg.head_dim as u64 * 2 * 4)
        .saturating_add(cfg.head_dim as u64 * 4);
    per_position.saturating_mul(seq as u64)
}

impl Model {
    /// `max_seq_len`: 0 for the model's own, capped at 4096; `nthreads`: threads of the pool
    /// that runs the matmuls and the attention.
    pub fn new(
        cfg: ModelConfig,
        slice: NodeSlice,
        weights: Weights,
        buffer_type: BufferType,
        max_seq_len: usize,
        nthreads: usize,
    ) -> Result<Model> {
        let seq = effective_max_seq_len(&cfg, max_seq_len);
        if seq == 0 {
            return Err(Error::invalid("max_seq_len must be at least 1"));
        }
        let (q_local, kv_local, hid) =
            (slice.q_rows.len(), slice.kv_rows.len(), slice.hidden.len());
        let b = MAX_BATCH;
        let rope = RopeTable::new(cfg.rope, seq)?;
        let pool = ThreadPool::new(nthreads)?;
        let xq_cols = cfg.dim.max(q_local).max(hid);
        // a node alone writes its logits in place (`classify`)
        let logits_local = if slice.n_nodes == 1 {
            0
        } else {
            slice.vocab.len()
        };
        let bufs = Buffers {
            xb: vec![0.0; b * cfg.dim],
            xq: vec![BlockQ80::default(); b * xq_cols.div_ceil(QK)],
            q: vec![0.0; b * q_local],
            k: vec![0.0; b * kv_local],
            v: vec![0.0; b * kv_local],
            att_out: vec![0.0; b * q_local],
            proj: vec![0.0; b * cfg.dim],
            h1: vec![0.0; b * hid],
            h3: vec![0.0; b * hid],
            logits_local: vec![0.0; logits_local],
            fused: vec![0.0; b * (q_local + 2 * kv_local).max(2 * hid)],
            router: vec![0.0; cfg.moe.map_or(0, |m| b * m.n_experts)],
            ye: vec![0.0; cfg.moe.map_or(0, |m| b * m.n_active * cfg.dim)],
            lanes: match cfg.moe {
                Some(_) => (0..nthreads)
                    .map(|_| ExpertLane::new(cfg.dim, hid, b).map(Mutex::new))
                    .collect::<Result<_>>()?,
                None => Vec::new(),
            },
        };
        let q80_inputs = buffer_type == BufferType::Q80 && is_quantized(cfg.weights_float_type);
        Ok(Model {
            cache: KvCache::new(cfg.n_layers, seq, slice.n_kv_heads(), cfg.head_dim),
            logits: vec![0.0; cfg.vocab_size],
            cfg,
            slice,
            weights,
            q80_inputs,
            rope,
            pool,
            bufs,
        })
    }

    pub fn nthreads(&self) -> usize {
        self.pool.n_threads()
    }

    pub fn max_seq_len(&self) -> usize {
        self.cache.max_seq_len
    }

    /// One step on the root (or on one machine): the caller's `tokens` at positions `pos..`,
    /// checked here once and before any work (every id inside the vocabulary, the positions
    /// inside the KV cache), embedded, handed to `collective.begin_step`, then run through
    /// every layer; the last token's logits end in `self.logits`.
    pub fn step(
        &mut self,
        tokens: &[i64],
        pos: i64,
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        let ids: Vec<u32> = tokens
            .iter()
            .map(|&t| {
                u32::try_from(t)
                    .ok()
                    .filter(|&id| (id as usize) < vocab)
                    .ok_or_else(|| {
                        Error::invalid(format!("token {t} out of range (vocab_size {vocab})"))
                    })
            })
            .collect::<Result<_>>()?;
        let pos = usize::try_from(pos)
            .map_err(|_| Error::invalid(format!("position {pos} is negative")))?;
        self.check_positions(ids.len(), pos)?;
        let mut x = self.embed(&ids)?;
        collective.begin_step(&mut x, pos)?;
        self.run(&mut x, pos, collective)
    }

    /// The embeddings of `tokens` (checked by `step`): x (n_tokens, dim). Root only.
    pub(crate) fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let emb = self
            .weights
            .embedding
            .as_ref()
            .ok_or_else(|| Error::invalid("this node holds no embedding"))?;
        let dim = self.cfg.dim;
        let mut x = vec![0.0f32; tokens.len() * dim];
        for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(dim)) {
            let t = t as usize;
            row.copy_from_slice(&emb.rows(t..t + 1).as_f32()[..dim]);
        }
        Ok(x)
    }

    /// Check a call before any work: `n_tokens` tokens at positions `pos..`.
    fn check_positions(&self, n_tokens: usize, pos: usize) -> Result<()> {
        if n_tokens == 0 {
            return Err(Error::invalid("forward needs at least one token"));
        }
        if pos + n_tokens > self.max_seq_len() {
            return Err(Error::invalid(format!(
                "positions {pos}..{} exceed max_seq_len {} (raise --max-seq-len, up to the model's {})",
                pos + n_tokens,
                self.max_seq_len(),
                self.cfg.max_seq_len
            )));
        }
        Ok(())
    }

    /// Run `x` (n_tokens, dim), the embedded tokens at positions `pos..pos + n_tokens`,
    /// through every layer (a worker's step: the root sent `x`); the root ends with the last
    /// token's logits in `self.logits`.
    pub fn forward(
        &mut self,
        x: &mut [f32],
        pos: usize,
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let dim = self.cfg.dim;
        if !x.len().is_multiple_of(dim) {
            return Err(Error::invalid(format!(
                "input of {} values is not a whole number of {dim}-value rows",
                x.len()
            )));
        }
        self.check_positions(x.len() / dim, pos)?;
        self.run(x, pos, collective)
    }

    /// `forward` on checked input.
    fn run(&mut self, x: &mut [f32], pos: usize, collective: &mut dyn Collective) -> Result<()> {
        let dim = self.cfg.dim;
        let n = x.len() / dim;
        for (i, chunk) in x.chunks_mut(MAX_BATCH * dim).enumerate() {
            self.forward_batch(chunk, pos + i * MAX_BATCH, collective)?;
        }
        self.classify(&x[(n - 1) * dim..], collective)
    }

    /// The layers on one batch: x (n, dim) at positions pos..pos + n, n <= MAX_BATCH.
    fn forward_batch(
        &mut self,
        x: &mut [f32],
        pos: usize,
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let Model {
            cfg,
            slice,
            weights,
            cache,
            bufs,
            rope,
            pool,
            q80_inputs,
            ..
        } = self;
        let q80 = *q80_inputs;
        let dim = cfg.dim;
        let n = x.len() / dim;
        let (q_local, kv_local, hid) =
            (slice.q_rows.len(), slice.kv_rows.len(), slice.hidden.len());
        // this node's heads: whole groups, so the local heads map to the local KV heads
        let shape = AttentionShape {
            n_heads: slice.n_heads(),
            n_kv_heads: slice.n_kv_heads(),
            head_dim: cfg.head_dim,
        };

        for (l, lw) in weights.layers.iter().enumerate() {
            // ---- attention ----
            // attention rmsnorm
            ops::rmsnorm_rows(x, &lw.attn_norm, cfg.norm_epsilon, &mut bufs.xb[..n * dim])?;
            // qkv matmuls for these positions
            let xin = input(q80, lw.wq.dtype, &bufs.xb[..n * dim], &mut bufs.xq)?;
            if let (Some(p), true) = (&lw.qkv_packed, q80) {
                // one matmul for the three, then each token's row split into q, k, v
                let fused = &mut bufs.fused[..n * (q_local + 2 * kv_local)];
                compute::matmul_packed(pool, p, xin, n, fused)?;
                compute::split_columns(
                    fused,
                    n,
                    &mut [
                        (&mut bufs.q[..], q_local),
                        (&mut bufs.k[..], kv_local),
                        (&mut bufs.v[..], kv_local),
                    ],
                );
            } else {
                compute::matmul(pool, &lw.wq, xin, n, &mut bufs.q[..n * q_local])?;
                compute::matmul(pool, &lw.wk, xin, n, &mut bufs.k[..n * kv_local])?;
                compute::matmul(pool, &lw.wv, xin, n, &mut bufs.v[..n * kv_local])?;
            }
            // Qwen3: RMSNorm of every head of q and k
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                ops::rmsnorm_heads(&mut bufs.q[..n * q_local], qn, cfg.norm_epsilon)?;
                ops::rmsnorm_heads(&mut bufs.k[..n * kv_local], kn, cfg.norm_epsilon)?;
            }
            // RoPE on q and k
            rope.apply_rows(&mut bufs.q[..n * q_local], q_local, pos)?;
            rope.apply_rows(&mut bufs.k[..n * kv_local], kv_local, pos)?;
            // keys and values of these positions into the cache
            cache.store(
                pool,
                l,
                pos,
                &bufs.k[..n * kv_local],
                &bufs.v[..n * kv_local],
            );
            // grouped-query attention, causal: token t sees positions 0..=pos + t
            let (kc, vc) = cache.layer(l);
            ops::attention(
                pool,
                &shape,
                &bufs.q[..n * q_local],
                kc,
                vc,
                pos,
                n,
                &mut bufs.att_out[..n * q_local],
            )?;
            // output projection (this node's columns of wo), summed over nodes
            let ain = input(q80, lw.wo.dtype, &bufs.att_out[..n * q_local], &mut bufs.xq)?;
            compute::matmul(pool, &lw.wo, ain, n, &mut bufs.proj[..n * dim])?;
            collective.all_reduce_sum(&mut bufs.proj[..n * dim])?;
            // residual connection
            add(x, &bufs.proj[..n * dim]);

            // ---- feed-forward ----
            // ffn rmsnorm
            ops::rmsnorm_rows(x, &lw.ffn_norm, cfg.norm_epsilon, &mut bufs.xb[..n * dim])?;
            let mut ff = SwiGluRun {
                pool,
                q80,
                act: cfg.hidden_act,
                hid,
                xq: &mut bufs.xq,
                h1: &mut bufs.h1,
                h3: &mut bufs.h3,
                fused: &mut bufs.fused,
            };
            match &lw.ffn {
                // SwiGLU of this node's hidden units, partial sums of the down projection
                Ffn::Dense(f) => {
                    ff.run(f, None, &bufs.xb[..n * dim], n, &mut bufs.proj[..n * dim])?
                }
                // mixture of experts: each chosen expert runs once on the tokens routed to it
                Ffn::Moe {
                    router,
                    experts,
                    n_active,
                } => {
                    let n_experts = experts.len();
                    // router logits (n, n_experts) in f32, softmax, top-k of each token
                    let logits = &mut bufs.router[..n * n_experts];
                    let xin = kernels::Input::F32(&bufs.xb[..n * dim]);
                    compute::matmul(ff.pool, router, xin, n, logits)?;
                    let norm_topk = cfg.moe.is_some_and(|m| m.norm_topk_prob);
                    let routes = ops::route_top_k(logits, n_experts, *n_active, norm_topk)?;
                    // each chosen expert on the tokens routed to it (unpicked ones are not read)
                    let shape = ExpertShape {
                        dim,
                        hid,
                        q80,
                        act: cfg.hidden_act,
                    };
                    let picked = run_experts(
                        ff.pool,
                        &bufs.lanes,
                        experts,
                        &routes,
                        shape,
                        &bufs.xb[..n * dim],
                        &mut bufs.ye,
                    )?;
                    // each token's output: the sum of its experts' outputs, weighted
                    let out = &mut bufs.proj[..n * dim];
                    out.fill(0.0);
                    for (e, start) in picked {
                        for (j, &(t, w)) in routes[e].iter().enumerate() {
                            let y = &bufs.ye[(start + j) * dim..(start + j + 1) * dim];
                            for (o, &y) in out[t * dim..(t + 1) * dim].iter_mut().zip(y) {
                                *o += w * y;
                            }
                        }
                    }
                }
            }
            // summed over nodes
            collective.all_reduce_sum(&mut bufs.proj[..n * dim])?;
            // residual connection
            add(x, &bufs.proj[..n * dim]);
        }
        Ok(())
    }

    /// Final norm and this node's rows of the classifier on the last token x (dim); the
    /// root gathers every node's logits.
    fn classify(&mut self, x: &[f32], collective: &mut dyn Collective) -> Result<()> {
        let Model {
            cfg,
            slice,
            weights,
            bufs,
            pool,
            q80_inputs,
            logits,
            ..
        } = self;
        let dim = cfg.dim;
        ops::rmsnorm(x, &weights.norm, cfg.norm_epsilon, &mut bufs.xb[..dim])?;
        let xin = input(
            *q80_inputs,
            weights.wcls.dtype,
            &bufs.xb[..dim],
            &mut bufs.xq,
        )?;
        if slice.n_nodes == 1 && collective.n_nodes() == 1 {
            // a node alone holds every row: the logits are written in place, nothing to gather
            return compute::matmul(pool, &weights.wcls, xin, 1, logits);
        }
        compute::matmul(pool, &weights.wcls, xin, 1, &mut bufs.logits_local)?;
        collective.gather_logits(&bufs.logits_local, logits)
    }
}

/// The pool and scratch buffers one SwiGLU runs with (borrowed from `Buffers`).
pub(super) struct SwiGluRun<'a> {
    pub pool: &'a mut ThreadPool,
    pub q80: bool,
    pub act: HiddenAct,
    pub hid: usize,             // this node's hidden units
    pub xq: &'a mut [BlockQ80], // quantized matmul input
    pub h1: &'a mut [f32],      // (batch, hid) gate, then act(gate) * up
    pub h3: &'a mut [f32],      // (batch, hid) up
    pub fused: &'a mut [f32],   // (batch, 2 hid) packed w1|w3 output
}

impl SwiGluRun<'_> {
    /// out (n, dim) = w2 · (act(w1 · x) * (w3 · x)) for x (n, dim) over this node's hidden
    /// units (a partial sum over nodes).
    /// `next`: the SwiGLU this thread runs right after this one, if known (an expert's), so
    /// that the kernels prefetch on into its weights (`kernels::set_next_stream`).
    pub fn run(
        &mut self,
        f: &SwiGlu,
        next: Option<&SwiGlu>,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let hid = self.hid;
        let (h1, h3) = (&mut self.h1[..n * hid], &mut self.h3[..n * hid]);
        // one token on one thread: each matmul's prefetches run on into the next matrix
        let hint = n == 1 && self.pool.n_threads() == 1;
        // gate and up projections (this node's hidden units)
        let xin = input(self.q80, f.w1.dtype, x, self.xq)?;
        // act(gate) * up, into gate
        let act = |gate: &mut [f32], up: &[f32]| match self.act {
            HiddenAct::Silu => ops::silu_mul(gate, up),
            HiddenAct::Gelu => ops::gelu_mul(gate, up),
        };
        let gate: &mut [f32] = if let (Some(p), true) = (&f.w13_packed, self.q80) {
            if let (true, Some(w2)) = (hint, f.w2.packed()) {
                kernels::set_next_stream(w2);
            }
            let fused = &mut self.fused[..n * 2 * hid];
            compute::matmul_packed(self.pool, p, xin, n, fused)?;
            if n == 1 {
                // one token: the fused row is gate | up already
                let (gate, up) = fused.split_at_mut(hid);
                act(gate, up)?;
                gate
            } else {
                compute::split_columns(fused, n, &mut [(&mut *h1, hid), (&mut *h3, hid)]);
                act(h1, h3)?;
                h1
            }
        } else {
            compute::matmul(self.pool, &f.w1, xin, n, h1)?;
            compute::matmul(self.pool, &f.w3, xin, n, h3)?;
            act(h1, h3)?;
            h1
        };
        // down projection (this node's columns of w2)
        let hin = input(self.q80, f.w2.dtype, gate, self.xq)?;
        if let (true, Some(Some(w13))) = (hint, next.map(|e| e.w13_packed.as_deref())) {
            kernels::set_next_stream(w13);
        }
        compute::matmul(self.pool, &f.w2, hin, n, out)
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
