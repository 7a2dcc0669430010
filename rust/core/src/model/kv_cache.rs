//! The keys and values of every past position, for this node's KV heads.

/// keys, values: (n_layers, n_kv_heads, max_seq_len, head_dim) each, for this node's KV
/// heads. Head-major, so that attention streams each head's past keys and values as one
/// contiguous run (position-major rows of kv_dim put every head's 512 bytes (head_dim 128) on
/// a different 4 KiB page, which the hardware prefetchers do not follow: attention took 3-4
/// ms of a 7B token at one thread that way). Allocated zeroed (the OS maps pages lazily:
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

    /// Store key and value of `pos` in `layer`: k, v (n_kv_heads · head_dim) each, head
    /// after head, as the projections produce them.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (hd, seq) = (self.head_dim, self.max_seq_len);
        let base = layer * self.layer_len() + pos * hd;
        for h in 0..self.n_kv_heads {
            let at = base + h * seq * hd;
            self.keys[at..at + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.values[at..at + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }
}
