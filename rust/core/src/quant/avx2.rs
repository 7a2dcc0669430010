//! x86_64 kernels: AVX2 + FMA + F16C, and the same Q40 × Q80 kernel with the AVX-VNNI /
//! AVX-512 VNNI int8 dot product (`vpdpbusd`) in place of `vpmaddubsw` + `vpmaddwd`.
//!
//! Q40 × Q80 trick: a Q40 weight is (n - 8) with n in 0..16 unsigned, so per block
//! sum (n - 8) * x = sum n * x - 8 * sum x. `n * x` is an unsigned × signed byte product
//! (exactly what `vpmaddubsw` / `vpdpbusd` take, no sign juggling), and `8 * sum x` depends
//! on the input only: it is computed once per matmul per input block (`XPrep`), as a vector
//! of 8 partial sums in the same lanes as the products, and subtracted in the integer domain.
//!
//! All loads are unaligned: Q40 blocks are 18 bytes and live in the memory-mapped file.
//! Every function here is `unsafe`: the caller guarantees the CPU has the features named in
//! its `target_feature` attribute (`dispatch` checks them once).

#![allow(clippy::needless_range_loop)] // lanes and unrolled accumulators read best indexed

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::block::{f16_to_f32, BlockQ40, BlockQ80, QK};
use super::packed::{CELL, GROUP};

// ---------------------------------------------------------------------------------------
// helpers

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    let x = _mm_add_ss(x, _mm_movehdup_ps(x));
    _mm_cvtss_f32(x)
}

/// The 32 nibbles of a Q40 block as bytes 0..16: values 0..16 in the low lane (low nibbles),
/// 16..32 in the high lane (high nibbles), matching the Q80 value order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q40_nibbles(b: *const BlockQ40) -> __m256i {
    let q = _mm_loadu_si128((*b).qs.as_ptr() as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// The block scale broadcast to 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scale8(d: u16) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(d as i16))
}

/// Per input block: its scale and 8 * (sums of 4 consecutive values), in the lanes of
/// `vpmaddwd(vpmaddubsw(n, x), 1)` / `vpdpbusd(n, x)`.
pub(crate) struct XPrep {
    pub(crate) dx: Vec<f32>,
    corr: Vec<__m256i>,
    /// -8 * sum x of each block (for the packed kernels, whose lanes are rows).
    pub(crate) ncorr: Vec<i32>,
}

pub(crate) type PreparedX = XPrep;

/// Run `f` with the per-block scales and corrections of `x` (a per-thread buffer).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn with_prepared_x<R>(x: &[BlockQ80], f: impl FnOnce(&XPrep) -> R) -> R {
    XPREP.with(|p| {
        let mut p = p.borrow_mut();
        prepare_x(x, &mut p);
        f(&p)
    })
}

