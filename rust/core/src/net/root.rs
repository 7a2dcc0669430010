//! The root's side: connect to the workers, handshake, ship weights, and the root's
//! [`Collective`]: a star, where the root sums the workers' partials and sends the sum back.

use std::ops::Range;
use std::time::Duration;

use super::auth;
use super::codec::Wire;
use super::identity::ModelIdentity;
use super::protocol::{
    expect_frame, read_frame, refusal, send_frame, BufferType, Hello, Kind, RootHello, Setup,
    StepHeader, MAGIC, MAX_REASON, PROTOCOL_VERSION,
};
use super::ship::{expect_ready, send_tensors, ShipTensor};
use super::tcp::{connect, Conn};
use super::Timeouts;
use crate::format::Reader;
use crate::model::Collective;
use crate::{Error, Result};

/// How the root joins its workers.
#[derive(Clone, Debug)]
pub struct RootOptions {
    /// Shared secret; `None` when the cluster runs without one.
    pub secret: Option<Vec<u8>>,
    pub buffer_type: BufferType,
    pub max_seq_len: u32,
    pub timeouts: Timeouts,
}

/// One connected worker.
pub struct WorkerLink {
    pub conn: Conn,
    pub addr: String,
    /// The worker has no copy of the model: the root must ship its slices.
    pub needs_weights: bool,
}

/// Bytes and time of the last step (on the root).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    pub sent: u64,
    pub received: u64,
    /// Time in socket reads and writes, waiting for the workers included.
    pub transfer: Duration,
}

/// Connect and handshake with one worker that becomes node `node_index` of `n_nodes`.
pub fn join_worker(
    addr: &str,
    node_index: usize,
    n_nodes: usize,
    model: &ModelIdentity,
    opts: &RootOptions,
) -> Result<WorkerLink> {
    let peer = format!("worker {node_index} ({addr})");
    let stream = connect(addr, &peer, opts.timeouts.connect)?;
    let mut conn = Conn::new(stream, peer.clone(), opts.timeouts.handshake)?;

    // preamble, then the worker's hello (or its refusal)
    let mut pre = Vec::with_capacity(8);
    pre.extend_from_slice(&MAGIC);
    pre.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    conn.write_all(&pre, "the protocol preamble")?;
    let hello = Hello::decode(&expect_frame(
        &mut conn,
        Kind::Hello,
        64,
        "the worker's hello",
    )?)
    .map_err(|e| Error::Protocol(format!("{peer}: {e}")))?;

    // shared secret, both ways
    let own_nonce = auth::nonce()?;
    match (&opts.secret, hello.secret_required) {
        (None, true) => {
            return Err(Error::Auth(format!(
                "{peer} requires a shared secret: give the same --secret (or DLLAMA_SECRET) to the root"
            )))
        }
        (Some(_), false) => {
            return Err(Error::Auth(format!(
                "{peer} has no shared secret but the root has one: start the worker with the same --secret \
                 (refusing to use an unauthenticated worker)"
            )))
        }
        _ => {}
    }
    let proof = match &opts.secret {
        Some(s) => auth::proof(s, auth::ROOT_ROLE, &hello.nonce, &own_nonce),
        None => Vec::new(),
    };
    send_frame(
        &mut conn,
        Kind::RootHello,
        &RootHello {
            nonce: own_nonce,
            proof,
        }
        .encode(),
        "our hello",
    )?;
    let ok = expect_frame(&mut conn, Kind::AuthOk, 64, "the worker's authentication")?;
    if let Some(s) = &opts.secret {
        let mut r = Reader::message(&ok, "AuthOk");
        let p = r.blob(64, "the proof")?;
        r.finish()?;
        if !auth::verify(s, auth::WORKER_ROLE, &own_nonce, &hello.nonce, p) {
            return Err(Error::Auth(format!(
                "{peer} failed the shared-secret challenge: it was started with a different --secret"
            )));
        }
    }

    // setup: who the worker is, which model
    let setup = Setup {
        node_index: node_index as u32,
        n_nodes: n_nodes as u32,
        buffer_type: opts.buffer_type,
        max_seq_len: opts.max_seq_len,
        model: model.clone(),
    };
    send_frame(&mut conn, Kind::Setup, &setup.encode(), "the setup")?;
    let acc = expect_frame(
        &mut conn,
        Kind::Accept,
        1,
        "the worker's answer to the setup",
    )?;
    let mut r = Reader::message(&acc, "Accept");
    let needs_weights = r.u8("needs_weights")? != 0;
    r.finish()?;
    Ok(WorkerLink {
        conn,
        addr: addr.to_string(),
        needs_weights,
    })
}

