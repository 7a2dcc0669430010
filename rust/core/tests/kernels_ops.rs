//! RMSNorm, RoPE, softmax, SiLU / GELU and attention against f64 references.

#[path = "kernels_common/mod.rs"]
mod common;

use common::*;
use dllama_core::ops::{self, AttentionShape, RopeConfig, RopeScaling, RopeTable, RopeType};
use dllama_core::pool::ThreadPool;

/// Elementwise ops: relative error of f32 math on O(1) values.
const OPS_REL: f64 = 2e-6;
/// Attention: a softmax and two dot products of head_dim in f32; relative to max |v|.
const ATTENTION_REL: f64 = 1e-6;

#[test]
fn rmsnorm_matches_f64() {
    let mut rng = rng(20);
    for dim in [1, 7, 8, 33, 576, 4096] {
        let x = random_values(&mut rng, 3 * dim, 2.0);
        let w = random_values(&mut rng, dim, 1.0);
        let mut out = vec![0.0f32; 3 * dim];
        ops::rmsnorm_rows(&x, &w, 1e-5, &mut out).unwrap();
        for t in 0..3 {
            let xr = &x[t * dim..(t + 1) * dim];
            let ms: f64 = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + 1e-5f32 as f64).sqrt();
            for i in 0..dim {
                let want = xr[i] as f64 * inv * w[i] as f64;
                let got = out[t * dim + i] as f64;
                assert!(
                    (got - want).abs() <= OPS_REL * want.abs() + 1e-30,
                    "dim {dim} [{t},{i}]: {got} vs {want}"
                );
            }
        }
    }
    assert!(ops::rmsnorm(&[1.0; 4], &[1.0; 3], 1e-5, &mut [0.0; 4]).is_err());
    assert!(ops::rmsnorm_rows(&[1.0; 5], &[1.0; 2], 1e-5, &mut [0.0; 5]).is_err());
}

#[test]
fn softmax_and_activations_match_f64() {
    let mut rng = rng(21);
    for n in [1, 5, 64, 1000] {
        let x = random_values(&mut rng, n, 10.0);
        let mut y = x.clone();
        ops::softmax(&mut y);
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        for i in 0..n {
            let want = (x[i] as f64 - max).exp() / sum;
            assert!(
                (y[i] as f64 - want).abs() <= 1e-6 * want + 1e-12,
                "softmax {n} [{i}]"
            );
        }
        let up = random_values(&mut rng, n, 1.0);
        let mut g = x.clone();
        ops::silu_mul(&mut g, &up).unwrap();
        let mut ge = x.clone();
        ops::gelu_mul(&mut ge, &up).unwrap();
        for i in 0..n {
            let v = x[i] as f64;
            let silu = v / (1.0 + (-v).exp()) * up[i] as f64;
            let gelu = 0.5
                * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
                * up[i] as f64;
            assert!(
                (g[i] as f64 - silu).abs() <= OPS_REL * (v.abs() * (up[i] as f64).abs()) + 1e-30,
                "silu [{i}]"
            );
            assert!(
                (ge[i] as f64 - gelu).abs() <= 1e-5 * (v.abs() * (up[i] as f64).abs()) + 1e-30,
                "gelu [{i}]"
            );
        }
    }
    assert!(ops::silu_mul(&mut [0.0; 3], &[0.0; 2]).is_err());
    let mut empty: [f32; 0] = [];
    ops::softmax(&mut empty);
}

fn rope_config(rope_type: RopeType, head_dim: usize) -> RopeConfig {
    RopeConfig {
        rope_type,
        head_dim,
        theta: 10000.0,
        scaling: Some(RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            orig_max_seq_len: 8192,
        }),
    }
}

#[test]
fn rope_rotates_pairs_and_halves() {
    let mut rng = rng(22);
    let hd = 16;
    for rope_type in [RopeType::Llama, RopeType::Falcon] {
        let table = RopeTable::new(rope_config(rope_type, hd), 64).unwrap();
        let x = random_values(&mut rng, 3 * hd, 1.0);
        for pos in [0usize, 1, 17, 63] {
            let mut y = x.clone();
            table.apply(&mut y, pos).unwrap();
            for h in 0..3 {
                for i in 0..hd / 2 {
                    let f = 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64);
                    let (c, s) = ((pos as f64 * f).cos(), (pos as f64 * f).sin());
                    let (ia, ib) = match rope_type {
                        RopeType::Falcon => (h * hd + i, h * hd + i + hd / 2),
                        _ => (h * hd + 2 * i, h * hd + 2 * i + 1),
                    };
                    let (a, b) = (x[ia] as f64, x[ib] as f64);
                    let tol = 1e-5 * (a.abs() + b.abs()) + 1e-7;
                    assert!(
                        (y[ia] as f64 - (a * c - b * s)).abs() <= tol,
                        "{rope_type:?} pos {pos} pair {i}"
                    );
                    assert!(
                        (y[ib] as f64 - (a * s + b * c)).abs() <= tol,
                        "{rope_type:?} pos {pos} pair {i}"
                    );
                }
            }
        }
        let mut y = x.clone();
        assert!(
            table.apply(&mut y, 64).is_err(),
            "position beyond the table"
        );
        assert!(table.apply(&mut y[..hd + 1], 0).is_err(), "not whole heads");
    }
}

