//! aarch64 kernels: NEON (every ARMv8-A, e.g. the Pi 4's Cortex-A72) and NEON with the
//! ARMv8.2 dot-product instruction `sdot` (Pi 5's Cortex-A76). `sdot` is emitted with
//! `asm!` so the crate builds with compilers where its intrinsic is not yet stable.
//!
//! Every function here is `unsafe`: the caller guarantees the CPU has the features named in
//! its `target_feature` attribute (`dispatch` checks them once).

#![allow(clippy::needless_range_loop)] // lanes and unrolled accumulators read best indexed

use std::arch::aarch64::*;
use std::arch::asm;

use super::block::{f16_to_f32, f32_to_f16, BlockQ40, BlockQ80, QK};
use super::packed::PREFETCH_AHEAD;
use super::shape::{assert_q80_blocks, matmul_rows};

#[target_feature(enable = "neon")]
#[inline]
unsafe fn q40_signed(b: *const BlockQ40) -> (int8x16_t, int8x16_t) {
    let q = vld1q_u8((*b).qs.as_ptr());
    let eight = vdupq_n_s8(8);
    let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), eight);
    let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), eight);
    (lo, hi)
}

/// f16 bits to f32 with the hardware conversion (`fcvtl`), not a software routine.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn h2f(bits: u16) -> f32 {
    let h = vdup_n_u16(bits);
    let out: float32x4_t;
    asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) out, in(vreg) h, options(pure, nomem, nostack));
    vgetq_lane_f32::<0>(out)
}

/// acc + the products of a and b summed in groups of 4 lanes, without `sdot`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn dot4_plain(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let pl = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let ph = vmull_high_s8(a, b);
    vaddq_s32(acc, vaddq_s32(vpaddlq_s16(pl), vpaddlq_s16(ph)))
}

/// acc + the products of a and b summed in groups of 4 lanes, with `sdot`.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn dot4_sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) acc, in(vreg) a, in(vreg) b, options(pure, nomem, nostack));
    acc
}

/// The scales of R <= 4 blocks (f16 bits `d(r)`) times the activation block's `dx`, converted
/// together (one `fcvtl`, one `fmul`); each equals `h2f(d(r)) * dx` exactly.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn row_scales<const R: usize>(d: impl Fn(usize) -> u16, dx: f32) -> [f32; R] {
    let mut bits = [0u16; 4];
    for r in 0..R {
        bits[r] = d(r);
    }
    let mut all = [0.0f32; 4];
    vst1q_f32(
        all.as_mut_ptr(),
        vmulq_n_f32(f16x4_to_f32(bits.as_ptr()), dx),
    );
    let mut out = [0.0f32; R];
    out.copy_from_slice(&all[..R]);
    out
}

