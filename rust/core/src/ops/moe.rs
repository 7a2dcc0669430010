//! The router of a mixture-of-experts FFN (Qwen3-MoE): softmax over the experts' logits, the
//! top k of each token, optionally renormalised to sum to 1.

use super::activation::softmax;
use crate::{Error, Result};

/// For each expert, the tokens routed to it with their weights, tokens in increasing order.
pub type Routes = Vec<Vec<(usize, f32)>>;

/// `logits` (n_tokens, n_experts) become probabilities in place; token t goes to the `k`
/// experts of highest probability (ties: the lower expert index first, as `torch.topk` on
/// CPU), weighted by its probability, divided by the sum of the k when `norm_topk`.
pub fn route_top_k(
    logits: &mut [f32],
    n_experts: usize,
    k: usize,
    norm_topk: bool,
) -> Result<Routes> {
    if n_experts == 0 || k == 0 || k > n_experts || !logits.len().is_multiple_of(n_experts) {
        return Err(Error::invalid(format!(
            "router: {} logits, {n_experts} experts, top {k}: need 0 < k <= n_experts and whole rows",
            logits.len()
        )));
    }
    let mut routes: Routes = vec![Vec::new(); n_experts];
    let mut order: Vec<usize> = (0..n_experts).collect();
    for (t, p) in logits.chunks_exact_mut(n_experts).enumerate() {
        softmax(p);
        // the k largest, stable on ties; NaN (a broken model) sorts last
        order.sort_by(|&a, &b| {
            let (pa, pb) = (p[a], p[b]);
            pb.partial_cmp(&pa)
                .unwrap_or_else(|| pa.is_nan().cmp(&pb.is_nan()))
                .then(a.cmp(&b))
        });
        let top = &order[..k];
        let sum: f32 = if norm_topk {
            top.iter().map(|&e| p[e]).sum()
        } else {
            1.0
        };
        for &e in top {
            routes[e].push((t, p[e] / sum));
        }
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs(l: &[f32]) -> Vec<f32> {
        let m = l.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = l.iter().map(|v| (v - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn picks_top_k_and_renormalises() {
        let row = [0.1f32, 2.0, -1.0, 1.5];
        let p = probs(&row);
        for norm in [false, true] {
            let mut l = row.to_vec();
            let r = route_top_k(&mut l, 4, 2, norm).unwrap();
            assert!(r[0].is_empty() && r[2].is_empty());
            let s = if norm { p[1] + p[3] } else { 1.0 };
            assert_eq!(r[1].len(), 1);
            assert!((r[1][0].1 - p[1] / s).abs() < 1e-6);
            assert!((r[3][0].1 - p[3] / s).abs() < 1e-6);
            if norm {
                assert!((r[1][0].1 + r[3][0].1 - 1.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        // experts 1, 2, 3 tie for the second place
        let mut l = vec![3.0f32, 1.0, 1.0, 1.0, 0.0];
        let r = route_top_k(&mut l, 5, 2, true).unwrap();
        assert_eq!(r[0].len(), 1);
        assert_eq!(r[1].len(), 1);
        assert!(r[2].is_empty() && r[3].is_empty() && r[4].is_empty());
        // all equal: the first k
        let mut l = vec![0.5f32; 6];
        let r = route_top_k(&mut l, 6, 3, false).unwrap();
        let picked: Vec<usize> = (0..6).filter(|&e| !r[e].is_empty()).collect();
        assert_eq!(picked, vec![0, 1, 2]);
        assert!((r[0][0].1 - 1.0 / 6.0).abs() < 1e-6);
    }

    #[test]
    fn tokens_grouped_by_expert_in_order() {
        // 3 tokens over 4 experts, top 1: tokens 0 and 2 pick expert 3, token 1 expert 0
        let mut l = vec![0.0, 0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0];
        let r = route_top_k(&mut l, 4, 1, true).unwrap();
        assert_eq!(r[3].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![1]);
        assert!(r[1].is_empty() && r[2].is_empty());
        assert!(r[3].iter().all(|x| x.1 == 1.0));
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(route_top_k(&mut [0.0; 8], 4, 5, true).is_err());
        assert!(route_top_k(&mut [0.0; 7], 4, 2, true).is_err());
        assert!(route_top_k(&mut [0.0; 8], 4, 0, true).is_err());
    }
}
