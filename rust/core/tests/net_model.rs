//! The real forward pass split across 2-4 nodes over 127.0.0.1 (workers in threads, some
//! mapping their own copy of the file, some shipped their slices) against one node.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dllama_core::format::{quantize, FloatType, ModelFile, ModelHeader};
use dllama_core::model::load::{load_model, LoadOptions};
use dllama_core::model::{BufferType, Local, ModelConfig};
use dllama_core::net::cluster::{connect_workers, start_root, EngineFactory};
use dllama_core::net::{serve, RootOptions, Timeouts, WorkerOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A random Q40 model: 4 KV heads (so 1 to 4 nodes), GQA 8/4, hidden with 8 blocks.
fn write_model(path: &Path, ft: FloatType) {
    let h = ModelHeader {
        dim: 128,
        hidden_dim: 256,
        n_layers: 2,
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: 32,
        vocab_size: 300,
        max_seq_len: 64,
        weights_float_type: ft,
        ..ModelHeader::default()
    };
    let mut bytes = h.to_bytes();
    let mut rng = StdRng::seed_from_u64(7);
    for t in h.tensors() {
        assert_eq!(t.offset as usize, bytes.len());
        let scale = if t.rows == 1 {
            0.0
        } else {
            1.0 / (t.cols as f32).sqrt()
        };
        let x: Vec<f32> = (0..t.rows * t.cols)
            .map(|_| {
                if t.rows == 1 {
                    1.0 + rng.gen_range(-0.1..0.1)
                } else {
                    rng.gen_range(-2.0..2.0) * scale
                }
            })
            .collect();
        bytes.extend(quantize(&x, t.float_type).unwrap());
    }
    assert_eq!(bytes.len() as u64, h.file_size());
    std::fs::write(path, bytes).unwrap();
}

struct Worker {
    addr: String,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn start(local: Option<&Path>) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let factory = EngineFactory::new(local.map(|p| ModelFile::open(p).unwrap()), 1).unwrap();
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let opts = WorkerOptions {
                secret: None,
                timeouts: Timeouts::default(),
                max_memory: None,
            };
            serve(
                listener,
                &opts,
                &factory,
                &|m: &str| eprintln!("worker: {m}"),
                &|| s.load(Ordering::Relaxed),
            )
            .unwrap();
        });
        Worker {
            addr,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
    }
}

/// Greedy generation: logits of every step, and the tokens.
fn generate(
    path: &Path,
    workers: &[&Worker],
    bt: BufferType,
    steps: usize,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let opts = LoadOptions {
        buffer_type: bt,
        max_seq_len: 64,
        ..Default::default()
    };
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    // one node: the whole model; a root: connect the workers, then its own slice
    let (mut model, mut root) = if addrs.is_empty() {
        (load_model(path, &opts).unwrap(), None)
    } else {
        let (m, r) = start_root(
            path,
            &opts,
            &addrs,
            Some(String::new()),
            Timeouts::default(),
            &mut |_, _, _| {},
        )
        .unwrap();
        (m, Some(r))
    };
    let mut tokens: Vec<u32> = vec![1, 17, 42, 5];
    let mut all = Vec::new();
    let mut pos = 0;
    let mut input = tokens.clone();
    for _ in 0..steps {
        let ids: Vec<i64> = input.iter().map(|&t| t as i64).collect();
        match root.as_mut() {
            Some(r) => model.step(&ids, pos as i64, r).unwrap(),
            None => model.step(&ids, pos as i64, &mut Local).unwrap(),
        }
        pos += input.len();
        let logits = model.logits.clone();
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        all.push(logits);
        tokens.push(next);
        input = vec![next];
    }
    (all, tokens)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("dllama-net-{}-{name}", std::process::id()))
}

fn max_rel_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let scale = b.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn f32_buffers_match_one_node_for_1_to_4_nodes() {
    let path = tmp("q40.m");
    write_model(&path, FloatType::Q40);
    let (want_logits, want_tokens) = generate(&path, &[], BufferType::F32, 6);
    for n in 2..=4 {
        // odd workers map their own copy, even ones are shipped their slices
        let ws: Vec<Worker> = (1..n)
            .map(|i| Worker::start(if i % 2 == 1 { Some(&path) } else { None }))
            .collect();
        let refs: Vec<&Worker> = ws.iter().collect();
        let (logits, tokens) = generate(&path, &refs, BufferType::F32, 6);
        assert_eq!(tokens, want_tokens, "n = {n}");
        let err = max_rel_err(&logits, &want_logits);
        // only the summation order differs from one node
        assert!(err < 1e-5, "n = {n}: max error {err} of max |logit|");
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn q80_buffers_stay_close_to_one_node() {
    let path = tmp("q40b.m");
    write_model(&path, FloatType::Q40);
    let (want_logits, want_tokens) = generate(&path, &[], BufferType::Q80, 6);
    for n in [2, 3] {
        // worker 1 maps its own copy; worker 2 is shipped its slice (on x86_64 the shipped
        // bytes go through a temporary file so the repacking can release them)
        let ws: Vec<Worker> = (1..n)
            .map(|i| Worker::start(if i == 1 { Some(&path) } else { None }))
            .collect();
        let refs: Vec<&Worker> = ws.iter().collect();
        let (logits, tokens) = generate(&path, &refs, BufferType::Q80, 6);
        let err = max_rel_err(&logits, &want_logits);
        eprintln!(
            "n = {n}: q80 max error {err} of max |logit|; tokens {tokens:?} vs {want_tokens:?}"
        );
        assert!(err < 0.05, "n = {n}: max error {err} of max |logit|");
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_node_count_that_does_not_fit_lists_the_valid_ones() {
    let path = tmp("q40c.m");
    write_model(&path, FloatType::Q40);
    let file = ModelFile::open(&path).unwrap();
    let cfg = ModelConfig::from_header(&file.header);
    let addrs: Vec<String> = (0..4).map(|i| format!("127.0.0.1:{}", 1 + i)).collect();
    let opts = RootOptions {
        secret: None,
        buffer_type: BufferType::Q80,
        max_seq_len: 64,
        timeouts: Timeouts::default(),
    };
    let err = connect_workers(&file, &cfg, &addrs, &opts, &mut |_, _, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("5 nodes") && err.contains("valid node counts: 1, 2, 3, 4"),
        "{err}"
    );
    std::fs::remove_file(&path).unwrap();
}
