//! The forward pass against a plain f64 reference, token by token vs batched prefill, and
//! split across 2 or 3 in-process nodes vs one.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::format::{FloatType, HiddenAct};
use crate::kernels::block::{dequantize_q40, quantize_q40};
use crate::kernels::BlockQ40;
use crate::ops::{RopeConfig, RopeScaling, RopeType};

fn config(n_heads: usize, n_kv_heads: usize, rope_type: RopeType, dtype: FloatType) -> ModelConfig {
    let head_dim = 64 / n_heads * 2;
    ModelConfig {
        arch: crate::format::ArchType::Llama,
        dim: 64,
        hidden_dim: 96,
        n_layers: 2,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size: 50,
        max_seq_len: 64,
        norm_epsilon: 1e-5,
        hidden_act: HiddenAct::Silu,
        rope: RopeConfig {
            rope_type,
            head_dim,
            theta: 10000.0,
            scaling: (rope_type == RopeType::Llama31).then_some(RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                orig_max_seq_len: 16,
            }),
        },
        weights_float_type: dtype,
        qk_norm: false,
        moe: None,
    }
}

/// Random full tensors by `.m` name, as f32 values (rows, cols).
fn random_model(cfg: &ModelConfig, seed: u64) -> HashMap<String, (usize, usize, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    let mut add = |name: String, rows: usize, cols: usize, scale: f32, offset: f32| {
        let v = (0..rows * cols)
            .map(|_| offset + rng.gen_range(-scale..scale))
            .collect();
        t.insert(name, (rows, cols, v));
    };
    let (d, h, q, kv) = (cfg.dim, cfg.hidden_dim, cfg.q_dim(), cfg.kv_dim());
    add("embedding".into(), cfg.vocab_size, d, 1.0, 0.0);
    for i in 0..cfg.n_layers {
        for (name, r, c) in [("q", q, d), ("k", kv, d), ("v", kv, d), ("wo", d, q)] {
            add(format!("layers.{i}.{name}"), r, c, 0.3, 0.0);
        }
        // the FFN: one SwiGLU, or a router and every expert's
        let ffns: Vec<String> = match cfg.moe {
            None => vec![format!("layers.{i}.")],
            Some(m) => {
                add(format!("layers.{i}.moe_gate"), m.n_experts, d, 1.0, 0.0);
                (0..m.n_experts)
                    .map(|e| format!("layers.{i}.experts.{e}."))
                    .collect()
            }
        };
        for p in ffns {
            for (name, r, c) in [("w1", h, d), ("w2", d, h), ("w3", h, d)] {
                add(format!("{p}{name}"), r, c, 0.3, 0.0);
            }
        }
        if cfg.qk_norm {
            add(format!("layers.{i}.q_norm"), 1, cfg.head_dim, 0.2, 1.0);
            add(format!("layers.{i}.k_norm"), 1, cfg.head_dim, 0.2, 1.0);
        }
        add(format!("layers.{i}.attn_norm"), 1, d, 0.2, 1.0);
        add(format!("layers.{i}.ffn_norm"), 1, d, 0.2, 1.0);
    }
    add("norm".into(), 1, d, 0.2, 1.0);
    add("wcls".into(), cfg.vocab_size, d, 0.3, 0.0);
    t
}

fn is_matrix(name: &str) -> bool {
    !(name.ends_with("norm") || name == "embedding" || name.ends_with("moe_gate"))
}

/// Tensors in the model's storage type; Q40 weights also dequantized back in `f32` so the
/// reference sees exactly the stored values.
fn encode(
    cfg: &ModelConfig,
    full: &mut HashMap<String, (usize, usize, Vec<f32>)>,
) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, (rows, cols, v)) in full.iter_mut() {
        let t = if is_matrix(name) && cfg.weights_float_type == FloatType::Q40 {
            let mut q = vec![BlockQ40::default(); v.len() / 32];
            quantize_q40(v, &mut q);
            dequantize_q40(&q, v);
            Tensor::owned(
                FloatType::Q40,
                *rows,
                *cols,
                crate::kernels::block::q40_bytes(&q),
            )
            .unwrap()
        } else {
            let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Tensor::owned(FloatType::F32, *rows, *cols, &b).unwrap()
        };
        out.insert(name.clone(), t);
    }
    out
}

fn build(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    i: usize,
    n: usize,
    bt: BufferType,
) -> Model {
    build_packed(cfg, tensors, i, n, bt, false)
}

