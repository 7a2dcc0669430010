//! aarch64 kernels: NEON (every ARMv8-A, e.g. the Pi 4's Cortex-A72) and NEON with the
//! ARMv8.2 dot-product instruction `sdot` (Pi 5's Cortex-A76). `sdot` is emitted with
//! `asm!` so the crate builds with compilers where its intrinsic is not yet stable.
//!
//! Every function here is `unsafe`: the caller guarantees the CPU has the features named in
//! its `target_feature` attribute (`dispatch` checks them once).

#![allow(clippy::needless_range_loop)] // lanes and unrolled accumulators read best indexed

use std::arch::aarch64::*;
use std::arch::asm;

use super::block::{bf16_to_f32, f16_to_f32, f32_to_f16, BlockQ40, BlockQ80, QK};
use super::packed::{for_each_claimed, CELL, GROUP, PREFETCH_AHEAD};
use super::shape::{assert_q80_blocks, matmul_rows, packed_shape};

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

// Packed Q40 (`kernels::packed`, 8 rows per cell) × Q80. A 16-byte half of a cell's vector
// V_q holds bytes 4q..4q+4 of 4 rows' `qs`, one row per 32-bit lane: `and 0x0F` gives those
// rows' values 4q..4q+4 and `ushr 4` their values 16+4q..16+4q+4, so their dot product with
// the input's bytes 4q..4q+4 (32-bit lane q of the input's first 16 bytes) and 16+4q..
// (lane q of the last 16) lands in each row's own lane: one `sdot` by element per 16 bytes,
// or, without sdot, `smull`/`smlal` against the input lane broadcast into int16 sums and one
// `addp` + `sadalp` per 4 rows and block. No horizontal sum per row, one scale conversion per
// 8 rows. The nibbles stay 0..15 and the Q40 offset is folded: sum (n - 8) x = sum n x - 8
// sum x, with -8 sum x per input block computed once per call as the integer sums' start
// (they are exact, so each block's sum equals the plain layout's).

/// Per input block: its scale as f32 and -8 × the sum of its values (the integer sums' start).
#[target_feature(enable = "neon")]
unsafe fn q80_scales_sums(x: &[BlockQ80]) -> (Vec<f32>, Vec<i32>) {
    let dx = x.iter().map(|b| h2f(b.d)).collect();
    let s8 = x
        .iter()
        .map(|b| {
            let p = b.qs.as_ptr();
            -8 * (vaddlvq_s8(vld1q_s8(p)) as i32 + vaddlvq_s8(vld1q_s8(p.add(16))) as i32)
        })
        .collect();
    (dx, s8)
}

/// The nibbles of 16 bytes as 0..15: (low, high).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn nibbles(v: uint8x16_t) -> (int8x16_t, int8x16_t) {
    (
        vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))),
        vreinterpretq_s8_u8(vshrq_n_u8(v, 4)),
    )
}

/// Ask for the cache lines of the cell `PREFETCH_AHEAD` bytes after `cell`: 3 `prfm` 48 bytes
/// apart per 144-byte cell, so that every 64-byte line of the stream gets one. The hardware
/// prefetchers stop at each page; this keeps the weight stream flowing across them.
#[inline(always)]
fn prefetch_cell(cell: *const u8) {
    let ahead = cell.wrapping_add(PREFETCH_AHEAD);
    // SAFETY: `prfm` has no architectural effect, for any address.
    unsafe {
        asm!(
            "prfm pldl1keep, [{0}]",
            "prfm pldl1keep, [{0}, #48]",
            "prfm pldl1keep, [{0}, #96]",
            in(reg) ahead,
            options(nostack, preserves_flags, readonly)
        );
    }
}

/// `acc` + each 4-byte group of `w` dotted with 4-byte lane `Q` of `x` (`sdot` by element).
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot_lane<const Q: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.4b[{q}]", inout(vreg) acc, in(vreg) w, in(vreg) x, q = const Q, options(pure, nomem, nostack));
    acc
}