/// A refusal the peer sent before the connection broke, if it can still be read.
fn pending_refusal(conn: &mut Conn) -> Option<Error> {
    conn.set_timeout(Duration::from_millis(500)).ok()?;
    match read_frame(conn, MAX_REASON, "a refusal") {
        Ok((Kind::Refuse, p)) => Some(refusal(&conn.peer, &p)),
        _ => None,
    }
}

/// The root's collective over TCP.
pub struct RootCollective {
    workers: Vec<WorkerLink>,
    buffer_type: BufferType,
    timeouts: Timeouts,
    dim: usize,
    /// Vocab rows of each node, root first.
    vocab_ranges: Vec<Range<usize>>,
    failed: Option<String>,
    // scratch
    wire: Vec<u8>,
    recv: Vec<u8>,
    tmp: Vec<f32>,
    // counters at the start of the step
    mark: (u64, u64, Duration),
}

impl RootCollective {
    /// Connect to `addrs` (workers 1..=n-1) and handshake with each.
    pub fn connect(
        addrs: &[String],
        dim: usize,
        model: &ModelIdentity,
        opts: &RootOptions,
    ) -> Result<RootCollective> {
        let n_nodes = addrs.len() + 1;
        let mut workers = Vec::with_capacity(addrs.len());
        for (i, a) in addrs.iter().enumerate() {
            workers.push(join_worker(a, i + 1, n_nodes, model, opts)?);
        }
        Ok(RootCollective {
            workers,
            buffer_type: opts.buffer_type,
            timeouts: opts.timeouts,
            dim,
            vocab_ranges: Vec::new(),
            failed: None,
            wire: Vec::new(),
            recv: Vec::new(),
            tmp: Vec::new(),
            mark: (0, 0, Duration::ZERO),
        })
    }

    pub fn workers(&self) -> &[WorkerLink] {
        &self.workers
    }

    /// Which worker (0-based among workers, i.e. node index - 1) needs weights shipped.
    pub fn needs_weights(&self, worker: usize) -> bool {
        self.workers[worker].needs_weights
    }

    /// Stream worker `worker` (0-based) its tensors, read from `file`; returns the bytes shipped.
    pub fn ship(
        &mut self,
        worker: usize,
        file: &std::fs::File,
        tensors: &[ShipTensor],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        let link = &mut self.workers[worker];
        link.conn.set_timeout(self.timeouts.step)?;
        match send_tensors(&mut link.conn, file, tensors, progress) {
            Ok(n) => Ok(n),
            // the worker may have refused (and said why) before it stopped reading
            Err(e) => Err(pending_refusal(&mut link.conn).unwrap_or(e)),
        }
    }

    /// Wait until every worker has built its slice.
    pub fn wait_ready(&mut self) -> Result<()> {
        for w in &mut self.workers {
            w.conn.set_timeout(self.timeouts.build)?;
            expect_ready(&mut w.conn)?;
            w.conn.set_timeout(self.timeouts.step)?;
        }
        Ok(())
    }