fn build_packed(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    i: usize,
    n: usize,
    bt: BufferType,
    pack: bool,
) -> Model {
    let slice = NodeSlice::new(cfg, i, n).unwrap();
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| crate::Error::format(format!("no tensor {name}")))
    };
    // packed on 1 or 2 threads (both paths of the repacking)
    let pack_threads = if pack { 1 + i % 2 } else { 0 };
    // even nodes take their parts of the whole tensors (rows shared, as mapped); odd nodes
    // get them as owned bytes, as if shipped by the root
    let get_part = |name: &str| {
        let (part, ..) = weights::tensor_part(cfg, &slice, name)?;
        let t = part.take(get(name)?)?;
        if i.is_multiple_of(2) {
            Ok(t)
        } else {
            Tensor::owned(t.dtype, t.rows, t.cols, t.bytes())
        }
    };
    let w = Weights::from_parts(cfg, &slice, i == 0, pack_threads, &get_part).unwrap();
    Model::new(cfg.clone(), slice, w, bt, 0, 1 + i % 2).unwrap()
}

/// Token ids as a caller gives them to `Model::step`.
fn ids(tokens: &[u32]) -> Vec<i64> {
    tokens.iter().map(|&t| t as i64).collect()
}

// ---- f64 reference, written from the paper, token by token ----

