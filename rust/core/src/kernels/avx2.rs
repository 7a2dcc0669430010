//! x86_64 kernels: AVX2 + FMA + F16C for Q80 × Q80, F32, F16, Q80 quantization and the
//! attention helpers. The Q40 × Q80 kernels are in `avx2_vnni`.
//!
//! All loads are unaligned (blocks are 34 bytes, weights live in the memory-mapped file).
//! Every function here is `unsafe`: the caller guarantees the CPU has the features named in
//! its `target_feature` attribute (`dispatch` checks them once).

#![allow(clippy::needless_range_loop)] // lanes and unrolled accumulators read best indexed

use std::arch::x86_64::*;

use super::block::{bf16_to_f32, f16_to_f32, BlockQ80, QK};
use super::packed::PREFETCH_AHEAD;
use super::shape::{assert_q80_blocks, kernel_shape, matmul_rows};

// ---------------------------------------------------------------------------------------
// helpers

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    let x = _mm_add_ss(x, _mm_movehdup_ps(x));
    _mm_cvtss_f32(x)
}

/// The block scale broadcast to 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn scale8(d: u16) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(d as i16))
}

// ---------------------------------------------------------------------------------------
// Q80 × Q80

/// R rows × T tokens of Q80 × Q80, blocks innermost; `out[r][t]`. Each input block is
/// loaded (and its scale converted) once for the R rows, each weight block once for the T
/// tokens; every (row, token) sum is the same sequence of operations as a 1 × 1 tile.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_q80<const R: usize, const T: usize>(
    w: *const BlockQ80,
    x: *const BlockQ80,
    bpr: usize,
) -> [[f32; T]; R] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..bpr {
        let mut xv = [_mm256_setzero_si256(); T];
        let mut xd = [_mm256_setzero_ps(); T];
        for t in 0..T {
            let xb = x.add(t * bpr + b);
            xv[t] = _mm256_loadu_si256((*xb).qs.as_ptr() as *const __m256i);
            xd[t] = scale8((*xb).d);
        }
        for r in 0..R {
            let wb = w.add(r * bpr + b);
            let wv = _mm256_loadu_si256((*wb).qs.as_ptr() as *const __m256i);
            // |w| * (x with w's sign): unsigned × signed bytes for vpmaddubsw
            let aw = _mm256_sign_epi8(wv, wv);
            let dw = scale8((*wb).d);
            for t in 0..T {
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], wv));
                let p = _mm256_madd_epi16(p, ones);
                acc[r][t] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, xd[t]), acc[r][t]);
            }
        }
    }
    let mut res = [[0.0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            res[r][t] = hsum(acc[r][t]);
        }
    }
    res
}

