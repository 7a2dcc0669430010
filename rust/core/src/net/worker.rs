//! The worker: listen, serve one root at a time, and the worker's [`Collective`].
//!
//! A session: preamble check, hello, shared-secret challenge (both ways), setup (which node,
//! which model), weights (mapped from the worker's own copy or shipped by the root), `Ready`,
//! then steps until the root sends `Stop` or goes away; then the worker listens again.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::auth;
use super::codec::Wire;
use super::identity::ModelIdentity;
use super::protocol::{
    expect_frame, read_frame_header, send_frame, send_refusal, Hello, Kind, RootHello, Setup,
    StepHeader, Writer, MAGIC, PROTOCOL_VERSION,
};
use super::ship::receive_tensors;
use super::tcp::Conn;
use super::Timeouts;
use crate::model::{Collective, ShippedTensor};
use crate::pool::lock;
use crate::{Error, Result};

/// A worker's slice of the model, able to run one forward step.
pub trait WorkerModel: Send {
    /// Run the step on `x` (n_tokens, dim) at `pos`, calling the collective as the root does.
    fn forward(&mut self, x: &mut [f32], pos: usize, collective: &mut dyn Collective)
        -> Result<()>;
    /// The model's `dim` (values per token of the residual).
    fn dim(&self) -> usize;
    /// Positions of its KV cache: no step may go beyond.
    fn max_seq_len(&self) -> usize;
}

/// Builds the worker's slice for a root's setup.
pub trait ModelFactory: Sync {
    /// Identity of the worker's own model file (started with `--model`), if any.
    fn local_identity(&self) -> Option<&ModelIdentity>;
    /// Check the setup before any weight moves (e.g. the slice exists for this node count);
    /// returns how many bytes of weights the root must ship for it (the receiving worker
    /// accepts no more).
    fn check(&self, setup: &Setup) -> Result<u64>;
    /// Build the slice from the tensors the root `shipped`, or (`None`) from the worker's own
    /// copy of the model file (its identity checked in the handshake).
    fn build(
        &self,
        setup: &Setup,
        shipped: Option<Vec<ShippedTensor>>,
    ) -> Result<Box<dyn WorkerModel>>;
    /// Bytes of memory the slice takes besides its weights (KV cache, RoPE table), counted
    /// with them against the worker's memory budget.
    fn working_memory(&self, _setup: &Setup) -> Result<u64> {
        Ok(0)
    }
}

/// Options of `dllama serve-worker`.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub secret: Option<Vec<u8>>,
    pub timeouts: Timeouts,
    /// Most bytes of memory a root's slice may take (weights, KV cache, RoPE table); `None`:
    /// the memory available when the root connects.
    pub max_memory: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// the worker's collective

/// The worker's side of the star: send partials to the root, receive the sums.
pub struct WorkerCollective<'a> {
    conn: &'a mut Conn,
    node_index: usize,
    n_nodes: usize,
    buffers: Wire,
    vectors: Wire,
    bufs: &'a mut WireBuffers,
}

/// A worker's encoded messages and decoding scratch, kept from step to step: a step's logits
/// alone take hundreds of KB, which allocated afresh each step come back as new pages.
#[derive(Default)]
pub struct WireBuffers {
    out: Vec<u8>,
    recv: Vec<u8>,
    scratch: Vec<f32>,
}

impl<'a> WorkerCollective<'a> {
    pub fn new(conn: &'a mut Conn, setup: &Setup, bufs: &'a mut WireBuffers) -> Self {
        WorkerCollective {
            conn,
            node_index: setup.node_index as usize,
            n_nodes: setup.n_nodes as usize,
            buffers: Wire::for_buffers(setup.buffer_type),
            vectors: Wire::for_vectors(setup.buffer_type),
            bufs,
        }
    }
}

impl Collective for WorkerCollective<'_> {
    fn node_index(&self) -> usize {
        self.node_index
    }
    fn n_nodes(&self) -> usize {
        self.n_nodes
    }
    fn all_reduce_sum(&mut self, x: &mut [f32]) -> Result<()> {
        let WireBuffers { out, recv, scratch } = &mut *self.bufs;
        out.clear();
        self.buffers.encode(x, out)?;
        recv.resize(out.len(), 0);
        if self.n_nodes == 2 {
            // both nodes send their partial at once and add the two (see the root's side)
            self.conn.exchange(out, recv, "partial sums")?;
            if !self.buffers.is_exact() {
                self.buffers.decode(out, x)?;
            }
            return self.buffers.decode_add(recv, x, scratch);
        }
        self.conn.write_all(out, "our partial sums")?;
        self.conn.read_exact(recv, "the summed buffer")?;
        self.buffers.decode(recv, x)
    }
    fn gather_logits(&mut self, local: &[f32], _out: &mut [f32]) -> Result<()> {
        let out = &mut self.bufs.out;
        out.clear();
        self.vectors.encode(local, out)?;
        self.conn.write_all(out, "our logits")
    }
}

