//! The experts of a mixture-of-experts FFN, each run once on the tokens routed to it.
//!
//! Two ways to use the pool's threads:
//! - one expert after another, each matmul split by rows across the threads (few experts);
//! - whole experts per thread (expert parallel inside the node), when there are at least two
//!   picked experts per thread: each thread runs the SwiGLU of its experts alone, so the
//!   threads meet once per layer instead of at each of the 2 or 3 matmuls of every expert
//!   (16 to 24 hand-offs per layer at 8 active experts).
//!
//! Either way expert e's outputs land in its own rows of `ye` and the caller sums them in
//! expert order: the result does not depend on the number of threads.

use std::sync::Mutex;

use super::forward::SwiGluRun;
use super::weights::SwiGlu;
use crate::format::HiddenAct;
use crate::kernels::{BlockQ80, QK};
use crate::ops::Routes;
use crate::pool::{lock, SharedOut, ThreadPool};
use crate::{Error, Result};

/// The scratch buffers of one thread running experts, sized for `batch` tokens.
pub struct ExpertLane {
    pool: ThreadPool,  // one thread: the kernels run on the thread that holds the lane
    xe: Vec<f32>,      // (batch, dim) the inputs of the tokens routed to the expert
    xq: Vec<BlockQ80>, // (batch, max(dim, hid) / 32) quantized matmul input
    h1: Vec<f32>,      // (batch, hid)
    h3: Vec<f32>,      // (batch, hid)
    fused: Vec<f32>,   // (batch, 2 hid)
}

impl ExpertLane {
    pub fn new(dim: usize, hid: usize, batch: usize) -> Result<ExpertLane> {
        Ok(ExpertLane {
            pool: ThreadPool::new(1)?,
            xe: vec![0.0; batch * dim],
            xq: vec![BlockQ80::default(); batch * dim.max(hid).div_ceil(QK)],
            h1: vec![0.0; batch * hid],
            h3: vec![0.0; batch * hid],
            fused: vec![0.0; batch * 2 * hid],
        })
    }
}

/// How each expert's SwiGLU runs: activation type, hidden units of this node.
#[derive(Clone, Copy)]
pub struct ExpertShape {
    pub dim: usize,
    pub hid: usize,
    pub q80: bool,
    pub act: HiddenAct,
}

/// Runs every expert that some token picked on the rows of `xb` (n, dim) routed to it, into
/// `ye` (n · k, dim): expert e's m outputs, tokens in route order, start at row `start`.
/// Returns the picked experts as (e, start), in expert order. `lanes`: one per pool thread
/// (at least one).
pub fn run_experts(
    pool: &mut ThreadPool,
    lanes: &[Mutex<ExpertLane>],
    experts: &[SwiGlu],
    routes: &Routes,
    shape: ExpertShape,
    xb: &[f32],
    ye: &mut [f32],
) -> Result<Vec<(usize, usize)>> {
    let dim = shape.dim;
    let mut picked = Vec::new();
    let mut rows = 0;
    for (e, chosen) in routes.iter().enumerate() {
        if !chosen.is_empty() {
            picked.push((e, rows)); // no token picked the others: their weights are not read
            rows += chosen.len();
        }
    }
    if ye.len() < rows * dim || lanes.is_empty() {
        return Err(Error::invalid(format!(
            "experts: {rows} routed rows do not fit {} outputs of {dim}",
            ye.len() / dim.max(1)
        )));
    }
    let n_threads = pool.n_threads();
    if n_threads == 1 || picked.len() < 2 * n_threads || lanes.len() < n_threads {
        // one expert after another, each matmul on all threads
        let mut lane = lock(&lanes[0]);
        for (k, &(e, start)) in picked.iter().enumerate() {
            let m = routes[e].len();
            let next = picked.get(k + 1).map(|&(e2, _)| &experts[e2]);
            run_one(
                Some(&mut *pool),
                &mut lane,
                (&experts[e], next),
                &routes[e],
                shape,
                xb,
                &mut ye[start * dim..(start + m) * dim],
            )?;
        }
        return Ok(picked);
    }
    // whole experts per thread: the longest first, each to the least loaded thread (the
    // weights' reading costs about as much as 4 tokens of compute)
    let mut owner = vec![0usize; picked.len()];
    let mut order: Vec<usize> = (0..picked.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(routes[picked[i].0].len()));
    let mut load = vec![0usize; n_threads];
    for i in order {
        let t = (0..n_threads).min_by_key(|&t| load[t]).unwrap_or(0);
        owner[i] = t;
        load[t] += routes[picked[i].0].len() + 4;
    }
    let shared = SharedOut::new(ye);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    pool.run(|i, _| {
        let mut lane = lock(&lanes[i]);
        for (k, &(e, start)) in picked.iter().enumerate() {
            if owner[k] != i {
                continue;
            }
            let m = routes[e].len();
            // this thread's next expert
            let next = (k + 1..picked.len())
                .find(|&j| owner[j] == i)
                .map(|j| &experts[picked[j].0]);
            // SAFETY: each expert's rows of `ye` are disjoint and written by its one owner;
            // `ye` outlives the run.
            let out = unsafe { shared.rows_mut(start * dim, m * dim) };
            let r = run_one(
                None,
                &mut lane,
                (&experts[e], next),
                &routes[e],
                shape,
                xb,
                out,
            );
            if let Err(err) = r {
                *lock(&failed) = Some(err);
                return;
            }
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(err) => Err(err),
        None => Ok(picked),
    }
}

/// One expert on the tokens `chosen`, its matmuls split across `pool` (None: the lane's own
/// one-thread pool); `expert` is (this expert, the one this thread runs next).
fn run_one(
    pool: Option<&mut ThreadPool>,
    lane: &mut ExpertLane,
    expert: (&SwiGlu, Option<&SwiGlu>),
    chosen: &[(usize, f32)],
    shape: ExpertShape,
    xb: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let ExpertLane {
        pool: own,
        xe,
        xq,
        h1,
        h3,
        fused,
    } = lane;
    gather(xe, chosen, xb, shape.dim);
    let m = chosen.len();
    let mut ff = SwiGluRun {
        pool: pool.unwrap_or(own),
        q80: shape.q80,
        act: shape.act,
        hid: shape.hid,
        xq,
        h1,
        h3,
        fused,
    };
    ff.run(expert.0, expert.1, &xe[..m * shape.dim], m, out)
}

/// The rows of `xb` (n, dim) of the tokens in `chosen`, in order, into `xe`.
fn gather(xe: &mut [f32], chosen: &[(usize, f32)], xb: &[f32], dim: usize) {
    for (j, &(t, _)) in chosen.iter().enumerate() {
        xe[j * dim..(j + 1) * dim].copy_from_slice(&xb[t * dim..(t + 1) * dim]);
    }
}
