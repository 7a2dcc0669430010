//! Shared by the `net_*` tests: a fake model whose partial sums depend on the node, workers
//! served from threads on 127.0.0.1, and a single-process reference of the same computation.
#![allow(dead_code)]

use std::net::TcpListener;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use dllama_core::model::{Collective, ShippedTensor};
use dllama_core::net::{
    serve, BufferType, ModelFactory, ModelIdentity, RootCollective, RootOptions, Setup, Timeouts,
    WorkerModel, WorkerOptions,
};
use dllama_core::{Error, Result};

pub const DIM: usize = 64;
pub const LAYERS: usize = 3;
pub const VOCAB: usize = 100;

/// Vocab rows of node `i` of `n` (uneven on purpose).
pub fn vocab_range(i: usize, n: usize) -> Range<usize> {
    (i * VOCAB / n)..((i + 1) * VOCAB / n)
}

/// Node `node`'s partial update for layer `l`, computed from the residual `x`.
pub fn partial(node: usize, l: usize, pos: usize, x: &[f32]) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(j, v)| ((v * (node as f32 + 1.0) + (l * 7 + pos + j % 5) as f32 * 0.3).sin()) * 0.5)
        .collect()
}

/// This node's logits (rows of `range`) for the last token of `x`.
pub fn local_logits(range: Range<usize>, x: &[f32]) -> Vec<f32> {
    let last = &x[x.len() - DIM..];
    range
        .map(|v| {
            last.iter()
                .enumerate()
                .map(|(j, a)| a * ((v * 3 + j) as f32 * 0.1).cos())
                .sum::<f32>()
        })
        .collect()
}

/// The fake model of node `node` of `n`.
pub struct Fake {
    pub node: usize,
    pub n: usize,
    /// Fail (as if the process died) at this step.
    pub die_at_step: Option<usize>,
    pub steps: usize,
    /// Hang (as a frozen machine) for this long at step `die_at_step` instead of failing.
    pub hang: Option<Duration>,
}

impl Fake {
    pub fn run(
        &mut self,
        x: &mut [f32],
        pos: usize,
        c: &mut dyn Collective,
        logits: &mut [f32],
    ) -> Result<()> {
        if Some(self.steps) == self.die_at_step {
            if let Some(d) = self.hang {
                std::thread::sleep(d);
            } else {
                return Err(Error::Invalid("fake worker dies".into()));
            }
        }
        self.steps += 1;
        for l in 0..LAYERS {
            let mut p = Vec::with_capacity(x.len());
            for t in x.chunks(DIM) {
                p.extend(partial(self.node, l, pos, t));
            }
            c.all_reduce_sum(&mut p)?;
            for (a, b) in x.iter_mut().zip(&p) {
                *a += *b;
            }
        }
        let local = local_logits(vocab_range(self.node, self.n), x);
        c.gather_logits(&local, logits)
    }
}

impl WorkerModel for Fake {
    fn forward(&mut self, x: &mut [f32], pos: usize, c: &mut dyn Collective) -> Result<()> {
        let mut none = [];
        self.run(x, pos, c, &mut none)
    }
    fn dim(&self) -> usize {
        DIM
    }
    fn max_seq_len(&self) -> usize {
        64
    }
}

/// Single-process reference: the partials summed exactly (root first, then workers in order).
pub fn reference(n: usize, x: &mut [f32], pos: usize) -> Vec<f32> {
    for l in 0..LAYERS {
        let mut sum = vec![0f32; x.len()];
        for node in 0..n {
            let mut p = Vec::new();
            for t in x.chunks(DIM) {
                p.extend(partial(node, l, pos, t));
            }
            for (s, v) in sum.iter_mut().zip(&p) {
                *s += *v;
            }
        }
        for (a, b) in x.iter_mut().zip(&sum) {
            *a += *b;
        }
    }
    (0..n)
        .flat_map(|i| local_logits(vocab_range(i, n), x))
        .collect()
}

