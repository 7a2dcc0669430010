//! Which part of every layer node `i` of `n` computes (tensor parallelism).
//!
//! Each node owns whole KV-head groups (its KV heads and the query heads that read them),
//! a range of the FFN's hidden units (rows of w1 and w3 = columns of w2) in whole 32-value
//! blocks, and a range of the vocabulary (rows of the classifier). Rows of q/k/v/w1/w3/wcls
//! are contiguous in the file; the columns of wo and w2 are not, so a node with `n > 1`
//! copies those. Slices may be uneven: any `n` from 1 to `n_kv_heads` works when the hidden
//! dimension has enough blocks.

use std::ops::Range;

use super::config::ModelConfig;
// slices of quantized rows or columns stay whole blocks of QK values
use crate::kernels::QK;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSlice {
    pub node_index: usize,
    pub n_nodes: usize,
    /// This node's KV heads.
    pub kv_heads: Range<usize>,
    /// This node's query heads (the groups of `kv_heads`).
    pub heads: Range<usize>,
    /// Rows of wq (= columns of wo): `heads * head_dim`.
    pub q_rows: Range<usize>,
    /// Rows of wk and wv: `kv_heads * head_dim`.
    pub kv_rows: Range<usize>,
    /// Rows of w1 and w3 (= columns of w2).
    pub hidden: Range<usize>,
    /// Rows of the classifier: the logits this node computes.
    pub vocab: Range<usize>,
}

/// `[total * i / n, total * (i + 1) / n)`: n ranges that cover `0..total`, sizes differing by 1.
fn even_range(total: usize, i: usize, n: usize) -> Range<usize> {
    total * i / n..total * (i + 1) / n
}

