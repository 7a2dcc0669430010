//! x86_64 Q40 × Q80 kernels: AVX2 + FMA + F16C, and the same kernels with the AVX-VNNI /
//! AVX-512 VNNI int8 dot product (`vpdpbusd`) in place of `vpmaddubsw` + `vpmaddwd`; for the
//! plain Q40 layout and for the packed one (`packed.rs`).
//!
//! Trick: a Q40 weight is (n - 8) with n in 0..16 unsigned, so per block
//! sum (n - 8) * x = sum n * x - 8 * sum x. `n * x` is an unsigned × signed byte product
//! (exactly what `vpmaddubsw` / `vpdpbusd` take, no sign juggling), and `8 * sum x` depends
//! on the input only: it is computed once per matmul per input block (`XPrep`) and subtracted
//! in the integer domain.
//!
//! All loads are unaligned: Q40 blocks are 18 bytes and live in the memory-mapped file.
//! Every function here is `unsafe`: the caller guarantees the CPU has the features named in
//! its `target_feature` attribute (`dispatch` checks them once).

#![allow(clippy::needless_range_loop)] // lanes and unrolled accumulators read best indexed

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::avx2::{hsum, prefetch, prefetch_ahead, scale8};
use super::block::{BlockQ40, BlockQ80, QK};
use super::packed::{
    for_each_claimed, take_next_stream, PassPlan, CELL, GEN_PREFETCH_AHEAD, GROUP,
};
use super::shape::matmul_rows;

/// The 32 nibbles of a Q40 block as bytes 0..16: values 0..16 in the low lane (low nibbles),
/// 16..32 in the high lane (high nibbles), matching the Q80 value order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q40_nibbles(b: *const BlockQ40) -> __m256i {
    let q = _mm_loadu_si128((*b).qs.as_ptr() as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
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
    let n = x.len();
    p.dx.resize(n, 0.0);
    p.corr.resize(n, _mm256_setzero_si256());
    p.ncorr.resize(n, 0);
    let eight = _mm256_set1_epi8(8);
    let ones = _mm256_set1_epi16(1);
    for (i, b) in x.iter().enumerate() {
        // 8 · (sums of 4 consecutive values), and -8 · sum x as their sum, negated (exact)
        let xv = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
        let c = _mm256_madd_epi16(_mm256_maddubs_epi16(eight, xv), ones);
        let s = _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        p.corr[i] = c;
        p.ncorr[i] = -_mm_cvtsi128_si32(s);
        // the f16 scale, converted exactly (F16C)
        p.dx[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(b.d as i32)));
    }
}

// ---------------------------------------------------------------------------------------
// Q40 × Q80, generated for each int8 dot instruction: `$expand8` turns a 32-byte vector of a
// packed cell into the two operands of the 4 steps, `$init8(ncorr)` gives the sums they
// start from, `$step8` adds a step, `$dot8(sums, ncorr)` gives the 8 rows' integer dot
// products (the correction -8 sum x goes in at `$init8` or at `$dot8`).