// ---------------------------------------------------------------------------------------------
// serving

struct Shared<'a> {
    opts: &'a WorkerOptions,
    factory: &'a dyn ModelFactory,
    log: &'a (dyn Fn(&str) + Sync),
    /// The root being served, if any.
    busy: Mutex<Option<String>>,
    /// Open connections, to shut them down when the worker stops.
    open: Mutex<Vec<(u64, TcpStream)>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    /// Connections that have not yet proven themselves (handshake not done).
    unauthenticated: AtomicUsize,
    /// Those connections, oldest first (the one dropped to make room for a new one).
    pending: Mutex<VecDeque<(u64, TcpStream)>>,
}

/// Most connections in their handshake at once (each holds a thread and up to a control frame
/// of memory). When a new one comes beyond it, the one that has waited longest is dropped to
/// make room: a root's handshake takes milliseconds, so connections that stay silent cannot
/// keep it out. Past twice as many (the dropped ones take a moment to end) a new one is
/// refused at once.
pub const MAX_UNAUTHENTICATED: usize = 16;

/// Counts connection `id` as unauthenticated until dropped or `done()`.
struct PreAuth<'s, 'a> {
    shared: Option<&'s Shared<'a>>,
    id: u64,
}

impl PreAuth<'_, '_> {
    fn done(&mut self) {
        if let Some(s) = self.shared.take() {
            s.unauthenticated.fetch_sub(1, Ordering::Relaxed);
            lock(&s.pending).retain(|(i, _)| *i != self.id);
        }
    }
}

impl Drop for PreAuth<'_, '_> {
    fn drop(&mut self) {
        self.done();
    }
}

/// Serve roots on `listener`, one at a time, until `stop()` returns true (polled every
/// 100 ms) or an error of the listener itself.
pub fn serve(
    listener: TcpListener,
    opts: &WorkerOptions,
    factory: &dyn ModelFactory,
    log: &(dyn Fn(&str) + Sync),
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("cannot make the listening socket non-blocking", e))?;
    let shared = Shared {
        opts,
        factory,
        log,
        busy: Mutex::new(None),
        open: Mutex::new(Vec::new()),
        next_id: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        unauthenticated: AtomicUsize::new(0),
        pending: Mutex::new(VecDeque::new()),
    };
    let result = std::thread::scope(|scope| -> Result<()> {
        let r = loop {
            if stop() {
                break Ok(());
            }
            match listener.accept() {
                Ok((stream, addr)) => {
                    let waiting = shared.unauthenticated.fetch_add(1, Ordering::Relaxed);
                    if waiting >= 2 * MAX_UNAUTHENTICATED {
                        shared.unauthenticated.fetch_sub(1, Ordering::Relaxed);
                        refuse_at_once(
                            stream,
                            "too many connections in their handshake; try again",
                        );
                        continue;
                    }
                    if waiting >= MAX_UNAUTHENTICATED {
                        // make room: the connection that has waited longest goes (its thread
                        // ends at once, and with it its count)
                        if let Some((_, oldest)) = lock(&shared.pending).pop_front() {
                            let _ = oldest.shutdown(std::net::Shutdown::Both);
                        }
                    }
                    let _ = stream.set_nonblocking(false);
                    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                    if let Ok(clone) = stream.try_clone() {
                        lock(&shared.open).push((id, clone));
                    }
                    if let Ok(clone) = stream.try_clone() {
                        lock(&shared.pending).push_back((id, clone));
                    }
                    let shared = &shared;
                    scope.spawn(move || {
                        let peer = format!("root {addr}");
                        let pre = PreAuth {
                            shared: Some(shared),
                            id,
                        };
                        let r =
                            catch_unwind(AssertUnwindSafe(|| handle(shared, stream, &peer, pre)));
                        match r {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                if !shared.stopping.load(Ordering::Relaxed) {
                                    (shared.log)(&format!("{e}"))
                                }
                            }
                            Err(_) => (shared.log)(&format!(
                                "internal error while serving {peer}; session dropped"
                            )),
                        }
                        lock(&shared.open).retain(|(i, _)| *i != id);
                    });
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => break Err(Error::io("accept failed on the listening socket", e)),
            }
        };
        shared.stopping.store(true, Ordering::Relaxed);
        for (_, s) in lock(&shared.open).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        r
    });
    result
}

/// Clears the busy flag when the session ends, however it ends.
struct BusyGuard<'a>(&'a Mutex<Option<String>>);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        *lock(self.0) = None;
    }
}