fn reference_logits(
    cfg: &ModelConfig,
    t: &HashMap<String, (usize, usize, Vec<f32>)>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let g = |n: &str| t[n].2.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let matvec = |w: &[f64], x: &[f64]| -> Vec<f64> {
        w.chunks(x.len())
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let rms = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let s = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + cfg.norm_epsilon as f64)
            .sqrt();
        x.iter().zip(w).map(|(a, b)| a / s * b).collect()
    };
    let hd = cfg.head_dim;
    let freqs: Vec<f64> = cfg
        .rope
        .frequencies()
        .unwrap()
        .iter()
        .map(|&f| f as f64)
        .collect();
    let rope = |x: &mut [f64], p: usize| {
        for head in x.chunks_mut(hd) {
            for (j, f) in freqs.iter().enumerate() {
                let (a, b) = match cfg.rope.rope_type {
                    RopeType::Falcon => (j, j + hd / 2),
                    _ => (2 * j, 2 * j + 1),
                };
                let (c, s) = ((p as f64 * f).cos(), (p as f64 * f).sin());
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    };
    let mut keys: Vec<Vec<Vec<f64>>> = vec![vec![]; cfg.n_layers];
    let mut vals: Vec<Vec<Vec<f64>>> = vec![vec![]; cfg.n_layers];
    let emb = g("embedding");
    let mut out = vec![];
    for (p, &tok) in tokens.iter().enumerate() {
        let mut x = emb[tok as usize * cfg.dim..(tok as usize + 1) * cfg.dim].to_vec();
        for l in 0..cfg.n_layers {
            let n = |s: &str| g(&format!("layers.{l}.{s}"));
            let xb = rms(&x, &n("attn_norm"));
            let mut q = matvec(&n("q"), &xb);
            let mut k = matvec(&n("k"), &xb);
            let v = matvec(&n("v"), &xb);
            if cfg.qk_norm {
                let (qn, kn) = (n("q_norm"), n("k_norm"));
                q = q.chunks(hd).flat_map(|h| rms(h, &qn)).collect();
                k = k.chunks(hd).flat_map(|h| rms(h, &kn)).collect();
            }
            rope(&mut q, p);
            rope(&mut k, p);
            keys[l].push(k);
            vals[l].push(v);
            let mut att_out = vec![0.0; cfg.q_dim()];
            for h in 0..cfg.n_heads {
                let kvh = h / cfg.group_size();
                let qh = &q[h * hd..(h + 1) * hd];
                let s: Vec<f64> = keys[l]
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (pp, w) in e.iter().enumerate() {
                    for d in 0..hd {
                        att_out[h * hd + d] += w / z * vals[l][pp][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&n("wo"), &att_out);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xb = rms(&x, &n("ffn_norm"));
            let swiglu = |p: &str| {
                let h1 = matvec(&n(&format!("{p}w1")), &xb);
                let h3 = matvec(&n(&format!("{p}w3")), &xb);
                let hh: Vec<f64> = h1
                    .iter()
                    .zip(&h3)
                    .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                    .collect();
                matvec(&n(&format!("{p}w2")), &hh)
            };
            let o = match cfg.moe {
                None => swiglu(""),
                Some(m) => {
                    // softmax of the router logits, the k best experts, weighted
                    let l = matvec(&n("moe_gate"), &xb);
                    let mx = l.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = l.iter().map(|v| (v - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let mut order: Vec<usize> = (0..m.n_experts).collect();
                    order.sort_by(|&a, &b| e[b].partial_cmp(&e[a]).unwrap());
                    let top = &order[..m.n_active];
                    let sum: f64 = if m.norm_topk_prob {
                        top.iter().map(|&i| e[i] / z).sum()
                    } else {
                        1.0
                    };
                    let mut o = vec![0.0; cfg.dim];
                    for &i in top {
                        let y = swiglu(&format!("experts.{i}."));
                        o.iter_mut()
                            .zip(&y)
                            .for_each(|(a, b)| *a += e[i] / z / sum * b);
                    }
                    o
                }
            };
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        out.push(matvec(&g("wcls"), &rms(&x, &g("norm"))));
    }
    out
}

fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs() / scale)
        .fold(0.0, f64::max)
}

const TOKENS: [u32; 12] = [3, 17, 42, 0, 49, 8, 8, 23, 31, 5, 11, 2];

#[test]
fn f32_matches_the_reference_token_by_token_and_batched() {
    for (nh, nkv, rt) in [
        (4, 4, RopeType::Llama),
        (4, 2, RopeType::Falcon),
        (4, 1, RopeType::Llama31),
    ] {
        let cfg = config(nh, nkv, rt, FloatType::F32);
        let mut full = random_model(&cfg, 7);
        let tensors = encode(&cfg, &mut full);
        let want = reference_logits(&cfg, &full, &TOKENS);
        let mut m = build(&cfg, &tensors, 0, 1, BufferType::Q80);
        for (p, &tok) in TOKENS.iter().enumerate() {
            m.step(&[tok as i64], p as i64, &mut Local).unwrap();
            let e = max_rel_err(&m.logits, &want[p]);
            assert!(e < 1e-5, "{rt:?} {nh}/{nkv} pos {p}: rel err {e}");
        }
        // the whole prompt in one batch, into a fresh cache
        let mut m = build(&cfg, &tensors, 0, 1, BufferType::Q80);
        m.step(&ids(&TOKENS), 0, &mut Local).unwrap();
        let e = max_rel_err(&m.logits, want.last().unwrap());
        assert!(e < 1e-5, "{rt:?} batched: rel err {e}");
    }
}

#[test]
fn q40_weights_with_q80_inputs_stay_close() {
    let cfg = config(4, 2, RopeType::Llama, FloatType::Q40);
    let mut full = random_model(&cfg, 9);
    let tensors = encode(&cfg, &mut full); // `full` now holds the dequantized weights
    let want = reference_logits(&cfg, &full, &TOKENS);
    for bt in [BufferType::Q80, BufferType::F32] {
        let mut m = build(&cfg, &tensors, 0, 1, bt);
        m.step(&ids(&TOKENS), 0, &mut Local).unwrap();
        let e = max_rel_err(&m.logits, want.last().unwrap());
        // F32 inputs: only summation order differs; Q80 inputs: 8-bit activations.
        let bound = if bt == BufferType::F32 { 1e-5 } else { 0.05 };
        assert!(e < bound, "{bt:?}: rel err {e}");
    }
}

#[test]
fn packed_q40_equals_plain_q40() {
    let cfg = config(4, 2, RopeType::Llama, FloatType::Q40);
    let mut full = random_model(&cfg, 5);
    let tensors = encode(&cfg, &mut full);
    let mut logits = vec![];
    for pack in [false, true] {
        let mut m = build_packed(&cfg, &tensors, 0, 1, BufferType::Q80, pack);
        m.step(&ids(&TOKENS), 0, &mut Local).unwrap();
        m.step(&[7], TOKENS.len() as i64, &mut Local).unwrap();
        logits.push(m.logits.clone());
    }
    let want: Vec<f64> = logits[0].iter().map(|&v| v as f64).collect();
    let e = max_rel_err(&logits[1], &want);
    assert!(e < 1e-5, "packed vs plain: rel err {e}");
}

// ---- an in-process collective: n nodes on n threads ----

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
}

struct Threads {
    index: usize,
    n: usize,
    shared: Arc<Shared>,
}

impl Collective for Threads {
    fn node_index(&self) -> usize {
        self.index
    }
    fn n_nodes(&self) -> usize {
        self.n
    }
    fn all_reduce_sum(&mut self, x: &mut [f32]) -> crate::Result<()> {
        self.shared.slots.lock().unwrap()[self.index] = x.to_vec();
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().unwrap();
            x.fill(0.0);
            for s in slots.iter() {
                x.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            }
        }
        self.shared.barrier.wait();
        Ok(())
    }
    fn gather_logits(&mut self, local: &[f32], out: &mut [f32]) -> crate::Result<()> {
        self.shared.slots.lock().unwrap()[self.index] = local.to_vec();
        self.shared.barrier.wait();
        if self.index == 0 {
            let all: Vec<f32> = self.shared.slots.lock().unwrap().concat();
            out.copy_from_slice(&all);
        }
        self.shared.barrier.wait();
        Ok(())
    }
}

#[test]
fn split_across_nodes_equals_one_node() {
    // F32 buffers: the sums differ only in order, so nearly exact; Q80 buffers with packed
    // (fused) weights: 8-bit rounding of differently ordered sums may flip, so a looser bound
    for (bt, pack, bound) in [
        (BufferType::F32, false, 1e-5),
        (BufferType::Q80, true, 0.05),
    ] {
        split_case(bt, pack, bound);
    }
}

fn split_case(bt: BufferType, pack: bool, bound: f64) {
    let cfg = config(4, 4, RopeType::Llama, FloatType::Q40);
    let mut full = random_model(&cfg, 11);
    let tensors = encode(&cfg, &mut full);
    split_cfg_case(&cfg, &tensors, bt, pack, bound);
}

/// 2 and 3 nodes (threads) against one node.
fn split_cfg_case(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    bt: BufferType,
    pack: bool,
    bound: f64,
) {
    let (cfg, tensors) = (cfg.clone(), tensors.clone());
    let mut one = build_packed(&cfg, &tensors, 0, 1, bt, pack);
    let x0 = one.embed(&TOKENS).unwrap();
    one.step(&ids(&TOKENS), 0, &mut Local).unwrap();
    // 3 nodes: uneven (1, 1, 2 KV heads; 1, 1, 1 hidden blocks)
    for n in [2, 3] {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(n),
            slots: Mutex::new(vec![vec![]; n]),
        });
        let logits: Vec<f32> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let (shared, tensors, cfg, x0) = (shared.clone(), &tensors, &cfg, &x0);
                    s.spawn(move || {
                        let mut m = build_packed(cfg, tensors, i, n, bt, pack);
                        let mut c = Threads {
                            index: i,
                            n,
                            shared,
                        };
                        let mut x = x0.clone();
                        m.forward(&mut x, 0, &mut c).unwrap();
                        m.logits.clone()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .next()
                .unwrap()
        });
        let want: Vec<f64> = one.logits.iter().map(|&v| v as f64).collect();
        let e = max_rel_err(&logits, &want);
        assert!(e < bound, "{bt:?} {n} nodes: rel err {e}");
    }
}

#[test]
fn bad_calls_are_errors() {
    let cfg = config(4, 4, RopeType::Llama, FloatType::F32);
    let mut full = random_model(&cfg, 1);
    let tensors = encode(&cfg, &mut full);
    let mut m = build(&cfg, &tensors, 0, 1, BufferType::Q80);
    let mut x = vec![0.0; cfg.dim];
    let err = |r: crate::Result<()>| r.unwrap_err().to_string();
    let e = err(m.step(&[50], 0, &mut Local));
    assert!(e.contains("token 50 out of range (vocab_size 50)"), "{e}");
    let e = err(m.step(&[-1], 0, &mut Local));
    assert!(e.contains("token -1 out of range"), "{e}");
    let e = err(m.step(&[1], -1, &mut Local));
    assert!(e.contains("position -1 is negative"), "{e}");
    let e = err(m.step(&[1], 64, &mut Local));
    assert!(e.contains("exceed max_seq_len 64"), "{e}");
    assert!(err(m.step(&[], 0, &mut Local)).contains("at least one token"));
    let e = err(m.forward(&mut x, 64, &mut Local));
    assert!(e.contains("exceed max_seq_len 64"), "{e}");
    assert!(m.forward(&mut [], 0, &mut Local).is_err());
    assert!(m.forward(&mut x[..10], 0, &mut Local).is_err());
    // a tensor of the wrong shape
    let mut bad = tensors.clone();
    bad.insert("layers.1.w2".into(), bad["layers.1.w1"].clone());
    let slice = NodeSlice::new(&cfg, 0, 1).unwrap();
    let get = |name: &str| {
        bad.get(name)
            .cloned()
            .ok_or_else(|| crate::Error::format(name.to_string()))
    };
    let whole = |name: &str| get(name);
    let err = Weights::from_parts(&cfg, &slice, true, 0, &whole)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("layers.1.w2 is f32 96x64, expected f32 64x96"),
        "{err}"
    );
    // parts: unknown names, and a part of the wrong shape
    for name in ["layers.2.q", "layers.x.q", "layers.0.wz", "tok_embeddings"] {
        assert!(weights::tensor_part(&cfg, &slice, name).is_err(), "{name}");
    }
    let half = NodeSlice::new(&cfg, 1, 2).unwrap();
    let err = Weights::from_parts(&cfg, &half, false, 0, &get)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("expected f32 64x64"), "{err}");
}

