//! Encoding of float vectors on the wire: F32, F16 or Q80 (ggml Q8_0 blocks).
//!
//! The per-layer buffers travel in the cluster's buffer type (Q80 by default: 34 bytes per 32
//! values); the embedded input and the logits slices travel in F16 when the buffer type is Q80
//! (2 bytes per value) and in F32 otherwise.

use super::protocol::BufferType;
use crate::kernels::block::{dequantize_q80, f16_to_f32, f32_to_f16, quantize_q80, BlockQ80, QK};
use crate::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("the dllama wire format is little-endian; big-endian hosts are not supported");

/// How a vector is encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    F32,
    F16,
    Q80,
}

impl Wire {
    /// The per-layer partial sums.
    pub fn for_buffers(b: BufferType) -> Wire {
        match b {
            BufferType::F32 => Wire::F32,
            BufferType::Q80 => Wire::Q80,
        }
    }
    /// The embedded input of a step and the logits slices.
    pub fn for_vectors(b: BufferType) -> Wire {
        match b {
            BufferType::F32 => Wire::F32,
            BufferType::Q80 => Wire::F16,
        }
    }
    /// Bytes for `n` values (`n` a multiple of 32 for Q80).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            Wire::F32 => 4 * n,
            Wire::F16 => 2 * n,
            Wire::Q80 => n / QK * std::mem::size_of::<BlockQ80>(),
        }
    }
    /// Append the encoding of `x` to `out`.
    pub fn encode(self, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
        match self {
            Wire::F32 => {
                out.reserve(4 * x.len());
                for v in x {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Wire::F16 => {
                out.reserve(2 * x.len());
                for v in x {
                    out.extend_from_slice(&f32_to_f16(*v).to_le_bytes());
                }
            }
            Wire::Q80 => {
                if !x.len().is_multiple_of(QK) {
                    return Err(Error::invalid(format!(
                        "Q80 buffers need a multiple of {QK} values, got {}",
                        x.len()
                    )));
                }
                let mut blocks = vec![BlockQ80::default(); x.len() / QK];
                quantize_q80(x, &mut blocks);
                for b in &blocks {
                    out.extend_from_slice(&b.d.to_le_bytes());
                    out.extend(b.qs.iter().map(|q| *q as u8));
                }
            }
        }
        Ok(())
    }
    /// Decode `bytes` (exactly `self.bytes(out.len())` of them) into `out`.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) -> Result<()> {
        if bytes.len() != self.bytes(out.len())
            || (self == Wire::Q80 && !out.len().is_multiple_of(QK))
        {
            return Err(Error::Protocol(format!(
                "{self:?} buffer of {} bytes cannot hold {} values",
                bytes.len(),
                out.len()
            )));
        }
        match self {
            Wire::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Wire::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            Wire::Q80 => {
                let mut block = [BlockQ80::default()];
                for (o, c) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                    block[0].d = u16::from_le_bytes([c[0], c[1]]);
                    for (q, b) in block[0].qs.iter_mut().zip(&c[2..]) {
                        *q = *b as i8;
                    }
                    dequantize_q80(&block, o);
                }
            }
        }
        Ok(())
    }
    /// Decode and add into `acc` (the root summing partials).
    pub fn decode_add(self, bytes: &[u8], acc: &mut [f32], scratch: &mut Vec<f32>) -> Result<()> {
        scratch.resize(acc.len(), 0.0);
        self.decode(bytes, scratch)?;
        for (a, s) in acc.iter_mut().zip(scratch.iter()) {
            *a += *s;
        }
        Ok(())
    }
    /// Replace `x` by what the other side will decode (so all nodes hold the same values).
    pub fn round_trip(self, x: &mut [f32], scratch: &mut Vec<u8>) -> Result<()> {
        if self == Wire::F32 {
            return Ok(());
        }
        scratch.clear();
        self.encode(x, scratch)?;
        self.decode(scratch, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_the_format_error() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        for (wire, tol) in [
            (Wire::F32, 0.0),
            (Wire::F16, 4.1 * 2f32.powi(-11)),
            (Wire::Q80, 4.1 / 127.0),
        ] {
            let mut buf = Vec::new();
            wire.encode(&x, &mut buf).unwrap();
            assert_eq!(buf.len(), wire.bytes(x.len()));
            let mut y = vec![0.0; x.len()];
            wire.decode(&buf, &mut y).unwrap();
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= tol * amax.max(1.0), "{wire:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        let mut y = vec![0.0; 32];
        assert!(Wire::Q80.decode(&[0u8; 33], &mut y).is_err());
        assert!(Wire::F32.decode(&[0u8; 4], &mut y).is_err());
        assert!(Wire::Q80.encode(&[0.0; 31], &mut Vec::new()).is_err());
    }
}