    /// The vocab rows of each node (root first), to place the gathered logits.
    pub fn set_vocab_ranges(&mut self, ranges: Vec<Range<usize>>) -> Result<()> {
        if ranges.len() != self.workers.len() + 1 {
            return Err(Error::invalid(format!(
                "{} vocab ranges for {} nodes",
                ranges.len(),
                self.workers.len() + 1
            )));
        }
        self.vocab_ranges = ranges;
        Ok(())
    }

    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(m) => Err(Error::Connection(format!("the cluster is down: {m}"))),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        self.failed = Some(e.to_string());
        for w in &self.workers {
            w.conn.shutdown();
        }
        e
    }

    fn counters(&self) -> (u64, u64, Duration) {
        self.workers
            .iter()
            .fold((0, 0, Duration::ZERO), |(s, r, t), w| {
                (s + w.conn.sent, r + w.conn.received, t + w.conn.io_time)
            })
    }

    /// Start a step: send every worker the embedded input `x` (n_tokens, dim) and `pos`.
    /// With Q80 buffers the input travels in F16, and `x` is rounded the same way here so all
    /// nodes hold the same residual.
    pub fn begin_step(&mut self, x: &mut [f32], pos: usize) -> Result<()> {
        self.check()?;
        self.mark = self.counters();
        if self.dim == 0 || x.is_empty() || !x.len().is_multiple_of(self.dim) {
            return Err(Error::invalid(format!(
                "step input of {} values is not (n_tokens, {})",
                x.len(),
                self.dim
            )));
        }
        let n_tokens = x.len() / self.dim;
        let wire = Wire::for_vectors(self.buffer_type);
        let mut payload = Vec::with_capacity(StepHeader::SIZE + wire.bytes(x.len()));
        StepHeader {
            pos: pos as u32,
            n_tokens: n_tokens as u32,
        }
        .encode_into(&mut payload);
        wire.encode(x, &mut payload)?;
        let mut frame = Vec::with_capacity(5 + payload.len());
        super::protocol::encode_frame(&mut frame, Kind::Step, &payload);
        for i in 0..self.workers.len() {
            if let Err(e) = self.workers[i].conn.write_all(&frame, "a step") {
                return Err(self.fail(e));
            }
        }
        wire.round_trip(x, &mut self.wire)
    }

    /// Bytes and socket time since the last `begin_step`.
    pub fn step_stats(&self) -> StepStats {
        let (s, r, t) = self.counters();
        StepStats {
            sent: s - self.mark.0,
            received: r - self.mark.1,
            transfer: t - self.mark.2,
        }
    }

    /// Tell the workers the session is over and close (also done on drop).
    pub fn stop(&mut self) {
        for w in &mut self.workers {
            if self.failed.is_none() {
                let _ = w.conn.set_timeout(Duration::from_secs(1));
                let _ = send_frame(&mut w.conn, Kind::Stop, &[], "stop");
            }
            w.conn.shutdown();
        }
        self.failed.get_or_insert_with(|| "stopped".into());
    }

    fn all_reduce_inner(&mut self, x: &mut [f32]) -> Result<()> {
        let wire = Wire::for_buffers(self.buffer_type);
        let n = wire.bytes(x.len());
        self.recv.resize(n, 0);
        if let [w] = &mut self.workers[..] {
            // two nodes: both send their partial at the same moment and each adds the two
            // decoded partials (x_root + x_worker: the same bits on both, addition commutes),
            // so neither waits for a reply to its own message
            self.wire.clear();
            wire.encode(x, &mut self.wire)?;
            w.conn
                .exchange(&self.wire, &mut self.recv, "partial sums")?;
            if !wire.is_exact() {
                wire.decode(&self.wire, x)?;
            }
            return wire.decode_add(&self.recv, x, &mut self.tmp);
        }
        // more nodes: sum the workers' partials into ours
        for w in self.workers.iter_mut() {
            w.conn.read_exact(&mut self.recv, "its partial sums")?;
            wire.decode_add(&self.recv, x, &mut self.tmp)?;
        }
        // send the sum back; hold exactly what the workers will decode
        self.wire.clear();
        wire.encode(x, &mut self.wire)?;
        for w in self.workers.iter_mut() {
            w.conn.write_all(&self.wire, "the summed buffer")?;
        }
        if !wire.is_exact() {
            wire.decode(&self.wire, x)?;
        }
        Ok(())
    }

    fn gather_inner(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        if self.vocab_ranges.is_empty() {
            return Err(Error::invalid("gather_logits before set_vocab_ranges"));
        }
        let r0 = self.vocab_ranges[0].clone();
        if local.len() != r0.len() || out.len() < self.vocab_ranges.last().map_or(0, |r| r.end) {
            return Err(Error::invalid(format!(
                "gather_logits: local slice of {} for rows {r0:?}, output of {}",
                local.len(),
                out.len()
            )));
        }
        out[r0].copy_from_slice(local);
        let wire = Wire::for_vectors(self.buffer_type);
        for (i, w) in self.workers.iter_mut().enumerate() {
            let r = self.vocab_ranges[i + 1].clone();
            self.recv.resize(wire.bytes(r.len()), 0);
            w.conn.read_exact(&mut self.recv, "its logits")?;
            wire.decode(&self.recv, &mut out[r])?;
        }
        Ok(())
    }
}

impl Collective for RootCollective {
    fn node_index(&self) -> usize {
        0
    }
    fn n_nodes(&self) -> usize {
        self.workers.len() + 1
    }
    fn begin_step(&mut self, x: &mut [f32], pos: usize) -> Result<()> {
        RootCollective::begin_step(self, x, pos)
    }
    fn all_reduce_sum(&mut self, x: &mut [f32]) -> Result<()> {
        self.check()?;
        let r = self.all_reduce_inner(x);
        r.map_err(|e| self.fail(e))
    }
    fn gather_logits(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        self.check()?;
        let r = self.gather_inner(local, out);
        r.map_err(|e| self.fail(e))
    }
}

impl Drop for RootCollective {
    fn drop(&mut self) {
        self.stop();
    }
}