thread_local! {
    static XPREP: RefCell<XPrep> = const { RefCell::new(XPrep { dx: Vec::new(), corr: Vec::new(), ncorr: Vec::new() }) };
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prepare_x(x: &[BlockQ80], p: &mut XPrep) {
    p.dx.clear();
    p.corr.clear();
    p.ncorr.clear();
    let eight = _mm256_set1_epi8(8);
    let ones = _mm256_set1_epi16(1);
    for b in x {
        p.dx.push(f16_to_f32(b.d));
        p.ncorr
            .push(-8 * b.qs.iter().map(|&q| q as i32).sum::<i32>());
        let xv = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
        p.corr
            .push(_mm256_madd_epi16(_mm256_maddubs_epi16(eight, xv), ones));
    }
}

// ---------------------------------------------------------------------------------------
// Q40 × Q80, generated for each int8 dot instruction

macro_rules! q40_q80_kernels {
    ($features:literal, $dot:ident, $dot8:ident) => {
        /// 8 rows (one packed group) × T tokens: each cell is expanded once for the T tokens;
        /// lane j of `acc[t]` is row j's output for token t.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn packed_tile<const T: usize>(
            gc: *const u8,
            bpr: usize,
            x: *const BlockQ80,
            dx: *const f32,
            nc: *const i32,
        ) -> [__m256; T] {
            let m4 = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..bpr {
                let c = gc.add(b * CELL);
                let mut lo = [_mm256_setzero_si256(); 4];
                let mut hi = [_mm256_setzero_si256(); 4];
                for q in 0..4 {
                    let v = _mm256_loadu_si256(c.add(16 + 32 * q) as *const __m256i);
                    lo[q] = _mm256_and_si256(v, m4);
                    hi[q] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(c as *const __m128i));
                for t in 0..T {
                    let i = t * bpr + b;
                    let p = $dot8(&lo, &hi, (*x.add(i)).qs.as_ptr() as *const i32, *nc.add(i));
                    let s = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*dx.add(i)));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[t]);
                }
            }
            acc
        }

        /// out (n_tokens, n_rows) = packed w (n_rows, bpr) × x (n_tokens, bpr); `cells` are
        /// the groups of these rows (`PackedQ40::groups`), the last one possibly partial.
        ///
        /// # Safety
        /// The CPU has the features of this function's `target_feature`.
        #[target_feature(enable = $features)]
        pub unsafe fn matmul_q40x8_q80(
            cells: &[u8],
            bpr: usize,
            x: &[BlockQ80],
            out: &mut [f32],
            n_tokens: usize,
        ) {
            let n_rows = out.len() / n_tokens;
            let n_groups = n_rows.div_ceil(GROUP);
            assert!(
                n_rows * n_tokens == out.len()
                    && bpr * n_tokens == x.len()
                    && cells.len() == n_groups * bpr * CELL
            );
            XPREP.with(|p| {
                let mut p = p.borrow_mut();
                prepare_x(x, &mut p);
                let mut lanes = [0.0f32; GROUP];
                let mut store = |t: usize, g: usize, v: __m256| {
                    let row0 = t * n_rows + g * GROUP;
                    let rows = GROUP.min(n_rows - g * GROUP);
                    if rows == GROUP {
                        _mm256_storeu_ps(out.as_mut_ptr().add(row0), v);
                    } else {
                        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                        out[row0..row0 + rows].copy_from_slice(&lanes[..rows]);
                    }
                };
                for g in 0..n_groups {
                    // the group's cells (bpr · 144 bytes) stay in L2 while the tokens go by,
                    // so the weights are read from memory once per batch
                    let gc = cells.as_ptr().add(g * bpr * CELL);
                    let mut t = 0;
                    while t + 4 <= n_tokens {
                        let o = t * bpr;
                        let v = packed_tile::<4>(
                            gc,
                            bpr,
                            x.as_ptr().add(o),
                            p.dx.as_ptr().add(o),
                            p.ncorr.as_ptr().add(o),
                        );
                        for (k, &vk) in v.iter().enumerate() {
                            store(t + k, g, vk);
                        }
                        t += 4;
                    }
                    while t < n_tokens {
                        let o = t * bpr;
                        let v = packed_tile::<1>(
                            gc,
                            bpr,
                            x.as_ptr().add(o),
                            p.dx.as_ptr().add(o),
                            p.ncorr.as_ptr().add(o),
                        );
                        store(t, g, v[0]);
                        t += 1;
                    }
                }
            });
        }

        /// R rows × T tokens of Q40 × Q80, blocks innermost; `out[r][t]`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile<const R: usize, const T: usize>(
            w: *const BlockQ40,
            x: *const BlockQ80,
            dx: *const f32,
            corr: *const __m256i,
            bpr: usize,
        ) -> [[f32; T]; R] {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            for b in 0..bpr {
                let mut xv = [_mm256_setzero_si256(); T];
                let mut xd = [_mm256_setzero_ps(); T];
                let mut xc = [_mm256_setzero_si256(); T];
                for t in 0..T {
                    let i = t * bpr + b;
                    xv[t] = _mm256_loadu_si256((*x.add(i)).qs.as_ptr() as *const __m256i);
                    xd[t] = _mm256_broadcast_ss(&*dx.add(i));
                    xc[t] = _mm256_load_si256(corr.add(i));
                }
                for r in 0..R {
                    let wb = w.add(r * bpr + b);
                    let nib = q40_nibbles(wb);
                    let dw = scale8((*wb).d);
                    for t in 0..T {
                        let p = $dot(nib, xv[t], xc[t]);
                        acc[r][t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_mul_ps(dw, xd[t]),
                            acc[r][t],
                        );
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

        /// out (n_tokens, n_rows) = w (n_rows, bpr) × x (n_tokens, bpr).
        ///
        /// # Safety
        /// The CPU has the features of this function's `target_feature`.
        #[target_feature(enable = $features)]
        pub unsafe fn matmul_q40_q80(
            w: &[BlockQ40],
            x: &[BlockQ80],
            out: &mut [f32],
            n_tokens: usize,
        ) {
            let n_rows = out.len() / n_tokens;
            let bpr = x.len() / n_tokens;
            assert!(
                n_rows * n_tokens == out.len()
                    && bpr * n_tokens == x.len()
                    && w.len() == n_rows * bpr
            );
            XPREP.with(|p| {
                let mut p = p.borrow_mut();
                prepare_x(x, &mut p);
                let (dx, corr) = (p.dx.as_ptr(), p.corr.as_ptr());
                let (wp, xp) = (w.as_ptr(), x.as_ptr());
                if n_tokens == 1 {
                    // generation: 4 rows share each input load
                    let mut r = 0;
                    while r + 4 <= n_rows {
                        let v = tile::<4, 1>(wp.add(r * bpr), xp, dx, corr, bpr);
                        for i in 0..4 {
                            out[r + i] = v[i][0];
                        }
                        r += 4;
                    }
                    while r < n_rows {
                        out[r] = tile::<1, 1>(wp.add(r * bpr), xp, dx, corr, bpr)[0][0];
                        r += 1;
                    }
                } else {
                    // prefill: each weight row is expanded once per 4 tokens and stays in L1
                    // while all tokens go by, so it is read from memory once per batch
                    for r in 0..n_rows {
                        let wr = wp.add(r * bpr);
                        let mut t = 0;
                        while t + 4 <= n_tokens {
                            let o = t * bpr;
                            let v = tile::<1, 4>(wr, xp.add(o), dx.add(o), corr.add(o), bpr);
                            for i in 0..4 {
                                out[(t + i) * n_rows + r] = v[0][i];
                            }
                            t += 4;
                        }
                        while t < n_tokens {
                            let o = t * bpr;
                            out[t * n_rows + r] =
                                tile::<1, 1>(wr, xp.add(o), dx.add(o), corr.add(o), bpr)[0][0];
                            t += 1;
                        }
                    }
                }
            });
        }
    };
}

/// The 8 rows' integer dot products of one packed cell (expanded: `lo[q]`, `hi[q]`) with
/// one input block `xq` (32 bytes as 8 i32): lane j = sum n_j * x - 8 sum x. With
/// `vpmaddubsw`: 8 products of at most 2 · 15 · 128 summed in i16 stay below 32768.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot8_maddubs(
    lo: &[__m256i; 4],
    hi: &[__m256i; 4],
    xq: *const i32,
    ncorr: i32,
) -> __m256i {
    let mut s = [_mm256_setzero_si256(); 2];
    for q in 0..4 {
        let xl = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(q)));
        let xh = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(4 + q)));
        s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(lo[q], xl));
        s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(hi[q], xh));
    }
    let p = _mm256_madd_epi16(_mm256_add_epi16(s[0], s[1]), _mm256_set1_epi16(1));
    _mm256_add_epi32(p, _mm256_set1_epi32(ncorr))
}

