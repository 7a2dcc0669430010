//! Grouped-query attention of new tokens over the KV cache.
//!
//! Query head h reads KV head h / (n_heads / n_kv_heads). The caches are head-major:
//! k_cache, v_cache (n_kv_heads, max_seq_len, head_dim), so one head's past keys are one
//! contiguous run. Token t of a batch that starts at position pos0 attends positions
//! 0..=pos0 + t (causal).

use std::cell::RefCell;
use std::ops::Range;

use super::activation::softmax;
use crate::kernels::Kernels;
use crate::pool::{SharedOut, ThreadPool};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    fn check(&self) -> Result<()> {
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || self.head_dim == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(Error::invalid(format!(
                "attention: bad shape {self:?} (n_heads must be a non-zero multiple of n_kv_heads)"
            )));
        }
        Ok(())
    }
}

/// Heads `heads` of one token at position `pos`: q (n_heads, head_dim) → out (heads.len(),
/// head_dim), over caches of `max_seq_len` positions. `att` is scratch of at least pos + 1
/// values.
#[allow(clippy::too_many_arguments)]
fn attention_heads(
    shape: &AttentionShape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    max_seq_len: usize,
    pos: usize,
    heads: Range<usize>,
    att: &mut [f32],
    out: &mut [f32],
) {
    let k = Kernels::get();
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let att = &mut att[..pos + 1];
    for (i, h) in heads.enumerate() {
        let qh = &q[h * hd..(h + 1) * hd];
        // KV head h / group: positions 0..=pos, head_dim values each, back to back
        let kv = (h / group) * max_seq_len * hd..((h / group) * max_seq_len + pos + 1) * hd;
        // scores of every past position
        k.attn_scores(qh, &k_cache[kv.clone()], hd, scale, att);
        softmax(att);
        // weighted sum of the values
        let oh = &mut out[i * hd..(i + 1) * hd];
        oh.fill(0.0);
        k.attn_values(att, &v_cache[kv], hd, oh);
    }
}

thread_local! {
    static ATT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// All heads of q (n_tokens, n_heads · head_dim) at positions pos0.. into out (same shape),
/// the (token, head) pairs split across the pool. k_cache, v_cache: (n_kv_heads,
/// max_seq_len, head_dim), with max_seq_len taken from their length; they must already hold
/// the keys and values of positions 0..pos0 + n_tokens.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &mut ThreadPool,
    shape: &AttentionShape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    pos0: usize,
    n_tokens: usize,
    out: &mut [f32],
) -> Result<()> {
    shape.check()?;
    let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
    let end = pos0 + n_tokens;
    if n_tokens == 0 || q.len() != n_tokens * q_dim || out.len() != q.len() {
        return Err(Error::invalid(format!(
            "attention: q has {} and out {} values, expected ({n_tokens}, {q_dim})",
            q.len(),
            out.len()
        )));
    }
    let max_seq_len = k_cache.len() / kv_dim;
    if k_cache.len() != max_seq_len * kv_dim || v_cache.len() != k_cache.len() || max_seq_len < end
    {
        return Err(Error::invalid(format!(
            "attention: caches of {} / {} values are not (n_kv_heads, max_seq_len, head_dim) \
             of {kv_dim} values per position, holding positions up to {end}",
            k_cache.len(),
            v_cache.len()
        )));
    }
    let n_heads = shape.n_heads;
    let hd = shape.head_dim;
    let total = n_tokens * n_heads;
    let shared = SharedOut::new(out);
    pool.run(|i, n| {
        // contiguous runs of (token, head) pairs per thread
        let r = crate::pool::split_range(total, i, n, 1);
        if r.is_empty() {
            return;
        }
        ATT.with(|att| {
            let mut att = att.borrow_mut();
            att.resize(end, 0.0);
            let mut j = r.start;
            while j < r.end {
                let t = j / n_heads;
                let h0 = j % n_heads;
                let h1 = n_heads.min(h0 + (r.end - j));
                // SAFETY: the pairs r of this thread are disjoint from other threads'.
                let o = unsafe { shared.rows_mut(t * q_dim + h0 * hd, (h1 - h0) * hd) };
                let qt = &q[t * q_dim..(t + 1) * q_dim];
                attention_heads(
                    shape,
                    qt,
                    k_cache,
                    v_cache,
                    max_seq_len,
                    pos0 + t,
                    h0..h1,
                    &mut att,
                    o,
                );
                j += h1 - h0;
            }
        });
    });
    Ok(())
}