/// out (n_tokens, n_rows) = w (n_rows, bpr) Q80 × x (n_tokens, bpr) Q80.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matmul_q80_q80(w: &[BlockQ80], x: &[BlockQ80], out: &mut [f32], n_tokens: usize) {
    let (n_rows, bpr, _) = kernel_shape(w.len(), x.len(), out.len(), n_tokens, 1);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    if n_tokens == 1 {
        // generation: 4 rows share each input block
        let mut r = 0;
        while r + 4 <= n_rows {
            let v = tile_q80::<4, 1>(wp.add(r * bpr), xp, bpr);
            for i in 0..4 {
                out[r + i] = v[i][0];
            }
            r += 4;
        }
        while r < n_rows {
            out[r] = tile_q80::<1, 1>(wp.add(r * bpr), xp, bpr)[0][0];
            r += 1;
        }
    } else {
        // prefill: each weight row stays in L1 while all tokens go by, 4 tokens per pass
        for r in 0..n_rows {
            let wr = wp.add(r * bpr);
            let mut t = 0;
            while t + 4 <= n_tokens {
                let v = tile_q80::<1, 4>(wr, xp.add(t * bpr), bpr);
                for i in 0..4 {
                    out[(t + i) * n_rows + r] = v[0][i];
                }
                t += 4;
            }
            while t < n_tokens {
                out[t * n_rows + r] = tile_q80::<1, 1>(wr, xp.add(t * bpr), bpr)[0][0];
                t += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// F32 and F16 weights × F32 input

/// Eight f32 weights at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_f32(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

/// Eight bf16 weights at `p` (bits), widened to the f32 values they are the high halves of.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_bf16(p: *const u16) -> __m256 {
    let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
}

/// Eight f16 weights at `p` (bits) as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8_f16(p: *const u16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// The f32-input kernels for weights of element type `$t` read by `$load8` (8 at a time) and
/// `$one` (1 at a time) as f32: one body for f32, f16 and bf16 weights, so that bf16 weights
/// give bit for bit the sums of the same values held as f32 (a MoE router held as bf16).
macro_rules! float_weight_kernels {
    ($t:ty, $load8:ident, $one:expr, $dot:ident, $matmul:ident, $streams:ident) => {
        /// # Safety
        /// The CPU has AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        pub unsafe fn $dot(w: &[$t], x: &[f32]) -> f32 {
            let n = w.len().min(x.len());
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            let mut a = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for k in 0..4 {
                    a[k] = _mm256_fmadd_ps(
                        $load8(wp.add(i + 8 * k)),
                        _mm256_loadu_ps(xp.add(i + 8 * k)),
                        a[k],
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                a[0] = _mm256_fmadd_ps($load8(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ));
            while i < n {
                s += $one(w[i]) * x[i];
                i += 1;
            }
            s
        }

        /// # Safety
        /// The CPU has AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $matmul(w: &[$t], x: &[f32], out: &mut [f32], n_tokens: usize) {
            if n_tokens == 1 {
                let (n_rows, cols, _) = kernel_shape(w.len(), x.len(), out.len(), 1, 1);
                $streams(w, x, out, n_rows, cols);
            } else {
                matmul_rows(w, x, out, n_tokens, 1, |w, x| $dot(w, x))
            }
        }

        /// One token through the rows (a MoE router: 128 × 2048, 1 MB a layer in f32): 4 rows
        /// at once, one from each quarter of the matrix, so that the weights are read as 4
        /// streams (one stream reads at about half the memory bandwidth), each row summed in 2
        /// lanes-of-8 accumulators; the rows left over one at a time (`$dot`).
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $streams(w: &[$t], x: &[f32], out: &mut [f32], n_rows: usize, cols: usize) {
            let quarter = n_rows / 4;
            let full = cols / 16 * 16;
            let xp = x.as_ptr();
            for r in 0..quarter {
                let rows: [usize; 4] = std::array::from_fn(|k| r + k * quarter);
                let wp: [*const $t; 4] = rows.map(|row| w.as_ptr().add(row * cols));
                let mut a = [[_mm256_setzero_ps(); 2]; 4];
                let mut i = 0;
                while i < full {
                    let x0 = _mm256_loadu_ps(xp.add(i));
                    let x1 = _mm256_loadu_ps(xp.add(i + 8));
                    for k in 0..4 {
                        a[k][0] = _mm256_fmadd_ps($load8(wp[k].add(i)), x0, a[k][0]);
                        a[k][1] = _mm256_fmadd_ps($load8(wp[k].add(i + 8)), x1, a[k][1]);
                    }
                    i += 16;
                }
                for k in 0..4 {
                    let mut sum = hsum(_mm256_add_ps(a[k][0], a[k][1]));
                    for j in full..cols {
                        sum += $one(*wp[k].add(j)) * x[j];
                    }
                    out[rows[k]] = sum;
                }
            }
            for row in 4 * quarter..n_rows {
                out[row] = $dot(&w[row * cols..(row + 1) * cols], x);
            }
        }
    };
}

float_weight_kernels!(
    f32,
    load8_f32,
    |v: f32| v,
    dot_f32,
    matmul_f32,
    matmul_f32_streams
);
float_weight_kernels!(
    u16,
    load8_bf16,
    bf16_to_f32,
    dot_bf16,
    matmul_bf16,
    matmul_bf16_streams
);
float_weight_kernels!(
    u16,
    load8_f16,
    f16_to_f32,
    dot_f16,
    matmul_f16,
    matmul_f16_streams
);

/// y += a * x.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(
            yp.add(i),
            _mm256_fmadd_ps(av, _mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i))),
        );
        i += 8;
    }
    while i < n {
        y[i] += a * x[i];
        i += 1;
    }
}

// ---------------------------------------------------------------------------------------
// Q80 quantization, bit-identical to the scalar `quantize_q80`

