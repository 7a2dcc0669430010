//! Faults: garbage, old versions, wrong secrets, wrong models, dead and silent peers. Each is
//! refused or reported with a clear message naming the peer, and the worker keeps serving.

mod net_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use dllama_core::net::protocol::{Kind, MAGIC, PROTOCOL_VERSION};
use dllama_core::net::tcp::listen;
use dllama_core::net::{BufferType, RootCollective};
use dllama_core::Error;
use net_common::*;

/// A raw socket to `w` that has sent the magic and protocol `version`, nothing else.
fn raw_hello(w: &TestWorker, version: u32) -> TcpStream {
    let mut s = TcpStream::connect(&w.addr).unwrap();
    s.write_all(&MAGIC).unwrap();
    s.write_all(&version.to_le_bytes()).unwrap();
    s
}

/// The error of a root that connects (Q80 buffers, no secret) to `addr` alone.
fn refusal_of(addr: &str) -> String {
    let opts = root_opts(BufferType::Q80, None);
    match RootCollective::connect(&[addr.to_string()], DIM, &identity(1), &opts) {
        Ok(_) => panic!("a root connected to {addr}"),
        Err(e) => e.to_string(),
    }
}

/// A raw connection of the current protocol version, past the worker's Hello.
fn greeted(w: &TestWorker) -> TcpStream {
    let mut s = raw_hello(w, PROTOCOL_VERSION);
    let (kind, _) = raw_frame(&mut s);
    assert_eq!(kind, Kind::Hello as u8);
    s
}

/// Read one frame from a raw socket: (kind, payload).
fn raw_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut h = [0u8; 5];
    s.read_exact(&mut h).unwrap();
    let n = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut p = vec![0u8; n];
    s.read_exact(&mut p).unwrap();
    (h[0], p)
}

fn still_serves(w: &TestWorker) {
    let mut root = connect_root(&[w], BufferType::F32, None).unwrap();
    run_root(&mut root, &[(vec![1], 0)]).unwrap();
}