/// Quarter `Q` of a cell's quants (`w` = the cell's vectors) for T tokens, with `sdot`:
/// p[t][h] (rows 4h..4h+4) += the 8 values of V_Q's half h dotted with token t's inputs.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn quarter_sdot<const Q: i32, const T: usize>(
    w: *const u8,
    x: &[(int8x16_t, int8x16_t); T],
    p: &mut [[int32x4_t; 2]; T],
) {
    let half = |h: usize| nibbles(vld1q_u8(w.add(32 * Q as usize + 16 * h)));
    let (lo0, hi0) = half(0);
    let (lo1, hi1) = half(1);
    for t in 0..T {
        p[t][0] = sdot_lane::<Q>(sdot_lane::<Q>(p[t][0], lo0, x[t].0), hi0, x[t].1);
        p[t][1] = sdot_lane::<Q>(sdot_lane::<Q>(p[t][1], lo1, x[t].0), hi1, x[t].1);
    }
}

/// Quarter `Q` without `sdot`: a[t][k] (int16, rows 2k, 2k+1: 4 lanes each) += the products
/// of V_Q's values with token t's input lane `Q` broadcast (`smull` / `smlal`, 8 per
/// instruction). Each lane sums 8 products n·x with n <= 15, |x| <= 128: at most 15360.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn quarter_plain<const Q: i32, const T: usize>(
    w: *const u8,
    x: &[(int8x16_t, int8x16_t); T],
    a: &mut [[int16x8_t; 4]; T],
) {
    let half = |h: usize| nibbles(vld1q_u8(w.add(32 * Q as usize + 16 * h)));
    let (lo0, hi0) = half(0);
    let (lo1, hi1) = half(1);
    let lane = |v: int8x16_t| vreinterpretq_s8_s32(vdupq_laneq_s32::<Q>(vreinterpretq_s32_s8(v)));
    for t in 0..T {
        let (xl, xh) = (lane(x[t].0), lane(x[t].1));
        let a = &mut a[t];
        if Q == 0 {
            a[0] = vmull_s8(vget_low_s8(lo0), vget_low_s8(xl));
            a[1] = vmull_high_s8(lo0, xl);
            a[2] = vmull_s8(vget_low_s8(lo1), vget_low_s8(xl));
            a[3] = vmull_high_s8(lo1, xl);
        } else {
            a[0] = vmlal_s8(a[0], vget_low_s8(lo0), vget_low_s8(xl));
            a[1] = vmlal_high_s8(a[1], lo0, xl);
            a[2] = vmlal_s8(a[2], vget_low_s8(lo1), vget_low_s8(xl));
            a[3] = vmlal_high_s8(a[3], lo1, xl);
        }
        a[0] = vmlal_s8(a[0], vget_low_s8(hi0), vget_low_s8(xh));
        a[1] = vmlal_high_s8(a[1], hi0, xh);
        a[2] = vmlal_s8(a[2], vget_low_s8(hi1), vget_low_s8(xh));
        a[3] = vmlal_high_s8(a[3], hi1, xh);
    }
}

/// One cell's integer sums for T tokens with `sdot`: [t][h] = rows 4h..4h+4, starting from
/// `init[t]` (-8 × the input block's sum).
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn cell_sdot<const T: usize>(
    w: *const u8,
    x: &[(int8x16_t, int8x16_t); T],
    init: [int32x4_t; T],
) -> [[int32x4_t; 2]; T] {
    let mut p = init.map(|v| [v, v]);
    quarter_sdot::<0, T>(w, x, &mut p);
    quarter_sdot::<1, T>(w, x, &mut p);
    quarter_sdot::<2, T>(w, x, &mut p);
    quarter_sdot::<3, T>(w, x, &mut p);
    p
}

