//! TCP sockets: connect / listen with clear errors, TCP_NODELAY and keepalive on, and reads
//! and writes that never block forever and count the bytes they move.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};

use crate::{Error, Result};

/// One end of a connection to a peer, named for error messages ("worker 1 (10.0.0.2:9998)").
pub struct Conn {
    stream: TcpStream,
    /// Human name of the peer, used in every error message.
    pub peer: String,
    /// Bytes written to / read from this socket since it was opened.
    pub sent: u64,
    pub received: u64,
    /// Time spent inside socket reads and writes.
    pub io_time: Duration,
    timeout: Duration,
    /// When set, every read also ends by then (a handshake's or a message's deadline).
    deadline: Option<Instant>,
    /// How long a read polls the socket before it blocks (see `spin_time`).
    spin: Duration,
}

/// How long a read stays awake polling the socket before it blocks: `$DLLAMA_NET_SPIN_US`
/// microseconds, default 2000 (0: block at once). The first `PURE_SPIN` of it is a busy poll;
/// after that every empty poll yields the core (`yield_now`), so that on a machine with more
/// runnable threads than cores the peer or the pool gets it first. Waking a thread blocked in
/// `read` costs tens to hundreds of microseconds on a busy machine, and a node waits twice a
/// layer for its peers, which are seldom in step within 200 µs: root + 1 worker on loopback
/// (the 8-layer Qwen3-MoE, 1 thread each, medians of 4 alternating runs), 20.4 ms a token
/// awake 200 µs, 19.6–19.9 ms awake 2 ms (benchmarks/README.md).
pub fn spin_time() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("DLLAMA_NET_SPIN_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        Duration::from_micros(us.unwrap_or(2000))
    })
}

/// The first part of `spin_time`, polled without yielding: the short waits (a peer a few
/// microseconds behind) cost no system call beyond the polls.
const PURE_SPIN: Duration = Duration::from_micros(200);