macro_rules! int8_kernels {
    ($features:literal, $dot4:ident) => {
        /// R rows of Q40 × one Q80 token; the input block loads and scales are shared.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile<const R: usize>(
            w: *const BlockQ40,
            bpr: usize,
            x: *const BlockQ80,
            dx: *const f32,
        ) -> [f32; R] {
            let mut acc = [vdupq_n_f32(0.0); R];
            for b in 0..bpr {
                let xb = x.add(b);
                let x0 = vld1q_s8((*xb).qs.as_ptr());
                let x1 = vld1q_s8((*xb).qs.as_ptr().add(16));
                let sc = row_scales::<R>(|r| (*w.add(r * bpr + b)).d, *dx.add(b));
                for r in 0..R {
                    let (lo, hi) = q40_signed(w.add(r * bpr + b));
                    let p = $dot4($dot4(vdupq_n_s32(0), lo, x0), hi, x1);
                    acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(p), sc[r]);
                }
            }
            let mut out = [0.0f32; R];
            for r in 0..R {
                out[r] = vaddvq_f32(acc[r]);
            }
            out
        }

        /// out (n_tokens, n_rows) = w (n_rows, bpr) Q40 × x (n_tokens, bpr) Q80.
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
            let (n_rows, bpr, _) =
                crate::kernels::shape::kernel_shape(w.len(), x.len(), out.len(), n_tokens, 1);
            let dx: Vec<f32> = x.iter().map(|b| h2f(b.d)).collect();
            // row-outer: a weight row is read from memory once, then stays in L1 for all tokens
            let mut r = 0;
            while r < n_rows {
                let rows = if r + 4 <= n_rows { 4 } else { 1 };
                for t in 0..n_tokens {
                    let (wp, xp, dp) = (
                        w.as_ptr().add(r * bpr),
                        x.as_ptr().add(t * bpr),
                        dx.as_ptr().add(t * bpr),
                    );
                    if rows == 4 {
                        let v = tile::<4>(wp, bpr, xp, dp);
                        for i in 0..4 {
                            out[t * n_rows + r + i] = v[i];
                        }
                    } else {
                        out[t * n_rows + r] = tile::<1>(wp, bpr, xp, dp)[0];
                    }
                }
                r += rows;
            }
        }

        /// R rows of Q80 × one Q80 token, as `tile` for Q40 weights.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile_q80<const R: usize>(
            w: *const BlockQ80,
            bpr: usize,
            x: *const BlockQ80,
            dx: *const f32,
        ) -> [f32; R] {
            let mut acc = [vdupq_n_f32(0.0); R];
            for b in 0..bpr {
                let xb = x.add(b);
                let x0 = vld1q_s8((*xb).qs.as_ptr());
                let x1 = vld1q_s8((*xb).qs.as_ptr().add(16));
                let sc = row_scales::<R>(|r| (*w.add(r * bpr + b)).d, *dx.add(b));
                for r in 0..R {
                    let wb = w.add(r * bpr + b);
                    let w0 = vld1q_s8((*wb).qs.as_ptr());
                    let w1 = vld1q_s8((*wb).qs.as_ptr().add(16));
                    let p = $dot4($dot4(vdupq_n_s32(0), w0, x0), w1, x1);
                    acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(p), sc[r]);
                }
            }
            let mut out = [0.0f32; R];
            for r in 0..R {
                out[r] = vaddvq_f32(acc[r]);
            }
            out
        }

        /// out (n_tokens, n_rows) = w (n_rows, bpr) Q80 × x (n_tokens, bpr) Q80.
        ///
        /// # Safety
        /// The CPU has the features of this function's `target_feature`.
        #[target_feature(enable = $features)]
        pub unsafe fn matmul_q80_q80(
            w: &[BlockQ80],
            x: &[BlockQ80],
            out: &mut [f32],
            n_tokens: usize,
        ) {
            let (n_rows, bpr, _) =
                crate::kernels::shape::kernel_shape(w.len(), x.len(), out.len(), n_tokens, 1);
            let dx: Vec<f32> = x.iter().map(|b| h2f(b.d)).collect();
            // 4-row tiles share each activation block's loads (as the Q40 kernel)
            let mut r = 0;
            while r < n_rows {
                let rows = if r + 4 <= n_rows { 4 } else { 1 };
                for t in 0..n_tokens {
                    let (wp, xp, dp) = (
                        w.as_ptr().add(r * bpr),
                        x.as_ptr().add(t * bpr),
                        dx.as_ptr().add(t * bpr),
                    );
                    if rows == 4 {
                        let v = tile_q80::<4>(wp, bpr, xp, dp);
                        for i in 0..4 {
                            out[t * n_rows + r + i] = v[i];
                        }
                    } else {
                        out[t * n_rows + r] = tile_q80::<1>(wp, bpr, xp, dp)[0];
                    }
                }
                r += rows;
            }
        }
    };
}

pub mod plain {
    use super::*;
    int8_kernels!("neon", dot4_plain);
}

pub mod dotprod {
    use super::*;
    int8_kernels!("neon,dotprod", dot4_sdot);
}

/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
#[inline]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for k in 0..4 {
            acc[k] = vfmaq_f32(
                acc[k],
                vld1q_f32(ap.add(i + 4 * k)),
                vld1q_f32(bp.add(i + 4 * k)),
            );
        }
        i += 16;
    }
    while i + 4 <= n {
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(ap.add(i)), vld1q_f32(bp.add(i)));
        i += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// Four f16 values (bits) to f32 with `fcvtl` (the f16 vector types are not stable Rust).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn f16x4_to_f32(p: *const u16) -> float32x4_t {
    let h = vld1_u16(p);
    let out: float32x4_t;
    asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) out, in(vreg) h, options(pure, nomem, nostack));
    out
}

/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
unsafe fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for k in 0..4 {
            acc[k] = vfmaq_f32(
                acc[k],
                f16x4_to_f32(wp.add(i + 4 * k)),
                vld1q_f32(xp.add(i + 4 * k)),
            );
        }
        i += 16;
    }
    while i + 4 <= n {
        acc[0] = vfmaq_f32(acc[0], f16x4_to_f32(wp.add(i)), vld1q_f32(xp.add(i)));
        i += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
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
/// The CPU has NEON.
#[target_feature(enable = "neon")]
#[inline]
pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 4 <= n {
        vst1q_f32(
            yp.add(i),
            vfmaq_n_f32(vld1q_f32(yp.add(i)), vld1q_f32(xp.add(i)), a),
        );
        i += 4;
    }
    while i < n {
        y[i] += a * x[i];
        i += 1;
    }
}