macro_rules! q40_q80_kernels {
    (
        $features:literal,
        $dot:ident,
        $expand8:ident,
        $init8:ident,
        $step8:ident,
        $dot8:ident,
        $gen_ahead:expr
    ) => {
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
                prefetch_ahead(c, CELL);
                let mut lo = [_mm256_setzero_si256(); 4];
                let mut hi = [_mm256_setzero_si256(); 4];
                for q in 0..4 {
                    let v = _mm256_loadu_si256(c.add(16 + 32 * q) as *const __m256i);
                    (lo[q], hi[q]) = $expand8(v, m4);
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(c as *const __m128i));
                for t in 0..T {
                    let i = t * bpr + b;
                    let xq = (*x.add(i)).qs.as_ptr() as *const i32;
                    let mut s = $init8(*nc.add(i));
                    for q in 0..4 {
                        let xl = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(q)));
                        let xh = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(4 + q)));
                        $step8(&mut s, lo[q], hi[q], xl, xh);
                    }
                    let p = $dot8(s, *nc.add(i));
                    let s = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*dx.add(i)));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[t]);
                }
            }
            acc
        }

        /// Columns `b0..b1` of G packed groups (8·G rows, `s.apart` bytes apart) × one token,
        /// added into `acc`: each input block's 8 broadcasts, its scale and its correction
        /// are shared by the G cells of a block column; lane j of `acc[g]` is row j of group
        /// g. Per row the same integer sums and f32 operations as `packed_tile::<1>`. Each
        /// group is a stream read `AHEAD` bytes behind its prefetches, which are `skip` bytes
        /// further on still. `CHECKED`: some of these prefetches may lie past the end of the
        /// cells and go through `Streams::ahead`; otherwise none does, and the addresses are
        /// used as they are (the same addresses, fewer instructions).
        #[target_feature(enable = $features)]
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn packed_columns<const G: usize, const AHEAD: usize, const CHECKED: bool>(
            gc: *const u8,
            s: &Streams,
            (b0, b1, skip): (usize, usize, usize),
            x: *const BlockQ80,
            dx: *const f32,
            nc: *const i32,
            acc: &mut [__m256; G],
        ) {
            let apart = s.apart;
            let m4 = _mm256_set1_epi8(0x0F);
            for b in b0..b1 {
                let xq = (*x.add(b)).qs.as_ptr() as *const i32;
                let init = $init8(*nc.add(b));
                let mut sums = [init; G];
                let t = gc as usize + b * CELL + AHEAD + skip;
                for g in 0..G {
                    let a = t + g * apart;
                    prefetch(if CHECKED { s.ahead(a) } else { a as *const u8 }, CELL);
                }
                for q in 0..4 {
                    let xl = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(q)));
                    let xh = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(4 + q)));
                    for g in 0..G {
                        let c = gc.add(g * apart + b * CELL);
                        let v = _mm256_loadu_si256(c.add(16 + 32 * q) as *const __m256i);
                        let (lo, hi) = $expand8(v, m4);
                        $step8(&mut sums[g], lo, hi, xl, xh);
                    }
                }
                let d = _mm256_broadcast_ss(&*dx.add(b));
                for g in 0..G {
                    let c = gc.add(g * apart + b * CELL);
                    let p = $dot8(sums[g], *nc.add(b));
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(c as *const __m128i));
                    acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, d), acc[g]);
                }
            }
        }

        /// G packed groups (8·G rows from `gc`, `s.apart` bytes apart) × one token, all
        /// `bpr` columns (`packed_columns`): the prefetches run AHEAD along each group's
        /// stream; from the column where that passes the group's end, into the group the
        /// next pass reads in its place (not the neighbour that this pass reads already).
        /// Only the columns whose prefetches may reach past the end of the cells check them.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn packed_groups<const G: usize, const AHEAD: usize>(
            gc: *const u8,
            s: &Streams,
            bpr: usize,
            x: *const BlockQ80,
            dx: *const f32,
            nc: *const i32,
        ) -> [__m256; G] {
            let apart = s.apart;
            let mut acc = [_mm256_setzero_ps(); G];
            let b_skip = apart.saturating_sub(AHEAD).div_ceil(CELL).min(bpr);
            for (b0, b1, skip) in [(0, b_skip, 0), (b_skip, bpr, (G - 1) * apart)] {
                // the first column whose farthest prefetch (group G - 1, CELL bytes) ends
                // past the cells
                let far = gc as usize + AHEAD + skip + (G - 1) * apart + CELL;
                let bc = if far > s.end {
                    b0
                } else {
                    ((s.end - far) / CELL + 1).clamp(b0, b1)
                };
                packed_columns::<G, AHEAD, false>(gc, s, (b0, bc, skip), x, dx, nc, &mut acc);
                packed_columns::<G, AHEAD, true>(gc, s, (bc, b1, skip), x, dx, nc, &mut acc);
            }
            acc
        }

        /// One token through `n_rows` rows of packed groups `cells`, into `out[..n_rows]`,
        /// read as 4 streams: the groups are cut into 4 parts of k consecutive groups, and
        /// pass i multiplies group i of every part (`packed_groups::<4>`), so each stream
        /// reads its part in memory order, its prefetches AHEAD bytes ahead running on into
        /// the part's next group. k is odd, so the streams' distance k · gstride is no
        /// multiple of 4 KiB unless bpr is a multiple of 256 (gstride = bpr · 2^4 · 9):
        /// streams a multiple of 4 KiB apart share cache sets and DRAM banks. The groups left
        /// over are cut the same way; the last 3 or fewer go one at a time. `next`: where the
        /// prefetches past the end go (`set_next_stream`). On a Sapphire Rapids-class Xeon
        /// 10–20% faster at one thread than 4 neighbouring groups a pass prefetched 32 KiB
        /// ahead, and faster than 8 parts (benchmarks/README.md).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn packed_one_token(
            cells: &[u8],
            bpr: usize,
            n_rows: usize,
            p: &XPrep,
            x: &[BlockQ80],
            next: (usize, usize),
            out: *mut f32,
        ) {
            let n_groups = n_rows.div_ceil(GROUP);
            debug_assert!(cells.len() >= n_groups * bpr * CELL);
            let store = |g: usize, v: __m256| store_group(out, n_rows, g, v);
            const AHEAD: usize = $gen_ahead;
            let gstride = bpr * CELL;
            let streams = Streams {
                apart: gstride,
                end: cells.as_ptr() as usize + n_groups * gstride,
                next,
            };
            let (xp, dx, nc) = (x.as_ptr(), p.dx.as_ptr(), p.ncorr.as_ptr());
            let mut g = 0;
            while n_groups - g >= 4 {
                let k = PassPlan::new(g..n_groups).k;
                let parts = Streams {
                    apart: k * gstride,
                    ..streams
                };
                let base = cells.as_ptr().add(g * gstride);
                for i in 0..k {
                    let gc = base.add(i * gstride);
                    let v = packed_groups::<4, AHEAD>(gc, &parts, bpr, xp, dx, nc);
                    for (q, &vq) in v.iter().enumerate() {
                        store(g + q * k + i, vq);
                    }
                }
                g += 4 * k;
            }
            while g < n_groups {
                let gc = cells.as_ptr().add(g * gstride);
                store(
                    g,
                    packed_groups::<1, AHEAD>(gc, &streams, bpr, xp, dx, nc)[0],
                );
                g += 1;
            }
        }

        /// One token, the rows handed out by `claim` (ranges of rows starting on a multiple
        /// of 8, until it returns `None`): out[r] = row r of the packed `cells` (all the
        /// groups of a matrix of `n_rows` rows) × x. The input is prepared once for all the
        /// claimed ranges.
        ///
        /// # Safety
        /// The CPU has the features of this function's `target_feature`; `out` holds `n_rows`
        /// values, and no other thread touches the rows `claim` gives this one.
        #[target_feature(enable = $features)]
        pub unsafe fn matmul_q40x8_q80_claimed(
            cells: &[u8],
            bpr: usize,
            x: &[BlockQ80],
            out: *mut f32,
            n_rows: usize,
            claim: &mut dyn FnMut() -> Option<std::ops::Range<usize>>,
        ) {
            crate::kernels::shape::packed_shape(cells.len(), bpr, x.len(), n_rows, 1);
            // a hint is for the whole matrix on one thread, not for these ranges: dropped
            take_next_stream();
            XPREP.with(|p| {
                let mut p = p.borrow_mut();
                prepare_x(x, &mut p);
                for_each_claimed(cells, bpr, n_rows, claim, |cells, r| {
                    packed_one_token(cells, bpr, r.len(), &p, x, (0, 0), out.add(r.start));
                });
            });
        }

        /// One token, the items handed out by `claim` ((plan, items) of some thread's
        /// `PassPlan`, until it returns `None`): out[r] = row r of the packed `cells` (all
        /// the groups of a matrix of `n_rows` rows) × x, for the rows of those items. A
        /// thread's consecutive passes continue the same 4 streams, so its claims may be
        /// small at no cost to the streams. The input is prepared once for all the items.
        ///
        /// # Safety
        /// The CPU has the features of this function's `target_feature`; `out` holds `n_rows`
        /// values, and no other thread touches the rows of the items `claim` gives this one.
        #[target_feature(enable = $features)]
        pub unsafe fn matmul_q40x8_q80_passes(
            cells: &[u8],
            bpr: usize,
            x: &[BlockQ80],
            out: *mut f32,
            n_rows: usize,
            claim: &mut dyn FnMut() -> Option<(PassPlan, std::ops::Range<usize>)>,
        ) {
            let n_groups =
                crate::kernels::shape::packed_shape(cells.len(), bpr, x.len(), n_rows, 1).1;
            take_next_stream();
            const AHEAD: usize = $gen_ahead;
            let gstride = bpr * CELL;
            let base = cells.as_ptr();
            let end = base as usize + n_groups * gstride;
            let store = |g: usize, v: __m256| store_group(out, n_rows, g, v);
            XPREP.with(|p| {
                let mut p = p.borrow_mut();
                prepare_x(x, &mut p);
                let (xp, dx, nc) = (x.as_ptr(), p.dx.as_ptr(), p.ncorr.as_ptr());
                while let Some((plan, items)) = claim() {
                    assert!(
                        plan.end() <= n_groups && items.end <= plan.items(),
                        "claimed items {items:?} of {plan:?} in {n_groups} groups"
                    );
                    let parts = Streams {
                        apart: plan.k * gstride,
                        end,
                        next: (0, 0),
                    };
                    for i in items.start..items.end.min(plan.k) {
                        let g = plan.g0 + i;
                        let v = packed_groups::<4, AHEAD>(
                            base.add(g * gstride),
                            &parts,
                            bpr,
                            xp,
                            dx,
                            nc,
                        );
                        for (s, &vs) in v.iter().enumerate() {
                            store(g + s * plan.k, vs);
                        }
                    }
                    let one = Streams {
                        apart: gstride,
                        end,
                        next: (0, 0),
                    };
                    for i in items.start.max(plan.k)..items.end {
                        let g = plan.single(i);
                        store(
                            g,
                            packed_groups::<1, AHEAD>(base.add(g * gstride), &one, bpr, xp, dx, nc)
                                [0],
                        );
                    }
                }
            });
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
            let (n_rows, n_groups) =
                crate::kernels::shape::packed_shape(cells.len(), bpr, x.len(), out.len(), n_tokens);
            // the hint is this call's (whatever the token count), not a later one's
            let next = take_next_stream();
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
                if n_tokens == 1 {
                    packed_one_token(cells, bpr, n_rows, &p, x, next, out.as_mut_ptr());
                    return;
                }
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
            let (n_rows, bpr, _) =
                crate::kernels::shape::kernel_shape(w.len(), x.len(), out.len(), n_tokens, 1);
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

/// Group g's 8 outputs (the lanes of `v`, row j in lane j) into out[8g..], those of rows
/// below `n_rows` only (the last group may be partial).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store_group(out: *mut f32, n_rows: usize, g: usize, v: __m256) {
    let rows = GROUP.min(n_rows - g * GROUP);
    if rows == GROUP {
        _mm256_storeu_ps(out.add(g * GROUP), v);
    } else {
        let mut lanes = [0.0f32; GROUP];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(g * GROUP), rows);
    }
}