/// Between two empty polls `waited` into a read's awake time: spin, or yield the core once the
/// pure spin is over.
#[inline]
fn pause(waited: Duration) {
    if waited < PURE_SPIN {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

impl Conn {
    /// Wrap a connected stream: TCP_NODELAY, keepalive probes so that a peer that vanished
    /// without closing (power cut) is noticed, and `timeout` on every read and write.
    pub fn new(stream: TcpStream, peer: String, timeout: Duration) -> Result<Conn> {
        let ctx = |what: &str| format!("{peer}: cannot {what}");
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io(ctx("set TCP_NODELAY"), e))?;
        let ka = TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5));
        #[cfg(any(target_os = "linux", target_os = "macos", target_os = "android"))]
        let ka = ka.with_retries(3);
        SockRef::from(&stream)
            .set_tcp_keepalive(&ka)
            .map_err(|e| Error::io(ctx("enable TCP keepalive"), e))?;
        let mut conn = Conn {
            stream,
            peer,
            sent: 0,
            received: 0,
            io_time: Duration::ZERO,
            timeout,
            deadline: None,
            spin: spin_time(),
        };
        conn.set_timeout(timeout)?;
        Ok(conn)
    }

    /// Timeout of every following read and write (at least 1 ms: zero would mean "forever").
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        let t = timeout.max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(t))
            .and_then(|_| self.stream.set_write_timeout(Some(t)))
            .map_err(|e| Error::io(format!("{}: cannot set socket timeout", self.peer), e))?;
        self.timeout = t;
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A deadline for every following read, whatever their timeouts (`None`: none): a
    /// handshake has one as a whole, so a peer that dribbles its messages cannot stretch it.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Run `f`, the reads of one message, by one deadline: the timeout from now, or the
    /// deadline already set if that comes first (so a message's header and body share it).
    pub fn within<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let saved = self.deadline;
        let end = Instant::now() + self.timeout;
        self.deadline = Some(saved.map_or(end, |d| d.min(end)));
        let r = f(self);
        self.deadline = saved;
        r
    }

    /// Read without blocking: `Ok(0)` at end of stream, `WouldBlock` when nothing is there.
    #[cfg(unix)]
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the fd is our open socket.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Write without blocking: the bytes the socket took, or `WouldBlock` when its buffer is
    /// full.
    #[cfg(unix)]
    fn try_send(&self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // a peer that went away gives EPIPE, not SIGPIPE (where the flag exists)
        #[cfg(any(target_os = "linux", target_os = "android"))]
        const FLAGS: libc::c_int = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        const FLAGS: libc::c_int = libc::MSG_DONTWAIT;
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes; the fd is our open socket.
        let n = unsafe {
            libc::send(
                self.stream.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                FLAGS,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// The bytes that are there now (0 when none yet), or the error of a closed or broken
    /// connection.
    #[cfg(unix)]
    fn recv_some(&self, buf: &mut [u8], what: &str) -> Result<usize> {
        match self.try_recv(buf) {
            Ok(0) => Err(self.closed(what)),
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(0),
            Err(e) => Err(self.map_err(e, &format!("while we waited for {what}"))),
        }
    }

    /// The bytes the socket took now (0 when its buffer is full), or the error.
    #[cfg(unix)]
    fn send_some(&self, buf: &[u8], what: &str) -> Result<usize> {
        match self.try_send(buf) {
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(0),
            Err(e) => Err(self.map_err(e, &format!("while we sent {what}"))),
        }
    }

    fn closed(&self, what: &str) -> Error {
        Error::Connection(format!(
            "{} closed the connection while we waited for {what}",
            self.peer
        ))
    }

    /// Send all of `send` while receiving exactly `recv.len()` bytes, both directions at once:
    /// for two peers that each send the other a buffer at the same moment, neither waits for
    /// the other's message before sending its own (and neither can block the other by filling
    /// the socket buffers, whatever the sizes). Polls for up to `self.spin`, then sleeps in
    /// `poll` until the socket is ready; fails after `self.timeout` without progress.
    #[cfg(unix)]
    pub fn exchange(&mut self, send: &[u8], recv: &mut [u8], what: &str) -> Result<()> {
        let start = Instant::now();
        let r = self.exchange_inner(send, recv, what, start);
        self.io_time += start.elapsed();
        if r.is_ok() {
            self.sent += send.len() as u64;
            self.received += recv.len() as u64;
        }
        r
    }

    #[cfg(unix)]
    fn exchange_inner(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        what: &str,
        start: Instant,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        let (mut sent, mut got) = (0, 0);
        let mut last_progress = start;
        while sent < send.len() || got < recv.len() {
            let mut progress = false;
            if sent < send.len() {
                let n = self.send_some(&send[sent..], what)?;
                sent += n;
                progress |= n > 0;
            }
            if got < recv.len() {
                let n = self.recv_some(&mut recv[got..], what)?;
                got += n;
                progress |= n > 0;
            }
            let now = Instant::now();
            if progress {
                last_progress = now;
                continue;
            }
            if now - start < self.spin {
                pause(now - start);
                continue;
            }
            let left = self.timeout.saturating_sub(now - last_progress);
            if left.is_zero() {
                return Err(self.map_err(
                    std::io::Error::from(ErrorKind::TimedOut),
                    &format!("while we exchanged {what}"),
                ));
            }
            let mut events = 0;
            if sent < send.len() {
                events |= libc::POLLOUT;
            }
            if got < recv.len() {
                events |= libc::POLLIN;
            }
            let mut pfd = libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd; the result is only a hint to try again (readiness,
            // errors and hang-ups show up in the next send / recv).
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
        Ok(())
    }

    /// Elsewhere: send, then receive (enough for buffers that fit the socket buffers, as
    /// one token's do; only unix builds are tested).
    #[cfg(not(unix))]
    pub fn exchange(&mut self, send: &[u8], recv: &mut [u8], what: &str) -> Result<()> {
        self.write_all(send, what)?;
        self.read_exact(recv, what)
    }

    /// Poll for up to `self.spin` before blocking; returns the bytes read into `buf`.
    #[cfg(unix)]
    fn spin_read(&mut self, buf: &mut [u8], start: Instant, what: &str) -> Result<usize> {
        let mut done = 0;
        loop {
            let waited = start.elapsed();
            if done == buf.len() || waited >= self.spin {
                return Ok(done);
            }
            match self.recv_some(&mut buf[done..], what)? {
                0 => pause(waited),
                n => done += n,
            }
        }
    }

    #[cfg(not(unix))]
    fn spin_read(&mut self, _buf: &mut [u8], _start: Instant, _what: &str) -> Result<usize> {
        Ok(0)
    }

    /// Read exactly `buf.len()` bytes; `what` says what we were waiting for.
    pub fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let start = Instant::now();
        let mut done = match self.spin_read(buf, start, what) {
            Ok(n) => n,
            Err(e) => {
                self.io_time += start.elapsed();
                return Err(e);
            }
        };
        // One deadline for the whole buffer, not a timeout per read: a peer that dribbles a
        // byte now and then cannot hold us longer than `timeout` (nor past `self.deadline`).
        let end = self
            .deadline
            .map_or(start + self.timeout, |d| d.min(start + self.timeout));
        let mut shortened = false;
        let mut result = Ok(());
        while done < buf.len() {
            if done > 0 || self.deadline.is_some() {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    result = Err(self.map_err(
                        std::io::Error::from(ErrorKind::TimedOut),
                        &format!("while we waited for {what}"),
                    ));
                    break;
                }
                if let Err(e) = self.stream.set_read_timeout(Some(left)) {
                    result = Err(self.map_err(e, "while setting a deadline"));
                    break;
                }
                shortened = true;
            }
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => {
                    result = Err(self.closed(what));
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Err(self.map_err(e, &format!("while we waited for {what}")));
                    break;
                }
            }
        }
        if shortened {
            let _ = self.stream.set_read_timeout(Some(self.timeout));
        }
        if let Err(e) = result {
            self.io_time += start.elapsed();
            return Err(e);
        }
        self.received += buf.len() as u64;
        self.io_time += start.elapsed();
        Ok(())
    }

    /// Write all of `buf`; `what` says what we were sending.
    pub fn write_all(&mut self, buf: &[u8], what: &str) -> Result<()> {
        let start = Instant::now();
        let r = self.stream.write_all(buf);
        self.io_time += start.elapsed();
        match r {
            Ok(()) => {
                self.sent += buf.len() as u64;
                Ok(())
            }
            Err(e) => Err(self.map_err(e, &format!("while we sent {what}"))),
        }
    }

    fn map_err(&self, e: std::io::Error, when: &str) -> Error {
        let peer = &self.peer;
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Connection(format!(
                "{peer} did not answer within {:.0} s {when} (timed out)",
                self.timeout.as_secs_f64()
            )),
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => {
                Error::Connection(format!("{peer} dropped the connection {when} ({e})"))
            }
            _ => Error::io(format!("{peer}: socket error {when}"), e),
        }
    }

    /// Close our sending side, then read and drop whatever the peer still sends, until it
    /// closes or `limit` passes (so that closing does not reset the connection under data the
    /// peer has not read yet).
    pub fn drain(&mut self, limit: Duration) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let end = Instant::now() + limit;
        let mut sink = [0u8; 16384];
        while Instant::now() < end {
            let left = end
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            if self.stream.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match self.stream.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Close both directions now (best effort: the peer may already be gone).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Address of the peer, if the socket still knows it.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.stream.peer_addr().ok()
    }
}

