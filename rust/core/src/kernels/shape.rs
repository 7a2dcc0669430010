//! Shapes of kernel calls derived from slice lengths (and asserted), and the row loop the
//! f32 / f16 / scalar matmuls share: every kernel file imports them from here.

use super::packed::{CELL, GROUP};

/// The shape of a kernel call `out (n_tokens, n_rows) = w (n_rows, w_width) × x (n_tokens,
/// x_width)`, derived from the slice lengths: `(n_rows, x_width, w_width)`, where each weight
/// element (a block) covers `x_per_w` input elements (1 for blocks × blocks or floats × floats,
/// 32 for blocks × floats). Panics on lengths that do not fit: the checked entry point
/// (`matmul::matmul`) has already returned `Error::Invalid` for those.
#[inline]
pub(crate) fn kernel_shape(
    w_len: usize,
    x_len: usize,
    out_len: usize,
    n_tokens: usize,
    x_per_w: usize,
) -> (usize, usize, usize) {
    let n_rows = out_len / n_tokens;
    let x_width = x_len / n_tokens;
    let w_width = x_width / x_per_w;
    assert!(
        n_rows * n_tokens == out_len
            && x_width * n_tokens == x_len
            && w_width * x_per_w == x_width
            && w_len == n_rows * w_width,
        "kernel shapes: {w_len} weights, {x_len} inputs, {out_len} outputs, {n_tokens} tokens"
    );
    (n_rows, x_width, w_width)
}

/// The shape of a packed Q40 × Q80 call `out (n_tokens, n_rows) = cells (n_rows, bpr) × x
/// (n_tokens, bpr)`: `(n_rows, n_groups)`. Panics on lengths that do not fit, as
/// [`kernel_shape`].
#[inline]
pub(crate) fn packed_shape(
    cells_len: usize,
    bpr: usize,
    x_len: usize,
    out_len: usize,
    n_tokens: usize,
) -> (usize, usize) {
    let n_rows = out_len / n_tokens;
    let n_groups = n_rows.div_ceil(GROUP);
    assert!(
        n_rows * n_tokens == out_len
            && bpr * n_tokens == x_len
            && cells_len == n_groups * bpr * CELL,
        "packed kernel shapes: {cells_len} bytes of cells, {bpr} blocks per row, {x_len} inputs, \
         {out_len} outputs, {n_tokens} tokens"
    );
    (n_rows, n_groups)
}

/// out (n_tokens, n_rows) = w (n_rows, w_width) × x (n_tokens, w_width · x_per_w) through a
/// row dot product (`x_per_w` as in [`kernel_shape`]); row-outer so each weight row is read from
/// memory once per batch.
#[inline(always)]
pub(crate) fn matmul_rows<W, X>(
    w: &[W],
    x: &[X],
    out: &mut [f32],
    n_tokens: usize,
    x_per_w: usize,
    dot: impl Fn(&[W], &[X]) -> f32,
) {
    let (n_rows, x_width, w_width) = kernel_shape(w.len(), x.len(), out.len(), n_tokens, x_per_w);
    if w_width == 0 {
        out.fill(0.0);
        return;
    }
    for (r, wr) in w.chunks_exact(w_width).enumerate() {
        for (t, xt) in x.chunks_exact(x_width).enumerate() {
            out[t * n_rows + r] = dot(wr, xt);
        }
    }
}

/// The shape check of every `quantize_q80`: `x_len` values fill `n_blocks` blocks exactly.
#[inline]
pub(crate) fn assert_q80_blocks(x_len: usize, n_blocks: usize) {
    assert_eq!(
        x_len,
        n_blocks * super::block::QK,
        "quantize_q80: {x_len} values for {n_blocks} blocks"
    );
}