/// Qwen3 (q/k norms, falcon RoPE, head_dim 32 = 2 × dim / n_heads) and Qwen3-MoE (6 experts, top
/// 2, with and without renormalisation) against the reference: F32 token by token and
/// batched (tokens grouped by expert), Q40 with Q80 inputs, packed or not, and split over
/// 2 and 3 in-process nodes.
#[test]
fn qwen3_and_moe_match_the_reference() {
    use crate::format::ArchType;
    let qwen = |dtype, moe: Option<MoeConfig>| ModelConfig {
        arch: if moe.is_some() {
            ArchType::Qwen3Moe
        } else {
            ArchType::Qwen3
        },
        qk_norm: true,
        moe,
        ..config(4, 4, RopeType::Falcon, dtype)
    };
    let moe = |norm_topk_prob| MoeConfig {
        n_experts: 6,
        n_active: 2,
        norm_topk_prob,
    };
    for m in [None, Some(moe(true)), Some(moe(false))] {
        let cfg = qwen(FloatType::F32, m);
        let mut full = random_model(&cfg, 13);
        let tensors = encode(&cfg, &mut full);
        let want = reference_logits(&cfg, &full, &TOKENS);
        let mut one = build(&cfg, &tensors, 0, 1, BufferType::F32);
        for (p, &tok) in TOKENS.iter().enumerate() {
            one.step(&[tok as i64], p as i64, &mut Local).unwrap();
            let e = max_rel_err(&one.logits, &want[p]);
            assert!(e < 1e-5, "{m:?} pos {p}: rel err {e}");
        }
        let mut batched = build(&cfg, &tensors, 0, 1, BufferType::F32);
        batched.step(&ids(&TOKENS), 0, &mut Local).unwrap();
        let e = max_rel_err(&batched.logits, want.last().unwrap());
        assert!(e < 1e-5, "{m:?} batched: rel err {e}");

        let cfg = qwen(FloatType::Q40, m);
        let mut full = random_model(&cfg, 17);
        let tensors = encode(&cfg, &mut full);
        let want = reference_logits(&cfg, &full, &TOKENS);
        for (bt, pack, bound) in [
            (BufferType::F32, false, 1e-5),
            (BufferType::Q80, false, 0.05),
            (BufferType::Q80, true, 0.05),
        ] {
            let mut q = build_packed(&cfg, &tensors, 0, 1, bt, pack);
            q.step(&ids(&TOKENS), 0, &mut Local).unwrap();
            let e = max_rel_err(&q.logits, want.last().unwrap());
            assert!(e < bound, "{m:?} q40 {bt:?} pack {pack}: rel err {e}");
        }
        split_cfg_case(&cfg, &tensors, BufferType::F32, false, 1e-5);
    }
}

