//! Q40 weights repacked at load time for the x86_64 SIMD kernels (the "interleaved repack"
//! of issue 5, as llama.cpp's q4_0 8x8): groups of 8 rows, block column by block column.
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
//! Rows past the last multiple of 8 are padded with zero blocks (scale 0).

use super::block::{BlockQ40, QK};
use crate::{Error, Result};

/// Rows per interleaved group.
pub const GROUP: usize = 8;
/// Bytes per (group, block column).
pub const CELL: usize = 16 + GROUP * 16;

pub struct PackedQ40 {
    n_rows: usize,
    bpr: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedQ40 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedQ40({} x {})", self.n_rows, self.cols())
    }
}

impl PackedQ40 {
    /// Repack `w` (n_rows, cols) Q40 rows.
    pub fn pack(w: &[BlockQ40], n_rows: usize, cols: usize) -> Result<PackedQ40> {
        if !cols.is_multiple_of(QK) || w.len() != n_rows * (cols / QK) {
            return Err(Error::invalid(format!(
                "pack_q40: {} blocks are not ({n_rows}, {cols}) Q40 weights",
                w.len()
            )));
        }
        let bpr = cols / QK;
        let n_groups = n_rows.div_ceil(GROUP);
        let mut data = vec![0u8; n_groups * bpr * CELL];
        let pad = BlockQ40 {
            d: 0,
            qs: [0x88; 16],
        };
        for g in 0..n_groups {
            for b in 0..bpr {
                let cell = &mut data[(g * bpr + b) * CELL..(g * bpr + b + 1) * CELL];
                for j in 0..GROUP {
                    let r = g * GROUP + j;
                    let blk = if r < n_rows { &w[r * bpr + b] } else { &pad };
                    cell[2 * j..2 * j + 2].copy_from_slice(&blk.d.to_le_bytes());
                    for q in 0..4 {
                        let o = 16 + 32 * q + 4 * j;
                        cell[o..o + 4].copy_from_slice(&blk.qs[4 * q..4 * q + 4]);
                    }
                }
            }
        }
        Ok(PackedQ40 { n_rows, bpr, data })
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
