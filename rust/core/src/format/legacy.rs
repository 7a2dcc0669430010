//! The seed's legacy `.bin` model (read only), as written by distributed-llama's early
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

/// Parses the legacy header and lays the tensors out. Returns the header (with `.m` defaults
/// for what the legacy format does not store: llama, silu, rope_theta 10000, norm_epsilon
/// 1e-5), the tensors in legacy file order with the same names as `.m`, and the file size.
pub fn layout(
    bytes: &[u8],
    weights: FloatType,
    what: &str,
) -> Result<(ModelHeader, Vec<TensorSpec>, u64)> {
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

    let (wt, f32) = (weights, FloatType::F32);
    let (q_dim, kv_dim, hidden, vocab) = (
        header.q_dim(),
        header.kv_dim(),
        header.hidden_dim,
        header.vocab_size,
    );
    let mut t = Layout::new(LEGACY_HEADER_SIZE as u64);
    t.push("embedding".into(), vocab, dim, f32);
    for i in 0..header.n_layers {
        t.push(format!("layers.{i}.attn_norm"), 1, dim, f32);
        t.push(format!("layers.{i}.ffn_norm"), 1, dim, f32);
        t.push(format!("layers.{i}.q"), q_dim, dim, wt);
        t.push(format!("layers.{i}.k"), kv_dim, dim, wt);
        t.push(format!("layers.{i}.v"), kv_dim, dim, wt);
        t.push(format!("layers.{i}.wo"), dim, q_dim, wt);
        t.push(format!("layers.{i}.w1"), hidden, dim, wt);
        t.push(format!("layers.{i}.w2"), dim, hidden, wt);
        t.push(format!("layers.{i}.w3"), hidden, dim, wt);
    }
    t.push("norm".into(), 1, dim, f32);
    // freq_cis_real and freq_cis_imag: seq_len × head_size / 2 float32 each
    let gap = (header.max_seq_len as u64).saturating_mul(header.head_dim as u64 / 2 * 8);
    t.skip(gap);
    t.push("wcls".into(), vocab, dim, wt);
    let size = t.offset;
    Ok((header, t.tensors, size))
}
