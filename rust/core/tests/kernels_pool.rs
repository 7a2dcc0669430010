//! The thread pool: every thread runs every op, row splits cover each row exactly once on
//! cache-line boundaries, panics come back to the caller, the pool is reusable and drops cleanly.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use dllama_core::pool::{split_range, ThreadPool, ROW_ALIGN};

#[test]
fn every_thread_runs_every_op() {
    for n in [1, 2, 3, 5] {
        let mut pool = ThreadPool::new(n).unwrap();
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..300 {
            pool.run(|i, total| {
                assert_eq!(total, n);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 300);
        }
    }
}

#[test]
fn split_rows_covers_each_row_once_aligned() {
    for n in [1, 2, 3, 4, 7] {
        for rows in [0, 1, 15, 16, 17, 100, 4096, 11008] {
            let mut next = 0;
            for i in 0..n {
                let r = split_range(rows, i, n, ROW_ALIGN);
                assert_eq!(
                    r.start, next,
                    "{rows} rows / {n}: gap or overlap before thread {i}"
                );
                assert!(
                    r.start.is_multiple_of(ROW_ALIGN) || r.start == rows,
                    "start {} not aligned",
                    r.start
                );
                next = r.end;
            }
            assert_eq!(next, rows);
        }
    }
    let mut pool = ThreadPool::new(3).unwrap();
    let seen = Mutex::new(vec![0u8; 1000]);
    pool.split_rows(1000, |_, r| {
        let mut s = seen.lock().unwrap();
        for i in r {
            s[i] += 1;
        }
    });
    assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1));
}

#[test]
fn split_rows_claimed_gives_each_row_once_and_lets_others_take_a_slow_threads_rows() {
    for n in [1, 2, 3, 5] {
        let mut pool = ThreadPool::new(n).unwrap();
        for rows in [0, 1, 15, 16, 17, 100, 1000, 4096, 11008] {
            for chunk in [1, 16, 48, 200, 100_000] {
                for slow in [false, true] {
                    // slow: thread 1 claims nothing until every other thread is through, so
                    // they must have taken all of its rows
                    let seen = Mutex::new(vec![0u8; rows]);
                    let taken = Mutex::new(vec![0usize; n]);
                    let finished = AtomicUsize::new(0);
                    pool.split_rows_claimed(rows, chunk, |i, claim| {
                        if slow && i == 1 {
                            let t0 = std::time::Instant::now();
                            while finished.load(Ordering::Acquire) < n - 1 {
                                assert!(t0.elapsed().as_secs() < 20, "the other threads hang");
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                        }
                        while let Some(r) = claim() {
                            assert!(
                                r.start.is_multiple_of(ROW_ALIGN),
                                "start {} not aligned",
                                r.start
                            );
                            assert!(!r.is_empty() && r.end <= rows, "{r:?} of {rows}");
                            let mut s = seen.lock().unwrap();
                            for k in r.clone() {
                                s[k] += 1;
                            }
                            taken.lock().unwrap()[i] += r.len();
                        }
                        finished.fetch_add(1, Ordering::Release);
                    });
                    let what = format!("{rows} rows, chunk {chunk}, {n} threads, slow {slow}");
                    let seen = seen.into_inner().unwrap();
                    assert!(
                        seen.iter().all(|&c| c == 1),
                        "{what}: a row not given out once"
                    );
                    if slow && n >= 2 {
                        assert_eq!(taken.into_inner().unwrap()[1], 0, "{what}: nothing taken");
                    }
                }
            }
        }
    }
}

#[test]
fn split_claimed_gives_each_item_once_with_its_owner_and_the_steps_asked() {
    for n in [1, 2, 3, 5] {
        let mut pool = ThreadPool::new(n).unwrap();
        for items in [0, 1, 7, 40, 1001] {
            for slow in [false, true] {
                // thread i owns items of its own numbering: `items + i` of them
                let own = |i: usize| 0..items + i;
                let seen = Mutex::new((0..n).map(|i| vec![0u8; own(i).len()]).collect::<Vec<_>>());
                let taken = Mutex::new(vec![0usize; n]);
                let finished = AtomicUsize::new(0);
                pool.split_claimed(
                    own,
                    |left| left.div_ceil(4),
                    |left| left.div_ceil(2),
                    |i, claim| {
                        if slow && i == 1 {
                            let t0 = std::time::Instant::now();
                            while finished.load(Ordering::Acquire) < n - 1 {
                                assert!(t0.elapsed().as_secs() < 20, "the other threads hang");
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                        }
                        while let Some((owner, r)) = claim() {
                            assert!(owner < n && !r.is_empty() && r.end <= own(owner).end);
                            // from its own range a thread takes a quarter of what is left
                            // at most, from the others' half
                            let most = if owner == i { 4 } else { 2 };
                            assert!(r.len() <= own(owner).len().div_ceil(most), "{r:?}");
                            let mut s = seen.lock().unwrap();
                            for k in r.clone() {
                                s[owner][k] += 1;
                            }
                            taken.lock().unwrap()[i] += r.len();
                        }
                        finished.fetch_add(1, Ordering::Release);
                    },
                );
                let what = format!("{items} items, {n} threads, slow {slow}");
                let seen = seen.into_inner().unwrap();
                assert!(
                    seen.iter().flatten().all(|&c| c == 1),
                    "{what}: an item not given out once"
                );
                if slow && n >= 2 {
                    assert_eq!(taken.into_inner().unwrap()[1], 0, "{what}: nothing taken");
                }
            }
        }
    }
}

#[test]
fn a_panic_in_a_task_reaches_the_caller_and_the_pool_survives() {
    let mut pool = ThreadPool::new(3).unwrap();
    for bad in [0, 2] {
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i, _| {
                if i == bad {
                    panic!("task {i} failed");
                }
            })
        }));
        assert!(r.is_err(), "panic on thread {bad} lost");
    }
    let count = AtomicUsize::new(0);
    pool.run(|_, _| {
        count.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(count.load(Ordering::Relaxed), 3);
}

#[test]
fn zero_threads_is_an_error() {
    assert!(ThreadPool::new(0).is_err());
}

#[test]
fn idle_pool_wakes_up_after_parking() {
    let mut pool = ThreadPool::new(2).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50)); // workers park
    let count = AtomicUsize::new(0);
    pool.run(|_, _| {
        count.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(count.load(Ordering::Relaxed), 2);
    drop(pool);
}