#[test]
fn garbage_is_refused_and_the_worker_keeps_serving() {
    let w = TestWorker::start(FakeFactory::plain(1), None);
    let mut s = TcpStream::connect(&w.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (kind, reason) = raw_frame(&mut s);
    assert_eq!(kind, Kind::Refuse as u8);
    assert_eq!(
        String::from_utf8(reason).unwrap(),
        "not a dllama root (bad magic)"
    );
    w.wait_log("bad magic");
    still_serves(&w);
}

#[test]
fn an_old_protocol_version_is_refused_with_both_versions_named() {
    let w = TestWorker::start(FakeFactory::plain(1), None);
    let mut s = raw_hello(&w, 0);
    let (kind, reason) = raw_frame(&mut s);
    assert_eq!(kind, Kind::Refuse as u8);
    let reason = String::from_utf8(reason).unwrap();
    assert_names(
        &reason,
        &["version 0", &format!("version {PROTOCOL_VERSION}")],
    );
    w.wait_log("protocol version 0 is not supported");
    still_serves(&w);
}

#[test]
fn an_absurd_frame_length_is_refused_without_allocating() {
    let w = TestWorker::start(FakeFactory::plain(1), None);
    let mut s = greeted(&w);
    s.write_all(&[Kind::RootHello as u8, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    w.wait_log("4294967295 bytes, more than the");
    still_serves(&w);
}

#[test]
fn a_wrong_secret_is_refused_both_ways() {
    let w = TestWorker::start(FakeFactory::plain(1), Some("right"));
    let err = connect_root(&[&w], BufferType::Q80, Some("wrong"))
        .err()
        .unwrap();
    assert!(matches!(err, Error::Auth(_)), "{err:?}");
    assert!(
        err.to_string().contains("worker 1") && err.to_string().contains("wrong shared secret"),
        "{err}"
    );
    w.wait_log("wrong shared secret");

    let err = connect_root(&[&w], BufferType::Q80, None).err().unwrap();
    assert!(
        matches!(err, Error::Auth(_)) && err.to_string().contains("requires a shared secret"),
        "{err}"
    );

    // a root with a secret will not use a worker without one
    let open = TestWorker::start(FakeFactory::plain(1), None);
    let err = connect_root(&[&open], BufferType::Q80, Some("right"))
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::Auth(_)) && err.to_string().contains("has no shared secret"),
        "{err}"
    );

    // the right secret works, on the same worker, right after
    let mut root = connect_root(&[&w], BufferType::Q80, Some("right")).unwrap();
    run_root(&mut root, &[(vec![3], 0)]).unwrap();
}

#[test]
fn a_worker_with_another_model_refuses_and_says_why() {
    let w = TestWorker::start(FakeFactory::plain(2), None);
    let err = connect_root(&[&w], BufferType::Q80, None).err().unwrap();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    let msg = err.to_string();
    assert_names(&msg, &["worker 1", "wrong model"]);
    w.wait_log("wrong model");
}

#[test]
fn a_worker_dying_mid_generation_stops_the_root_with_one_clear_error() {
    let w1 = TestWorker::start(FakeFactory::plain(1), None);
    let w2 = TestWorker::start(
        FakeFactory {
            die_at_step: Some(2),
            ..FakeFactory::plain(1)
        },
        None,
    );
    let mut root = connect_root(&[&w1, &w2], BufferType::Q80, None).unwrap();
    let start = Instant::now();
    let err = run_root(&mut root, &[(vec![1, 2], 0), (vec![3], 2), (vec![4], 3)])
        .err()
        .unwrap();
    assert_within(start, Duration::from_secs(4));
    let msg = err.to_string();
    assert!(matches!(err, Error::Connection(_)), "{err:?}");
    assert!(
        msg.contains("worker 2 (") && msg.contains("closed the connection"),
        "{msg}"
    );
    // later calls fail at once, naming the cause
    let again = run_root(&mut root, &[(vec![5], 4)])
        .err()
        .unwrap()
        .to_string();
    assert_names(&again, &["the cluster is down", "worker 2"]);
    drop(root);
    // the healthy worker saw the root go and serves again
    w1.wait_log("listening again");
    still_serves(&w1);
}

#[test]
fn a_busy_worker_refuses_a_second_root() {
    let w = TestWorker::start(FakeFactory::plain(1), None);
    let mut first = connect_root(&[&w], BufferType::Q80, None).unwrap();
    let err = connect_root(&[&w], BufferType::Q80, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("busy serving root"), "{err}");
    run_root(&mut first, &[(vec![1], 0)]).unwrap();
}

#[test]
fn unreachable_and_silent_workers_give_clear_errors_in_bounded_time() {
    // nothing listens on this port any more
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let err = refusal_of(&addr);
    assert!(
        err.contains(&format!("cannot reach worker 1 ({addr})")) && err.contains("refused"),
        "{err}"
    );

    // a listener that accepts and never speaks
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = mute.local_addr().unwrap().to_string();
    let start = Instant::now();
    let err = refusal_of(&addr);
    assert_within(start, Duration::from_secs(4));
    assert_names(&err, &["worker 1", "did not answer within 2 s"]);
    drop(mute);
}

#[test]
fn a_port_in_use_is_named() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = listen("127.0.0.1", port).err().unwrap().to_string();
    assert_names(&err, &[&format!("port {port}"), "already in use"]);
}

#[test]
fn a_frozen_worker_times_out_naming_it() {
    let w = TestWorker::start(
        FakeFactory {
            die_at_step: Some(1),
            hang: Some(Duration::from_secs(8)),
            ..FakeFactory::plain(1)
        },
        None,
    );
    let addrs = vec![w.addr.clone()];
    let mut opts = root_opts(BufferType::Q80, None);
    opts.timeouts.step = Duration::from_secs(1);
    let mut root = RootCollective::connect(&addrs, DIM, &identity(1), &opts).unwrap();
    root.wait_ready().unwrap();
    root.set_vocab_ranges(vec![vocab_range(0, 2), vocab_range(1, 2)])
        .unwrap();
    run_root(&mut root, &[(vec![1], 0)]).unwrap();
    let start = Instant::now();
    let err = run_root(&mut root, &[(vec![2], 1)])
        .err()
        .unwrap()
        .to_string();
    assert_within(start, Duration::from_secs(3));
    assert_names(
        &err,
        &["worker 1", "did not answer within 1 s", "partial sums"],
    );
}

// ---------------------------------------------------------------------------------------------
// hostile peers

