//! Weight shipping: the root streams a worker the bytes of its slices, tensor by tensor, in
//! chunks of at most `SHIP_CHUNK` bytes (`Tensor` frame: name + byte count, `Data` frames,
//! then `ShipEnd`).

use super::protocol::{expect_frame, read_frame_header, send_frame, Kind, TensorStart, SHIP_CHUNK};
use std::fs::File;

use super::tcp::Conn;
use crate::format::model_file::read_at;
use crate::model::tensor::AlignedBytes;
use crate::model::ShippedTensor;
use crate::{Error, Result};

/// A tensor to ship: its name and where its bytes are in the model file, possibly in several
/// non-contiguous parts (the column slice of a row-major matrix is one part per row).
/// The root reads them with positioned reads, not through its memory map, so shipping does
/// not leave the workers' slices resident in the root's memory.
pub struct ShipTensor {
    pub name: String,
    /// (file offset, byte count) of each part, in order.
    pub parts: Vec<(u64, usize)>,
}

impl ShipTensor {
    pub fn nbytes(&self) -> u64 {
        self.parts.iter().map(|p| p.1 as u64).sum()
    }
}

/// Root side: send `tensors` (parts of `file`) to one worker. `progress(done, total)` after
/// every chunk.
pub fn send_tensors(
    conn: &mut Conn,
    file: &File,
    tensors: &[ShipTensor],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let total: u64 = tensors.iter().map(|t| t.nbytes()).sum();
    let mut done = 0u64;
    let mut chunk: Vec<u8> = Vec::with_capacity(SHIP_CHUNK);
    for t in tensors {
        let start = TensorStart {
            name: t.name.clone(),
            nbytes: t.nbytes(),
        };
        send_frame(
            conn,
            Kind::Tensor,
            &start.encode(),
            "a weight tensor header",
        )?;
        for &(offset, len) in &t.parts {
            let (mut off, mut rest) = (offset, len);
            while rest > 0 {
                let take = rest.min(SHIP_CHUNK - chunk.len());
                let at = chunk.len();
                chunk.resize(at + take, 0);
                read_at(file, &mut chunk[at..], off).map_err(|e| {
                    Error::io(
                        format!(
                            "cannot read {} bytes of {} at offset {off} of the model file",
                            take, t.name
                        ),
                        e,
                    )
                })?;
                off += take as u64;
                rest -= take;
                if chunk.len() == SHIP_CHUNK {
                    send_frame(conn, Kind::Data, &chunk, "weights")?;
                    done += chunk.len() as u64;
                    chunk.clear();
                    progress(done, total);
                }
            }
        }
        if !chunk.is_empty() {
            send_frame(conn, Kind::Data, &chunk, "weights")?;
            done += chunk.len() as u64;
            chunk.clear();
            progress(done, total);
        }
    }
    send_frame(conn, Kind::ShipEnd, &[], "the end of the weights")?;
    Ok(total)
}

/// Worker side: receive tensors until `ShipEnd`; at most `budget` bytes in all. A tensor's
/// memory is filled as its data arrives (an announced size costs nothing until then); the whole
/// transfer must end by `deadline`.
pub fn receive_tensors(
    conn: &mut Conn,
    budget: u64,
    deadline: std::time::Instant,
) -> Result<Vec<ShippedTensor>> {
    let mut out: Vec<ShippedTensor> = Vec::new();
    let mut announced = 0usize; // bytes the last tensor's header announced
    let mut used = 0u64;
    let mut chunk: Vec<u8> = Vec::new();
    let incomplete = |out: &Vec<ShippedTensor>, announced: usize| -> Option<String> {
        out.last().filter(|t| t.data.len() < announced).map(|t| {
            format!(
                "tensor {} incomplete: {} of {announced} bytes",
                t.name,
                t.data.len()
            )
        })
    };
    loop {
        if std::time::Instant::now() >= deadline {
            return Err(Error::Protocol(format!(
                "{} is shipping the weights too slowly ({} bytes in, of {budget}): given up",
                conn.peer, used
            )));
        }
        let (kind, len) = read_frame_header(conn, SHIP_CHUNK, "weights")?;
        match kind {
            Kind::Tensor => {
                if let Some(msg) = incomplete(&out, announced) {
                    return Err(Error::Protocol(format!("{}: {msg}", conn.peer)));
                }
                if len > TensorStart::MAX_ENCODED {
                    return Err(Error::Protocol(format!(
                        "{} sent a Tensor header of {len} bytes (at most {})",
                        conn.peer,
                        TensorStart::MAX_ENCODED
                    )));
                }
                let mut p = vec![0u8; len];
                conn.read_exact(&mut p, "a weight tensor header")?;
                let TensorStart { name, nbytes: n } = TensorStart::decode(&p)?;
                used = used.saturating_add(n);
                if used > budget {
                    return Err(Error::Protocol(format!(
                        "{} ships more weight bytes ({used}) than this worker's slice takes ({budget})",
                        conn.peer
                    )));
                }
                announced = n as usize;
                out.push(ShippedTensor {
                    name,
                    data: AlignedBytes::reserve(announced)?,
                });
            }
            Kind::Data => {
                let Some(t) = out.last_mut() else {
                    return Err(Error::Protocol(format!(
                        "{} sent weight data before a tensor header",
                        conn.peer
                    )));
                };
                if t.data.len() + len > announced {
                    return Err(Error::Protocol(format!(
                        "{} sent more bytes for tensor {} than announced ({announced})",
                        conn.peer, t.name
                    )));
                }
                chunk.resize(len, 0);
                conn.read_exact(&mut chunk, "weights")?;
                t.data.extend(&chunk);
            }
            Kind::ShipEnd => {
                if let Some(msg) = incomplete(&out, announced) {
                    return Err(Error::Protocol(format!("{}: {msg}", conn.peer)));
                }
                if len != 0 {
                    return Err(Error::Protocol(format!(
                        "{}: ShipEnd with a payload",
                        conn.peer
                    )));
                }
                return Ok(out);
            }
            Kind::Refuse | Kind::Stop => {
                return Err(Error::Connection(format!(
                    "{} gave up while shipping weights",
                    conn.peer
                )));
            }
            other => {
                return Err(Error::Protocol(format!(
                    "{} sent {other:?} while shipping weights",
                    conn.peer
                )))
            }
        }
    }
}

/// Wait for the worker's `Ready` (its slice is built).
pub fn expect_ready(conn: &mut Conn) -> Result<()> {
    expect_frame(conn, Kind::Ready, 0, "the worker's Ready (its slice built)").map(|_| ())
}
