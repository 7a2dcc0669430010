//! File formats shared with the C++ distributed-llama, byte for byte.
//!
//! - [`header`]: the `.m` model header (magic `0x0A00ABCD`, key/value pairs), the tensor
//!   list with offsets, the file size.
//! - [`model_file`]: a memory-mapped `.m` file (or distributed-llama's legacy `.bin`, see [`legacy`]).
//! - [`tokenizer`]: the `.t` tokenizer file and llama2.c's `tokenizer.bin`.
//!
//! Everything is little-endian; matrices are row-major with quantization blocks running along a
//! row (the input dimension).

pub mod header;
mod header_fields;
pub mod legacy;
pub mod model_file;
pub mod reader;
pub mod tokenizer;

pub use header::{ArchType, HiddenAct, ModelHeader, RopeType};
pub use model_file::ModelFile;
pub use reader::Reader;
pub use tokenizer::Tokenizer;

use crate::error::{Error, Result};
use crate::kernels::block::{self, BlockQ40, BlockQ80, QK};
use half::{f16, slice::HalfFloatSliceExt};

/// How the numbers of a tensor are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FloatType {
    F32 = 0,
    F16 = 1,
    /// ggml Q4_0: 18-byte blocks of 32 values.
    Q40 = 2,
    /// ggml Q8_0: 34-byte blocks of 32 values.
    Q80 = 3,
}

impl FloatType {
    pub const ALL: [FloatType; 4] = [
        FloatType::F32,
        FloatType::F16,
        FloatType::Q40,
        FloatType::Q80,
    ];

    /// The code used in the `.m` header (`weights_float_type`).
    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn from_code(code: i64) -> Option<FloatType> {
        match code {
            0 => Some(FloatType::F32),
            1 => Some(FloatType::F16),
            2 => Some(FloatType::Q40),
            3 => Some(FloatType::Q80),
            _ => None,
        }
    }

    /// `"f32"`, `"f16"`, `"q40"`, `"q80"`: the names the CLI and the binding use.
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "f32",
            FloatType::F16 => "f16",
            FloatType::Q40 => "q40",
            FloatType::Q80 => "q80",
        }
    }

    pub fn from_name(name: &str) -> Result<FloatType> {
        match name.to_ascii_lowercase().as_str() {
            "f32" => Ok(FloatType::F32),
            "f16" => Ok(FloatType::F16),
            "q40" => Ok(FloatType::Q40),
            "q80" => Ok(FloatType::Q80),
            _ => Err(Error::invalid(format!(
                "unknown float type {name:?} (expected one of f32, f16, q40, q80)"
            ))),
        }
    }

    /// Values per block: 1 for the plain types, 32 for Q40 / Q80.
    pub fn block_values(self) -> usize {
        match self {
            FloatType::F32 | FloatType::F16 => 1,
            FloatType::Q40 | FloatType::Q80 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 => 2,
            FloatType::Q40 => std::mem::size_of::<BlockQ40>(),
            FloatType::Q80 => std::mem::size_of::<BlockQ80>(),
        }
    }

    /// Bytes that `n_values` numbers take, or an error if `n_values` is not a whole number of
    /// blocks.
    pub fn bytes_for(self, n_values: u64) -> Result<u64> {
        let bv = self.block_values() as u64;
        if !n_values.is_multiple_of(bv) {
            return Err(Error::invalid(format!(
                "{} stores values in blocks of {bv}; {n_values} is not a multiple of {bv}",
                self.name()
            )));
        }
        (n_values / bv)
            .checked_mul(self.block_bytes() as u64)
            .ok_or_else(|| Error::invalid(format!("{n_values} {} values overflow", self.name())))
    }
}

impl std::fmt::Display for FloatType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a model file: where it is and how it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// `embedding`, `layers.{i}.q`, ..., `norm`, `wcls` (see docs/DESIGN.md).
    pub name: String,
    /// Output dimension (1 for the norm vectors).
    pub rows: usize,
    /// Input dimension: quantization blocks run along it.
    pub cols: usize,
    pub float_type: FloatType,
    /// Byte offset from the start of the file.
    pub offset: u64,
    pub nbytes: u64,
}