/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
pub unsafe fn matmul_f32(w: &[f32], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, 1, |w, x| dot_f32(w, x))
}

/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
pub unsafe fn matmul_f16(w: &[u16], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, 1, |w, x| dot_f16(w, x))
}

/// Q80 quantization, bit-identical to the scalar one: `fcvtas` rounds half away from zero
/// exactly as `f32::round`.
///
/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
pub unsafe fn quantize_q80(x: &[f32], out: &mut [BlockQ80]) {
    assert_q80_blocks(x.len(), out.len());
    for (xb, yb) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let mut v = [vdupq_n_f32(0.0); 8];
        let mut m = vdupq_n_f32(0.0);
        for k in 0..8 {
            v[k] = vld1q_f32(p.add(4 * k));
            m = vmaxq_f32(m, vabsq_f32(v[k]));
        }
        let amax = vmaxvq_f32(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        yb.d = f32_to_f16(d);
        for k in 0..4 {
            let a = vcvtaq_s32_f32(vmulq_n_f32(v[2 * k], id));
            let b = vcvtaq_s32_f32(vmulq_n_f32(v[2 * k + 1], id));
            let h = vcombine_s16(vqmovn_s32(a), vqmovn_s32(b));
            vst1_s8(yb.qs.as_mut_ptr().add(8 * k), vqmovn_s16(h));
        }
    }
}

/// Ask for the cache lines of the `len` bytes `PREFETCH_AHEAD` bytes after `p` (`prfm`, a
/// hint that never faults, so the address may lie past the data): a head's keys and values
/// are each one stream, which the hardware prefetchers stop following at page boundaries.
#[inline(always)]
fn prefetch_ahead(p: *const u8, len: usize) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD);
    for off in (0..len).step_by(64) {
        // SAFETY: `prfm` has no architectural effect, for any address.
        unsafe {
            asm!("prfm pldl1keep, [{0}]", in(reg) ahead.wrapping_add(off), options(nostack, preserves_flags, readonly));
        }
    }
}

/// The 4 sums of the lanes of `a[0..4]`, in order, as one vector.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn hsum4(a: &[float32x4_t]) -> float32x4_t {
    vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3]))
}

/// Attention scores of one head: scores[p] = (q · k[p·stride .. p·stride + q.len()]) · scale.
/// Eight positions at a time: eight independent dot products whose sums come out as two
/// vectors (`hsum4`), instead of one horizontal sum per position.
///
/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
pub unsafe fn attn_scores(q: &[f32], k: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    let hd = q.len();
    let n = scores.len();
    if let Some(last) = n.checked_sub(1) {
        assert!(last * stride + hd <= k.len(), "attn_scores: keys too short");
    }
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let chunks = hd / 4;
    let mut p = 0;
    while p + 8 <= n {
        for j in 0..8 {
            prefetch_ahead(kp.add((p + j) * stride) as *const u8, hd * 4);
        }
        let mut acc = [vdupq_n_f32(0.0); 8];
        for c in 0..chunks {
            let qc = vld1q_f32(qp.add(4 * c));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = vfmaq_f32(*a, qc, vld1q_f32(kp.add((p + j) * stride + 4 * c)));
            }
        }
        let mut s = [hsum4(&acc[..4]), hsum4(&acc[4..])];
        for i in 4 * chunks..hd {
            for (h, s) in s.iter_mut().enumerate() {
                let tail: [f32; 4] =
                    std::array::from_fn(|j| q[i] * *kp.add((p + 4 * h + j) * stride + i));
                *s = vaddq_f32(*s, vld1q_f32(tail.as_ptr()));
            }
        }
        vst1q_f32(scores.as_mut_ptr().add(p), vmulq_n_f32(s[0], scale));
        vst1q_f32(scores.as_mut_ptr().add(p + 4), vmulq_n_f32(s[1], scale));
        p += 8;
    }
    for (j, out) in scores.iter_mut().enumerate().skip(p) {
        *out = dot_f32(q, k.get_unchecked(j * stride..j * stride + hd)) * scale;
    }
}