impl NodeSlice {
    /// The slice of node `node_index` among `n_nodes`.
    pub fn new(cfg: &ModelConfig, node_index: usize, n_nodes: usize) -> Result<NodeSlice> {
        if let Err(why) = Self::check_count(cfg, n_nodes) {
            let valid = Self::valid_node_counts(cfg);
            let list = valid
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::invalid(format!(
                "this model cannot be split across {n_nodes} nodes ({why}); valid node counts: {list}"
            )));
        }
        if node_index >= n_nodes {
            return Err(Error::invalid(format!(
                "node index {node_index} out of range for {n_nodes} nodes"
            )));
        }
        Ok(Self::build(cfg, node_index, n_nodes))
    }

    /// Every node count this model can be split across, in increasing order.
    pub fn valid_node_counts(cfg: &ModelConfig) -> Vec<usize> {
        (1..=cfg.n_kv_heads.max(1))
            .filter(|&n| Self::check_count(cfg, n).is_ok())
            .collect()
    }

    /// Why `n` nodes do not fit the model, if they do not.
    fn check_count(cfg: &ModelConfig, n: usize) -> std::result::Result<(), String> {
        if n == 0 {
            return Err("at least one node is needed".into());
        }
        if n == 1 {
            return Ok(());
        }
        if n > cfg.n_kv_heads {
            return Err(format!(
                "each node needs at least one of the {} KV heads",
                cfg.n_kv_heads
            ));
        }
        if !cfg.hidden_dim.is_multiple_of(QK) || cfg.hidden_dim / QK < n {
            return Err(format!(
                "the hidden dimension {} must split into whole 32-value blocks, at least one per node",
                cfg.hidden_dim
            ));
        }
        if cfg.vocab_size < n {
            return Err(format!(
                "the vocabulary ({}) is smaller than the node count",
                cfg.vocab_size
            ));
        }
        // wo is sliced by columns: each node's first column must start a block.
        for i in 0..n {
            let s = Self::build(cfg, i, n);
            if s.q_rows.start % QK != 0 {
                return Err(format!(
                    "node {i}'s attention columns start at {}, not a multiple of 32 (head_dim {})",
                    s.q_rows.start, cfg.head_dim
                ));
            }
        }
        Ok(())
    }

    fn build(cfg: &ModelConfig, i: usize, n: usize) -> NodeSlice {
        let g = cfg.group_size();
        let kv_heads = even_range(cfg.n_kv_heads, i, n);
        let heads = kv_heads.start * g..kv_heads.end * g;
        let hd = cfg.head_dim;
        let hidden = if n == 1 {
            0..cfg.hidden_dim
        } else {
            let b = even_range(cfg.hidden_dim / QK, i, n);
            b.start * QK..b.end * QK
        };
        NodeSlice {
            node_index: i,
            n_nodes: n,
            q_rows: heads.start * hd..heads.end * hd,
            kv_rows: kv_heads.start * hd..kv_heads.end * hd,
            kv_heads,
            heads,
            hidden,
            vocab: even_range(cfg.vocab_size, i, n),
        }
    }

    pub fn n_heads(&self) -> usize {
        self.heads.len()
    }
    pub fn n_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{FloatType, HiddenAct};
    use crate::ops::{RopeConfig, RopeType};

    pub(crate) fn cfg(
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        hidden: usize,
        vocab: usize,
    ) -> ModelConfig {
        ModelConfig {
            arch: crate::format::ArchType::Llama,
            dim: n_heads * head_dim,
            hidden_dim: hidden,
            n_layers: 1,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size: vocab,
            max_seq_len: 16,
            norm_epsilon: 1e-5,
            hidden_act: HiddenAct::Silu,
            rope: RopeConfig {
                rope_type: RopeType::Llama,
                head_dim,
                theta: 10000.0,
                scaling: None,
            },
            weights_float_type: FloatType::Q40,
            qk_norm: false,
            moe: None,
        }
    }

    /// The slices of all nodes tile every dimension exactly, in node order.
    fn assert_tiles(c: &ModelConfig, n: usize) {
        let slices: Vec<_> = (0..n).map(|i| NodeSlice::new(c, i, n).unwrap()).collect();
        let check = |get: &dyn Fn(&NodeSlice) -> Range<usize>, total: usize, what: &str| {
            let mut next = 0;
            for s in &slices {
                let r = get(s);
                assert_eq!(
                    r.start, next,
                    "{what}: node {} starts at {}",
                    s.node_index, r.start
                );
                assert!(r.end > r.start, "{what}: node {} is empty", s.node_index);
                next = r.end;
            }
            assert_eq!(next, total, "{what} not covered");
        };
        check(&|s| s.kv_heads.clone(), c.n_kv_heads, "kv heads");
        check(&|s| s.heads.clone(), c.n_heads, "heads");
        check(&|s| s.q_rows.clone(), c.q_dim(), "q rows");
        check(&|s| s.kv_rows.clone(), c.kv_dim(), "kv rows");
        check(&|s| s.hidden.clone(), c.hidden_dim, "hidden");
        check(&|s| s.vocab.clone(), c.vocab_size, "vocab");
        for s in &slices {
            assert_eq!(s.heads.start, s.kv_heads.start * c.group_size());
            assert_eq!(s.heads.len(), s.kv_heads.len() * c.group_size());
            if n > 1 {
                assert_eq!(s.hidden.start % 32, 0);
                assert_eq!(s.hidden.end % 32, 0);
                assert_eq!(s.q_rows.start % 32, 0);
            }
        }
    }

    #[test]
    fn every_count_up_to_n_kv_heads_tiles_the_model() {
        // Llama 2 7B, TinyLlama, SmolLM2-135M (9 heads, 3 KV heads, head_dim 64, hidden 1536)
        for c in [
            cfg(32, 32, 128, 11008, 32000),
            cfg(32, 4, 64, 5632, 32000),
            cfg(9, 3, 64, 1536, 49152),
        ] {
            for n in 1..=c.n_kv_heads {
                assert_tiles(&c, n);
            }
            assert_eq!(
                NodeSlice::valid_node_counts(&c),
                (1..=c.n_kv_heads).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn uneven_split_of_smollm2_in_three() {
        let c = cfg(9, 3, 64, 1536, 49152);
        let s1 = NodeSlice::new(&c, 1, 3).unwrap();
        assert_eq!(s1.kv_heads, 1..2);
        assert_eq!(s1.heads, 3..6);
        assert_eq!(s1.q_rows, 192..384);
        assert_eq!(s1.hidden, 512..1024);
        assert_eq!(s1.vocab, 16384..32768);
        // 5 KV heads over 3 nodes: 1, 2, 2 heads.
        let c = cfg(10, 5, 32, 96 * 32, 1001);
        let sizes: Vec<_> = (0..3)
            .map(|i| NodeSlice::new(&c, i, 3).unwrap().kv_heads.len())
            .collect();
        assert_eq!(sizes, vec![1, 2, 2]);
        assert_tiles(&c, 3);
    }

    #[test]
    fn too_many_nodes_lists_the_valid_counts() {
        let c = cfg(9, 3, 64, 1536, 49152);
        let err = NodeSlice::new(&c, 0, 4).unwrap_err().to_string();
        assert!(err.contains("4 nodes"), "{err}");
        assert!(err.contains("valid node counts: 1, 2, 3"), "{err}");
        let err = NodeSlice::new(&c, 0, 0).unwrap_err().to_string();
        assert!(err.contains("valid node counts: 1, 2, 3"), "{err}");
    }

    #[test]
    fn head_dim_that_breaks_blocks_is_refused() {
        // head_dim 48: with 3 heads, node 1 of 2 or 3 starts wo's columns at 48, not a
        // block boundary; with 4 heads, 2 nodes start at 0 and 96, 4 nodes at 48.
        let c = cfg(3, 3, 48, 256, 100);
        assert_eq!(NodeSlice::valid_node_counts(&c), vec![1]);
        let err = NodeSlice::new(&c, 0, 3).unwrap_err().to_string();
        assert!(err.contains("not a multiple of 32"), "{err}");
        let c = cfg(4, 4, 48, 256, 100);
        assert_eq!(NodeSlice::valid_node_counts(&c), vec![1, 2]);
    }

    #[test]
    fn hidden_blocks_limit_the_count() {
        // hidden 64 = 2 blocks: at most 2 nodes even with 4 KV heads.
        let c = cfg(4, 4, 32, 64, 100);
        assert_eq!(NodeSlice::valid_node_counts(&c), vec![1, 2]);
    }

    #[test]
    fn node_index_out_of_range() {
        let c = cfg(4, 4, 32, 128, 100);
        assert!(NodeSlice::new(&c, 2, 2).is_err());
    }
}
