//! Shared helpers of the kernel tests (a directory, so cargo does not build it as a test crate).
#![allow(dead_code)]

use dllama_core::kernels::block::{f16_to_f32, f32_to_f16};
use dllama_core::kernels::{BlockQ40, BlockQ80, KernelPath, Kernels, QK};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Values of mixed magnitudes: mostly N(0, scale)-like, some outliers, some zeros.
pub fn random_values(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let u: f32 = rng.gen_range(-1.0..1.0);
            match i % 97 {
                0 => 0.0,
                13 => u * scale * 20.0,
                _ => u * scale,
            }
        })
        .collect()
}

/// Random Q40 blocks with every nibble pattern and scales of both signs.
pub fn random_q40(rng: &mut StdRng, n_blocks: usize) -> Vec<BlockQ40> {
    (0..n_blocks)
        .map(|_| {
            let mut b = BlockQ40 {
                d: f32_to_f16(rng.gen_range(-0.05..0.05)),
                qs: [0; 16],
            };
            rng.fill(&mut b.qs[..]);
            b
        })
        .collect()
}

/// Random Q80 blocks (values -127..=127 as the quantizer makes them).
pub fn random_q80(rng: &mut StdRng, n_blocks: usize) -> Vec<BlockQ80> {
    (0..n_blocks)
        .map(|_| {
            let mut b = BlockQ80 {
                d: f32_to_f16(rng.gen_range(0.0..0.1)),
                qs: [0; 32],
            };
            for q in b.qs.iter_mut() {
                *q = rng.gen_range(-127..=127);
            }
            b
        })
        .collect()
}

pub fn q40_values(b: &[BlockQ40]) -> Vec<f64> {
    let mut out = Vec::with_capacity(b.len() * QK);
    for blk in b {
        let d = f16_to_f32(blk.d) as f64;
        let mut v = [0.0f64; 32];
        for j in 0..16 {
            v[j] = ((blk.qs[j] & 15) as f64 - 8.0) * d;
            v[j + 16] = ((blk.qs[j] >> 4) as f64 - 8.0) * d;
        }
        out.extend_from_slice(&v);
    }
    out
}

pub fn q80_values(b: &[BlockQ80]) -> Vec<f64> {
    b.iter()
        .flat_map(|blk| {
            blk.qs
                .iter()
                .map(move |&q| q as f64 * f16_to_f32(blk.d) as f64)
        })
        .collect()
}

/// f64 matmul: out (n_tokens, n_rows) and the scale sum |w||x| of each output.
pub fn reference(
    w: &[f64],
    x: &[f64],
    n_rows: usize,
    cols: usize,
    n_tokens: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; n_tokens * n_rows];
    let mut mag = vec![0.0; n_tokens * n_rows];
    for t in 0..n_tokens {
        for r in 0..n_rows {
            let (mut s, mut m) = (0.0, 0.0);
            for c in 0..cols {
                let p = w[r * cols + c] * x[t * cols + c];
                s += p;
                m += p.abs();
            }
            out[t * n_rows + r] = s;
            mag[t * n_rows + r] = m;
        }
    }
    (out, mag)
}

/// |got - want| <= rel * mag + abs for every element, with a message naming the worst one.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], mag: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i]).abs();
        let limit = rel * mag[i] + abs;
        assert!(
            err <= limit,
            "{what}: element {i}: got {} want {} (error {err:e} > limit {limit:e})",
            got[i],
            want[i]
        );
    }
}

/// The kernels of every path this CPU runs, scalar included.
pub fn all_kernels() -> Vec<Kernels> {
    KernelPath::ALL
        .iter()
        .filter_map(|&p| Kernels::for_path(p))
        .collect()
}

/// Awkward sizes: (n_rows, blocks per row, n_tokens).
pub const SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (3, 1, 1),
    (5, 3, 1),
    (4, 2, 1),
    (7, 5, 2),
    (9, 7, 3),
    (17, 11, 5),
    (33, 129, 1),
    (6, 344, 4),
    (2, 128, 9),
];
