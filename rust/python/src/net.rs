//! Bindings: the cluster's worker (`serve_worker`) and the root's shipping progress line.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dllama_core::format::ModelFile;
use dllama_core::net::auth::shared_secret;
use dllama_core::net::cluster::EngineFactory;
use dllama_core::net::tcp::listen;
use dllama_core::net::{serve, Timeouts, WorkerOptions};
use pyo3::prelude::*;

use crate::errors::IntoPy;

/// `[dllama worker 12:34:56] message` on stderr.
pub fn log_line(who: &str, msg: &str) {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86400;
    eprintln!(
        "[dllama {who} {:02}:{:02}:{:02}] {msg}",
        s / 3600,
        s / 60 % 60,
        s % 60
    );
}

pub fn secs(v: f64, what: &str) -> PyResult<Duration> {
    if !(v > 0.0 && v.is_finite()) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{what} must be a positive number of seconds, got {v}"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Serve roots on `host:port`, one at a time, until interrupted (Ctrl-C).
///
/// `model`: this worker's own copy of the model file (checked against the root's by size,
/// header and checksum); without it the root ships this worker its slices. `secret`: the
/// cluster's shared secret (None: `$DLLAMA_SECRET`; empty or unset: no authentication).
/// Deadlines, in seconds: `step_timeout` for each read inside a step, `idle_timeout` between
/// steps, `handshake_timeout` for a root's whole handshake, `build_timeout` (plus the time of the
/// slice at 256 KiB/s) for receiving shipped weights and building the slice. `max_memory`: most
/// bytes a root's slice may take (weights, KV cache, RoPE table; default: the memory available
/// when the root connects).
#[pyfunction]
#[pyo3(signature = (
    host, port, *, nthreads=1, model=None, secret=None, step_timeout=60.0, idle_timeout=3600.0,
    handshake_timeout=10.0, build_timeout=600.0, max_memory=None
))]
#[allow(clippy::too_many_arguments)]
fn serve_worker(
    py: Python<'_>,
    host: String,
    port: u16,
    nthreads: usize,
    model: Option<PathBuf>,
    secret: Option<String>,
    step_timeout: f64,
    idle_timeout: f64,
    handshake_timeout: f64,
    build_timeout: f64,
    max_memory: Option<u64>,
) -> PyResult<()> {
    if nthreads == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "nthreads must be at least 1",
        ));
    }
    let timeouts = Timeouts {
        step: secs(step_timeout, "step_timeout")?,
        idle: secs(idle_timeout, "idle_timeout")?,
        handshake: secs(handshake_timeout, "handshake_timeout")?,
        build: secs(build_timeout, "build_timeout")?,
        ..Timeouts::default()
    };
    let opts = WorkerOptions {
        secret: shared_secret(secret),
        timeouts,
        max_memory,
    };
    let factory = py
        .detach(|| {
            let file = model.as_deref().map(ModelFile::open).transpose()?;
            EngineFactory::new(file, nthreads)
        })
        .py()?;
    let listener = py.detach(|| listen(&host, port)).py()?;
    let what = match &model {
        Some(p) => format!("model {} mapped locally", p.display()),
        None => "weights shipped by the root".to_string(),
    };
    log_line(
        "worker",
        &format!(
            "listening on {host}:{port} ({what}, {nthreads} thread{}{})",
            if nthreads == 1 { "" } else { "s" },
            if opts.secret.is_some() {
                ", shared secret required"
            } else {
                ""
            }
        ),
    );
    let interrupt: Mutex<Option<PyErr>> = Mutex::new(None);
    let building = factory.stop_flag();
    let stop = || -> bool {
        match Python::attach(|py| py.check_signals()) {
            Ok(()) => false,
            Err(e) => {
                *interrupt.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                // a slice being built is given up before its next tensor
                building.store(true, std::sync::atomic::Ordering::Relaxed);
                true
            }
        }
    };
    let log = |m: &str| log_line("worker", m);
    let r = py.detach(|| serve(listener, &opts, &factory, &log, &stop));
    if let Some(e) = interrupt.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    r.py()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(serve_worker, m)?)?;
    m.add("PROTOCOL_VERSION", dllama_core::net::PROTOCOL_VERSION)?;
    Ok(())
}

/// The progress line of `Node(..., workers=[...])` while the root ships weights: on stderr,
/// redrawn on a terminal (a new worker, every 0.25 s, and the end), else only the end.
pub fn shipping_progress(workers: &[String]) -> impl FnMut(usize, u64, u64) + '_ {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut last = (usize::MAX, std::time::Instant::now());
    let start = std::time::Instant::now();
    move |w: usize, done: u64, total: u64| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let due = w != last.0 || last.1.elapsed().as_millis() >= 250;
        if (tty && due) || done == total {
            last = (w, std::time::Instant::now());
            let mut e = std::io::stderr().lock();
            let _ = write!(
                e,
                "{}📦 shipping weights to worker {} ({}): {pct:3}% {:.1} / {:.1} MB",
                if tty { "\r" } else { "" },
                w + 1,
                workers[w],
                done as f64 / 1e6,
                total as f64 / 1e6
            );
            if done == total {
                let s = start.elapsed().as_secs_f64();
                let _ = writeln!(e, " in {s:.1} s");
            }
            let _ = e.flush();
        }
    }
}
