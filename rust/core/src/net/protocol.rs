//! Wire format: the preamble, the frames and the handshake messages.
//!
//! Everything is little-endian. The root opens with an 8-byte preamble (`MAGIC`, protocol
//! version) so a worker can turn away garbage and old versions before it parses anything;
//! after that every message is a frame `[kind: u8][len: u32][payload: len bytes]`, except the
//! per-layer collective buffers, whose sizes are implied by the model (see docs/PROTOCOL.md).

use super::identity::ModelIdentity;
use super::tcp::Conn;
use crate::format::{FloatType, Reader};
use crate::{Error, Result};

/// First bytes a root sends: "DLMA".
pub const MAGIC: [u8; 4] = *b"DLMA";
/// Bumped at every incompatible change of the wire format.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest control frame (handshake, setup, refusal): the model header fits easily.
pub const MAX_CONTROL_FRAME: usize = 1 << 20;
/// Largest `Refuse` frame accepted, and the most of a reason that is printed.
pub const MAX_REASON: usize = 4096;
const MAX_REASON_CHARS: usize = 400;
/// Largest chunk of shipped weights per frame.
pub const SHIP_CHUNK: usize = 1 << 20;
/// Size of a frame header: kind (1) + length (4).
pub const FRAME_HEADER: usize = 5;
/// Size of the nonces of the challenge-response.
pub const NONCE_LEN: usize = 32;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// worker → root: version, whether a secret is required, nonce.
    Hello = 1,
    /// root → worker: whether a secret is used, nonce, proof.
    RootHello = 2,
    /// worker → root: the worker's proof.
    AuthOk = 3,
    /// root → worker: node index, node count, buffer type, model identity and header.
    Setup = 4,
    /// worker → root: setup accepted; whether weights must be shipped.
    Accept = 5,
    /// either way: a refusal with a reason (UTF-8), then the connection closes.
    Refuse = 6,
    /// root → worker: one shipped tensor starts: name, byte count.
    Tensor = 7,
    /// root → worker: a chunk of the current tensor's bytes.
    Data = 8,
    /// root → worker: all tensors shipped.
    ShipEnd = 9,
    /// worker → root: the slice is built, ready for steps.
    Ready = 10,
    /// root → worker: one forward step: pos, n_tokens, embedded input.
    Step = 11,
    /// root → worker: the session is over (the worker goes back to listening).
    Stop = 12,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => RootHello,
            3 => AuthOk,
            4 => Setup,
            5 => Accept,
            6 => Refuse,
            7 => Tensor,
            8 => Data,
            9 => ShipEnd,
            10 => Ready,
            11 => Step,
            12 => Stop,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// frames

