//! How the nodes of a cluster combine their partial results.
//!
//! The forward pass of node `i` of `n` computes its slice of every layer and calls the
//! collective twice per layer (after attention, after the FFN) to turn its partial sums of the
//! residual update into the full sums that every node then holds, and once at the end to gather
//! the logits on the root. On one machine the collective is [`Local`], which does nothing.
//! The TCP implementations live in `crate::net`.

use crate::Result;

pub trait Collective: Send {
    /// This node's index: 0 is the root.
    fn node_index(&self) -> usize;
    /// How many nodes take part (1 on one machine).
    fn n_nodes(&self) -> usize;
    /// Called on the root with the embedded input `x` (n_tokens, dim) of a step at `pos`,
    /// before the layers: a cluster's root sends it to the workers (and may round `x` as they
    /// receive it). Nothing to do on one machine.
    fn begin_step(&mut self, _x: &mut [f32], _pos: usize) -> Result<()> {
        Ok(())
    }
    /// `x`: (n_tokens, dim) partial sums on each node; on return every node holds the
    /// element-wise sum over all nodes.
    fn all_reduce_sum(&mut self, x: &mut [f32]) -> Result<()>;
    /// `local`: this node's slice of the logits of the last token (its vocab rows).
    /// On the root, `out` (vocab_size) receives all slices in node order; on a worker `out`
    /// is left untouched.
    fn gather_logits(&mut self, local: &[f32], out: &mut [f32]) -> Result<()>;
}

/// The collective of a single node: nothing to combine.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Collective for Local {
    fn node_index(&self) -> usize {
        0
    }
    fn n_nodes(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _x: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn gather_logits(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        out[..local.len()].copy_from_slice(local);
        Ok(())
    }
}
