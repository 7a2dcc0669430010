//! Q40 and Q80 blocks, byte-identical to ggml's Q4_0 and Q8_0, and their scalar
//! quantize / dequantize (the reference the SIMD kernels are held to).

use super::shape::assert_q80_blocks;
use half::f16;

/// Values per quantization block, for both Q40 and Q80.
pub const QK: usize = 32;

/// 32 values in 4 bits: byte `j` of `qs` holds value `j` in its low nibble and value `j + 16`
/// in its high nibble; value = (nibble - 8) * d.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ40 {
    /// Scale, f16 bits.
    pub d: u16,
    pub qs: [u8; QK / 2],
}

/// 32 values in 8 bits: value = qs[j] * d.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ80 {
    /// Scale, f16 bits.
    pub d: u16,
    pub qs: [i8; QK],
}

impl Default for BlockQ80 {
    fn default() -> Self {
        BlockQ80 { d: 0, qs: [0; QK] }
    }
}

const _: () = assert!(std::mem::size_of::<BlockQ40>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ80>() == 34);
const _: () = assert!(std::mem::align_of::<BlockQ40>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ80>() == 2);

#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// bf16 bits (the high half of an f32) to f32: exact.
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` as bf16 bits when that loses nothing (its low 16 bits are zero), else `None`.
#[inline]
pub fn f32_to_bf16_exact(x: f32) -> Option<u16> {
    let b = x.to_bits();
    (b & 0xFFFF == 0).then_some((b >> 16) as u16)
}

/// Quantize `x` (a multiple of 32 values) into Q40 blocks as distributed-llama's converter
/// writes `.m` files (`converter/writer.py`): d = m / -8, where m is the block's maximum if
/// it is at least as large in magnitude as the minimum, else the minimum. This is ggml's
/// `quantize_row_q4_0_ref` (m = the first value of largest magnitude) except on a tie
/// |max| = |min| where the minimum comes first: ggml takes the negative value, the converter
/// the positive one (the bytes differ; in SmolLM2's weights, 2388 blocks).
pub fn quantize_q40(x: &[f32], out: &mut [BlockQ40]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "quantize_q40: {} values for {} blocks",
        x.len(),
        out.len()
    );
    for (xb, yb) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (mut max, mut min) = (xb[0], xb[0]);
        for &v in &xb[1..] {
            max = max.max(v);
            min = min.min(v);
        }
        let max = if -min > max { min } else { max };
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = f32_to_f16(d);
        for j in 0..QK / 2 {
            let x0 = xb[j] * id;
            let x1 = xb[QK / 2 + j] * id;
            // as (int8_t)(x + 8.5f) in C: truncation toward zero, then clamp to 15
            let xi0 = ((x0 + 8.5) as i8).min(15) as u8;
            let xi1 = ((x1 + 8.5) as i8).min(15) as u8;
            yb.qs[j] = xi0 | (xi1 << 4);
        }
    }
}

/// Dequantize Q40 blocks into `out` (32 values per block).
pub fn dequantize_q40(blocks: &[BlockQ40], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK);
    for (b, yb) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        for j in 0..QK / 2 {
            yb[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            yb[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Quantize `x` (a multiple of 32 values) into Q80 blocks, as ggml's
/// `quantize_row_q8_0_ref` (and distributed-llama's C++ for activations): d = amax / 127,
/// q = round(x · (1 / d)), halves away from zero.
pub fn quantize_q80(x: &[f32], out: &mut [BlockQ80]) {
    quantize_q80_rounding(x, out, f32::round)
}

/// Quantize `x` into Q80 blocks as distributed-llama's converter writes `.m` weights
/// (`converter/writer.py`, `np.round`): as [`quantize_q80`] but halves to even, so exact halves
/// of x · (1 / d) give other bytes (in SmolLM2's weights, 734 of 5.1 M blocks).
pub fn quantize_q80_weights(x: &[f32], out: &mut [BlockQ80]) {
    quantize_q80_rounding(x, out, f32::round_ties_even)
}

fn quantize_q80_rounding(x: &[f32], out: &mut [BlockQ80], round: impl Fn(f32) -> f32) {
    assert_q80_blocks(x.len(), out.len());
    for (xb, yb) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = f32_to_f16(d);
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = round(v * id) as i8;
        }
    }
}

/// Dequantize Q80 blocks into `out` (32 values per block).
pub fn dequantize_q80(blocks: &[BlockQ80], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK);
    for (b, yb) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        for (y, &q) in yb.iter_mut().zip(&b.qs) {
            *y = q as f32 * d;
        }
    }
}

/// View raw file bytes as Q40 blocks (blocks have alignment 2).
pub fn as_q40(bytes: &[u8]) -> Option<&[BlockQ40]> {
    if !bytes.len().is_multiple_of(18) || !(bytes.as_ptr() as usize).is_multiple_of(2) {
        return None;
    }
    // SAFETY: BlockQ40 is repr(C), 18 bytes, alignment 2, every bit pattern valid.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const BlockQ40, bytes.len() / 18) })
}

/// View raw bytes as Q80 blocks (blocks have alignment 2).
pub fn as_q80(bytes: &[u8]) -> Option<&[BlockQ80]> {
    if !bytes.len().is_multiple_of(34) || !(bytes.as_ptr() as usize).is_multiple_of(2) {
        return None;
    }
    // SAFETY: BlockQ80 is repr(C), 34 bytes, alignment 2, every bit pattern valid.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const BlockQ80, bytes.len() / 34) })
}

/// Blocks as raw bytes (for writing files and sockets).
pub fn q40_bytes(blocks: &[BlockQ40]) -> &[u8] {
    // SAFETY: repr(C) with no padding (size assert above).
    unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, blocks.len() * 18) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q40_round_trip_within_half_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 7.0)
            .collect();
        let mut q = vec![BlockQ40::default(); 2];
        quantize_q40(&x, &mut q);
        let mut y = vec![0.0; 64];
        dequantize_q40(&q, &mut y);
        for (b, blk) in q.iter().enumerate() {
            let d = f16_to_f32(blk.d).abs();
            for j in 0..32 {
                let i = b * 32 + j;
                // half a step, except a value of the opposite sign to the largest one and
                // nearly its size: +8 steps does not fit in 4 bits and is clamped to +7.
                let s = x[i] / f16_to_f32(blk.d);
                let bound = if s > 7.5 { (s - 7.0) * d } else { 0.5 * d };
                assert!(
                    (x[i] - y[i]).abs() <= bound * 1.001 + 1e-6,
                    "{i}: {} vs {}",
                    x[i],
                    y[i]
                );
            }
        }
    }

    #[test]
    fn q80_round_trip_within_half_step() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 53 % 96) as f32 - 47.0) / 3.0)
            .collect();
        let mut q = vec![BlockQ80::default(); 3];
        quantize_q80(&x, &mut q);
        let mut y = vec![0.0; 96];
        dequantize_q80(&q, &mut y);
        for (i, (a, b)) in x.iter().zip(&y).enumerate() {
            let d = f16_to_f32(q[i / 32].d);
            assert!((a - b).abs() <= d * 0.5 + d * 1e-3, "{i}: {a} vs {b}");
        }
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let x = [0.0f32; 32];
        let mut q = [BlockQ40::default()];
        quantize_q40(&x, &mut q);
        // d = 0 / -8 = -0.0, as in ggml
        assert_eq!(f16_to_f32(q[0].d), 0.0);
        assert!(q[0].qs.iter().all(|&b| b == 0x88));
    }

    #[test]
    fn q40_ties_take_the_positive_extreme_as_distributed_llamas_converter() {
        // [-3, 3, np.linspace(-1, 1, 30)] and [3, -3, ...]: |max| = |min|. The expected bytes
        // were written by distributed-llama's converter/writer.py (writeQuantizedQ40Tensor, at
        // its commit 8d624a7), run outside this repository on these values: d = 3 / -8 in both
        // blocks (ggml's rule gives d = -3 / -8 to the first).
        let lin: Vec<f32> = (0..30)
            .map(|i| {
                if i == 29 {
                    1.0
                } else {
                    (-1.0 + i as f64 * (2.0 / 29.0)) as f32
                }
            })
            .collect();
        let mut x = vec![-3.0f32, 3.0];
        x.extend(&lin);
        x.extend([3.0f32, -3.0]);
        x.extend(&lin);
        let mut q = [BlockQ40::default(); 2];
        quantize_q40(&x, &mut q);
        let mut bytes = Vec::new();
        for b in &q {
            bytes.extend(b.d.to_le_bytes());
            bytes.extend(b.qs);
        }
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "00b6",
                "8f808b8a7a7a7a7a7a69696969696858", // d = -0.375
                "00b6",
                "808f8b8a7a7a7a7a7a69696969696858",
            )
        );
    }
}