/// Where the one-token packed kernels' streams and prefetches go: the G streams of a pass
/// start `apart` bytes from each other (neighbouring groups, or the parts of a matrix); past
/// `end` (the end of this matmul's cells), prefetches go into `next` (address, length:
/// `set_next_stream`).
struct Streams {
    apart: usize,
    end: usize,
    next: (usize, usize),
}

impl Streams {
    /// The address to prefetch for `t`, which may lie past the end of the cells (a prefetch
    /// never faults, whatever the address).
    #[inline(always)]
    fn ahead(&self, t: usize) -> *const u8 {
        let past = t.wrapping_sub(self.end);
        if t >= self.end && past < self.next.1 {
            (self.next.0 + past) as *const u8
        } else {
            t as *const u8
        }
    }
}

/// A packed cell's vector V_q as the unsigned bytes `vpmaddubsw` multiplies: its low
/// nibbles and its high nibbles (`m4` = 0x0F in every byte).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn expand8_nibbles(v: __m256i, m4: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_and_si256(v, m4),
        _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
    )
}

/// A packed cell's vector V_q as the unsigned bytes `vpdpbusd` multiplies: its low nibbles,
/// and its high nibbles left in place, i.e. 16 times their value (one `vpandn` where
/// `expand8_nibbles` takes a shift and an `and`; `m4` = 0x0F in every byte). A lane sums 16
/// products of at most 240 · 128 a block, far inside an i32, and the high sums, multiples of
/// 16, come back exactly with an arithmetic shift (`dot8_vnni`). With `dot8_vnni`'s `$init`,
/// 16% more one-token throughput with the matrix in cache on a Sapphire Rapids-class Xeon
/// (40.5 → 47.2 GB/s); from memory the same there, where one thread is bandwidth-bound
/// (benchmarks/README.md).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn expand8_high_in_place(v: __m256i, m4: __m256i) -> (__m256i, __m256i) {
    (_mm256_and_si256(v, m4), _mm256_andnot_si256(m4, v))
}