/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q80(x: &[f32], out: &mut [BlockQ80]) {
    assert_q80_blocks(x.len(), out.len());
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xb, yb) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let amax = _mm_cvtss_f32(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = _mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT), 0) as u16;
        let idv = _mm256_set1_ps(id);
        let mut q = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            // round half away from zero, as f32::round: t = trunc(v), +-1 when |v - t| >= 0.5
            let s = _mm256_mul_ps(v[k], idv);
            let t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(s, t));
            let step = _mm256_or_ps(_mm256_and_ps(s, sign), one);
            let r = _mm256_add_ps(
                t,
                _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), step),
            );
            q[k] = _mm256_cvtps_epi32(r);
        }
        let i01 = _mm256_packs_epi32(q[0], q[1]);
        let i23 = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i01, i23), perm);
        _mm256_storeu_si256(yb.qs.as_mut_ptr() as *mut __m256i, bytes);
    }
}

/// exp of 8 values, Cephes' `expf` scheme: x = n·ln2 + r with |r| <= ln2/2, a degree-5
/// polynomial for exp(r), 2^n by the exponent bits; within 2 ulp of `f32::exp` for inputs in
/// [-87.3, 88.3] (other inputs are clamped to that range, so the result is never 0 or
/// infinite; NaN stays NaN).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn exp8(x: __m256) -> __m256 {
    // max / min return their second operand when one is NaN: a NaN stays NaN
    let x = _mm256_min_ps(
        _mm256_set1_ps(88.3),
        _mm256_max_ps(_mm256_set1_ps(-87.3), x),
    );
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // r = x - n·ln2, with ln2 split in two so that n·ln2_hi is exact
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // exp(r) = 1 + r + r² · p
    let e = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(e, _mm256_castsi256_ps(pow2n))
}

/// x = exp(x - max x) / sum, in place, with `exp8`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    if n == 0 {
        return;
    }
    let xp = x.as_mut_ptr();
    let full = n / 8 * 8;
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(8) {
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(xp.add(i)));
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
    let max = lanes
        .iter()
        .chain(&x[full..])
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mv = _mm256_set1_ps(max);
    let mut sv = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xp.add(i)), mv));
        _mm256_storeu_ps(xp.add(i), e);
        sv = _mm256_add_ps(sv, e);
    }
    let mut sum = hsum(sv);
    if full < n {
        // the last n % 8 values through the same exp, padded with -inf (exp: tiny, dropped)
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..n - full].copy_from_slice(&x[full..]);
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mv));
        _mm256_storeu_ps(tail.as_mut_ptr(), e);
        x[full..].copy_from_slice(&tail[..n - full]);
        sum += tail[..n - full].iter().sum::<f32>();
    }
    let inv = _mm256_set1_ps(1.0 / sum);
    for i in (0..full).step_by(8) {
        _mm256_storeu_ps(xp.add(i), _mm256_mul_ps(_mm256_loadu_ps(xp.add(i)), inv));
    }
    for v in &mut x[full..] {
        *v /= sum;
    }
}

/// gate = silu(gate) · up in place, silu(v) = v / (1 + exp(-v)) with `exp8`, over the shorter
/// length (within a few ulp of the scalar `f32::exp` version; NaN stays NaN).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (gp, up_p) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let silu8 = |v: __m256, u: __m256| {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
        _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), u)
    };
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        let v = silu8(_mm256_loadu_ps(gp.add(i)), _mm256_loadu_ps(up_p.add(i)));
        _mm256_storeu_ps(gp.add(i), v);
    }
    if full < n {
        // the last n % 8 values through the same arithmetic, padded with zeros
        let (mut g, mut u) = ([0.0f32; 8], [0.0f32; 8]);
        g[..n - full].copy_from_slice(&gate[full..n]);
        u[..n - full].copy_from_slice(&up[full..n]);
        let v = silu8(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
        _mm256_storeu_ps(g.as_mut_ptr(), v);
        gate[full..n].copy_from_slice(&g[..n - full]);
    }
}

/// Ask for the cache lines of the `len` bytes `PREFETCH_AHEAD` bytes after `p`: the packed
/// Q40 cells and the KV rows are each read as one stream, which the hardware prefetchers give
/// up on at every 4 KiB page. A prefetch is a hint that never faults, so the address may lie
/// past the data.
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, len: usize) {
    prefetch(p.wrapping_add(PREFETCH_AHEAD), len);
}