/// Resolve `addr` ("host:port") to socket addresses, with a clear error.
pub fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| {
            Error::invalid(format!(
                "cannot resolve worker address {addr:?} ({e}); expected host:port"
            ))
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::invalid(format!(
            "worker address {addr:?} resolves to nothing"
        )));
    }
    Ok(addrs)
}

/// Connect to `addr` within `timeout`, naming the peer `peer` in errors.
pub fn connect(addr: &str, peer: &str, timeout: Duration) -> Result<TcpStream> {
    let mut last: Option<std::io::Error> = None;
    for sa in resolve(addr)? {
        match TcpStream::connect_timeout(&sa, timeout.max(Duration::from_millis(1))) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("resolve returned at least one address");
    let why = match e.kind() {
        ErrorKind::ConnectionRefused => {
            "connection refused: is `dllama serve-worker` running there, on that port?".to_string()
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => format!(
            "no answer within {:.0} s: is the host up and the port open?",
            timeout.as_secs_f64()
        ),
        _ => e.to_string(),
    };
    Err(Error::Connection(format!("cannot reach {peer}: {why}")))
}

/// Listen on `host:port`, with a clear error when the port is taken.
pub fn listen(host: &str, port: u16) -> Result<TcpListener> {
    let addr = format!("{host}:{port}");
    let sas = resolve(&addr)?;
    let mut last: Option<std::io::Error> = None;
    for sa in sas {
        match TcpListener::bind(sa) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("resolve returned at least one address");
    match e.kind() {
        ErrorKind::AddrInUse => Err(Error::Connection(format!(
            "cannot listen on {addr}: port {port} is already in use (another worker? pick another --port)"
        ))),
        ErrorKind::AddrNotAvailable => Err(Error::Connection(format!(
            "cannot listen on {addr}: {host} is not an address of this machine"
        ))),
        ErrorKind::PermissionDenied => Err(Error::Connection(format!(
            "cannot listen on {addr}: permission denied (ports below 1024 need root)"
        ))),
        _ => Err(Error::io(format!("cannot listen on {addr}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two connected `Conn`s over loopback, a and b, each named for its peer ("b", "a").
    fn pair(timeout: Duration) -> (Conn, Conn) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (
            Conn::new(a, "b".into(), timeout).unwrap(),
            Conn::new(b, "a".into(), timeout).unwrap(),
        )
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn exchange_moves_buffers_larger_than_the_socket_buffers_both_ways_at_once() {
        // 8 MiB each way: far beyond what the kernel buffers, so two peers that first wrote
        // their whole message and then read would both block in write forever
        let n = 8 << 20;
        let (mut a, mut b) = pair(Duration::from_secs(10));
        let t = std::thread::spawn(move || {
            let mut got = vec![0u8; n];
            b.exchange(&pattern(n, 2), &mut got, "test data").unwrap();
            (got, b.sent, b.received)
        });
        let mut got = vec![0u8; n];
        a.exchange(&pattern(n, 1), &mut got, "test data").unwrap();
        let (b_got, b_sent, b_received) = t.join().unwrap();
        assert!(got == pattern(n, 2) && b_got == pattern(n, 1));
        assert_eq!((a.sent, a.received), (n as u64, n as u64));
        assert_eq!((b_sent, b_received), (n as u64, n as u64));
    }

    #[test]
    fn exchange_with_a_peer_that_closes_or_stays_silent_fails_naming_it() {
        let (mut a, b) = pair(Duration::from_secs(10));
        drop(b);
        let e = a
            .exchange(&[1; 64], &mut [0; 64], "partial sums")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b ") && e.contains("partial sums"), "{e}");

        let (mut a, _b) = pair(Duration::from_millis(300));
        let t0 = Instant::now();
        let e = a
            .exchange(&[1; 64], &mut [0; 64], "partial sums")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("did not answer") && e.contains("partial sums"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
}