/// Encode a frame into `out` (appending).
pub fn encode_frame(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    out.push(kind as u8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Send one frame in a single write.
pub fn send_frame(conn: &mut Conn, kind: Kind, payload: &[u8], what: &str) -> Result<()> {
    let mut buf = Vec::with_capacity(FRAME_HEADER + payload.len());
    encode_frame(&mut buf, kind, payload);
    conn.write_all(&buf, what)
}

/// Read a frame header; checks the kind is known and the length is at most `max_len`.
pub fn read_frame_header(conn: &mut Conn, max_len: usize, what: &str) -> Result<(Kind, usize)> {
    let mut h = [0u8; FRAME_HEADER];
    conn.read_exact(&mut h, what)?;
    let kind = Kind::from_u8(h[0]).ok_or_else(|| {
        if h.starts_with(b"HTTP/") {
            // a web server on that port answered our preamble
            return Error::Protocol(format!(
                "{} answered in HTTP: not a dllama node (a web server on that port?)",
                conn.peer
            ));
        }
        Error::Protocol(format!(
            "{} sent an unknown message kind {} (expected {what})",
            conn.peer, h[0]
        ))
    })?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > max_len {
        return Err(Error::Protocol(format!(
            "{} sent a {kind:?} message of {len} bytes, more than the {max_len} allowed (expected {what})",
            conn.peer
        )));
    }
    Ok((kind, len))
}

/// Read a whole frame of at most `max_len` payload bytes.
/// Header and body by one deadline (`Conn::within`).
pub fn read_frame(conn: &mut Conn, max_len: usize, what: &str) -> Result<(Kind, Vec<u8>)> {
    conn.within(|conn| {
        let (kind, len) = read_frame_header(conn, max_len, what)?;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload, what)?;
        Ok((kind, payload))
    })
}

/// Read a frame that must be of kind `want` and at most `max_len` bytes; a `Refuse` (at most
/// `MAX_REASON` bytes) becomes an error carrying its reason. The size limit of the kind is
/// checked before the body is read; header and body by one deadline (`Conn::within`).
pub fn expect_frame(conn: &mut Conn, want: Kind, max_len: usize, what: &str) -> Result<Vec<u8>> {
    conn.within(|conn| expect_frame_now(conn, want, max_len, what))
}

fn expect_frame_now(conn: &mut Conn, want: Kind, max_len: usize, what: &str) -> Result<Vec<u8>> {
    let (kind, len) = read_frame_header(conn, u32::MAX as usize, what)?;
    let limit = match kind {
        k if k == want => max_len,
        Kind::Refuse => MAX_REASON,
        other => {
            return Err(Error::Protocol(format!(
                "{} sent {other:?} where we expected {what}",
                conn.peer
            )))
        }
    };
    if len > limit {
        return Err(Error::Protocol(format!(
            "{} sent a {kind:?} message of {len} bytes, more than the {limit} allowed (expected {what})",
            conn.peer
        )));
    }
    let mut payload = vec![0u8; len];
    conn.read_exact(&mut payload, what)?;
    if kind == Kind::Refuse {
        return Err(refusal(&conn.peer, &payload));
    }
    Ok(payload)
}

/// A peer's text made safe to print: invalid UTF-8 replaced, control characters (newlines,
/// escapes) shown as `\u{..}`, at most `MAX_REASON_CHARS` characters.
pub fn sanitize(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX_REASON_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// The error for a refusal frame: auth problems map to `Auth`, the rest to `Protocol`.
pub fn refusal(peer: &str, payload: &[u8]) -> Error {
    let reason = sanitize(payload);
    let msg = format!("{peer} refused: {reason}");
    if reason.contains("secret") {
        Error::Auth(msg)
    } else {
        Error::Protocol(msg)
    }
}

/// Send a refusal with its reason (best effort: the peer may be gone or speak garbage), then
/// close our side and drain what the peer still sends for up to a second, so the refusal is
/// not lost to a reset.
pub fn send_refusal(conn: &mut Conn, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    if send_frame(conn, Kind::Refuse, &reason.as_bytes()[..end], "a refusal").is_ok() {
        conn.drain(std::time::Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------------------------
// payload writer (payloads are read with `format::Reader::message`)

/// Appends little-endian fields.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub fn blob(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32).bytes(v)
    }
}

// ---------------------------------------------------------------------------------------------
// handshake messages

/// worker → root, after the preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub secret_required: bool,
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(PROTOCOL_VERSION)
            .u8(self.secret_required as u8)
            .bytes(&self.nonce);
        w.0
    }
    pub fn decode(p: &[u8]) -> Result<Hello> {
        let mut r = Reader::message(p, "Hello");
        let v = r.u32("the protocol version")?;
        if v != PROTOCOL_VERSION {
            return Err(Error::Protocol(format!(
                "worker speaks protocol version {v}, this root speaks {PROTOCOL_VERSION}"
            )));
        }
        let secret_required = r.u8("secret_required")? != 0;
        let nonce = r.array("the nonce")?;
        r.finish()?;
        Ok(Hello {
            secret_required,
            nonce,
        })
    }
}

/// root → worker: the root's nonce and, when a secret is used, its proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootHello {
    pub nonce: [u8; NONCE_LEN],
    /// Empty without a secret, else HMAC-SHA256 (32 bytes).
    pub proof: Vec<u8>,
}

impl RootHello {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&self.nonce).blob(&self.proof);
        w.0
    }
    pub fn decode(p: &[u8]) -> Result<RootHello> {
        let mut r = Reader::message(p, "RootHello");
        let nonce = r.array("the nonce")?;
        let proof = r.blob(64, "the proof")?.to_vec();
        r.finish()?;
        Ok(RootHello { nonce, proof })
    }
}