/// Ask for the cache lines of the `len` bytes at `p` (any address: see `prefetch_ahead`).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, len: usize) {
    let p = p as *const i8;
    for off in (0..len).step_by(64) {
        // SAFETY: a prefetch has no architectural effect, for any address (SSE is part of
        // x86_64).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off)) };
    }
}

/// The 8 sums of the lanes of `a[0..8]`, in order, as one vector.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum8(a: &[__m256; 8]) -> __m256 {
    // pairwise horizontal adds: lanes of (a0 a1 a2 a3) then (a4 a5 a6 a7), per 128-bit half
    let h01 = _mm256_hadd_ps(a[0], a[1]);
    let h23 = _mm256_hadd_ps(a[2], a[3]);
    let h45 = _mm256_hadd_ps(a[4], a[5]);
    let h67 = _mm256_hadd_ps(a[6], a[7]);
    let h0123 = _mm256_hadd_ps(h01, h23);
    let h4567 = _mm256_hadd_ps(h45, h67);
    // low halves hold the sums of the low 4 lanes, high halves of the high 4
    let lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
    let hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
    _mm256_add_ps(lo, hi)
}

/// Attention scores of one head: scores[p] = (q · k[p·stride .. p·stride + q.len()]) · scale.
/// Eight positions at a time: eight independent dot products whose sums come out together
/// (`hsum8`), instead of one horizontal sum per position.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attn_scores(q: &[f32], k: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    let hd = q.len();
    let n = scores.len();
    if let Some(last) = n.checked_sub(1) {
        assert!(last * stride + hd <= k.len(), "attn_scores: keys too short");
    }
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let chunks = hd / 8;
    let sv = _mm256_set1_ps(scale);
    let mut p = 0;
    while p + 8 <= n {
        // the rows PREFETCH_AHEAD bytes further on (a head's keys are one stream)
        for j in 0..8 {
            prefetch_ahead(kp.add((p + j) * stride) as *const u8, hd * 4);
        }
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in 0..chunks {
            let qc = _mm256_loadu_ps(qp.add(8 * c));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kp.add((p + j) * stride + 8 * c)), *a);
            }
        }
        let mut s = hsum8(&acc);
        for i in 8 * chunks..hd {
            let tail: [f32; 8] = std::array::from_fn(|j| q[i] * *kp.add((p + j) * stride + i));
            s = _mm256_add_ps(s, _mm256_loadu_ps(tail.as_ptr()));
        }
        _mm256_storeu_ps(scores.as_mut_ptr().add(p), _mm256_mul_ps(s, sv));
        p += 8;
    }
    for (j, out) in scores.iter_mut().enumerate().skip(p) {
        *out = dot_f32(q, k.get_unchecked(j * stride..j * stride + hd)) * scale;
    }
}

/// Weighted sum of one head's values: out += sum_p att[p] · v[p·stride .. p·stride + out.len()].
/// 64 outputs at a time stay in registers across all positions (an `axpy` per position would
/// load and store them each time).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attn_values(att: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    if let Some(last) = att.len().checked_sub(1) {
        assert!(
            last * stride + hd <= v.len(),
            "attn_values: values too short"
        );
    }
    let (vp, op) = (v.as_ptr(), out.as_mut_ptr());
    let mut c0 = 0;
    while c0 + 64 <= hd {
        let mut acc: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(op.add(c0 + 8 * j)));
        for (p, &a) in att.iter().enumerate() {
            if c0 == 0 {
                // whole rows, ahead, as for the keys (later passes find them in the cache)
                prefetch_ahead(vp.add(p * stride) as *const u8, hd * 4);
            }
            let av = _mm256_set1_ps(a);
            let row = vp.add(p * stride + c0);
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(row.add(8 * j)), *acc);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(op.add(c0 + 8 * j), *acc);
        }
        c0 += 64;
    }
    if c0 < hd {
        // the last hd % 64 outputs (head_dim 64 and 128 never get here)
        for (p, &a) in att.iter().enumerate() {
            axpy(
                a,
                v.get_unchecked(p * stride + c0..p * stride + hd),
                &mut out[c0..],
            );
        }
    }
}