/// (weights, buffers, packed) of the MoE tests: F32, and packed Q40 with Q80 inputs.
const MOE_RUNS: [(FloatType, BufferType, bool); 2] = [
    (FloatType::F32, BufferType::F32, false),
    (FloatType::Q40, BufferType::Q80, true),
];

/// A small Qwen3-MoE of 8 experts, `n_active` a token.
fn moe_config(dtype: FloatType, n_active: usize) -> ModelConfig {
    ModelConfig {
        arch: crate::format::ArchType::Qwen3Moe,
        qk_norm: true,
        moe: Some(MoeConfig {
            n_experts: 8,
            n_active,
            norm_topk_prob: true,
        }),
        ..config(4, 4, RopeType::Falcon, dtype)
    }
}

/// The weights of a whole model on one node (packed on one thread with `pack`).
fn one_node_weights(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>, pack: bool) -> Weights {
    let slice = NodeSlice::new(cfg, 0, 1).unwrap();
    let get_part = |name: &str| {
        let (part, ..) = weights::tensor_part(cfg, &slice, name)?;
        part.take(
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| crate::Error::format(format!("no tensor {name}")))?,
        )
    };
    Weights::from_parts(cfg, &slice, true, usize::from(pack), &get_part).unwrap()
}

/// The logits of `TOKENS` through `m`: after each token, one step at a time, or (`batched`)
/// after the one step of them all.
fn step_logits(m: &mut Model, batched: bool) -> Vec<Vec<f32>> {
    if batched {
        m.step(&ids(&TOKENS), 0, &mut Local).unwrap();
        return vec![m.logits.clone()];
    }
    TOKENS
        .iter()
        .enumerate()
        .map(|(p, &tok)| {
            m.step(&[tok as i64], p as i64, &mut Local).unwrap();
            m.logits.clone()
        })
        .collect()
}