/// Single-process reference of what the cluster computes with `buffer_type` on the wire,
/// bit for bit: the input rounded through the "vector" type; per layer, with two nodes the
/// two partials each rounded through the "buffer" type and added (root first), with more
/// nodes (or the root alone) the root's exact partial plus the workers' rounded ones, the
/// sum rounded once; the
/// workers' logits rounded through the "vector" type.
pub fn reference_on_the_wire(
    n: usize,
    x: &mut [f32],
    pos: usize,
    buffer_type: BufferType,
) -> Vec<f32> {
    use dllama_core::net::codec::Wire;
    let (buffers, vectors) = (
        Wire::for_buffers(buffer_type),
        Wire::for_vectors(buffer_type),
    );
    let mut scratch = Vec::new();
    let mut rounded = |w: Wire, v: &mut Vec<f32>| w.round_trip(v, &mut scratch).unwrap();
    let mut xv = x.to_vec();
    rounded(vectors, &mut xv);
    x.copy_from_slice(&xv);
    for l in 0..LAYERS {
        let mut parts: Vec<Vec<f32>> = (0..n)
            .map(|node| {
                x.chunks(DIM)
                    .flat_map(|t| partial(node, l, pos, t))
                    .collect()
            })
            .collect();
        let sum: Vec<f32> = if n == 2 {
            for p in parts.iter_mut() {
                rounded(buffers, p);
            }
            parts[0].iter().zip(&parts[1]).map(|(a, b)| a + b).collect()
        } else {
            let mut s = parts[0].clone();
            for p in parts.iter_mut().skip(1) {
                rounded(buffers, p);
                for (a, b) in s.iter_mut().zip(p.iter()) {
                    *a += *b;
                }
            }
            rounded(buffers, &mut s);
            s
        };
        for (a, b) in x.iter_mut().zip(&sum) {
            *a += *b;
        }
    }
    (0..n)
        .flat_map(|i| {
            let mut l = local_logits(vocab_range(i, n), x);
            if i > 0 {
                rounded(vectors, &mut l);
            }
            l
        })
        .collect()
}

/// The embedded input of token `t`.
pub fn embed(t: usize) -> Vec<f32> {
    (0..DIM)
        .map(|j| ((t * 31 + j) as f32 * 0.37).sin())
        .collect()
}

pub fn identity(tag: u8) -> ModelIdentity {
    ModelIdentity {
        file_size: 1 << 30,
        header: vec![tag; 40],
        fingerprint: [tag; 32],
    }
}

/// Factory of fake models. `local` = started with `--model` (this identity).
pub struct FakeFactory {
    pub local: Option<ModelIdentity>,
    pub die_at_step: Option<usize>,
    pub hang: Option<Duration>,
    /// Tensors a shipping root must send (name, bytes); checked byte for byte.
    pub expect_shipped: Vec<(String, Vec<u8>)>,
}

impl FakeFactory {
    /// A worker started with `--model` of identity `local`, healthy, expecting no shipping.
    pub fn plain(local: u8) -> FakeFactory {
        FakeFactory {
            local: Some(identity(local)),
            die_at_step: None,
            hang: None,
            expect_shipped: vec![],
        }
    }

    /// A worker without a model, expecting exactly `expect` to be shipped to it.
    pub fn shipped(expect: Vec<(String, Vec<u8>)>) -> FakeFactory {
        FakeFactory {
            local: None,
            expect_shipped: expect,
            ..FakeFactory::plain(1)
        }
    }
}

impl ModelFactory for FakeFactory {
    fn local_identity(&self) -> Option<&ModelIdentity> {
        self.local.as_ref()
    }
    fn check(&self, setup: &Setup) -> Result<u64> {
        if setup.n_nodes > 4 {
            return Err(Error::Invalid(format!(
                "{} nodes do not fit this model; valid: 1, 2, 3, 4",
                setup.n_nodes
            )));
        }
        // what a shipping root must send: the expected tensors, or at most the file
        let expected: u64 = self.expect_shipped.iter().map(|t| t.1.len() as u64).sum();
        Ok(if expected > 0 {
            expected
        } else {
            setup.model.file_size
        })
    }
    fn build(
        &self,
        setup: &Setup,
        shipped: Option<Vec<ShippedTensor>>,
    ) -> Result<Box<dyn WorkerModel>> {
        if let Some(t) = shipped {
            let got: Vec<(String, Vec<u8>)> = t
                .into_iter()
                .map(|t| (t.name, t.data.as_ref().to_vec()))
                .collect();
            if got != self.expect_shipped {
                let names: Vec<(&String, usize)> = got.iter().map(|(n, b)| (n, b.len())).collect();
                return Err(Error::Invalid(format!(
                    "shipped tensors differ from the expected ones: {names:?}"
                )));
            }
        }
        Ok(Box::new(Fake {
            node: setup.node_index as usize,
            n: setup.n_nodes as usize,
            die_at_step: self.die_at_step,
            steps: 0,
            hang: self.hang,
        }))
    }
}