/// How the nodes exchange the per-layer buffers (the engine's type; on the wire as the float
/// type code of the `.m` header: 0 f32, 3 q80).
pub use crate::model::BufferType;

fn buffer_from_code(c: u8) -> Result<BufferType> {
    FloatType::from_code(c as i64)
        .and_then(BufferType::from_float_type)
        .ok_or_else(|| Error::Protocol(format!("unknown buffer float type code {c}")))
}

/// root → worker: who the worker is in this cluster and which model it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub node_index: u32,
    pub n_nodes: u32,
    pub buffer_type: BufferType,
    pub max_seq_len: u32,
    pub model: ModelIdentity,
}

impl Setup {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.node_index)
            .u32(self.n_nodes)
            .u8(self.buffer_type.float_type().code() as u8)
            .u32(self.max_seq_len)
            .u64(self.model.file_size)
            .bytes(&self.model.fingerprint)
            .blob(&self.model.header);
        w.0
    }
    pub fn decode(p: &[u8]) -> Result<Setup> {
        let mut r = Reader::message(p, "Setup");
        let node_index = r.u32("node_index")?;
        let n_nodes = r.u32("n_nodes")?;
        let buffer_type = buffer_from_code(r.u8("the buffer type")?)?;
        let max_seq_len = r.u32("max_seq_len")?;
        let file_size = r.u64("the file size")?;
        let fingerprint = r.array("the fingerprint")?;
        let header = r.blob(MAX_CONTROL_FRAME, "the model header")?.to_vec();
        r.finish()?;
        if n_nodes < 2 || node_index == 0 || node_index >= n_nodes {
            return Err(Error::Protocol(format!(
                "Setup names node {node_index} of {n_nodes}: a worker must be node 1..n-1 of n >= 2"
            )));
        }
        Ok(Setup {
            node_index,
            n_nodes,
            buffer_type,
            max_seq_len,
            model: ModelIdentity {
                file_size,
                header,
                fingerprint,
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// weights and steps

/// Longest name of a shipped tensor.
pub const MAX_TENSOR_NAME: usize = 256;

/// root → worker: a shipped tensor starts; its bytes follow in `Data` frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorStart {
    pub name: String,
    pub nbytes: u64,
}

impl TensorStart {
    /// Largest encoding: the name's length, the name, the byte count.
    pub const MAX_ENCODED: usize = 4 + MAX_TENSOR_NAME + 8;

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.blob(self.name.as_bytes()).u64(self.nbytes);
        w.0
    }
    pub fn decode(p: &[u8]) -> Result<TensorStart> {
        let mut r = Reader::message(p, "Tensor");
        let name = std::str::from_utf8(r.blob(MAX_TENSOR_NAME, "the name")?)
            .map_err(|_| Error::Protocol("Tensor message: the name is not UTF-8".into()))?
            .to_string();
        let nbytes = r.u64("the byte count")?;
        r.finish()?;
        Ok(TensorStart { name, nbytes })
    }
}

/// root → worker: a forward step starts at position `pos` with `n_tokens` tokens; their
/// embedded input (`n_tokens × dim` values in the "vector" type) follows in the same frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepHeader {
    pub pos: u32,
    pub n_tokens: u32,
}

impl StepHeader {
    pub const SIZE: usize = 8;

    /// Append the header to `out` (the input goes after it).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pos.to_le_bytes());
        out.extend_from_slice(&self.n_tokens.to_le_bytes());
    }
    /// Split a Step payload into its header and the input bytes; the step must hold at least
    /// one token and end within `max_tokens` positions.
    pub fn decode(p: &[u8], max_tokens: usize) -> Result<(StepHeader, &[u8])> {
        let mut r = Reader::message(p, "Step");
        let h = StepHeader {
            pos: r.u32("pos")?,
            n_tokens: r.u32("n_tokens")?,
        };
        if h.n_tokens == 0 {
            return Err(Error::Protocol(format!(
                "step of 0 tokens at position {} (a step holds at least one)",
                h.pos
            )));
        }
        if h.pos as u64 + h.n_tokens as u64 > max_tokens as u64 {
            return Err(Error::Protocol(format!(
                "step of {} tokens at position {} exceeds max_seq_len {max_tokens}",
                h.n_tokens, h.pos
            )));
        }
        Ok((h, r.rest()))
    }
}