/// A refusal written without waiting (the socket is non-blocking): the accept loop must not
/// stall on a peer that does not read.
fn refuse_at_once(stream: TcpStream, reason: &str) {
    use std::io::Write;
    let mut frame = Vec::new();
    super::protocol::encode_frame(&mut frame, Kind::Refuse, reason.as_bytes());
    let mut stream = stream;
    let _ = stream.write(&frame);
}

fn handle(
    shared: &Shared<'_>,
    stream: TcpStream,
    peer: &str,
    mut unauthenticated: PreAuth<'_, '_>,
) -> Result<()> {
    let t = shared.opts.timeouts;
    let mut conn = Conn::new(stream, peer.to_string(), t.handshake)?;
    // the whole handshake, preamble to setup, by one deadline
    conn.set_deadline(Some(std::time::Instant::now() + t.handshake));
    let log = shared.log;

    // preamble: magic and version, before anything is parsed
    let mut pre = [0u8; 8];
    conn.read_exact(&mut pre, "the protocol preamble")
        .map_err(|e| Error::Protocol(format!("refused {peer}: {e}")))?;
    if pre[..4] != MAGIC {
        send_refusal(&mut conn, "not a dllama root (bad magic)");
        return Err(Error::Protocol(format!(
            "refused {peer}: not a dllama root (bad magic {:02x?})",
            &pre[..4]
        )));
    }
    let version = u32::from_le_bytes([pre[4], pre[5], pre[6], pre[7]]);
    if version != PROTOCOL_VERSION {
        let why = format!("protocol version {version} is not supported; this worker speaks version {PROTOCOL_VERSION}");
        send_refusal(&mut conn, &why);
        return Err(Error::Protocol(format!("refused {peer}: {why}")));
    }

    // hello and shared secret
    let nonce = auth::nonce()?;
    let hello = Hello {
        secret_required: shared.opts.secret.is_some(),
        nonce,
    };
    send_frame(&mut conn, Kind::Hello, &hello.encode(), "our hello")?;
    let rh = match expect_frame(&mut conn, Kind::RootHello, 128, "the root's hello")
        .and_then(|p| RootHello::decode(&p))
    {
        Ok(rh) => rh,
        Err(Error::Connection(m)) => return Err(Error::Protocol(format!("refused {peer}: {m}"))),
        Err(e) => {
            // a message of the wrong kind or size, or one that does not parse: say why
            send_refusal(&mut conn, &e.to_string());
            return Err(Error::Protocol(format!("refused {peer}: {e}")));
        }
    };
    let mut ok = Writer::default();
    if let Some(secret) = &shared.opts.secret {
        if rh.proof.is_empty() {
            send_refusal(
                &mut conn,
                "this worker requires a shared secret (--secret or DLLAMA_SECRET)",
            );
            return Err(Error::Auth(format!(
                "refused {peer}: no shared secret given"
            )));
        }
        if !auth::verify(secret, auth::ROOT_ROLE, &nonce, &rh.nonce, &rh.proof) {
            send_refusal(&mut conn, "wrong shared secret");
            return Err(Error::Auth(format!("refused {peer}: wrong shared secret")));
        }
        ok.blob(&auth::proof(secret, auth::WORKER_ROLE, &rh.nonce, &nonce));
    } else {
        // no secret here (a root with one refuses us when it reads our hello)
        ok.blob(&[]);
    }
    unauthenticated.done();

    // one root at a time
    let _busy = {
        let mut b = lock(&shared.busy);
        if let Some(other) = b.as_ref() {
            let why = format!("busy serving {other}");
            send_refusal(&mut conn, &why);
            return Err(Error::Connection(format!("refused {peer}: {why}")));
        }
        *b = Some(peer.to_string());
        BusyGuard(&shared.busy)
    };
    send_frame(&mut conn, Kind::AuthOk, &ok.0, "our authentication")?;

    // setup
    let setup = match expect_frame(
        &mut conn,
        Kind::Setup,
        super::protocol::MAX_CONTROL_FRAME,
        "the setup",
    )
    .and_then(|p| Setup::decode(&p))
    {
        Ok(s) => s,
        Err(Error::Connection(m)) => return Err(Error::Connection(m)),
        Err(e) => {
            send_refusal(&mut conn, &e.to_string());
            return Err(Error::Protocol(format!("refused {peer}: {e}")));
        }
    };
    let refuse = |conn: &mut Conn, e: Error| -> Error {
        send_refusal(conn, &e.to_string());
        Error::Protocol(format!("refused {peer}: {e}"))
    };
    let ship_budget = match shared.factory.check(&setup) {
        Ok(b) => b,
        Err(e) => return Err(refuse(&mut conn, e)),
    };
    // the slice's memory (weights, mapped or shipped, and KV cache) within the budget
    let working = match shared.factory.working_memory(&setup) {
        Ok(b) => b,
        Err(e) => return Err(refuse(&mut conn, e)),
    };
    let budget = match shared.opts.max_memory {
        Some(m) => Some((m, "the worker's --max-memory")),
        None => crate::memory::available_bytes().map(|a| (a, "available")),
    };
    if let Some((limit, what)) = budget {
        let need = ship_budget.saturating_add(working);
        if need > limit {
            return Err(refuse(
                &mut conn,
                Error::invalid(format!(
                    "this worker's slice needs {} ({} of weights + {} of KV cache and RoPE \
                     table at max_seq_len {}); {} {what}",
                    crate::memory::human(need),
                    crate::memory::human(ship_budget),
                    crate::memory::human(working),
                    setup.max_seq_len,
                    crate::memory::human(limit),
                )),
            ));
        }
    }
    let local = match shared.factory.local_identity() {
        Some(id) => match id.mismatch(&setup.model) {
            Some(why) => {
                return Err(refuse(
                    &mut conn,
                    Error::Protocol(format!("wrong model: {why}")),
                ))
            }
            None => true,
        },
        None => false,
    };
    let mut acc = Writer::default();
    acc.u8(!local as u8);
    send_frame(&mut conn, Kind::Accept, &acc.0, "our acceptance")?;
    // the handshake is over: what follows has its own deadlines
    conn.set_deadline(None);
    log(&format!(
        "{peer} connected: node {} of {}, {:?} buffers, weights {}",
        setup.node_index,
        setup.n_nodes,
        setup.buffer_type,
        if local {
            "mapped from the local model file"
        } else {
            "shipped by the root"
        }
    ));

    // weights
    let shipped = if local {
        None
    } else {
        conn.set_timeout(t.step)?;
        // the whole transfer by a deadline: the build time plus the budget at 256 KiB/s
        let slowest = Duration::from_secs_f64(ship_budget as f64 / (256.0 * 1024.0));
        let deadline = std::time::Instant::now() + t.build + slowest;
        let w = match receive_tensors(&mut conn, ship_budget, deadline) {
            Ok(w) => w,
            Err(Error::Protocol(m)) => return Err(refuse(&mut conn, Error::Protocol(m))),
            Err(e) => return Err(e),
        };
        let n: u64 = w.iter().map(|t| t.data.len() as u64).sum();
        log(&format!(
            "received {} tensors, {:.1} MB of weights",
            w.len(),
            n as f64 / 1e6
        ));
        Some(w)
    };
    let mut model = match shared.factory.build(&setup, shipped) {
        Ok(m) => m,
        Err(e) => return Err(refuse(&mut conn, e)),
    };
    send_frame(&mut conn, Kind::Ready, &[], "Ready")?;
    log(&format!("ready for {peer}"));

    // steps, until Stop or the root goes away
    let mut steps = 0u64;
    match run_steps(&mut conn, &setup, model.as_mut(), &t, &mut steps) {
        Ok(()) => {
            log(&format!(
                "{peer} finished after {steps} steps; listening again"
            ));
            Ok(())
        }
        Err(Error::Connection(m)) => Err(Error::Connection(format!(
            "{m}: the root went away after {steps} steps; listening again"
        ))),
        Err(Error::Protocol(m)) => Err(refuse(
            &mut conn,
            Error::Protocol(format!("{m}; listening again")),
        )),
        Err(e) => Err(Error::Connection(format!(
            "session with {peer} ended after {steps} steps: {e}; listening again"
        ))),
    }
}

