//! Quantized blocks and kernels.