/// One cell's integer sums for T tokens without `sdot`, as `cell_sdot`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn cell_plain<const T: usize>(
    w: *const u8,
    x: &[(int8x16_t, int8x16_t); T],
    init: [int32x4_t; T],
) -> [[int32x4_t; 2]; T] {
    let mut a = [[vdupq_n_s16(0); 4]; T];
    quarter_plain::<0, T>(w, x, &mut a);
    quarter_plain::<1, T>(w, x, &mut a);
    quarter_plain::<2, T>(w, x, &mut a);
    quarter_plain::<3, T>(w, x, &mut a);
    let mut p = [[vdupq_n_s32(0); 2]; T];
    for t in 0..T {
        for h in 0..2 {
            // rows 4h..4h+4 in order: `addp` of the int16 sums (two lanes: at most 30720),
            // then `sadalp` adds the pairs of each row into init
            let pairs = vpaddq_s16(a[t][2 * h], a[t][2 * h + 1]);
            p[t][h] = vpadalq_s16(init[t], pairs);
        }
    }
    p
}

macro_rules! packed_kernels {
    ($features:literal, $cell:ident, $wide:literal) => {
        /// One group of 8 rows (`bpr` cells from `c`) × T tokens (inputs, scales and sums of
        /// each token's blocks): [t][h] = token t's outputs of rows 4h..4h+4.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn group_tile<const T: usize>(
            c: *const u8,
            bpr: usize,
            x: [*const BlockQ80; T],
            dx: [*const f32; T],
            s8: [*const i32; T],
        ) -> [[float32x4_t; 2]; T] {
            let mut acc = [[vdupq_n_f32(0.0); 2]; T];
            for b in 0..bpr {
                let cell = c.add(b * CELL);
                prefetch_cell(cell);
                let xs: [(int8x16_t, int8x16_t); T] = std::array::from_fn(|t| {
                    let q = (*x[t].add(b)).qs.as_ptr();
                    (vld1q_s8(q), vld1q_s8(q.add(16)))
                });
                let init: [int32x4_t; T] = std::array::from_fn(|t| vld1q_dup_s32(s8[t].add(b)));
                let p = $cell::<T>(cell.add(16), &xs, init);
                // the 8 rows' f16 scales (bytes 0..16), converted with one fcvtl / fcvtl2
                let d = f16x8_to_f32(cell as *const u16);
                for t in 0..T {
                    let dxt = *dx[t].add(b);
                    for h in 0..2 {
                        let sc = vmulq_n_f32(d[h], dxt);
                        acc[t][h] = vfmaq_f32(acc[t][h], vcvtq_f32_s32(p[t][h]), sc);
                    }
                }
            }
            acc
        }

        /// out (n_tokens, n_rows) = packed Q40 `cells` (n_rows, bpr) × x (n_tokens, bpr) Q80,
        /// group-outer (a group's cells are read from memory once, then stay in cache for
        /// all tokens), `$wide` (4 with sdot, 2 without) tokens per pass over a group (the
        /// unpacked weights serve them all), the rest 2 or 1 at a time.
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
            let (n_rows, _) = packed_shape(cells.len(), bpr, x.len(), out.len(), n_tokens);
            let (dx, s8) = q80_scales_sums(x);
            packed_rows(
                cells,
                bpr,
                n_rows,
                x,
                (&dx, &s8),
                out.as_mut_ptr(),
                n_tokens,
            );
        }

        /// `Kernels::matmul_q40x8_q80_claimed` on this path (its contract): the input's
        /// scales and sums are computed once for all the ranges `claim` hands out.
        ///
        /// # Safety
        /// As `Kernels::matmul_q40x8_q80_claimed`, and the CPU has the features of this
        /// function's `target_feature`.
        #[target_feature(enable = $features)]
        pub unsafe fn matmul_q40x8_q80_claimed(
            cells: &[u8],
            bpr: usize,
            x: &[BlockQ80],
            out: *mut f32,
            n_rows: usize,
            claim: &mut dyn FnMut() -> Option<std::ops::Range<usize>>,
        ) {
            packed_shape(cells.len(), bpr, x.len(), n_rows, 1);
            let (dx, s8) = q80_scales_sums(x);
            for_each_claimed(cells, bpr, n_rows, claim, |cells, r| {
                packed_rows(cells, bpr, r.len(), x, (&dx, &s8), out.add(r.start), 1);
            });
        }

        /// out[t · n_rows + r] = row r of the packed `cells` (`n_rows` rows, `bpr` blocks a
        /// row; shapes checked by the caller) × token t of x, whose scales and sums are
        /// (dx, s8) (`q80_scales_sums`).
        #[target_feature(enable = $features)]
        unsafe fn packed_rows(
            cells: &[u8],
            bpr: usize,
            n_rows: usize,
            x: &[BlockQ80],
            (dx, s8): (&[f32], &[i32]),
            out: *mut f32,
            n_tokens: usize,
        ) {
            let n_groups = n_rows.div_ceil(GROUP);
            debug_assert!(cells.len() >= n_groups * bpr * CELL && x.len() >= n_tokens * bpr);
            let (xp, dp, sp) = (x.as_ptr(), dx.as_ptr(), s8.as_ptr());
            let put = |t: usize, g: usize, v: &[float32x4_t; 2]| {
                let mut o = [0.0f32; GROUP];
                vst1q_f32(o.as_mut_ptr(), v[0]);
                vst1q_f32(o.as_mut_ptr().add(4), v[1]);
                let r0 = g * GROUP;
                let n = GROUP.min(n_rows - r0);
                std::ptr::copy_nonoverlapping(o.as_ptr(), out.add(t * n_rows + r0), n);
            };
            for g in 0..n_groups {
                let c = cells.as_ptr().add(g * bpr * CELL);
                // tokens t.. in one pass over the group: T pointers of each kind, then its rows
                macro_rules! pass {
                    ($t:expr, $n:literal) => {{
                        let o = |k: usize| ($t + k) * bpr;
                        let v = group_tile::<$n>(
                            c,
                            bpr,
                            std::array::from_fn(|k| xp.add(o(k))),
                            std::array::from_fn(|k| dp.add(o(k))),
                            std::array::from_fn(|k| sp.add(o(k))),
                        );
                        for (k, v) in v.iter().enumerate() {
                            put($t + k, g, v);
                        }
                    }};
                }
                let mut t = 0;
                while t < n_tokens {
                    let left = n_tokens - t;
                    if $wide == 4 && left >= 4 {
                        pass!(t, 4);
                        t += 4;
                    } else if left >= 2 {
                        pass!(t, 2);
                        t += 2;
                    } else {
                        pass!(t, 1);
                        t += 1;
                    }
                }
            }
        }
    };
}