impl TensorSpec {
    /// The RMSNorm weights are vectors (`rows == 1`), everything else a matrix.
    pub fn is_vector(&self) -> bool {
        self.name == "norm" || self.name.ends_with("_norm")
    }

    pub fn n_values(&self) -> u64 {
        self.rows as u64 * self.cols as u64
    }
}

/// Lays tensors out one after another from `offset`. Sizes are computed with saturating
/// arithmetic: callers validate the dimensions first (see [`ModelHeader::validate`]).
pub(crate) struct Layout {
    pub tensors: Vec<TensorSpec>,
    pub offset: u64,
}

impl Layout {
    pub fn new(offset: u64) -> Self {
        Layout {
            tensors: Vec::new(),
            offset,
        }
    }

    /// Appends a tensor of `rows` × `cols` values stored as `ft`.
    pub fn push(&mut self, name: String, rows: usize, cols: usize, ft: FloatType) {
        let nbytes = Self::nbytes(rows, cols, ft);
        let offset = self.offset;
        self.offset = offset.saturating_add(nbytes);
        self.tensors.push(TensorSpec {
            name,
            rows,
            cols,
            float_type: ft,
            offset,
            nbytes,
        });
    }

    /// Bytes of a `rows` × `cols` tensor stored as `ft` (saturating).
    pub fn nbytes(rows: usize, cols: usize, ft: FloatType) -> u64 {
        let n = (rows as u64).saturating_mul(cols as u64);
        (n / ft.block_values() as u64).saturating_mul(ft.block_bytes() as u64)
    }

