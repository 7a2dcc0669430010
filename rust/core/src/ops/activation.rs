//! Softmax and the gated activations of the FFN.

use crate::kernels::Kernels;
use crate::{Error, Result};

/// In place: x = exp(x - max) / sum, on the active kernel path. An empty slice is left as is.
pub fn softmax(x: &mut [f32]) {
    Kernels::get().softmax(x)
}

fn check(gate: &[f32], up: &[f32], what: &str) -> Result<()> {
    if gate.len() != up.len() {
        return Err(Error::invalid(format!(
            "{what}: gate has {} values, up {}",
            gate.len(),
            up.len()
        )));
    }
    Ok(())
}

/// SwiGLU: gate = silu(gate) * up, silu(v) = v / (1 + exp(-v)).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) -> Result<()> {
    check(gate, up, "silu_mul")?;
    Kernels::get().silu_mul(gate, up);
    Ok(())
}

/// GeGLU with the tanh approximation of GELU (distributed-llama's `gelu`):
/// gate = 0.5 v (1 + tanh(sqrt(2/π) (v + 0.044715 v³))) * up.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) -> Result<()> {
    check(gate, up, "gelu_mul")?;
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    for (g, &u) in gate.iter_mut().zip(up) {
        let v = *g;
        *g = 0.5 * v * (1.0 + (C * (v + 0.044715 * v * v * v)).tanh()) * u;
    }
    Ok(())
}
