//! The seam between the forward pass and the kernels (`crate::kernels`, `crate::ops`): typed
//! views of this node's tensors and the choice of matmul input.

use super::config::is_quantized;
use super::tensor::Tensor;
use crate::format::FloatType;
use crate::kernels::{self, BlockQ80, Input, PackedQ40, QK};
use crate::pool::ThreadPool;
use crate::Result;

/// The kernels' view of a weight tensor multiplied by `x`: the repacked rows when there are
/// some and the input is Q80 (the packed kernels take Q80 only), the bf16 copy of F32 values
/// when there is one.
pub fn matrix_view<'a>(w: &'a Tensor, x: &Input<'_>) -> kernels::Matrix<'a> {
    if let (Some(p), Input::Q80(_)) = (w.packed(), x) {
        return kernels::Matrix::Q40Packed(p);
    }
    if let (Some(b), Input::F32(_)) = (w.bf16(), x) {
        return kernels::Matrix::Bf16(b);
    }
    match w.dtype {
        FloatType::F32 => kernels::Matrix::F32(w.as_f32()),
        FloatType::F16 => kernels::Matrix::F16(w.as_f16()),
        FloatType::Q40 => kernels::Matrix::Q40(w.as_q40()),
        FloatType::Q80 => kernels::Matrix::Q80(w.as_q80()),
    }
}

/// out (n_tokens, w.rows) = w (rows, cols) × x (n_tokens, cols)ᵀ, rows split across the pool.
pub fn matmul(
    pool: &mut ThreadPool,
    w: &Tensor,
    x: Input<'_>,
    n_tokens: usize,
    out: &mut [f32],
) -> Result<()> {
    kernels::matmul(pool, matrix_view(w, &x), x, out, w.rows, w.cols, n_tokens)
}

/// out (n_tokens, p.n_rows()) = p × x (n_tokens, cols)ᵀ for repacked Q40 rows (Q80 input).
pub fn matmul_packed(
    pool: &mut ThreadPool,
    p: &PackedQ40,
    x: Input<'_>,
    n_tokens: usize,
    out: &mut [f32],
) -> Result<()> {
    kernels::matmul(
        pool,
        kernels::Matrix::Q40Packed(p),
        x,
        out,
        p.n_rows(),
        p.cols(),
        n_tokens,
    )
}

/// Split each row of `fused` (n_tokens, sum of widths) into the rows of `outs` (n_tokens,
/// width each), in order.
pub fn split_columns(fused: &[f32], n_tokens: usize, outs: &mut [(&mut [f32], usize)]) {
    let total: usize = outs.iter().map(|(_, w)| *w).sum();
    for t in 0..n_tokens {
        let mut c = t * total;
        for (out, w) in outs.iter_mut() {
            out[t * *w..(t + 1) * *w].copy_from_slice(&fused[c..c + *w]);
            c += *w;
        }
    }
}

/// The input of a matmul by weights of type `dtype`: Q80 blocks (quantized into `xq`) when
/// `q80` is on and the weights are quantized, or for Q80 weights (which have no f32-input
/// kernel); else the f32 values themselves.
pub fn input<'a>(
    q80: bool,
    dtype: FloatType,
    x: &'a [f32],
    xq: &'a mut [BlockQ80],
) -> Result<Input<'a>> {
    if (q80 && is_quantized(dtype)) || dtype == FloatType::Q80 {
        let nb = x.len() / QK;
        kernels::quantize_q80(x, &mut xq[..nb])?;
        Ok(Input::Q80(&xq[..nb]))
    } else {
        Ok(Input::F32(x))
    }
}

/// The active kernel path ("avx2+avx512vnni", "neon+dotprod", "scalar", ...).
pub fn kernels_name() -> String {
    kernels::active_path().name().to_string()
}
