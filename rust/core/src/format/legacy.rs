//! The legacy `.bin` model of distributed-llama (read only), as written by its early
//! `convert-llama2.py` / `convert-legacy.py`:
//!
//! 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative in llama2.c
//! files with an unshared classifier: take abs), seq_len); embedding F32 [vocab, dim]; per layer
//! rms_att F32 [dim], rms_ffn F32 [dim], wq, wk, wv, wo, w1, w2, w3 (weights type); rms_final
//! F32 [dim]; a gap of 2 × seq_len × (head_size / 2) × 4 bytes (llama2.c's RoPE tables, unused);
//! wcls [vocab, dim] (weights type). The weights type is not in the file.

use super::{FloatType, Layout, ModelHeader, Reader, TensorSpec};
use crate::error::{Error, Result};

/// Size of the legacy header: 7 int32.
pub const LEGACY_HEADER_SIZE: usize = 28;

/// Parses and validates the legacy header. Returns it with `.m` defaults for what the legacy
/// format does not store: llama, silu, rope_theta 10000, norm_epsilon 1e-5.
pub fn parse(bytes: &[u8], weights: FloatType, what: &str) -> Result<ModelHeader> {
    let mut r = Reader::new(bytes, what);
    let mut v = [0i64; 7];
    let names = [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
    ];
    for (slot, name) in v.iter_mut().zip(names) {
        *slot = r.i32(name)? as i64;
    }
    v[5] = v[5].abs(); // llama2.c: negative vocab_size flags an unshared classifier
    for (value, name) in v.iter().zip(names) {
        if *value <= 0 {
            return Err(Error::format(format!(
                "{what}: {name} = {value} must be positive"
            )));
        }
    }
    let n = |i: usize| v[i] as usize;
    let (dim, n_heads) = (n(0), n(3));
    if dim % n_heads != 0 {
        return Err(Error::format(format!(
            "{what}: dim {dim} is not divisible by n_heads {n_heads}"
        )));
    }
    let header = ModelHeader {
        dim,
        hidden_dim: n(1),
        n_layers: n(2),
        n_heads,
        n_kv_heads: n(4),
        vocab_size: n(5),
        max_seq_len: n(6),
        head_dim: dim / n_heads,
        weights_float_type: weights,
        file_header_size: Some(LEGACY_HEADER_SIZE),
        ..ModelHeader::default()
    };
    // Reuse the .m checks (header size is not a multiple of 8 here: check without it).
    ModelHeader {
        file_header_size: None,
        ..header.clone()
    }
    .validate()
    .map_err(|e| Error::format(format!("{what}: {e}")))?;
    Ok(header)
}

/// One layer's tensors in legacy file order: (name, rows, cols, type).
fn layer_shapes(h: &ModelHeader) -> [(&'static str, usize, usize, FloatType); 9] {
    let (wt, f32, dim, hidden) = (h.weights_float_type, FloatType::F32, h.dim, h.hidden_dim);
    let (q_dim, kv_dim) = (h.q_dim(), h.kv_dim());
    [
        ("attn_norm", 1, dim, f32),
        ("ffn_norm", 1, dim, f32),
        ("q", q_dim, dim, wt),
        ("k", kv_dim, dim, wt),
        ("v", kv_dim, dim, wt),
        ("wo", dim, q_dim, wt),
        ("w1", hidden, dim, wt),
        ("w2", dim, hidden, wt),
        ("w3", hidden, dim, wt),
    ]
}

/// freq_cis_real and freq_cis_imag: seq_len × head_size / 2 float32 each (unused).
fn rope_gap(h: &ModelHeader) -> u64 {
    (h.max_seq_len as u64).saturating_mul(h.head_dim as u64 / 2 * 8)
}

/// The exact size of a legacy file with this header (computed without listing the tensors).
pub fn file_size(h: &ModelHeader) -> u64 {
    let (wt, f32) = (h.weights_float_type, FloatType::F32);
    let layer = layer_shapes(h).iter().fold(0u64, |a, &(_, r, c, ft)| {
        a.saturating_add(Layout::nbytes(r, c, ft))
    });
    (LEGACY_HEADER_SIZE as u64)
        .saturating_add(Layout::nbytes(h.vocab_size, h.dim, f32))
        .saturating_add(layer.saturating_mul(h.n_layers as u64))
        .saturating_add(Layout::nbytes(1, h.dim, f32))
        .saturating_add(rope_gap(h))
        .saturating_add(Layout::nbytes(h.vocab_size, h.dim, wt))
}

/// The tensors in legacy file order, with the same names as `.m` (9 × n_layers + 3 entries:
/// check the file size against [`file_size`] first).
pub fn tensors(h: &ModelHeader) -> Vec<TensorSpec> {
    let (wt, f32) = (h.weights_float_type, FloatType::F32);
    let mut t = Layout::new(LEGACY_HEADER_SIZE as u64);
    t.push("embedding".into(), h.vocab_size, h.dim, f32);
    let layer = layer_shapes(h);
    for i in 0..h.n_layers {
        for (name, rows, cols, ft) in layer {
            t.push(format!("layers.{i}.{name}"), rows, cols, ft);
        }
    }
    t.push("norm".into(), 1, h.dim, f32);
    t.skip(rope_gap(h));
    t.push("wcls".into(), h.vocab_size, h.dim, wt);
    t.tensors
}
