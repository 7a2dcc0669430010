//! Q40 × Q80 matmul speed against the machine's memory read bandwidth, and the cost of one
//! pool dispatch. `cargo run --release --example matmul_bench [-- rows cols]`
//! `BENCH_THREADS=1,2` (the default) picks the thread counts, `BENCH_ONLY=avx2` one kernel
//! path (`KernelPath::name`), `BENCH_HOT=1` one matrix only (cache-resident when small),
//! `BENCH_F32=1` also f32 weights of the same shape × one token (the engine's entry),
//! `BENCH_MB=4000` the megabytes of weights in all (default 640).
//!
//! The weights are several distinct (rows, cols) matrices, together larger than the caches,
//! used in turn, so every matmul streams its weights from memory as in generation. A VM may
//! report a last-level cache of hundreds of MB: there the default 640 MB flatters small
//! matrices, and `BENCH_MB=2000` or more measures them from memory (benchmarks/README.md).

use std::time::Instant;

use dllama_core::kernels::{
    self, matmul, BlockQ40, BlockQ80, Input, KernelPath, Kernels, Matrix, PackedQ40, QK,
};
use dllama_core::pool::ThreadPool;

/// The median (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Times `run(it)` for `it` in `0..n` and returns the `median` of the wall times, in seconds.
fn timed(n: usize, mut run: impl FnMut(usize)) -> f64 {
    let times = (0..n)
        .map(|it| {
            let t0 = Instant::now();
            run(it);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(4096);
    let cols = args.get(1).copied().unwrap_or(11008);
    assert!(cols % QK == 0, "cols must be a multiple of 32");
    let bpr = cols / QK;
    let mat_bytes = rows * bpr * 18;
    // > BENCH_MB (640) MB of weights in all; BENCH_HOT=1 keeps one matrix (in cache when
    // small) to measure the kernel's compute speed alone
    let hot = std::env::var("BENCH_HOT").is_ok_and(|v| v == "1");
    let total_mb: usize = std::env::var("BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(640);
    let n_mats = if hot {
        1
    } else {
        (total_mb << 20) / mat_bytes + 1
    };
    // timed calls per figure: every matrix 3 times (once for the 32-token batches); a hot
    // matrix takes microseconds, so it is timed 300 times (30) for a stable quartile
    let (reps, reps_batch) = if hot { (300, 30) } else { (3 * n_mats, n_mats) };
    eprintln!(
        "weights: {n_mats} matrices of ({rows}, {cols}) Q40, {:.1} MB each",
        mat_bytes as f64 / 1e6
    );
    let mut seed = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mats: Vec<Vec<BlockQ40>> = (0..n_mats)
        .map(|_| {
            (0..rows * bpr)
                .map(|_| {
                    let r = next();
                    let mut b = BlockQ40 {
                        d: 0x2000 | (r as u16 & 0x3ff),
                        qs: [0; 16],
                    };
                    b.qs[..8].copy_from_slice(&r.to_le_bytes());
                    b.qs[8..].copy_from_slice(&next().to_le_bytes());
                    b
                })
                .collect()
        })
        .collect();
    let t0 = Instant::now();
    let packed: Vec<PackedQ40> = mats
        .iter()
        .map(|m| PackedQ40::pack(m, rows, cols).unwrap())
        .collect();
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "packing: {:.2} GB/s of Q40 weights (1 thread)",
        (n_mats * mat_bytes) as f64 / dt / 1e9
    );
    {
        let mut pool2 = ThreadPool::new(2).unwrap();
        let t0 = Instant::now();
        let again: Vec<PackedQ40> = mats
            .iter()
            .map(|m| PackedQ40::pack_with(&mut pool2, m, rows, cols).unwrap())
            .collect();
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "packing: {:.2} GB/s of Q40 weights (2 threads)",
            (n_mats * mat_bytes) as f64 / dt / 1e9
        );
        drop(again);
    }
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut xq = vec![BlockQ80::default(); bpr];
    kernels::quantize_q80(&x, &mut xq).unwrap();
    let mut out = vec![0.0f32; rows];

    let f32_mats: Option<Vec<Vec<f32>>> =
        std::env::var("BENCH_F32").is_ok_and(|v| v == "1").then(|| {
            let n = (256 << 20) / (rows * cols * 4) + 1;
            (0..n)
                .map(|m| {
                    (0..rows * cols)
                        .map(|i| ((i * 7 + m) % 13) as f32 * 0.01 - 0.06)
                        .collect()
                })
                .collect()
        });
    println!("active kernels: {}", kernels::active_path());
    let thread_counts: Vec<usize> = std::env::var("BENCH_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or(vec![1, 2]);
    let only = std::env::var("BENCH_ONLY").ok();
    for threads in thread_counts {
        let mut pool = ThreadPool::new(threads).unwrap();
        // pool dispatch cost: an empty op, back to back
        let n = 20000;
        let t0 = Instant::now();
        for _ in 0..n {
            pool.run(|_, _| {});
        }
        let dispatch_ns = t0.elapsed().as_secs_f64() / n as f64 * 1e9;
        // the benchmarks' reference reader (huge pages, 4 streams per thread)
        let bw = dllama_core::memory::read_bandwidth(512 << 20, threads, 7).unwrap() / 1e9;
        println!("threads {threads}: memory read {bw:.1} GB/s, empty dispatch {dispatch_ns:.0} ns");
        let mut paths = KernelPath::ALL.to_vec();
        if std::env::var("BENCH_REVERSE").is_ok() {
            paths.reverse();
        }
        for path in paths {
            let Some(k) = Kernels::for_path(path) else {
                continue;
            };
            if only.as_deref().is_some_and(|o| o != path.name()) {
                continue;
            }
            let t = timed(reps, |it| {
                let w = &mats[it % n_mats];
                let shared = dllama_core::pool::SharedOut::new(&mut out);
                pool.split_rows(rows, |_, r| {
                    // SAFETY: disjoint rows per thread
                    let o = unsafe { shared.rows_mut(r.start, r.len()) };
                    k.matmul_q40_q80(&w[r.start * bpr..r.end * bpr], &xq, o, 1);
                });
            });
            let gbs = mat_bytes as f64 / t / 1e9;
            println!(
                "threads {threads}: q40×q80 {rows}x{cols} {:<16} {:7.3} ms  {gbs:5.1} GB/s  ({:.0}% of read bandwidth)",
                path.name(),
                t * 1e3,
                100.0 * gbs / bw
            );
            if path == KernelPath::Scalar {
                continue;
            }
            let t = timed(reps, |it| {
                let p = &packed[it % n_mats];
                let shared = dllama_core::pool::SharedOut::new(&mut out);
                pool.split_rows(rows, |_, r| {
                    // SAFETY: disjoint rows per thread
                    let o = unsafe { shared.rows_mut(r.start, r.len()) };
                    let cells = p.groups(r.start / 8, r.end.div_ceil(8));
                    k.matmul_q40x8_q80(cells, bpr, &xq, o, 1);
                });
            });
            let gbs = mat_bytes as f64 / t / 1e9;
            println!(
                "threads {threads}: packed  {rows}x{cols} {:<16} {:7.3} ms  {gbs:5.1} GB/s  ({:.0}% of read bandwidth)",
                path.name(),
                t * 1e3,
                100.0 * gbs / bw
            );
            // packed prefill of 32 tokens on this path
            let nt = 32;
            let xb: Vec<BlockQ80> = (0..nt).flat_map(|_| xq.iter().copied()).collect();
            let mut ob = vec![0.0f32; nt * rows];
            let t = timed(reps_batch, |it| {
                let p = &packed[it % n_mats];
                let shared = dllama_core::pool::SharedOut::new(&mut ob);
                let n_rows_all = rows;
                pool.split_rows(rows, |_, r| {
                    let mut tile = vec![0.0f32; nt * r.len()];
                    let cells = p.groups(r.start / 8, r.end.div_ceil(8));
                    k.matmul_q40x8_q80(cells, bpr, &xb, &mut tile, nt);
                    for t in 0..nt {
                        for (i, &v) in tile[t * r.len()..(t + 1) * r.len()].iter().enumerate() {
                            // SAFETY: disjoint rows per thread
                            unsafe { shared.write(t * n_rows_all + r.start + i, v) };
                        }
                    }
                });
            });
            println!(
                "threads {threads}: packed prefill {nt} tokens {:<16} {:7.3} ms = {:.3} ms/token",
                path.name(),
                t * 1e3,
                t * 1e3 / nt as f64
            );
        }
        // the checked entry point the engine uses, on the active path
        let t = timed(reps, |it| {
            matmul(
                &mut pool,
                Matrix::Q40(&mats[it % n_mats]),
                Input::Q80(&xq),
                &mut out,
                rows,
                cols,
                1,
            )
            .unwrap();
        });
        println!(
            "threads {threads}: kernels::matmul (active path) {:7.3} ms  {:5.1} GB/s",
            t * 1e3,
            mat_bytes as f64 / t / 1e9
        );
        let t = timed(reps, |it| {
            matmul(
                &mut pool,
                Matrix::Q40Packed(&packed[it % n_mats]),
                Input::Q80(&xq),
                &mut out,
                rows,
                cols,
                1,
            )
            .unwrap();
        });
        println!(
            "threads {threads}: kernels::matmul packed (active path) {:7.3} ms  {:5.1} GB/s",
            t * 1e3,
            mat_bytes as f64 / t / 1e9
        );
        // BENCH_F32=1: f32 weights of the same shape (a MoE router is 128 × 2048) × one
        // token through the engine's entry, > 256 MB of them in turn
        if let Some(fm) = &f32_mats {
            let t = timed(3 * fm.len(), |it| {
                matmul(
                    &mut pool,
                    Matrix::F32(&fm[it % fm.len()]),
                    Input::F32(&x),
                    &mut out,
                    rows,
                    cols,
                    1,
                )
                .unwrap();
            });
            println!(
                "threads {threads}: kernels::matmul f32 (active path) {:7.3} ms  {:5.1} GB/s",
                t * 1e3,
                (rows * cols * 4) as f64 / t / 1e9
            );
        }
        // f32-buffer mode: Q40 weights × f32 input, active path and scalar
        for k in [
            Kernels::get(),
            &Kernels::for_path(KernelPath::Scalar).unwrap(),
        ] {
            let t = timed(reps_batch, |it| {
                let w = &mats[it % n_mats];
                let shared = dllama_core::pool::SharedOut::new(&mut out);
                pool.split_rows(rows, |_, r| {
                    // SAFETY: disjoint rows per thread
                    let o = unsafe { shared.rows_mut(r.start, r.len()) };
                    k.matmul_q40_f32(&w[r.start * bpr..r.end * bpr], &x, o, 1);
                });
            });
            println!(
                "threads {threads}: q40×f32 {:<16} {:7.3} ms  {:5.1} GB/s",
                k.path.name(),
                t * 1e3,
                mat_bytes as f64 / t / 1e9
            );
        }
        // prefill: 32 tokens at once, weights read once per batch
        let nt = 32;
        let xb: Vec<BlockQ80> = (0..nt).flat_map(|_| xq.iter().copied()).collect();
        let mut ob = vec![0.0f32; nt * rows];
        let t = timed(reps_batch, |it| {
            matmul(
                &mut pool,
                Matrix::Q40(&mats[it % n_mats]),
                Input::Q80(&xb),
                &mut ob,
                rows,
                cols,
                nt,
            )
            .unwrap();
        });
        println!(
            "threads {threads}: prefill {nt} tokens {:7.3} ms = {:.3} ms/token",
            t * 1e3,
            t * 1e3 / nt as f64
        );
        let t = timed(reps_batch, |it| {
            matmul(
                &mut pool,
                Matrix::Q40Packed(&packed[it % n_mats]),
                Input::Q80(&xb),
                &mut ob,
                rows,
                cols,
                nt,
            )
            .unwrap();
        });
        println!(
            "threads {threads}: packed prefill {nt} tokens {:7.3} ms = {:.3} ms/token",
            t * 1e3,
            t * 1e3 / nt as f64
        );
    }
}