macro_rules! dot8_vnni {
    ($name:ident, $features:literal, $dpbusd:ident) => {
        /// As `dot8_maddubs`, with `vpdpbusd` (two independent chains of 4).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $name(
            lo: &[__m256i; 4],
            hi: &[__m256i; 4],
            xq: *const i32,
            ncorr: i32,
        ) -> __m256i {
            let mut s = [_mm256_set1_epi32(ncorr), _mm256_setzero_si256()];
            for q in 0..4 {
                s[0] = $dpbusd(
                    s[0],
                    lo[q],
                    _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(q))),
                );
                s[1] = $dpbusd(
                    s[1],
                    hi[q],
                    _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(4 + q))),
                );
            }
            _mm256_add_epi32(s[0], s[1])
        }
    };
}

dot8_vnni!(
    dot8_avxvnni,
    "avx2,fma,f16c,avxvnni",
    _mm256_dpbusd_avx_epi32
);
dot8_vnni!(
    dot8_avx512vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    _mm256_dpbusd_epi32
);

/// sum n * x - corr, with AVX2 `vpmaddubsw` (n <= 15 so no i16 saturation) + `vpmaddwd`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_maddubs(nib: __m256i, xv: __m256i, corr: __m256i) -> __m256i {
    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(nib, xv), _mm256_set1_epi16(1));
    _mm256_sub_epi32(p, corr)
}

pub mod maddubs {
    use super::*;
    q40_q80_kernels!("avx2,fma,f16c", dot_maddubs, dot8_maddubs);
}

