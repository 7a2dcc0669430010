//! Q40 weights repacked at load time for the SIMD kernels (an "interleaved repack",
//! as llama.cpp's q4_0 8x8): groups of 8 rows, block column by block column.
//!
//! Per (group g, block column b), 144 bytes at ((g · bpr) + b) · 144:
//! - bytes 0..16: the 8 rows' f16 scales, row j at 2j (one `vcvtph2ps` gives all 8);
//! - bytes 16..144: four 32-byte vectors V_q (q = 0..4): lane j (bytes 4j..4j+4) of V_q is
//!   bytes 4q..4q+4 of row j's Q40 `qs`, i.e. values 4q..4q+4 in the low nibbles and
//!   16+4q..16+4q+4 in the high nibbles.
//!
//! So one 32-byte load feeds 8 rows at once, each lane's 4-byte dot product lands in that row's
//! i32 lane (`vpdpbusd` / `vpmaddubsw` against the 4 input bytes broadcast), the 8 results
//! come out as one vector with no horizontal sum, and the size stays 18 bytes per 32 weights.
//! On aarch64 each 16-byte half of V_q feeds 4 rows (`sdot` by element, or `smull`/`smlal`).
//! Rows past the last multiple of 8 are padded with zero blocks (scale 0).

use super::block::{BlockQ40, QK};
use crate::memory::LargeBytes;
use crate::pool::{split_range, ThreadPool};
use crate::{Error, Result};

/// Rows per interleaved group.
pub const GROUP: usize = 8;
/// Bytes per (group, block column).
pub const CELL: usize = 16 + GROUP * 16;
/// How far ahead of the cell being multiplied the packed kernels prefetch, in bytes.
/// The cells are one sequential stream, but the hardware prefetchers stop at each 4 KiB page
/// and let it run dry. 8 KiB was the best distance swept with the benchmarks (figures in
/// benchmarks/README.md).
pub const PREFETCH_AHEAD: usize = 8192;
/// How far ahead along each of its 4 streams (the 4 parts of the matrix) the x86 one-token
/// kernels prefetch. On a Sapphire Rapids-class Xeon 2–3 KiB read fastest (1 KiB and 4 KiB
/// 3–8% slower; the 32 KiB of the earlier 4-neighbouring-group passes, swept on Zen 3, 10–20%
/// slower: benchmarks/README.md).
pub const GEN_PREFETCH_AHEAD: usize = 2048;

thread_local! {
    /// (address, length) of the cells this thread multiplies after its next one-token packed
    /// matmul (see `set_next_stream`); (0, 0) when unknown.
    static NEXT_STREAM: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// Tell the one-token packed kernels which matrix the calling thread multiplies right after
/// its next packed matmul: the prefetches that run past the end of that matmul's cells go on
/// into the first cells of `next` (so its first pass starts warm) instead of into whatever
/// memory follows. Only a hint, on this thread, taken by its next packed matmul; it changes
/// no result. For matmuls that run on the calling thread alone (a one-thread pool).
pub fn set_next_stream(next: &PackedQ40) {
    let cells = next.groups(0, next.n_groups());
    NEXT_STREAM.with(|n| n.set((cells.as_ptr() as usize, cells.len())));
}

/// The hint of `set_next_stream`, cleared (the x86 kernels take it; NEON's do not yet).
#[cfg(target_arch = "x86_64")]
pub(crate) fn take_next_stream() -> (usize, usize) {
    NEXT_STREAM.with(|n| n.replace((0, 0)))
}

/// Run `f(rows_cells, rows)` for every range of rows `claim` hands out until it returns
/// `None`, `rows_cells` being the cells of those rows among `cells`, all the groups of a
/// packed matrix of `n_rows` rows of `bpr` blocks (the claimed kernel entries,
/// `Kernels::matmul_q40x8_q80_claimed`); panics on a range that does not start on a group or
/// ends past `n_rows`.
pub(crate) fn for_each_claimed(
    cells: &[u8],
    bpr: usize,
    n_rows: usize,
    claim: &mut dyn FnMut() -> Option<std::ops::Range<usize>>,
    mut f: impl FnMut(&[u8], std::ops::Range<usize>),
) {
    while let Some(rows) = claim() {
        assert!(
            rows.start.is_multiple_of(GROUP) && rows.start <= rows.end && rows.end <= n_rows,
            "claimed rows {rows:?} of {n_rows}"
        );
        f(
            &cells[rows.start / GROUP * bpr * CELL..rows.end.div_ceil(GROUP) * bpr * CELL],
            rows,
        );
    }
}

/// One thread's share of a one-token packed matmul (groups `g0..g0 + 4k + singles`), cut
/// into the items the x86 kernels claim (`Kernels::matmul_q40x8_q80_passes`): items `0..k`
/// are passes, pass p reading groups g0 + p + s·k for s in 0..4 (4 streams, each going
/// through its quarter of the share in memory order, so consecutive passes continue the
/// same streams and their prefetches); items `k..` are the groups left over, one each.
/// k is odd (see `packed_one_token`), so up to 7 groups are left over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassPlan {
    pub g0: usize,
    pub k: usize,
    pub singles: usize,
}

