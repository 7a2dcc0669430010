//! Cost of one pool dispatch (publish, all threads run an empty task, wait for all), the
//! synchronization a matmul pays. `cargo run --release --example pool_bench`
//!
//! Reports the best and the median of 50 batches of 2000 back-to-back dispatches: on a shared
//! machine the median includes the time the OS gives our threads to others.

use std::time::Instant;

use dllama_core::pool::ThreadPool;

fn main() {
    let max_threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    for threads in 1..=max_threads {
        let mut pool = ThreadPool::new(threads).unwrap();
        let mut per_op = Vec::new();
        for _ in 0..50 {
            let n = 2000;
            let t0 = Instant::now();
            for _ in 0..n {
                pool.run(|_, _| {});
            }
            per_op.push(t0.elapsed().as_secs_f64() / n as f64 * 1e9);
        }
        per_op.sort_by(|a, b| a.partial_cmp(b).unwrap());
        // after a pause long enough for the workers to park: the wake-up cost
        let mut wake = Vec::new();
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let t0 = Instant::now();
            pool.run(|_, _| {});
            wake.push(t0.elapsed().as_secs_f64() * 1e9);
        }
        wake.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "threads {threads}: dispatch best {:.0} ns, median {:.0} ns; after parking: median {:.0} ns",
            per_op[0],
            per_op[per_op.len() / 2],
            wake[wake.len() / 2]
        );
    }
}