#[test]
fn a_slow_loris_handshake_is_dropped_within_the_handshake_deadline() {
    let w = TestWorker::start(FakeFactory::plain(1), None);
    let mut s = greeted(&w);
    // a RootHello of 68 bytes, one byte every 300 ms: each read is quick, the message is not
    s.write_all(&[Kind::RootHello as u8, 68, 0, 0, 0]).unwrap();
    let start = Instant::now();
    let mut dropped = false;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(300));
        if s.write_all(&[0]).is_err() {
            dropped = true;
            break;
        }
        if w.logs().iter().any(|l| l.contains("timed out")) {
            dropped = true;
            break;
        }
    }
    assert!(
        dropped,
        "the dribbling root is still being served: {:?}",
        w.logs()
    );
    // the handshake deadline is 2 s (short_timeouts)
    assert_within(start, Duration::from_secs(6));
    w.wait_log("did not answer within 2 s");
    still_serves(&w);
}

#[test]
fn silent_connections_filling_the_pre_auth_slots_do_not_keep_a_root_out() {
    use dllama_core::net::worker::MAX_UNAUTHENTICATED;
    let w = TestWorker::start(FakeFactory::plain(1), None);
    // idle connections that never send the preamble hold every handshake slot
    let mut idle: Vec<TcpStream> = (0..MAX_UNAUTHENTICATED)
        .map(|_| TcpStream::connect(&w.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300)); // accepted and counted
                                                    // a real root is served (once refused: "too many connections"): the connection that
                                                    // waited longest made room
    still_serves(&w);
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    let got = idle[0].read(&mut byte);
    assert!(
        matches!(got, Ok(0)) || got.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the oldest idle connection is still open"
    );
    // the others are still waiting (a later one was not dropped instead)
    idle[MAX_UNAUTHENTICATED - 1]
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let got = idle[MAX_UNAUTHENTICATED - 1].read(&mut byte);
    assert!(
        got.is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "the newest idle connection was dropped"
    );
}

#[test]
fn a_peers_refusal_is_printed_sanitised_and_bounded() {
    // a fake worker that answers the preamble with a refusal full of control characters
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap().to_string();
    let reason = b"no\r\nFAKE: \x1b[31mred\x1b[0m and more".to_vec();
    let server = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        let mut pre = [0u8; 8];
        s.read_exact(&mut pre).unwrap();
        let mut f = vec![Kind::Refuse as u8];
        f.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        f.extend_from_slice(&reason);
        s.write_all(&f).unwrap();
        // then a second root: a refusal of 1 MiB is not read at all
        let (mut s, _) = fake.accept().unwrap();
        s.read_exact(&mut pre).unwrap();
        let mut f = vec![Kind::Refuse as u8];
        f.extend_from_slice(&(1u32 << 20).to_le_bytes());
        f.extend(std::iter::repeat_n(b'x', 1 << 20));
        let _ = s.write_all(&f);
    });
    let connect = || refusal_of(&addr);
    let err = connect();
    assert!(
        err.contains("refused: no\\u{d}\\u{a}FAKE: \\u{1b}[31mred"),
        "{err}"
    );
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err}");
    let err = connect();
    assert!(err.contains("more than the 4096 allowed"), "{err}");
    assert!(err.len() < 500, "{}", err.len());
    server.join().unwrap();
}

#[test]
fn a_frame_of_another_kind_is_refused_before_its_body_is_read() {
    let w = TestWorker::start(FakeFactory::plain(1), None);
    let mut s = greeted(&w);
    // a Data frame announcing 1 MiB where the RootHello (at most 128 bytes) is expected
    s.write_all(&[Kind::Data as u8, 0, 0, 0x10, 0]).unwrap();
    w.wait_log("sent Data where we expected the root's hello");
    still_serves(&w);
}

#[test]
fn a_step_header_of_no_tokens_or_past_the_cache_is_refused_naming_the_fault() {
    use dllama_core::net::protocol::StepHeader;
    let payload = |pos: u32, n: u32| {
        let mut p = Vec::new();
        StepHeader { pos, n_tokens: n }.encode_into(&mut p);
        p
    };
    let err = StepHeader::decode(&payload(3, 0), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("step of 0 tokens at position 3 (a step holds at least one)"),
        "{err}"
    );
    let err = StepHeader::decode(&payload(60, 5), 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceeds max_seq_len 64"), "{err}");
    let ok = payload(59, 5);
    let (h, rest) = StepHeader::decode(&ok, 64).unwrap();
    assert_eq!((h.pos, h.n_tokens, rest.len()), (59, 5, 0));
}

#[test]
fn a_web_server_on_the_workers_port_is_named_as_such() {
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        let mut pre = [0u8; 8];
        s.read_exact(&mut pre).unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
    let err = refusal_of(&addr);
    assert!(err.contains("answered in HTTP: not a dllama node"), "{err}");
    server.join().unwrap();
}