pub mod plain {
    use super::*;
    int8_kernels!("neon", dot4_plain);
    packed_kernels!("neon", cell_plain, 2);
}

pub mod dotprod {
    use super::*;
    int8_kernels!("neon,dotprod", dot4_sdot);
    packed_kernels!("neon,dotprod", cell_sdot, 4);
}

/// Four f32 weights at `p`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn load4_f32(p: *const f32) -> float32x4_t {
    vld1q_f32(p)
}

/// Four bf16 weights at `p` (bits), widened to the f32 values they are the high halves of.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn load4_bf16(p: *const u16) -> float32x4_t {
    vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p)))
}

/// The dot product of weights of element type `$t` read by `$load4` (4 at a time) and `$one`
/// as f32 with f32 `x`: one body for f32, f16 and bf16 weights, so that bf16 weights give bit
/// for bit the sums of the same values held as f32 (a MoE router held as bf16).
macro_rules! float_weight_dot {
    ($t:ty, $load4:ident, $one:expr, $dot:ident) => {
        /// # Safety
        /// The CPU has NEON.
        #[target_feature(enable = "neon")]
        #[inline]
        pub unsafe fn $dot(a: &[$t], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (ap, bp) = (a.as_ptr(), b.as_ptr());
            let mut acc = [vdupq_n_f32(0.0); 4];
            let mut i = 0;
            while i + 16 <= n {
                for k in 0..4 {
                    acc[k] = vfmaq_f32(
                        acc[k],
                        $load4(ap.add(i + 4 * k)),
                        vld1q_f32(bp.add(i + 4 * k)),
                    );
                }
                i += 16;
            }
            while i + 4 <= n {
                acc[0] = vfmaq_f32(acc[0], $load4(ap.add(i)), vld1q_f32(bp.add(i)));
                i += 4;
            }
            let mut s = vaddvq_f32(vaddq_f32(
                vaddq_f32(acc[0], acc[1]),
                vaddq_f32(acc[2], acc[3]),
            ));
            while i < n {
                s += $one(a[i]) * b[i];
                i += 1;
            }
            s
        }
    };
}

