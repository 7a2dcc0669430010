//! Checked, multi-threaded matmul entry points: what the forward pass calls.
//!
//! `matmul(pool, w, x, out, n_rows, cols, n_tokens)`: out (n_tokens, n_rows) =
//! w (n_rows, cols) × x (n_tokens, cols)ᵀ, the rows split across the pool's threads (each
//! thread's rows start on a cache-line boundary of the output). For n_tokens > 1 (prefill)
//! every weight row is read from memory once per batch.

use std::cell::RefCell;

use super::block::{BlockQ40, BlockQ80, QK};
use super::dispatch::Kernels;
use super::packed::{PackedQ40, PassPlan, CELL, GROUP};
use super::scalar;
use crate::pool::{split_range, SharedOut, ThreadPool, ROW_ALIGN};
use crate::{Error, Result};

/// The weight matrix of a matmul (n_rows, cols), row-major, as stored in the `.m` file.
#[derive(Clone, Copy, Debug)]
pub enum Matrix<'a> {
    F32(&'a [f32]),
    /// f16 bits.
    F16(&'a [u16]),
    /// bf16 bits: f32 values whose low halves are zero, held in half the bytes (a MoE
    /// router); the products are bit for bit those of `F32`.
    Bf16(&'a [u16]),
    Q40(&'a [BlockQ40]),
    Q80(&'a [BlockQ80]),
    /// Q40 repacked by [`PackedQ40::pack`] for the SIMD kernels (Q80 input only).
    Q40Packed(&'a PackedQ40),
}

/// The input vectors (n_tokens, cols): f32, or already quantized to Q80.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    F32(&'a [f32]),
    Q80(&'a [BlockQ80]),
}

impl Matrix<'_> {
    fn len(&self) -> usize {
        match self {
            Matrix::F32(w) => w.len(),
            Matrix::F16(w) | Matrix::Bf16(w) => w.len(),
            Matrix::Q40(w) => w.len() * QK,
            Matrix::Q80(w) => w.len() * QK,
            Matrix::Q40Packed(w) => w.n_rows() * w.cols(),
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Matrix::F32(_) => "f32",
            Matrix::F16(_) => "f16",
            Matrix::Bf16(_) => "bf16",
            Matrix::Q40(_) => "q40",
            Matrix::Q80(_) => "q80",
            Matrix::Q40Packed(_) => "packed q40",
        }
    }
}

impl Input<'_> {
    fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::Q80(x) => x.len() * QK,
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Input::F32(_) => "f32",
            Input::Q80(_) => "q80",
        }
    }
}

/// Quantize `x` (n values, n % 32 == 0) into `out` (n / 32 blocks) with the active kernels.
pub fn quantize_q80(x: &[f32], out: &mut [BlockQ80]) -> Result<()> {
    if x.len() != out.len() * QK {
        return Err(Error::invalid(format!(
            "quantize_q80: {} values do not fill {} blocks of {QK}",
            x.len(),
            out.len()
        )));
    }
    Kernels::get().quantize_q80(x, out);
    Ok(())
}

fn check_shapes(
    w: &Matrix<'_>,
    x: &Input<'_>,
    out: &[f32],
    n_rows: usize,
    cols: usize,
    n_tokens: usize,
) -> Result<()> {
    let quantized = !matches!(w, Matrix::F32(_) | Matrix::F16(_) | Matrix::Bf16(_))
        || matches!(x, Input::Q80(_));
    if n_tokens == 0 {
        return Err(Error::invalid("matmul: n_tokens must be at least 1"));
    }
    if quantized && !cols.is_multiple_of(QK) {
        return Err(Error::invalid(format!(
            "matmul: {cols} columns is not a multiple of {QK} for quantized data"
        )));
    }
    if w.len() != n_rows * cols {
        return Err(Error::invalid(format!(
            "matmul: {} weights hold {} values, expected ({n_rows}, {cols})",
            w.name(),
            w.len()
        )));
    }
    if x.len() != n_tokens * cols {
        return Err(Error::invalid(format!(
            "matmul: {} input holds {} values, expected ({n_tokens}, {cols})",
            x.name(),
            x.len()
        )));
    }
    if out.len() != n_tokens * n_rows {
        return Err(Error::invalid(format!(
            "matmul: output holds {} values, expected ({n_tokens}, {n_rows})",
            out.len()
        )));
    }
    if let Matrix::Q40Packed(p) = w {
        if p.n_rows() != n_rows || p.cols() != cols {
            return Err(Error::invalid(format!(
                "matmul: packed q40 weights are ({}, {}), expected ({n_rows}, {cols})",
                p.n_rows(),
                p.cols()
            )));
        }
    }
    match (w, x) {
        (Matrix::Q40(_) | Matrix::Q80(_), _)
        | (Matrix::Q40Packed(_), Input::Q80(_))
        | (Matrix::F32(_) | Matrix::F16(_) | Matrix::Bf16(_), Input::F32(_)) => Ok(()),
        _ => Err(Error::invalid(format!(
            "matmul: {} weights by a {} input is not supported (q40|q80 × q80|f32, packed q40 × q80, f32|f16|bf16 × f32)",
            w.name(),
            x.name()
        ))),
    }
}

/// The rows `r0..r1` of `w` (n_rows, cols) times all of `x`, into `out` (n_tokens, r1 - r0).
fn run_rows(
    k: &Kernels,
    w: &Matrix<'_>,
    x: &Input<'_>,
    cols: usize,
    rows: std::ops::Range<usize>,
    n_tokens: usize,
    out: &mut [f32],
) {
    let (r0, r1) = (rows.start, rows.end);
    let bpr = cols / QK;
    match (w, x) {
        (Matrix::Q40(w), Input::Q80(x)) => {
            k.matmul_q40_q80(&w[r0 * bpr..r1 * bpr], x, out, n_tokens)
        }
        (Matrix::Q40(w), Input::F32(x)) => {
            k.matmul_q40_f32(&w[r0 * bpr..r1 * bpr], x, out, n_tokens)
        }
        (Matrix::Q80(w), Input::F32(x)) => {
            scalar::matmul_q80_f32(&w[r0 * bpr..r1 * bpr], x, out, n_tokens)
        }
        (Matrix::Q80(w), Input::Q80(x)) => {
            k.matmul_q80_q80(&w[r0 * bpr..r1 * bpr], x, out, n_tokens)
        }
        (Matrix::Q40Packed(w), Input::Q80(x)) => {
            // row ranges start on a group boundary (ROW_ALIGN is a multiple of GROUP)
            debug_assert!(r0.is_multiple_of(GROUP));
            k.matmul_q40x8_q80(
                w.groups(r0 / GROUP, r1.div_ceil(GROUP)),
                bpr,
                x,
                out,
                n_tokens,
            )
        }
        (Matrix::F32(w), Input::F32(x)) => k.matmul_f32(&w[r0 * cols..r1 * cols], x, out, n_tokens),
        (Matrix::F16(w), Input::F32(x)) => k.matmul_f16(&w[r0 * cols..r1 * cols], x, out, n_tokens),
        (Matrix::Bf16(w), Input::F32(x)) => {
            k.matmul_bf16(&w[r0 * cols..r1 * cols], x, out, n_tokens)
        }
        _ => unreachable!("pairs checked by check_shapes"),
    }
}

const _: () = assert!(ROW_ALIGN.is_multiple_of(GROUP));

/// Whether the active kernels run packed Q40 faster than plain Q40 (every SIMD path, x86_64
/// and aarch64): the engine packs its Q40 weights at load time when this is true.
pub fn prefers_packed_q40() -> bool {
    Kernels::get().path != super::KernelPath::Scalar
}

thread_local! {
    /// Per-thread (n_tokens, rows of this thread) tile for batched matmuls.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows of the chunks a one-token packed matmul is handed out in (`split_rows_claimed`): about
/// an eighth of a thread's share, at least `MIN_CLAIM_BYTES` of weights, whole passes of 4
/// groups (32 rows).
fn claim_chunk_rows(n_rows: usize, bpr: usize, n_threads: usize) -> usize {
    let row_bytes = bpr * CELL / GROUP;
    let rows = (n_rows / n_threads / 8).max(MIN_CLAIM_BYTES.div_ceil(row_bytes.max(1)));
    rows.div_ceil(4 * GROUP) * 4 * GROUP
}

/// Threads up to which a one-token packed matmul hands out passes (`PassPlan`, the plans
/// live on the stack); more get row ranges.
const MAX_PLANS: usize = 16;

/// The smallest chunk of a one-token packed matmul, in bytes of weights: each chunk's first
/// cells come in before its stream is under way.
const MIN_CLAIM_BYTES: usize = 64 << 10;

/// out (n_tokens, n_rows) = w (n_rows, cols) × x (n_tokens, cols)ᵀ, split across the pool.
pub fn matmul(
    pool: &mut ThreadPool,
    w: Matrix<'_>,
    x: Input<'_>,
    out: &mut [f32],
    n_rows: usize,
    cols: usize,
    n_tokens: usize,
) -> Result<()> {
    check_shapes(&w, &x, out, n_rows, cols, n_tokens)?;
    if n_rows == 0 {
        return Ok(());
    }
    let k = Kernels::get();
    if pool.n_threads() == 1 {
        run_rows(k, &w, &x, cols, 0..n_rows, n_tokens, out);
        return Ok(());
    }
    if let (Matrix::Q40Packed(p), Input::Q80(xq), 1) = (&w, &x, n_tokens) {
        // one token: each thread streams its own rows and then takes the last ones of a
        // thread that lags (a core shared with another process), in passes (x86) or in
        // chunks of rows
        let bpr = cols / QK;
        let cells = p.groups(0, p.n_groups());
        let shared = SharedOut::new(out);
        if k.has_passes() && pool.n_threads() <= MAX_PLANS {
            // each thread's share as passes over 4 streams: claims of a few passes keep
            // the streams going, and the last passes go to whichever thread is free first
            let n = pool.n_threads();
            // shares of whole pairs of groups: no cache line of `out` is written by two threads
            let plans: [PassPlan; MAX_PLANS] = std::array::from_fn(|i| match i < n {
                true => PassPlan::new(split_range(p.n_groups(), i, n, ROW_ALIGN / GROUP)),
                false => PassPlan::new(0..0),
            });
            pool.split_claimed(
                |i| 0..plans[i].items(),
                |left| left.div_ceil(4),
                |left| left.div_ceil(2),
                |_, claim| {
                    let mut claim = || claim().map(|(owner, items)| (plans[owner], items));
                    // SAFETY: `split_claimed` hands every item to one thread only, the plans'
                    // groups are disjoint; `out` outlives the call and holds n_rows values.
                    unsafe {
                        k.matmul_q40x8_q80_passes(cells, bpr, xq, shared.ptr(), n_rows, &mut claim)
                    }
                },
            );
            return Ok(());
        }
        let chunk = claim_chunk_rows(n_rows, bpr, pool.n_threads());
        pool.split_rows_claimed(n_rows, chunk, |_, claim| {
            // SAFETY: `split_rows_claimed` hands every row to one thread only; `out` outlives
            // the call and holds n_rows values (checked above).
            unsafe { k.matmul_q40x8_q80_claimed(cells, bpr, xq, shared.ptr(), n_rows, claim) }
        });
        return Ok(());
    }
    let shared = SharedOut::new(out);
    pool.split_rows(n_rows, |_, rows| {
        let n = rows.len();
        if n_tokens == 1 {
            // SAFETY: the pool gives each thread a disjoint row range of `out`, which
            // outlives `split_rows`.
            let mine = unsafe { shared.rows_mut(rows.start, n) };
            run_rows(k, &w, &x, cols, rows, 1, mine);
        } else {
            TILE.with(|tile| {
                let mut tile = tile.borrow_mut();
                tile.resize(n_tokens * n, 0.0);
                run_rows(k, &w, &x, cols, rows.clone(), n_tokens, &mut tile);
                for t in 0..n_tokens {
                    for (i, &v) in tile[t * n..(t + 1) * n].iter().enumerate() {
                        // SAFETY: element (t, rows.start + i) belongs to this thread's rows.
                        unsafe { shared.write(t * n_rows + rows.start + i, v) };
                    }
                }
            });
        }
    });
    Ok(())
}