#[test]
#[allow(clippy::excessive_precision)] // the values as transformers printed them
fn llama31_frequencies_match_transformers() {
    // transformers ROPE_INIT_FUNCTIONS["llama3"] for head_dim 64, theta 500000, factor 8,
    // low 1, high 4, original 8192 (float32), printed by transformers 4.x
    let want: [f32; 32] = [
        1.0,
        0.663601279258728,
        0.44036662578582764,
        0.2922278344631195,
        0.193922758102417,
        0.12868738174438477,
        0.08539710193872452,
        0.05666961893439293,
        0.03760603070259094,
        0.02495540864765644,
        0.016560440883040428,
        0.010989529080688953,
        0.00729266507551074,
        0.00483942124992609,
        0.0032114461064338684,
        0.0013718936825171113,
        0.0005248460220173001,
        0.0001785077911335975,
        7.784655463183299e-05,
        5.165906986803748e-05,
        3.428102354519069e-05,
        2.2748929040972143e-05,
        1.5096217794052791e-05,
        1.0017868589784484e-05,
        6.647869668086059e-06,
        4.411534519022098e-06,
        2.927499735960737e-06,
        1.9426925064180978e-06,
        1.289173155782919e-06,
        8.554969213037111e-07,
        5.677088097399974e-07,
        3.76732259610435e-07,
    ];
    let mut cfg = rope_config(RopeType::Llama31, 64);
    cfg.theta = 500000.0;
    let got = cfg.frequencies().unwrap();
    for i in 0..32 {
        assert!(
            ((got[i] - want[i]) / want[i]).abs() < 2e-6,
            "freq {i}: {} vs {}",
            got[i],
            want[i]
        );
    }
    cfg.scaling = None;
    assert!(cfg.frequencies().is_err(), "llama3.1 without scaling");
    assert!(RopeType::from_code(3).is_none());
}

/// f64 attention of one token over positions 0..=pos; k, v: (n_kv_heads, max_seq, head_dim).
fn attention_ref(shape: &AttentionShape, q: &[f32], k: &[f32], v: &[f32], pos: usize) -> Vec<f64> {
    let hd = shape.head_dim;
    let max_seq = k.len() / shape.kv_dim();
    let group = shape.n_heads / shape.n_kv_heads;
    let mut out = vec![0.0; shape.q_dim()];
    for h in 0..shape.n_heads {
        // position p of KV head h / group is at (h / group · max_seq + p) · hd
        let at = |p: usize, i: usize| ((h / group) * max_seq + p) * hd + i;
        let scores: Vec<f64> = (0..=pos)
            .map(|p| {
                (0..hd)
                    .map(|i| q[h * hd + i] as f64 * k[at(p, i)] as f64)
                    .sum::<f64>()
                    / (hd as f64).sqrt()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        for p in 0..=pos {
            for i in 0..hd {
                out[h * hd + i] += e[p] / sum * v[at(p, i)] as f64;
            }
        }
    }
    out
}

#[test]
fn attention_gqa_matches_f64_on_any_thread_count() {
    let mut rng = rng(23);
    for shape in [
        AttentionShape {
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 8,
        },
        AttentionShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 12,
        },
        AttentionShape {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        },
    ] {
        let (pos0, n_tokens, max_seq) = (5, 4, 16);
        let q = random_values(&mut rng, n_tokens * shape.q_dim(), 1.0);
        let k = random_values(&mut rng, max_seq * shape.kv_dim(), 1.0);
        let v = random_values(&mut rng, max_seq * shape.kv_dim(), 1.0);
        for threads in [1, 2, 3] {
            let mut pool = ThreadPool::new(threads).unwrap();
            let mut out = vec![f32::NAN; q.len()];
            ops::attention(&mut pool, &shape, &q, &k, &v, pos0, n_tokens, &mut out).unwrap();
            let vmax = v.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
            for t in 0..n_tokens {
                let qd = shape.q_dim();
                let want = attention_ref(&shape, &q[t * qd..(t + 1) * qd], &k, &v, pos0 + t);
                for i in 0..qd {
                    let got = out[t * qd + i] as f64;
                    assert!(
                        (got - want[i]).abs() <= ATTENTION_REL * vmax,
                        "{shape:?} {threads} threads token {t} [{i}]: {got} vs {}",
                        want[i]
                    );
                }
            }
        }
        let mut pool = ThreadPool::new(1).unwrap();
        let mut out = vec![0.0f32; q.len()];
        assert!(
            ops::attention(&mut pool, &shape, &q, &k, &v, 14, n_tokens, &mut out).is_err(),
            "cache too short"
        );
    }
    let bad = AttentionShape {
        n_heads: 5,
        n_kv_heads: 2,
        head_dim: 4,
    };
    let mut pool = ThreadPool::new(1).unwrap();
    assert!(ops::attention(
        &mut pool,
        &bad,
        &[0.0; 20],
        &[0.0; 8],
        &[0.0; 8],
        0,
        1,
        &mut [0.0; 20]
    )
    .is_err());
}
