//! The seam between the forward pass and the kernels (`crate::quant`, `crate::ops`): typed
//! views of this node's tensors and the choice of matmul input.

use super::config::is_quantized;
use super::tensor::Tensor;
use crate::format::FloatType;
use crate::pool::ThreadPool;
use crate::quant::{self, BlockQ80, Input, QK};
use crate::Result;

/// The kernels' view of a weight tensor multiplied by `x`: the repacked rows when there are
/// some and the input is Q80 (the packed kernels take Q80 only).
pub fn weights_view<'a>(w: &'a Tensor, x: &Input<'_>) -> quant::Weights<'a> {
    if let (Some(p), Input::Q80(_)) = (w.packed(), x) {
        return quant::Weights::Q40Packed(p);
    }
    match w.dtype {
        FloatType::F32 => quant::Weights::F32(w.as_f32()),
        FloatType::F16 => quant::Weights::F16(w.as_f16()),
        FloatType::Q40 => quant::Weights::Q40(w.as_q40()),
        FloatType::Q80 => quant::Weights::Q80(w.as_q80()),
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
    quant::matmul(pool, weights_view(w, &x), x, out, w.rows, w.cols, n_tokens)
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
        quant::quantize_q80(x, &mut xq[..nb])?;
        Ok(Input::Q80(&xq[..nb]))
    } else {
        Ok(Input::F32(x))
    }
}

/// The active kernel path ("avx2+avx512vnni", "neon+dotprod", "scalar", ...).
pub fn kernels_name() -> String {
    quant::active_path().name().to_string()
}