impl PassPlan {
    /// The plan of the groups `groups`.
    pub fn new(groups: std::ops::Range<usize>) -> PassPlan {
        let n = groups.len();
        let k = n / 4;
        let k = if k.is_multiple_of(2) {
            k.saturating_sub(1)
        } else {
            k
        };
        PassPlan {
            g0: groups.start,
            k,
            singles: n - 4 * k,
        }
    }

    /// Items in all: passes, then single groups.
    pub fn items(&self) -> usize {
        self.k + self.singles
    }

    /// One past the last group.
    pub fn end(&self) -> usize {
        self.g0 + 4 * self.k + self.singles
    }

    /// The group of item `i >= k` (one of those left over after the passes).
    pub fn single(&self, i: usize) -> usize {
        self.g0 + 3 * self.k + i
    }

    /// The groups of `items`, appended to `out` (pass by pass, stream by stream).
    pub fn groups_of(&self, items: std::ops::Range<usize>, out: &mut Vec<usize>) {
        for i in items {
            if i < self.k {
                out.extend((0..4).map(|s| self.g0 + i + s * self.k));
            } else {
                out.push(self.single(i));
            }
        }
    }
}

pub struct PackedQ40 {
    n_rows: usize,
    bpr: usize,
    /// Huge-page backed where the system allows (see `LargeBytes`): the kernels read it
    /// once per token as a few long streams.
    data: LargeBytes,
}

impl std::fmt::Debug for PackedQ40 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedQ40({} x {})", self.n_rows, self.cols())
    }
}

impl PackedQ40 {
    /// Repack `w` (n_rows, cols) Q40 rows on the calling thread.
    pub fn pack(w: &[BlockQ40], n_rows: usize, cols: usize) -> Result<PackedQ40> {
        let (bpr, mut data) = Self::alloc(w, n_rows, cols)?;
        pack_groups(w, n_rows, bpr, 0, &mut data);
        Ok(PackedQ40 { n_rows, bpr, data })
    }

    /// Repack with every thread of `pool` (each thread packs a run of groups).
    pub fn pack_with(
        pool: &mut ThreadPool,
        w: &[BlockQ40],
        n_rows: usize,
        cols: usize,
    ) -> Result<PackedQ40> {
        let (bpr, mut data) = Self::alloc(w, n_rows, cols)?;
        let n_groups = n_rows.div_ceil(GROUP);
        let group_bytes = bpr * CELL;
        let base = SharedBytes(data.as_mut_ptr());
        pool.run(|i, n| {
            let r = split_range(n_groups, i, n, 1);
            if r.is_empty() {
                return;
            }
            // SAFETY: threads get disjoint group ranges of `data`, which outlives the run
            let mine = unsafe {
                std::slice::from_raw_parts_mut(
                    base.at(r.start * group_bytes),
                    r.len() * group_bytes,
                )
            };
            pack_groups(w, n_rows, bpr, r.start, mine);
        });
        Ok(PackedQ40 { n_rows, bpr, data })
    }