/// sum n * x - corr with AVX-VNNI `vpdpbusd` (VEX encoding: Alder Lake+, Zen 5).
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
unsafe fn dot_avxvnni(nib: __m256i, xv: __m256i, corr: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), corr), nib, xv)
}

pub mod avxvnni {
    use super::*;
    q40_q80_kernels!("avx2,fma,f16c,avxvnni", dot_avxvnni, dot8_avxvnni);
}

/// sum n * x - corr with AVX-512 VNNI `vpdpbusd` on 256-bit registers (Ice Lake+, Zen 4+).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[inline]
unsafe fn dot_avx512vnni(nib: __m256i, xv: __m256i, corr: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), corr), nib, xv)
}

pub mod avx512vnni {
    use super::*;
    q40_q80_kernels!(
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        dot_avx512vnni,
        dot8_avx512vnni
    );
}

pub use maddubs::matmul_q40_q80;

// ---------------------------------------------------------------------------------------
// Q80 × Q80

/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matmul_q80_q80(w: &[BlockQ80], x: &[BlockQ80], out: &mut [f32], n_tokens: usize) {
    let n_rows = out.len() / n_tokens;
    let bpr = x.len() / n_tokens;
    assert!(n_rows * n_tokens == out.len() && bpr * n_tokens == x.len() && w.len() == n_rows * bpr);
    let ones = _mm256_set1_epi16(1);
    for r in 0..n_rows {
        let wr = &w[r * bpr..(r + 1) * bpr];
        for t in 0..n_tokens {
            let xt = &x[t * bpr..(t + 1) * bpr];
            let mut acc = _mm256_setzero_ps();
            for (a, b) in wr.iter().zip(xt) {
                let av = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                let bv = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                // |a| * (b with a's sign): unsigned × signed bytes for vpmaddubsw
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(av, av), _mm256_sign_epi8(bv, av));
                let p = _mm256_madd_epi16(p, ones);
                let s = _mm256_mul_ps(scale8(a.d), scale8(b.d));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc);
            }
            out[t * n_rows + r] = hsum(acc);
        }
    }
}

// ---------------------------------------------------------------------------------------
// F32 and F16 weights × F32 input

/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut a = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for k in 0..4 {
            a[k] = _mm256_fmadd_ps(
                _mm256_loadu_ps(wp.add(i + 8 * k)),
                _mm256_loadu_ps(xp.add(i + 8 * k)),
                a[k],
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a[0]);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(a[0], a[1]),
        _mm256_add_ps(a[2], a[3]),
    ));
    while i < n {
        s += w[i] * x[i];
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut a = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for k in 0..4 {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i + 8 * k) as *const __m128i));
            a[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i + 8 * k)), a[k]);
        }
        i += 32;
    }
    while i + 8 <= n {
        let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i) as *const __m128i));
        a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i)), a[0]);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(a[0], a[1]),
        _mm256_add_ps(a[2], a[3]),
    ));
    while i < n {
        s += f16_to_f32(w[i]) * x[i];
        i += 1;
    }
    s
}

/// y += a * x.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
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

/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matmul_f32(w: &[f32], x: &[f32], out: &mut [f32], n_tokens: usize) {
    let n_rows = out.len() / n_tokens;
    let cols = x.len() / n_tokens;
    assert!(
        n_rows * n_tokens == out.len() && cols * n_tokens == x.len() && w.len() == n_rows * cols
    );
    for r in 0..n_rows {
        let wr = &w[r * cols..(r + 1) * cols];
        for t in 0..n_tokens {
            out[t * n_rows + r] = dot_f32(wr, &x[t * cols..(t + 1) * cols]);
        }
    }
}

/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matmul_f16(w: &[u16], x: &[f32], out: &mut [f32], n_tokens: usize) {
    let n_rows = out.len() / n_tokens;
    let cols = x.len() / n_tokens;
    assert!(
        n_rows * n_tokens == out.len() && cols * n_tokens == x.len() && w.len() == n_rows * cols
    );
    for r in 0..n_rows {
        let wr = &w[r * cols..(r + 1) * cols];
        for t in 0..n_tokens {
            out[t * n_rows + r] = dot_f16(wr, &x[t * cols..(t + 1) * cols]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Q80 quantization, bit-identical to the scalar `quantize_q80`

/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q80(x: &[f32], out: &mut [BlockQ80]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "quantize_q80: {} values for {} blocks",
        x.len(),
        out.len()
    );
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
