//! x86_64 AVX-512 VNNI kernel for packed Q40 × Q80: two packed groups (16 rows) per 512-bit
//! register, so each `vpdpbusd` does 64 multiply-adds and each broadcast input word feeds 16
//! rows. Used for prefill (several tokens); one token and the rest of the AVX-512 VNNI path
//! use the 256-bit kernels of `avx2` / `avx2_vnni`.
//!
//! Every function here is `unsafe`: the caller guarantees the CPU has the features named in
//! its `target_feature` attribute (`dispatch` checks them once).

#![allow(clippy::needless_range_loop)] // lanes and unrolled accumulators read best indexed

use std::arch::x86_64::*;

use super::avx2::prefetch_ahead;
use super::avx2_vnni::{with_prepared_x, PreparedX};
use super::block::BlockQ80;
use super::packed::{CELL, GROUP};
use super::shape::packed_shape;

/// Groups `ga` and `gb` (16 rows) × T tokens; lanes 0..8 of `acc[t]` are ga's rows, 8..16 gb's.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile2<const T: usize>(
    ga: *const u8,
    gb: *const u8,
    bpr: usize,
    x: *const BlockQ80,
    px: &PreparedX,
    o: usize,
) -> [__m512; T] {
    let m4 = _mm512_set1_epi8(0x0F);
    let (dx, nc) = (px.dx.as_ptr().add(o), px.ncorr.as_ptr().add(o));
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..bpr {
        let (ca, cb) = (ga.add(b * CELL), gb.add(b * CELL));
        prefetch_ahead(ca, CELL);
        prefetch_ahead(cb, CELL);
        let mut lo = [_mm512_setzero_si512(); 4];
        let mut hi = [_mm512_setzero_si512(); 4];
        for q in 0..4 {
            let va = _mm256_loadu_si256(ca.add(16 + 32 * q) as *const __m256i);
            let vb = _mm256_loadu_si256(cb.add(16 + 32 * q) as *const __m256i);
            let v = _mm512_inserti64x4(_mm512_castsi256_si512(va), vb, 1);
            lo[q] = _mm512_and_si512(v, m4);
            hi[q] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
        let scales = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(ca as *const __m128i)),
            _mm_loadu_si128(cb as *const __m128i),
            1,
        );
        let dw = _mm512_cvtph_ps(scales);
        for t in 0..T {
            let i = t * bpr + b;
            let xq = (*x.add(i)).qs.as_ptr() as *const i32;
            let mut s0 = _mm512_set1_epi32(*nc.add(i));
            let mut s1 = _mm512_setzero_si512();
            for q in 0..4 {
                s0 = _mm512_dpbusd_epi32(
                    s0,
                    lo[q],
                    _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(q))),
                );
                s1 = _mm512_dpbusd_epi32(
                    s1,
                    hi[q],
                    _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(4 + q))),
                );
            }
            let p = _mm512_add_epi32(s0, s1);
            let s = _mm512_mul_ps(dw, _mm512_set1_ps(*dx.add(i)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc[t]);
        }
    }
    acc
}

/// out (n_tokens, n_rows) = packed w (n_rows, bpr) × x (n_tokens, bpr), as
/// `avx2_vnni::*::matmul_q40x8_q80`, 16 rows per register.
///
/// # Safety
/// The CPU has the features of this function's `target_feature`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul_q40x8_q80_zmm(
    cells: &[u8],
    bpr: usize,
    x: &[BlockQ80],
    out: &mut [f32],
    n_tokens: usize,
) {
    let (n_rows, n_groups) = packed_shape(cells.len(), bpr, x.len(), out.len(), n_tokens);
    with_prepared_x(x, |px| {
        let mut lanes = [0.0f32; 2 * GROUP];
        let mut store = |t: usize, g: usize, v: __m512| {
            let row0 = t * n_rows + g * GROUP;
            let rows = (2 * GROUP).min(n_rows - g * GROUP);
            if rows == 2 * GROUP {
                _mm512_storeu_ps(out.as_mut_ptr().add(row0), v);
            } else {
                _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                out[row0..row0 + rows].copy_from_slice(&lanes[..rows]);
            }
        };
        let mut g = 0;
        while g < n_groups {
            // an odd last group is paired with itself; its copy in lanes 8..16 is dropped
            let ga = cells.as_ptr().add(g * bpr * CELL);
            let gb = if g + 1 < n_groups {
                ga.add(bpr * CELL)
            } else {
                ga
            };
            let mut t = 0;
            while t + 4 <= n_tokens {
                let v = tile2::<4>(ga, gb, bpr, x.as_ptr().add(t * bpr), px, t * bpr);
                for (k, &vk) in v.iter().enumerate() {
                    store(t + k, g, vk);
                }
                t += 4;
            }
            while t < n_tokens {
                let v = tile2::<1>(ga, gb, bpr, x.as_ptr().add(t * bpr), px, t * bpr);
                store(t, g, v[0]);
                t += 1;
            }
            g += 2;
        }
    });
}