float_weight_dot!(f32, load4_f32, |v: f32| v, dot_f32);
float_weight_dot!(u16, load4_bf16, bf16_to_f32, dot_bf16);
float_weight_dot!(u16, f16x4_to_f32, f16_to_f32, dot_f16);

/// Four f16 values (bits) to f32 with `fcvtl` (the f16 vector types are not stable Rust).
#[target_feature(enable = "neon")]
#[inline]
unsafe fn f16x4_to_f32(p: *const u16) -> float32x4_t {
    let h = vld1_u16(p);
    let out: float32x4_t;
    asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) out, in(vreg) h, options(pure, nomem, nostack));
    out
}

/// Eight f16 values (bits) to f32 with one `fcvtl` and one `fcvtl2`: [values 0..4, 4..8].
#[target_feature(enable = "neon")]
#[inline]
unsafe fn f16x8_to_f32(p: *const u16) -> [float32x4_t; 2] {
    let h = vld1q_u16(p);
    let (lo, hi): (float32x4_t, float32x4_t);
    asm!("fcvtl {0:v}.4s, {2:v}.4h", "fcvtl2 {1:v}.4s, {2:v}.8h", out(vreg) lo, out(vreg) hi, in(vreg) h, options(pure, nomem, nostack));
    [lo, hi]
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

/// Bit for bit [`matmul_f32`] of the f32 values whose high halves `w` holds.
///
/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
pub unsafe fn matmul_bf16(w: &[u16], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, 1, |w, x| dot_bf16(w, x))
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

/// gate = silu(gate) · up in place, silu(v) = v / (1 + exp(-v)) with `exp4` (16 values at a
/// time), over the shorter length (within a few ulp of the scalar `f32::exp` version).
///
/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (gp, up_p) = (gate.as_mut_ptr(), up.as_ptr());
    let one = vdupq_n_f32(1.0);
    let mut i = 0;
    while i + 16 <= n {
        let v: [float32x4_t; 4] = std::array::from_fn(|k| vld1q_f32(gp.add(i + 4 * k)));
        let e = exp4(v.map(|a| vnegq_f32(a)));
        for k in 0..4 {
            let s = vdivq_f32(v[k], vaddq_f32(one, e[k]));
            vst1q_f32(
                gp.add(i + 4 * k),
                vmulq_f32(s, vld1q_f32(up_p.add(i + 4 * k))),
            );
        }
        i += 16;
    }
    while i < n {
        // 4 values at a time, the last ones padded with zeros
        let m = (n - i).min(4);
        let (mut g, mut u) = ([0.0f32; 4], [0.0f32; 4]);
        g[..m].copy_from_slice(&gate[i..i + m]);
        u[..m].copy_from_slice(&up[i..i + m]);
        let v = vld1q_f32(g.as_ptr());
        let [e] = exp4([vnegq_f32(v)]);
        let s = vmulq_f32(vdivq_f32(v, vaddq_f32(one, e)), vld1q_f32(u.as_ptr()));
        vst1q_f32(g.as_mut_ptr(), s);
        gate[i..i + m].copy_from_slice(&g[..m]);
        i += m;
    }
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