/// A worker served from a thread; stops when dropped.
pub struct TestWorker {
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl TestWorker {
    pub fn start(factory: FakeFactory, secret: Option<&str>) -> TestWorker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let opts = WorkerOptions {
            secret: secret.map(|s| s.as_bytes().to_vec()),
            timeouts: short_timeouts(),
            max_memory: None,
        };
        let (log2, stop2) = (log.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let logf = |m: &str| log2.lock().unwrap().push(m.to_string());
            serve(listener, &opts, &factory, &logf, &|| {
                stop2.load(Ordering::Relaxed)
            })
        });
        TestWorker {
            addr,
            log,
            stop,
            handle: Some(handle),
        }
    }
    pub fn logs(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    /// Wait (up to 5 s) for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        for _ in 0..500 {
            if let Some(l) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no log line with {needle:?}; logs: {:?}", self.logs());
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let r = h.join().expect("serve thread panicked");
            r.expect("serve returned an error");
        }
    }
}

pub fn short_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        handshake: Duration::from_secs(2),
        step: Duration::from_secs(5),
        build: Duration::from_secs(5),
        idle: Duration::from_secs(30),
    }
}

pub fn root_opts(buffer: BufferType, secret: Option<&str>) -> RootOptions {
    RootOptions {
        secret: secret.map(|s| s.as_bytes().to_vec()),
        buffer_type: buffer,
        max_seq_len: 64,
        timeouts: short_timeouts(),
    }
}

/// Connect a root with Q80 buffers to the one worker at `addr`, without waiting until ready
/// (the weights are shipped first).
pub fn connect_q80_unready(addr: &str) -> RootCollective {
    RootCollective::connect(
        &[addr.to_string()],
        DIM,
        &identity(1),
        &root_opts(BufferType::Q80, None),
    )
    .unwrap()
}

/// Connect a root to `workers`, wait until ready, set the vocab ranges.
pub fn connect_root(
    workers: &[&TestWorker],
    buffer: BufferType,
    secret: Option<&str>,
) -> Result<RootCollective> {
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let mut root = RootCollective::connect(&addrs, DIM, &identity(1), &root_opts(buffer, secret))?;
    root.wait_ready()?;
    let n = workers.len() + 1;
    root.set_vocab_ranges((0..n).map(|i| vocab_range(i, n)).collect())?;
    Ok(root)
}

/// Run tokens through the cluster; returns the logits of each step.
pub fn run_root(root: &mut RootCollective, steps: &[(Vec<usize>, usize)]) -> Result<Vec<Vec<f32>>> {
    let n = root.n_nodes();
    let mut fake = Fake {
        node: 0,
        n,
        die_at_step: None,
        steps: 0,
        hang: None,
    };
    let mut out = Vec::new();
    for (tokens, pos) in steps {
        let mut x: Vec<f32> = tokens.iter().flat_map(|t| embed(*t)).collect();
        root.begin_step(&mut x, *pos)?;
        let mut logits = vec![0f32; VOCAB];
        fake.run(&mut x, *pos, root, &mut logits)?;
        out.push(logits);
    }
    Ok(out)
}

/// Asserts that an error message names every one of `needles` (the peer, the cause...).
#[track_caller]
pub fn assert_names(message: &str, needles: &[&str]) {
    let missing: Vec<&&str> = needles.iter().filter(|n| !message.contains(**n)).collect();
    assert!(missing.is_empty(), "{message:?} does not name {missing:?}");
}

/// Asserts that what started at `start` ended within `limit` (a bounded wait, not a speed).
#[track_caller]
pub fn assert_within(start: std::time::Instant, limit: Duration) {
    let elapsed = start.elapsed();
    assert!(elapsed < limit, "took {elapsed:?}, more than {limit:?}");
}
