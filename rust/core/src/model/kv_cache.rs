//! The keys and values of every past position, for this node's KV heads.

/// keys, values: (n_layers, max_seq_len, kv_dim) each, where kv_dim = this node's KV heads
/// times head_dim. Allocated zeroed (the OS maps pages lazily: memory is touched only as
/// positions are filled).
pub struct KvCache {
    pub max_seq_len: usize,
    pub kv_dim: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    pub fn new(n_layers: usize, max_seq_len: usize, kv_dim: usize) -> KvCache {
        let n = n_layers * max_seq_len * kv_dim;
        KvCache {
            max_seq_len,
            kv_dim,
            keys: vec![0.0; n],
            values: vec![0.0; n],
        }
    }

    /// Bytes the cache takes when full.
    pub fn nbytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * 4
    }

    fn at(&self, layer: usize, pos: usize) -> std::ops::Range<usize> {
        let i = (layer * self.max_seq_len + pos) * self.kv_dim;
        i..i + self.kv_dim
    }

    /// Key of `pos` in `layer`: (kv_dim).
    pub fn key(&self, layer: usize, pos: usize) -> &[f32] {
        &self.keys[self.at(layer, pos)]
    }
    pub fn value(&self, layer: usize, pos: usize) -> &[f32] {
        &self.values[self.at(layer, pos)]
    }
    /// Keys and values of `layer`: (max_seq_len, kv_dim) each.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let n = self.max_seq_len * self.kv_dim;
        (
            &self.keys[layer * n..(layer + 1) * n],
            &self.values[layer * n..(layer + 1) * n],
        )
    }

    /// Store key and value (kv_dim each) of `pos` in `layer`.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let r = self.at(layer, pos);
        self.keys[r.clone()].copy_from_slice(k);
        self.values[r].copy_from_slice(v);
    }
}