/// One step of the 8 rows' integer dot products of a packed cell with an input block: `lo`,
/// `hi` = the cell's vector V_q expanded (`expand8_nibbles`), `xl`, `xh` = input bytes
/// 4q..4q+4 and 16+4q..16+4q+4 broadcast; `s` partial sums (from `init8_maddubs`, finished
/// by `dot8_maddubs`). With `vpmaddubsw`: 8 · 2 products of at most 15 · 128 summed in i16
/// over the 4 steps stay below 32768, so one accumulator holds them all (`s[1]` stays 0;
/// with 4 groups per pass the registers then suffice).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn step8_maddubs(s: &mut [__m256i; 2], lo: __m256i, hi: __m256i, xl: __m256i, xh: __m256i) {
    let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
    s[0] = _mm256_add_epi16(s[0], p);
}

/// The sums `step8_maddubs` starts from: none (the correction is added at the end).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn init8_maddubs(_ncorr: i32) -> [__m256i; 2] {
    [_mm256_setzero_si256(); 2]
}

/// The 8 rows' dot products from the 4 steps' sums: lane j = sum n_j * x - 8 sum x.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot8_maddubs(s: [__m256i; 2], ncorr: i32) -> __m256i {
    let p = _mm256_madd_epi16(_mm256_add_epi16(s[0], s[1]), _mm256_set1_epi16(1));
    _mm256_add_epi32(p, _mm256_set1_epi32(ncorr))
}