    fn alloc(w: &[BlockQ40], n_rows: usize, cols: usize) -> Result<(usize, LargeBytes)> {
        if !cols.is_multiple_of(QK) || w.len() != n_rows * (cols / QK) {
            return Err(Error::invalid(format!(
                "pack_q40: {} blocks are not ({n_rows}, {cols}) Q40 weights",
                w.len()
            )));
        }
        let bpr = cols / QK;
        Ok((
            bpr,
            LargeBytes::zeroed(n_rows.div_ceil(GROUP) * bpr * CELL)?,
        ))
    }

    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    pub fn cols(&self) -> usize {
        self.bpr * QK
    }
    /// Blocks per row.
    pub fn bpr(&self) -> usize {
        self.bpr
    }
    pub fn n_groups(&self) -> usize {
        self.n_rows.div_ceil(GROUP)
    }
    /// The cells of groups `g0..g1`.
    pub fn groups(&self, g0: usize, g1: usize) -> &[u8] {
        &self.data[g0 * self.bpr * CELL..g1 * self.bpr * CELL]
    }

    /// Row `r` back as Q40 blocks (tests, and the portable kernel).
    pub fn unpack_row(&self, r: usize, out: &mut [BlockQ40]) {
        let (g, j) = (r / GROUP, r % GROUP);
        for (b, blk) in out.iter_mut().enumerate().take(self.bpr) {
            let cell = &self.data[(g * self.bpr + b) * CELL..];
            blk.d = u16::from_le_bytes([cell[2 * j], cell[2 * j + 1]]);
            for q in 0..4 {
                let o = 16 + 32 * q + 4 * j;
                blk.qs[4 * q..4 * q + 4].copy_from_slice(&cell[o..o + 4]);
            }
        }
    }
}

/// A raw pointer that may cross to the pool's threads (disjoint ranges only).
#[derive(Clone, Copy)]
struct SharedBytes(*mut u8);
unsafe impl Send for SharedBytes {}
unsafe impl Sync for SharedBytes {}
impl SharedBytes {
    fn at(self, offset: usize) -> *mut u8 {
        self.0.wrapping_add(offset)
    }
}

/// Pack the groups g0.. of `w` into `out` (whole groups of `bpr` cells).
fn pack_groups(w: &[BlockQ40], n_rows: usize, bpr: usize, g0: usize, out: &mut [u8]) {
    let pad = BlockQ40 {
        d: 0,
        qs: [0x88; 16],
    };
    for (gi, group) in out.chunks_exact_mut(bpr * CELL).enumerate() {
        let g = g0 + gi;
        // rows past n_rows (the last group's padding) are zero blocks
        let rows: [Option<&[BlockQ40]>; GROUP] = std::array::from_fn(|j| {
            let r = g * GROUP + j;
            (r < n_rows).then(|| &w[r * bpr..(r + 1) * bpr])
        });
        for (b, cell) in group.chunks_exact_mut(CELL).enumerate() {
            let mut c = [0u8; CELL];
            for (j, row) in rows.iter().enumerate() {
                let blk = row.map_or(&pad, |row| &row[b]);
                c[2 * j..2 * j + 2].copy_from_slice(&blk.d.to_le_bytes());
                for q in 0..4 {
                    let o = 16 + 32 * q + 4 * j;
                    c[o..o + 4].copy_from_slice(&blk.qs[4 * q..4 * q + 4]);
                }
            }
            cell.copy_from_slice(&c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PassPlan;

    #[test]
    fn a_pass_plan_covers_its_groups_once_in_4_streams_of_an_odd_length() {
        for start in [0, 3, 64] {
            for n in 0..70 {
                let p = PassPlan::new(start..start + n);
                assert!(p.k % 2 == 1 || p.k == 0, "{n}: k {}", p.k);
                assert!(p.singles <= 7 && (n < 4 || p.k > 0), "{n}: {p:?}");
                assert_eq!(p.end(), start + n);
                let mut groups = Vec::new();
                p.groups_of(0..p.items(), &mut groups);
                // pass i: group i of each quarter
                for i in 0..p.k {
                    let s: Vec<usize> = (0..4).map(|q| start + i + q * p.k).collect();
                    assert_eq!(groups[4 * i..4 * i + 4], s[..], "{n}: pass {i}");
                }
                groups.sort_unstable();
                assert_eq!(groups, (start..start + n).collect::<Vec<_>>(), "{n}");
            }
        }
    }
}
