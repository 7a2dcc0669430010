//! Encoding of float vectors on the wire: the `.m` file's codec in F32, F16 or Q80 (ggml Q8_0
//! blocks), with Q80 rounded as activations are (`format::quantize_activations_into`, ggml's
//! rule), not as the converter rounds weights; decoding is `format::dequantize_into`.
//!
//! The per-layer buffers travel in the cluster's buffer type (Q80 by default: 34 bytes per 32
//! values); the embedded input and the logits slices travel in F16 when the buffer type is Q80
//! (2 bytes per value) and in F32 otherwise.

use super::protocol::BufferType;
use crate::format::{dequantize_into, quantize_activations_into, FloatType};
use crate::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("the dllama wire format is little-endian; big-endian hosts are not supported");

/// How a vector is encoded on the wire: a float type of the `.m` format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire(pub FloatType);

impl Wire {
    /// The per-layer partial sums.
    pub fn for_buffers(b: BufferType) -> Wire {
        Wire(b.float_type())
    }
    /// The embedded input of a step and the logits slices.
    pub fn for_vectors(b: BufferType) -> Wire {
        match b {
            BufferType::F32 => Wire(FloatType::F32),
            BufferType::Q80 => Wire(FloatType::F16),
        }
    }
    /// Whether values cross unchanged (no rounding to re-apply).
    pub fn is_exact(self) -> bool {
        self.0 == FloatType::F32
    }
    /// Bytes for `n` values (`n` a multiple of 32 for Q80).
    pub fn bytes(self, n: usize) -> usize {
        n / self.0.block_values() * self.0.block_bytes()
    }
    /// Append the encoding of `x` to `out`.
    pub fn encode(self, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
        let n = self.0.bytes_for(x.len() as u64).map_err(|_| {
            Error::invalid(format!(
                "{} buffers need a multiple of {} values, got {}",
                self.0,
                self.0.block_values(),
                x.len()
            ))
        })? as usize;
        let at = out.len();
        out.resize(at + n, 0);
        quantize_activations_into(x, self.0, &mut out[at..])
    }
    /// Decode `bytes` (exactly `self.bytes(out.len())` of them) into `out`.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) -> Result<()> {
        dequantize_into(bytes, self.0, out).map_err(|_| {
            Error::Protocol(format!(
                "{} buffer of {} bytes cannot hold {} values",
                self.0,
                bytes.len(),
                out.len()
            ))
        })
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
        if self.is_exact() {
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
    use crate::kernels::block::{quantize_q80, BlockQ80};

    const F32: Wire = Wire(FloatType::F32);
    const F16: Wire = Wire(FloatType::F16);
    const Q80: Wire = Wire(FloatType::Q80);

    #[test]
    fn round_trips_within_the_format_error() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        for (wire, tol) in [(F32, 0.0), (F16, 4.1 * 2f32.powi(-11)), (Q80, 4.1 / 127.0)] {
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
    fn q80_rounds_as_activations_not_as_weights() {
        // d = 127 / 127 = 1, so 2.5 and -4.5 are exact halves: the activation rule rounds them
        // away from zero (3, -5), the converter's weight rule to even (2, -4).
        let mut x = vec![0.0f32; 32];
        (x[0], x[1], x[2]) = (127.0, 2.5, -4.5);
        let mut blocks = [BlockQ80::default()];
        quantize_q80(&x, &mut blocks);
        let mut want = blocks[0].d.to_le_bytes().to_vec();
        want.extend(blocks[0].qs.iter().map(|q| *q as u8));
        let mut got = Vec::new();
        Q80.encode(&x, &mut got).unwrap();
        assert_eq!(got, want);
        assert_eq!((got[3] as i8, got[4] as i8), (3, -5));
        assert_ne!(got, crate::format::quantize(&x, FloatType::Q80).unwrap());
    }

    #[test]
    fn batched_codecs_equal_one_value_at_a_time() {
        use crate::kernels::block::{f16_to_f32, f32_to_f16};
        // 150 blocks: two whole batches of the codec and a partial one; f16 edge values
        // (overflow, the largest finite, a tie, subnormals, signed zero) and Q80 halves
        let mut x: Vec<f32> = (0..150 * 32)
            .map(|i| ((i * 7919 % 4001) as f32 - 2000.0) * 0.013)
            .collect();
        let edges = [
            65520.0,
            65504.0,
            1.0 + 2f32.powi(-11),
            1e-7,
            -3e-8,
            -0.0,
            2.5,
            -4.5,
        ];
        x[..edges.len()].copy_from_slice(&edges);
        x[100 * 32] = 127.0; // the block of a batch-crossing index: its halves are exact
        x[100 * 32 + 1] = 2.5;
        let mut got = Vec::new();
        F16.encode(&x, &mut got).unwrap();
        let want: Vec<u8> = x
            .iter()
            .flat_map(|&v| f32_to_f16(v).to_le_bytes())
            .collect();
        assert_eq!(got, want);
        got.clear();
        Q80.encode(&x, &mut got).unwrap();
        let mut blocks = vec![BlockQ80::default(); 150];
        quantize_q80(&x, &mut blocks);
        let want: Vec<u8> = blocks
            .iter()
            .flat_map(|b| b.d.to_le_bytes().into_iter().chain(b.qs.map(|q| q as u8)))
            .collect();
        assert_eq!(got, want);
        // every f16 bit pattern decodes as one at a time (NaN as NaN)
        let bits: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let mut y = vec![0.0f32; 1 << 16];
        F16.decode(&bits, &mut y).unwrap();
        for (b, v) in (0..=u16::MAX).zip(&y) {
            let w = f16_to_f32(b);
            assert!(
                v.to_bits() == w.to_bits() || (v.is_nan() && w.is_nan()),
                "{b:#x}"
            );
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        let mut y = vec![0.0; 32];
        assert!(Q80.decode(&[0u8; 33], &mut y).is_err());
        assert!(F32.decode(&[0u8; 4], &mut y).is_err());
        assert!(Q80.encode(&[0.0; 31], &mut Vec::new()).is_err());
    }
}