/// Serve steps until the root sends `Stop`.
fn run_steps(
    conn: &mut Conn,
    setup: &Setup,
    model: &mut dyn WorkerModel,
    t: &Timeouts,
    steps: &mut u64,
) -> Result<()> {
    let dim = model.dim();
    let vectors = Wire::for_vectors(setup.buffer_type);
    let max_tokens = (setup.max_seq_len as usize).clamp(1, model.max_seq_len().max(1));
    let mut x: Vec<f32> = Vec::new();
    let mut input: Vec<u8> = Vec::new();
    let mut wire_bufs = WireBuffers::default();
    loop {
        conn.set_timeout(t.idle)?;
        let (kind, len) = read_frame_header(
            conn,
            StepHeader::SIZE + vectors.bytes(max_tokens * dim),
            "the next step",
        )?;
        conn.set_timeout(t.step)?;
        match kind {
            Kind::Stop => return Ok(()),
            Kind::Step => {
                input.resize(len, 0);
                conn.read_exact(&mut input, "the step input")?;
                let (step, values) = StepHeader::decode(&input, max_tokens)?;
                let (pos, n_tokens) = (step.pos as usize, step.n_tokens as usize);
                x.resize(n_tokens * dim, 0.0);
                vectors.decode(values, &mut x)?;
                let mut coll = WorkerCollective::new(conn, setup, &mut wire_bufs);
                model.forward(&mut x, pos, &mut coll)?;
                *steps += 1;
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} between steps"
                )))
            }
        }
    }
}