/// Weighted sum of one head's values: out += sum_p att[p] · v[p·stride .. p·stride + out.len()].
/// 64 outputs at a time stay in 16 registers across all positions (an `axpy` per position
/// would load and store them each time).
///
/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
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
        let mut acc: [float32x4_t; 16] = std::array::from_fn(|j| vld1q_f32(op.add(c0 + 4 * j)));
        for (p, &a) in att.iter().enumerate() {
            if c0 == 0 {
                // whole rows, ahead, as for the keys (later passes find them in the cache)
                prefetch_ahead(vp.add(p * stride) as *const u8, hd * 4);
            }
            let row = vp.add(p * stride + c0);
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = vfmaq_n_f32(*acc, vld1q_f32(row.add(4 * j)), a);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            vst1q_f32(op.add(c0 + 4 * j), *acc);
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

/// exp of N × 4 values, the scheme and constants of the x86 `exp8` (Cephes' `expf`: x =
/// n·ln2 + r with |r| <= ln2/2, a degree-5 polynomial for exp(r), 2^n by the exponent bits); within
/// 2 ulp of `f32::exp` for inputs in [-87.3, 88.3] (other inputs are clamped to that range, so
/// the result is never 0 or infinite; NaN stays NaN: `fmax` / `fmin` return it). Each step is
/// written for the N vectors together, so that their N dependency chains interleave.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn exp4<const N: usize>(x: [float32x4_t; N]) -> [float32x4_t; N] {
    let x = x.map(|v| vminq_f32(vdupq_n_f32(88.3), vmaxq_f32(vdupq_n_f32(-87.3), v)));
    let n = x.map(|v| vrndnq_f32(vmulq_n_f32(v, std::f32::consts::LOG2_E)));
    // r = x - n·ln2, with ln2 split in two so that n·ln2_hi is exact
    let mut r = [vdupq_n_f32(0.0); N];
    for k in 0..N {
        r[k] = vfmsq_f32(x[k], n[k], vdupq_n_f32(0.693_359_4));
    }
    for k in 0..N {
        r[k] = vfmsq_f32(r[k], n[k], vdupq_n_f32(-2.121_944_4e-4));
    }
    let mut p = [vdupq_n_f32(1.987_569_1e-4); N];
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        for k in 0..N {
            p[k] = vfmaq_f32(vdupq_n_f32(c), p[k], r[k]);
        }
    }
    let mut e = [vdupq_n_f32(0.0); N];
    for k in 0..N {
        // exp(r) = 1 + r + r² · p, times 2^n
        let er = vfmaq_f32(
            vaddq_f32(r[k], vdupq_n_f32(1.0)),
            p[k],
            vmulq_f32(r[k], r[k]),
        );
        let pow2n = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n[k]), vdupq_n_s32(127)));
        e[k] = vmulq_f32(er, vreinterpretq_f32_s32(pow2n));
    }
    e
}

/// x = exp(x - max x) / sum, in place, with `exp4` (16 values at a time).
///
/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
pub unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    if n == 0 {
        return;
    }
    let xp = x.as_mut_ptr();
    let full = n / 4 * 4;
    let mut mv = vdupq_n_f32(f32::NEG_INFINITY);
    for i in (0..full).step_by(4) {
        mv = vmaxq_f32(mv, vld1q_f32(xp.add(i)));
    }
    // a NaN score makes the max or the sum NaN, so every output NaN (as the scalar reference)
    let max = x[full..].iter().fold(vmaxvq_f32(mv), |m, &v| m.max(v));
    let mv = vdupq_n_f32(max);
    let mut sv = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 16 <= full {
        let v: [float32x4_t; 4] =
            std::array::from_fn(|k| vsubq_f32(vld1q_f32(xp.add(i + 4 * k)), mv));
        for (k, e) in exp4(v).into_iter().enumerate() {
            vst1q_f32(xp.add(i + 4 * k), e);
            sv = vaddq_f32(sv, e);
        }
        i += 16;
    }
    while i < full {
        let [e] = exp4([vsubq_f32(vld1q_f32(xp.add(i)), mv)]);
        vst1q_f32(xp.add(i), e);
        sv = vaddq_f32(sv, e);
        i += 4;
    }
    let mut sum = vaddvq_f32(sv);
    if full < n {
        // the last n % 4 values through the same exp, padded with -inf (exp: tiny, dropped)
        let mut tail = [f32::NEG_INFINITY; 4];
        tail[..n - full].copy_from_slice(&x[full..]);
        let [e] = exp4([vsubq_f32(vld1q_f32(tail.as_ptr()), mv)]);
        vst1q_f32(tail.as_mut_ptr(), e);
        x[full..].copy_from_slice(&tail[..n - full]);
        sum += tail[..n - full].iter().sum::<f32>();
    }
    let inv = 1.0 / sum;
    for i in (0..full).step_by(4) {
        vst1q_f32(xp.add(i), vmulq_n_f32(vld1q_f32(xp.add(i)), inv));
    }
    for v in &mut x[full..] {
        *v /= sum;
    }
}