    /// A gap of `nbytes` (the legacy format's unused RoPE tables).
    pub fn skip(&mut self, nbytes: u64) {
        self.offset = self.offset.saturating_add(nbytes);
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding tensor data
// ---------------------------------------------------------------------------------------------

/// Encodes float32 values as `ft` (little-endian), as distributed-llama's converter writes `.m`
/// weights: Q40 / Q80 in ggml's Q4_0 / Q8_0 layout, with the converter's rule on ties (see
/// `quantize_q40` and `quantize_q80_weights`).
pub fn quantize(x: &[f32], ft: FloatType) -> Result<Vec<u8>> {
    let nbytes = ft.bytes_for(x.len() as u64)? as usize;
    let mut out = vec![0u8; nbytes];
    quantize_into(x, ft, &mut out)?;
    Ok(out)
}

/// As [`quantize`], into a buffer of exactly `ft.bytes_for(x.len())` bytes.
pub fn quantize_into(x: &[f32], ft: FloatType, out: &mut [u8]) -> Result<()> {
    encode_into(x, ft, out, block::quantize_q80_weights)
}

/// As [`quantize_into`], but Q80 rounds as activations are quantized (`kernels::quantize_q80`,
/// ggml's rule: halves away from zero), not as the converter rounds weights: what the nodes of
/// a cluster send each other. The other types encode as in a file.
pub fn quantize_activations_into(x: &[f32], ft: FloatType, out: &mut [u8]) -> Result<()> {
    // the active SIMD kernel: bit-identical to `block::quantize_q80` (kernel tests)
    let kernels = crate::kernels::Kernels::get();
    encode_into(x, ft, out, |x, b| kernels.quantize_q80(x, b))
}

/// Values a batch of the F16 and Q80 codecs converts at once (on the stack).
const BATCH: usize = 64 * QK;

/// The one encoder; `q80` is the rounding rule of Q80 blocks (weights or activations).
fn encode_into(
    x: &[f32],
    ft: FloatType,
    out: &mut [u8],
    q80: impl Fn(&[f32], &mut [BlockQ80]),
) -> Result<()> {
    let nbytes = ft.bytes_for(x.len() as u64)? as usize;
    if out.len() != nbytes {
        return Err(Error::invalid(format!(
            "{} values of {ft} take {nbytes} bytes, the buffer has {}",
            x.len(),
            out.len()
        )));
    }
    match ft {
        FloatType::F32 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        FloatType::F16 => {
            // a batch at a time through `half`'s slice conversion (F16C / NEON where present,
            // the same rounding as one value at a time)
            let mut h = [f16::ZERO; BATCH];
            for (xs, os) in x.chunks(BATCH).zip(out.chunks_mut(2 * BATCH)) {
                let h = &mut h[..xs.len()];
                h.convert_from_f32_slice(xs);
                for (v, o) in h.iter().zip(os.chunks_exact_mut(2)) {
                    o.copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
        }
        FloatType::Q40 => {
            let mut b = [BlockQ40::default()];
            for (xb, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(18)) {
                block::quantize_q40(xb, &mut b);
                o[..2].copy_from_slice(&b[0].d.to_le_bytes());
                o[2..].copy_from_slice(&b[0].qs);
            }
        }
        FloatType::Q80 => {
            let mut b = [BlockQ80::default(); BATCH / QK];
            for (xs, os) in x.chunks(BATCH).zip(out.chunks_mut(BATCH / QK * 34)) {
                let b = &mut b[..xs.len() / QK];
                q80(xs, b);
                for (blk, o) in b.iter().zip(os.chunks_exact_mut(34)) {
                    o[..2].copy_from_slice(&blk.d.to_le_bytes());
                    for (dst, &q) in o[2..].iter_mut().zip(&blk.qs) {
                        *dst = q as u8;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Decodes `data` (stored as `ft`) into float32 values. Works on unaligned bytes.
pub fn dequantize(data: &[u8], ft: FloatType) -> Result<Vec<f32>> {
    let bb = ft.block_bytes();
    if !data.len().is_multiple_of(bb) {
        return Err(Error::invalid(format!(
            "{} bytes are not a whole number of {ft} blocks of {bb} bytes",
            data.len()
        )));
    }
    let mut out = vec![0f32; data.len() / bb * ft.block_values()];
    dequantize_into(data, ft, &mut out)?;
    Ok(out)
}

/// As [`dequantize`], into exactly the `out.len()` values that `data` holds.
pub fn dequantize_into(data: &[u8], ft: FloatType, out: &mut [f32]) -> Result<()> {
    let nbytes = ft.bytes_for(out.len() as u64)? as usize;
    if data.len() != nbytes {
        return Err(Error::invalid(format!(
            "{} values of {ft} take {nbytes} bytes, got {}",
            out.len(),
            data.len()
        )));
    }
    match ft {
        FloatType::F32 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        FloatType::F16 => {
            let mut h = [f16::ZERO; BATCH];
            for (os, bs) in out.chunks_mut(BATCH).zip(data.chunks(2 * BATCH)) {
                let h = &mut h[..os.len()];
                for (v, b) in h.iter_mut().zip(bs.chunks_exact(2)) {
                    *v = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                h.convert_to_f32_slice(os);
            }
        }
        FloatType::Q40 => {
            for (ob, b) in out.chunks_exact_mut(QK).zip(data.chunks_exact(18)) {
                let mut blk = BlockQ40 {
                    d: u16::from_le_bytes([b[0], b[1]]),
                    qs: [0; QK / 2],
                };
                blk.qs.copy_from_slice(&b[2..]);
                block::dequantize_q40(&[blk], ob);
            }
        }
        FloatType::Q80 => {
            for (ob, b) in out.chunks_exact_mut(QK).zip(data.chunks_exact(34)) {
                let mut blk = BlockQ80 {
                    d: u16::from_le_bytes([b[0], b[1]]),
                    qs: [0; QK],
                };
                for (q, &byte) in blk.qs.iter_mut().zip(&b[2..]) {
                    *q = byte as i8;
                }
                block::dequantize_q80(&[blk], ob);
            }
        }
    }
    Ok(())
}