macro_rules! dot8_vnni {
    ($init:ident, $step:ident, $finish:ident, $features:literal, $dpbusd:ident) => {
        /// The sums the `vpdpbusd` steps start from: the low chain from the correction
        /// -8 sum x (so no add at the end), the high one from 0.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $init(ncorr: i32) -> [__m256i; 2] {
            [_mm256_set1_epi32(ncorr), _mm256_setzero_si256()]
        }

        /// As `step8_maddubs`, with `vpdpbusd` (two independent chains, in i32), `hi` being
        /// 16 times the high nibbles (`expand8_high_in_place`).
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $step(s: &mut [__m256i; 2], lo: __m256i, hi: __m256i, xl: __m256i, xh: __m256i) {
            s[0] = $dpbusd(s[0], lo, xl);
            s[1] = $dpbusd(s[1], hi, xh);
        }

        /// As `dot8_maddubs`, the correction being in the low sums already (`$init`); the
        /// high sums, 16 times the high nibbles' (a multiple of 16), divided back exactly.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $finish(s: [__m256i; 2], _ncorr: i32) -> __m256i {
            _mm256_add_epi32(s[0], _mm256_srai_epi32(s[1], 4))
        }
    };
}

dot8_vnni!(
    init8_avxvnni,
    step8_avxvnni,
    dot8_avxvnni,
    "avx2,fma,f16c,avxvnni",
    _mm256_dpbusd_avx_epi32
);
dot8_vnni!(
    init8_avx512vnni,
    step8_avx512vnni,
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
    q40_q80_kernels!(
        "avx2,fma,f16c",
        dot_maddubs,
        expand8_nibbles,
        init8_maddubs,
        step8_maddubs,
        dot8_maddubs,
        GEN_PREFETCH_AHEAD
    );
}

/// sum n * x - corr with AVX-VNNI `vpdpbusd` (VEX encoding: Alder Lake+, Zen 5).
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
unsafe fn dot_avxvnni(nib: __m256i, xv: __m256i, corr: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), corr), nib, xv)
}

pub mod avxvnni {
    use super::*;
    q40_q80_kernels!(
        "avx2,fma,f16c,avxvnni",
        dot_avxvnni,
        expand8_high_in_place,
        init8_avxvnni,
        step8_avxvnni,
        dot8_avxvnni,
        GEN_PREFETCH_AHEAD
    );
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
        expand8_high_in_place,
        init8_avx512vnni,
        step8_avx512vnni,
        dot8_avx512vnni,
        GEN_PREFETCH_AHEAD
    );
}

pub use maddubs::matmul_q40_q80;

// ---------------------------------------------------------------------------------------
// Q40 × F32 (the f32-buffer mode)

/// Dot product of one Q40 row with f32 values: each block's 32 values are widened to f32
/// and multiplied exactly as the scalar `dot_q40_f32` (sum in f32, times the block scale).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_q40_f32(w: &[BlockQ40], x: &[f32]) -> f32 {
    let eight = _mm256_set1_epi8(8);
    let mut acc = _mm256_setzero_ps();
    for (b, blk) in w.iter().enumerate() {
        let v = _mm256_sub_epi8(q40_nibbles(blk), eight); // 32 signed values in value order
        let xp = x.as_ptr().add(b * QK);
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256(v, 1);
        let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
        let mut s = _mm256_setzero_ps();
        for (k, &p) in parts.iter().enumerate() {
            let wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(p));
            s = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xp.add(8 * k)), s);
        }
        acc = _mm256_fmadd_ps(s, scale8(blk.d), acc);
    }
    hsum(acc)
}

/// out (n_tokens, n_rows) = w (n_rows, bpr) Q40 × x (n_tokens, cols) F32.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matmul_q40_f32(w: &[BlockQ40], x: &[f32], out: &mut [f32], n_tokens: usize) {
    matmul_rows(w, x, out, n_tokens, QK, |w, x| dot_q40_f32(w, x))
}
