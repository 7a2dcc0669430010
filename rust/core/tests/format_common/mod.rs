//! Shared by the `format_*` tests: a small valid header and files packed by hand.
#![allow(dead_code)]

use dllama_core::format::{FloatType, ModelHeader};

/// A small valid Llama header (dim 64, 2 layers, GQA 4/2 heads of 16) with `vocab_size`
/// tokens and `max_seq_len` positions.
pub fn small_header(ft: FloatType, vocab_size: usize, max_seq_len: usize) -> ModelHeader {
    ModelHeader {
        dim: 64,
        hidden_dim: 96,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        vocab_size,
        max_seq_len,
        head_dim: 16,
        weights_float_type: ft,
        ..ModelHeader::default()
    }
}

/// `magic`, the header size, then the (key, value) pairs, as distributed-llama's writers
/// start both `.m` and `.t` files.
pub fn pack_pairs(magic: u32, pairs: &[(i32, i32)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&magic.to_le_bytes());
    b.extend_from_slice(&(8 + 8 * pairs.len() as i32).to_le_bytes());
    for (k, v) in pairs {
        b.extend_from_slice(&k.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}