/// Qwen3-MoE's experts run whole per thread (at least two picked experts per thread) or one
/// after another with each matmul split across the threads (fewer): 1, 2 and 3 threads give
/// the same logits to the bit, token by token (4 picked experts: 2 threads run them whole, 3
/// split them) and batched (up to 8 picked), in F32 and in packed Q40 with Q80 inputs.
#[test]
fn moe_logits_do_not_depend_on_the_thread_count() {
    for (dtype, bt, pack) in MOE_RUNS {
        let cfg = moe_config(dtype, 4);
        let mut full = random_model(&cfg, 19);
        let tensors = encode(&cfg, &mut full);
        let run = |threads: usize, batched: bool| -> Vec<Vec<f32>> {
            let w = one_node_weights(&cfg, &tensors, pack);
            let slice = NodeSlice::new(&cfg, 0, 1).unwrap();
            let mut m = Model::new(cfg.clone(), slice, w, bt, 0, threads).unwrap();
            step_logits(&mut m, batched)
        };
        for batched in [false, true] {
            let one = run(1, batched);
            for threads in [2, 3] {
                assert!(
                    run(threads, batched) == one,
                    "{dtype:?} batched {batched}: {threads} threads differ from 1"
                );
            }
        }
    }
}

/// A router whose values are all bf16 (as converted from a bf16 checkpoint) is held as bf16
/// and gives the same logits to the bit as the same values held as f32, token by token and
/// batched, in F32 and in packed Q40 with Q80 inputs; a router with any other value stays f32.
#[test]
fn a_bf16_router_is_held_as_bf16_and_routes_as_its_f32() {
    for (dtype, bt, pack) in MOE_RUNS {
        let cfg = moe_config(dtype, 2);
        let mut full = random_model(&cfg, 23);
        for (name, (_, _, v)) in full.iter_mut() {
            if name.ends_with("moe_gate") {
                v.iter_mut()
                    .for_each(|x| *x = f32::from_bits(x.to_bits() & 0xFFFF_0000));
            }
        }
        let tensors = encode(&cfg, &mut full);
        let slice = NodeSlice::new(&cfg, 0, 1).unwrap();
        let weights = |as_f32: bool| {
            let mut w = one_node_weights(&cfg, &tensors, pack);
            for (i, l) in w.layers.iter_mut().enumerate() {
                let Ffn::Moe { router, .. } = &mut l.ffn else {
                    panic!("a MoE layer")
                };
                assert!(
                    router.bf16().is_some(),
                    "layer {i}: router not held as bf16"
                );
                assert_eq!(router.read_bytes() * 2, router.nbytes());
                if as_f32 {
                    *router = tensors[&format!("layers.{i}.moe_gate")].clone();
                    assert!(router.bf16().is_none());
                }
            }
            w
        };
        let run = |as_f32: bool, batched: bool| -> Vec<Vec<f32>> {
            let mut m = Model::new(cfg.clone(), slice.clone(), weights(as_f32), bt, 0, 2).unwrap();
            step_logits(&mut m, batched)
        };
        for batched in [false, true] {
            assert!(
                run(false, batched) == run(true, batched),
                "{dtype:?} batched {batched}: the bf16 router's logits differ from the f32 one's"
            );
        }
        // one value with a nonzero low half keeps the router in f32
        let mut r = full["layers.0.moe_gate"].2.clone();
        r[5] = f32::from_bits(r[5].to_bits() | 1);
        let b: Vec<u8> = r.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = Tensor::owned(FloatType::F32, cfg.moe.unwrap().n_experts, cfg.dim, &b).unwrap();
        let t = t.held_as_bf16().unwrap();
        assert!(t.bf16().is_none() && t.read_bytes() == t.nbytes());
    }
}
