//! A weight matrix of this node: its type, shape and bytes, either memory-mapped from the
//! model file (no copy) or owned (a column slice, or bytes shipped by the root).

use std::ops::Range;
use std::sync::Arc;

use super::config::{bytes_for, is_quantized};
use crate::format::FloatType;
use crate::kernels::block::{as_q40, as_q80, f32_to_bf16_exact};
use crate::kernels::{BlockQ40, BlockQ80, PackedQ40};
use crate::memory::LargeBytes;
use crate::pool::ThreadPool;
use crate::{Error, Result};

/// Something that holds bytes for as long as it lives (a mapped file, an owned buffer).
pub trait ByteSource: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// A hint that `range` will not be read for a while (a mapped file drops those pages
    /// from this process; they come back from the file if read again).
    fn release(&self, _range: Range<usize>) {}
}

/// Owned bytes with 8-byte alignment, so f32 / f16 / block views are always valid (a column
/// slice, bytes shipped by the root).
#[derive(Clone, Default)]
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    /// `len` zero bytes; an error rather than an abort when the memory is not there.
    pub fn with_len(len: usize) -> Result<AlignedBytes> {
        let mut a = AlignedBytes::reserve(len)?;
        a.words.resize(len.div_ceil(8), 0);
        a.len = len;
        Ok(a)
    }
    /// Empty, with room reserved for `len` bytes (address space only: nothing is written, so
    /// no memory is used until [`extend`](Self::extend) fills it).
    pub fn reserve(len: usize) -> Result<AlignedBytes> {
        let mut words = Vec::new();
        words
            .try_reserve_exact(len.div_ceil(8))
            .map_err(|_| Error::invalid(format!("cannot allocate {len} bytes for weights")))?;
        Ok(AlignedBytes { words, len: 0 })
    }
    /// A copy of `b`.
    pub fn from_slice(b: &[u8]) -> Result<AlignedBytes> {
        let mut a = AlignedBytes::reserve(b.len())?;
        a.extend(b);
        Ok(a)
    }
    /// Appends `b` (within the reserved room, no reallocation).
    pub fn extend(&mut self, b: &[u8]) {
        let end = self.len + b.len();
        self.words.resize(end.div_ceil(8), 0);
        let start = self.len;
        self.len = end;
        self.as_mut()[start..end].copy_from_slice(b);
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for AlignedBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialized bytes; u8 has alignment 1.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

impl AsMut<[u8]> for AlignedBytes {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}

impl ByteSource for AlignedBytes {
    fn bytes(&self) -> &[u8] {
        self.as_ref()
    }
}

/// A memory-mapped file: tensors point into it without copying.
impl ByteSource for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn release(&self, range: Range<usize>) {
        // whole 4 KiB pages inside the range only
        const PAGE: usize = 4096;
        let start = range.start.div_ceil(PAGE) * PAGE;
        let end = range.end / PAGE * PAGE;
        if end > start {
            // SAFETY: a read-only file mapping: dropped pages are read back from the file on
            // the next access, nothing is lost. Failure only means the pages stay.
            #[cfg(unix)]
            let _ = unsafe {
                self.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// A (rows, cols) row-major matrix; quantized blocks of 32 run along a row.
#[derive(Clone)]
pub struct Tensor {
    pub dtype: FloatType,
    pub rows: usize,
    pub cols: usize,
    source: Arc<dyn ByteSource>,
    range: Range<usize>,
    /// Q40 rows repacked for the SIMD kernels (see `kernels::packed`), when packed.
    packed: Option<Arc<PackedQ40>>,
    /// F32 values held as bf16 bits (see [`Tensor::held_as_bf16`]), when they lose nothing.
    bf16: Option<Arc<LargeBytes>>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}x{})", self.dtype, self.rows, self.cols)
    }
}

impl Tensor {
    /// `range` of `source` holds the (rows, cols) matrix; checked for size and alignment.
    pub fn new(
        dtype: FloatType,
        rows: usize,
        cols: usize,
        source: Arc<dyn ByteSource>,
        range: Range<usize>,
    ) -> Result<Tensor> {
        if is_quantized(dtype) && !cols.is_multiple_of(32) {
            return Err(Error::format(format!(
                "{} tensor with {cols} columns, not a multiple of 32",
                dtype.name()
            )));
        }
        let want = rows * bytes_for(dtype, cols);
        if range.len() != want || range.end > source.bytes().len() {
            return Err(Error::format(format!(
                "{} tensor {rows}x{cols} needs {want} bytes, got {}",
                dtype.name(),
                range.len()
            )));
        }
        let align = match dtype {
            FloatType::F32 => 4,
            _ => 2,
        };
        let t = Tensor {
            dtype,
            rows,
            cols,
            source,
            range,
            packed: None,
            bf16: None,
        };
        if !(t.bytes().as_ptr() as usize).is_multiple_of(align) {
            // Only possible for a mapped tensor at an odd offset: copy it.
            return t.to_owned_rows(0..rows);
        }
        Ok(t)
    }

    /// An owned tensor from bytes.
    pub fn owned(dtype: FloatType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Tensor> {
        let len = bytes.len();
        Tensor::new(
            dtype,
            rows,
            cols,
            Arc::new(AlignedBytes::from_slice(bytes)?),
            0..len,
        )
    }

    pub fn bytes(&self) -> &[u8] {
        &self.source.bytes()[self.range.clone()]
    }

    pub fn row_bytes(&self) -> usize {
        bytes_for(self.dtype, self.cols)
    }

    /// Rows `r` as a tensor sharing the same bytes (no copy).
    pub fn rows(&self, r: Range<usize>) -> Tensor {
        let rb = self.row_bytes();
        let start = self.range.start + r.start * rb;
        Tensor {
            dtype: self.dtype,
            rows: r.len(),
            cols: self.cols,
            source: self.source.clone(),
            range: start..start + r.len() * rb,
            packed: None,
            bf16: None,
        }
    }

    fn to_owned_rows(&self, r: Range<usize>) -> Result<Tensor> {
        let rb = self.row_bytes();
        let src = &self.bytes()[r.start * rb..r.end * rb];
        let len = src.len();
        Ok(Tensor {
            dtype: self.dtype,
            rows: r.len(),
            cols: self.cols,
            source: Arc::new(AlignedBytes::from_slice(src)?),
            range: 0..len,
            packed: None,
            bf16: None,
        })
    }

    /// Columns `c` of every row, copied (a column slice is not contiguous in the file); the
    /// source's mapped pages are released afterwards.
    /// For quantized types `c` must be whole blocks.
    pub fn columns(&self, c: Range<usize>) -> Result<Tensor> {
        if c == (0..self.cols) {
            return Ok(self.clone());
        }
        if is_quantized(self.dtype) && (!c.start.is_multiple_of(32) || !c.end.is_multiple_of(32)) {
            return Err(Error::invalid(format!(
                "column slice {c:?} of a quantized tensor is not whole blocks"
            )));
        }
        let rb = self.row_bytes();
        let b0 = bytes_for(self.dtype, c.start);
        let b1 = bytes_for(self.dtype, c.end);
        let mut out = AlignedBytes::with_len(self.rows * (b1 - b0))?;
        {
            let src = self.bytes();
            let dst = out.as_mut();
            for r in 0..self.rows {
                dst[r * (b1 - b0)..(r + 1) * (b1 - b0)]
                    .copy_from_slice(&src[r * rb + b0..r * rb + b1]);
            }
        }
        // reading the columns touched most pages of the tensor: give them back (a mapped
        // file's pages come back from the file if another view reads them)
        self.release();
        let len = self.rows * (b1 - b0);
        Tensor::new(self.dtype, self.rows, c.len(), Arc::new(out), 0..len)
    }

    // ---- typed views (alignment checked in `new`) ----

    pub fn as_f32(&self) -> &[f32] {
        debug_assert_eq!(self.dtype, FloatType::F32);
        let b = self.bytes();
        // SAFETY: 4-byte alignment checked in `new`; any bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) }
    }
    pub fn as_f16(&self) -> &[u16] {
        debug_assert_eq!(self.dtype, FloatType::F16);
        let b = self.bytes();
        // SAFETY: 2-byte alignment checked in `new`.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u16, b.len() / 2) }
    }
    pub fn as_q40(&self) -> &[BlockQ40] {
        as_q40(self.bytes()).expect("alignment checked in Tensor::new")
    }
    pub fn as_q80(&self) -> &[BlockQ80] {
        as_q80(self.bytes()).expect("alignment checked in Tensor::new")
    }

    /// This Q40 tensor with its rows also repacked for the SIMD kernels (an owned copy the
    /// matmuls read instead of the mapped rows, whose pages are then released), on the
    /// threads of `pool` when given. Other types are returned as they are.
    pub fn packed_q40_with(mut self, pool: Option<&mut ThreadPool>) -> Result<Tensor> {
        if self.dtype == FloatType::Q40 && self.packed.is_none() {
            let packed = match pool {
                Some(pool) => PackedQ40::pack_with(pool, self.as_q40(), self.rows, self.cols)?,
                None => PackedQ40::pack(self.as_q40(), self.rows, self.cols)?,
            };
            self.packed = Some(Arc::new(packed));
            self.source.release(self.range.clone());
        }
        Ok(self)
    }

    /// This F32 tensor held as bf16 (the high halves of its values: half the bytes to read
    /// and keep, the same products bit for bit) when every value's low half is zero, as in a
    /// tensor converted from a bf16 checkpoint (Qwen3's MoE routers); then the matmuls read the
    /// bf16 copy and the mapped rows' pages are released. Other tensors are returned as they
    /// are.
    pub fn held_as_bf16(mut self) -> Result<Tensor> {
        if self.dtype != FloatType::F32 || self.bf16.is_some() {
            return Ok(self);
        }
        let values = self.as_f32();
        let mut held = LargeBytes::zeroed(values.len() * 2)?;
        let exact =
            held.chunks_exact_mut(2)
                .zip(values)
                .all(|(d, &v)| match f32_to_bf16_exact(v) {
                    Some(b) => {
                        d.copy_from_slice(&b.to_ne_bytes());
                        true
                    }
                    None => false,
                });
        if !exact {
            return Ok(self);
        }
        self.bf16 = Some(Arc::new(held));
        self.source.release(self.range.clone());
        Ok(self)
    }

    /// The bf16 bits of an F32 tensor [`held_as_bf16`](Self::held_as_bf16), if it is.
    pub fn bf16(&self) -> Option<&[u16]> {
        self.bf16.as_deref().map(|b| {
            // SAFETY: LargeBytes are 64-byte aligned; any bits are a valid u16.
            unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u16, b.len() / 2) }
        })
    }

    /// Release the mapped pages of this tensor (it will not be read for a while).
    pub fn release(&self) {
        self.source.release(self.range.clone());
    }

    /// The repacked rows, if any.
    pub fn packed(&self) -> Option<&PackedQ40> {
        self.packed.as_deref()
    }

    /// Size in bytes (in the file).
    pub fn nbytes(&self) -> usize {
        self.range.len()
    }

    /// Bytes a matmul by this tensor reads: [`nbytes`](Self::nbytes), or half of them for
    /// an F32 tensor held as bf16.
    pub fn read_bytes(&self) -> usize {
        self.bf16.as_ref().map_or(self.range.len(), |b| b.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_share_and_columns_copy() {
        let vals: Vec<f32> = (0..6 * 64).map(|i| i as f32).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::owned(FloatType::F32, 6, 64, &bytes).unwrap();
        let r = t.rows(2..4);
        assert_eq!(r.as_f32()[0], 128.0);
        assert_eq!(r.as_f32().len(), 128);
        let c = t.columns(32..64).unwrap();
        assert_eq!(c.cols, 32);
        assert_eq!(c.as_f32()[0], 32.0);
        assert_eq!(c.as_f32()[32], 96.0);
    }

    #[test]
    fn wrong_size_is_a_format_error() {
        let err = Tensor::owned(FloatType::Q40, 2, 64, &[0u8; 71])
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 72 bytes"), "{err}");
        let err = Tensor::owned(FloatType::Q40, 2, 40, &[0u8; 72])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a multiple of 32"), "{err}");
    }

    #[test]
    fn quantized_column_slice_must_be_whole_blocks() {
        let t = Tensor::owned(FloatType::Q40, 1, 64, &[0u8; 36]).unwrap();
        assert!(t.columns(0..16).is_err());
        assert_eq!(t.columns(32..64).unwrap().bytes().len(), 18);
    }
}
