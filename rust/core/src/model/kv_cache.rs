//! The keys and values of every past position, for this node's KV heads.

use crate::pool::{split_range, SharedOut, ThreadPool};

/// keys, values: (n_layers, n_kv_heads, max_seq_len, head_dim) each, for this node's KV
/// heads. Head-major, so that attention streams each head's past keys and values as one
/// contiguous run (position-major rows of kv_dim put every head's 512 bytes (head_dim 128) on
/// a different 4 KiB page, which the hardware prefetchers do not follow). Allocated zeroed (the OS maps pages lazily:
/// memory is touched only as positions are filled).
pub struct KvCache {
    pub max_seq_len: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    pub fn new(n_layers: usize, max_seq_len: usize, n_kv_heads: usize, head_dim: usize) -> KvCache {
        let n = n_layers * n_kv_heads * max_seq_len * head_dim;
        KvCache {
            max_seq_len,
            n_kv_heads,
            head_dim,
            keys: vec![0.0; n],
            values: vec![0.0; n],
        }
    }

    /// Bytes the cache takes when full.
    pub fn nbytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * 4
    }

    /// Values of one layer: n_kv_heads · max_seq_len · head_dim.
    fn layer_len(&self) -> usize {
        self.n_kv_heads * self.max_seq_len * self.head_dim
    }

    /// Keys and values of `layer`: (n_kv_heads, max_seq_len, head_dim) each.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let n = self.layer_len();
        (
            &self.keys[layer * n..(layer + 1) * n],
            &self.values[layer * n..(layer + 1) * n],
        )
    }

    /// Store the keys and values of `n` tokens at positions `pos..pos + n` of `layer`: k, v
    /// (n, n_kv_heads · head_dim) each, as the projections produce them. The heads are split
    /// across `pool`: the first write to a cache page faults it in, which is slow on a VM when
    /// the memory comes fresh from the host, so the threads share that.
    pub fn store(&mut self, pool: &mut ThreadPool, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (hd, seq, n_kv) = (self.head_dim, self.max_seq_len, self.n_kv_heads);
        let n = k.len() / (n_kv * hd).max(1);
        assert!(
            k.len() == n * n_kv * hd && v.len() == k.len() && pos + n <= seq,
            "kv_cache.store: {} values at position {pos} for {n_kv} heads of {hd}, {seq} positions",
            k.len()
        );
        let base = layer * self.layer_len();
        let keys = SharedOut::new(&mut self.keys);
        let values = SharedOut::new(&mut self.values);
        pool.run(|i, n_threads| {
            for h in split_range(n_kv, i, n_threads, 1) {
                for t in 0..n {
                    let at = base + (h * seq + pos + t) * hd;
                    let src = (t * n_kv + h) * hd..(t * n_kv + h + 1) * hd;
                    // SAFETY: each thread writes the rows of its own heads only, inside the
                    // caches, which outlive the run.
                    unsafe {
                        keys.rows_mut(at, hd).copy_from_slice(&k[src.clone()]);
                        values.rows_mut(at, hd).copy_from_slice(&v[src]);
                    }
                }
            }
        });
    }
}
