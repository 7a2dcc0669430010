//! The long-lived thread pool that splits each matmul across the node's threads.
//!
//! `ThreadPool::new(n)` starts `n - 1` worker threads once; the calling thread is thread 0.
//! `run(f)` publishes `f` by bumping an atomic generation counter: workers spin on it for a
//! short while (the next op usually follows within microseconds) and then park; the caller
//! runs its own share, then waits (spin, then park) until every worker has finished. There is
//! no channel and no allocation per op. A panic in a task is caught on its thread and
//! re-raised on the caller after all threads are done, so a bug never leaves the pool hung.

use std::any::Any;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long a waiting thread stays awake before it parks: long enough to bridge the gaps
/// between the ops of a token and between two tokens (sampling, a network exchange), since
/// waking a parked thread costs a futex call and, on a busy machine, up to a scheduler tick
/// (~1 ms measured on a shared 2-vCPU VM); short enough not to burn a core while the node idles.
const AWAKE_TIME: Duration = Duration::from_millis(2);

/// Pure spinning (the common case: the other threads are a few microseconds away) before the
/// waiting thread starts to `yield_now`, which hands the core to a thread we wait for when
/// the machine has more runnable threads than cores.
const SPIN_TIME: Duration = Duration::from_micros(5);

/// Spin iterations between two looks at the clock.
const SPINS_PER_CLOCK_CHECK: u32 = 64;

/// Spin-wait state: `wait()` is true while the thread should stay awake, then it parks.
struct Spinner {
    start: Option<Instant>,
    spins: u32,
    yielding: bool,
}

impl Spinner {
    fn new() -> Spinner {
        Spinner {
            start: None,
            spins: 0,
            yielding: false,
        }
    }
    #[inline]
    fn wait(&mut self) -> bool {
        self.spins = self.spins.wrapping_add(1);
        if self.yielding || self.spins.is_multiple_of(SPINS_PER_CLOCK_CHECK) {
            let elapsed = self.start.get_or_insert_with(Instant::now).elapsed();
            if elapsed > AWAKE_TIME {
                return false;
            }
            self.yielding = elapsed > SPIN_TIME;
        }
        if self.yielding {
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
        true
    }
}

/// `m`'s guard, also once a panic on another thread has poisoned it: every holder leaves the
/// data whole between its statements, and a panic is reported where it happened.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rows of f32 output per cache line: row ranges given to threads start on a multiple of it,
/// so two threads never write the same cache line of the output.
pub const ROW_ALIGN: usize = 16;

type Task = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Bumped once per `run`; workers wait for it to change.
    generation: AtomicU64,
    /// Workers that finished the current generation.
    done: AtomicUsize,
    stop: AtomicBool,
    /// The current task, lifetime-erased; valid while `run` has not returned.
    task: UnsafeCell<Option<*const Task>>,
    /// The thread blocked in `run`, woken by the last worker to finish.
    caller: UnsafeCell<Option<Thread>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    n_threads: usize,
}

// SAFETY: `task` and `caller` are written only by the thread inside `run` before it bumps
// `generation` (Release) and read by workers after they observe the new generation (Acquire);
// `run` takes `&mut self`, so one run at a time.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all (the caller counts as one).
    pub fn new(n_threads: usize) -> Result<ThreadPool> {
        if n_threads == 0 || n_threads > 1024 {
            return Err(Error::invalid(format!(
                "nthreads must be between 1 and 1024, got {n_threads}"
            )));
        }
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            task: UnsafeCell::new(None),
            caller: UnsafeCell::new(None),
            panic: Mutex::new(None),
            n_threads,
        });
        let mut workers = Vec::with_capacity(n_threads - 1);
        for index in 1..n_threads {
            let shared = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name(format!("dllama-{index}"))
                .spawn(move || worker_loop(&shared, index))
                .map_err(|e| Error::io("cannot start a worker thread", e))?;
            workers.push(handle);
        }
        Ok(ThreadPool { shared, workers })
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Run `f(thread_index, n_threads)` once on every thread of the pool and return when all
    /// are done. A panic in any of them is re-raised here after all have finished.
    pub fn run<F: Fn(usize, usize) + Sync>(&mut self, f: F) {
        let n = self.shared.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        let task: &(dyn Fn(usize, usize) + Sync + '_) = &f;
        // SAFETY: the pointer is only dereferenced by workers between the generation bump
        // below and their `done` increment, and we wait for all of them before returning.
        let task: *const Task = unsafe {
            std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Task>(task)
        };
        unsafe {
            *self.shared.task.get() = Some(task);
            *self.shared.caller.get() = Some(thread::current());
        }
        self.shared.done.store(0, Ordering::Relaxed);
        self.shared.generation.fetch_add(1, Ordering::Release);
        for w in &self.workers {
            w.thread().unpark();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, n)));
        // wait for the workers: spin, then park (the last worker unparks us)
        let target = n - 1;
        let mut spinner = Spinner::new();
        while self.shared.done.load(Ordering::Acquire) < target {
            if !spinner.wait() {
                thread::park();
            }
        }
        unsafe {
            *self.shared.task.get() = None;
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        let worker_panic = lock(&self.shared.panic).take();
        if let Some(p) = worker_panic {
            resume_unwind(p);
        }
    }

    /// Split `n_rows` rows across the pool and call `f(thread_index, rows)` on each thread
    /// with a non-empty range. Range starts are multiples of [`ROW_ALIGN`].
    pub fn split_rows<F: Fn(usize, Range<usize>) + Sync>(&mut self, n_rows: usize, f: F) {
        self.run(|i, n| {
            let r = split_range(n_rows, i, n, ROW_ALIGN);
            if !r.is_empty() {
                f(i, r);
            }
        });
    }
}

/// Threads up to which `split_rows_claimed` hands out chunks (its claims live on the stack);
/// a larger pool gets `split_rows`' fixed ranges, one chunk each.
const MAX_CLAIMING_THREADS: usize = 64;

/// (start, end) in one word, so that an owner and a thief claim with one compare-exchange.
fn pack(start: usize, end: usize) -> u64 {
    ((start as u64) << 32) | end as u64
}

fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & 0xFFFF_FFFF) as usize)
}

impl ThreadPool {
    /// As `split_rows`, with the rows handed out in chunks of `chunk` rows (rounded up to a
    /// multiple of [`ROW_ALIGN`]): `f(thread_index, claim)` runs once on every thread, and
    /// each `claim()` gives that thread the next chunk of its own range (the range
    /// `split_rows` would give it) front to back, then, once its own range is taken, chunks
    /// from the back of the other threads' ranges, then `None`. So a thread that the
    /// machine slows down (another process on its core) leaves its last chunks to the
    /// others instead of keeping them waiting. Every row is given out exactly once, in
    /// ranges that start on a multiple of `ROW_ALIGN`.
    pub fn split_rows_claimed<F>(&mut self, n_rows: usize, chunk: usize, f: F)
    where
        F: Fn(usize, &mut dyn FnMut() -> Option<Range<usize>>) + Sync,
    {
        let n = self.shared.n_threads;
        let units = n_rows.div_ceil(ROW_ALIGN);
        let step = chunk.div_ceil(ROW_ALIGN).max(1);
        if n > MAX_CLAIMING_THREADS || units > u32::MAX as usize {
            return self.split_rows(n_rows, |i, r| {
                let mut once = Some(r);
                f(i, &mut || once.take())
            });
        }
        let rows = |r: Range<usize>| r.start * ROW_ALIGN..(r.end * ROW_ALIGN).min(n_rows);
        self.split_claimed(
            |i| split_range(units, i, n, 1),
            |_| step,
            |_| step,
            |i, claim| f(i, &mut || claim().map(|(_, r)| rows(r))),
        );
    }

    /// Hand out the items `own(i)` of every thread i (each thread's own numbering; at most
    /// [`MAX_CLAIMING_THREADS`] threads, fewer than 2^32 items each): `f(thread_index,
    /// claim)` runs once on every thread, and each `claim()` gives that thread (owner,
    /// items): first `own_step(left)` items from the front of its own range (`left`: its
    /// items not handed out yet), then, once its own range is taken, `thief_step(left)`
    /// items from the back of another thread's range (the next thread's first), then
    /// `None`. So a thread that the machine slows down leaves its last items to the others
    /// instead of keeping them waiting. Every item is given out exactly once. Steps are at
    /// least 1.
    pub fn split_claimed<F>(
        &mut self,
        own: impl Fn(usize) -> Range<usize>,
        own_step: impl Fn(usize) -> usize + Sync,
        thief_step: impl Fn(usize) -> usize + Sync,
        f: F,
    ) where
        F: Fn(usize, &mut dyn FnMut() -> Option<(usize, Range<usize>)>) + Sync,
    {
        let n = self.shared.n_threads;
        assert!(n <= MAX_CLAIMING_THREADS, "split_claimed: {n} threads");
        let claims: [AtomicU64; MAX_CLAIMING_THREADS] = std::array::from_fn(|_| AtomicU64::new(0));
        for (i, c) in claims.iter().enumerate().take(n) {
            let r = own(i);
            assert!(r.end <= u32::MAX as usize, "split_claimed: {r:?}");
            c.store(pack(r.start, r.end), Ordering::Relaxed);
        }
        // published to the workers by `run`'s generation bump (release / acquire)
        self.run(|i, n| {
            let mut own = true;
            let mut victim = 1;
            let mut claim = || {
                if own {
                    // the front of our own range
                    match take(&claims[i], |a, b| (a + own_step(b - a).max(1)).min(b), true) {
                        Some((a, t)) => return Some((i, a..t)),
                        None => own = false,
                    }
                }
                // the back of the others' ranges, the next thread's first
                while victim < n {
                    let v = (i + victim) % n;
                    let cut =
                        |a: usize, b: usize| b.saturating_sub(thief_step(b - a).max(1)).max(a);
                    if let Some((s, b)) = take(&claims[v], cut, false) {
                        return Some((v, s..b));
                    }
                    victim += 1;
                }
                None
            };
            f(i, &mut claim);
        });
    }
}

/// Take a chunk of the range (start, end) packed in `c`, with one compare-exchange (retried
/// while another thread changes it): `cut(start, end)` is where the chunk ends (from the
/// front) or begins (from the back); the chunk taken, or `None` once the range is empty.
fn take(c: &AtomicU64, cut: impl Fn(usize, usize) -> usize, front: bool) -> Option<(usize, usize)> {
    let mut cur = c.load(Ordering::Acquire);
    loop {
        let (a, b) = unpack(cur);
        if a >= b {
            return None;
        }
        let m = cut(a, b);
        let (chunk, left) = if front {
            ((a, m), (m, b))
        } else {
            ((m, b), (a, m))
        };
        match c.compare_exchange_weak(
            cur,
            pack(left.0, left.1),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Some(chunk),
            Err(v) => cur = v,
        }
    }
}

/// The rows of thread `i` of `n` among `n_rows`: contiguous, in order, boundaries on
/// multiples of `align` (the last range takes the remainder).
pub fn split_range(n_rows: usize, i: usize, n: usize, align: usize) -> Range<usize> {
    let units = n_rows.div_ceil(align);
    let start = (units * i / n * align).min(n_rows);
    let end = (units * (i + 1) / n * align).min(n_rows);
    start..end
}

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // wait for a new generation: spin, then park
        let mut spinner = Spinner::new();
        let gen = loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen || shared.stop.load(Ordering::Acquire) {
                break g;
            }
            if !spinner.wait() {
                thread::park();
            }
        };
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        seen = gen;
        // SAFETY: published before the generation bump; `run` waits for our `done`.
        let (task, caller) = unsafe { (*shared.task.get(), (*shared.caller.get()).clone()) };
        if let Some(task) = task {
            let task: &Task = unsafe { &*task };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| task(index, shared.n_threads))) {
                *lock(&shared.panic) = Some(p);
            }
        }
        let finished = shared.done.fetch_add(1, Ordering::AcqRel) + 1;
        if finished == shared.n_threads - 1 {
            if let Some(c) = caller {
                c.unpark();
            }
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw view of an output matrix that several threads write at disjoint places (each its own
/// rows of a (n_tokens, n_rows) matrix, a strided region no `&mut` slice can describe).
#[derive(Clone, Copy)]
pub struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: users write disjoint elements only (documented on `write`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn new(out: &mut [f32]) -> SharedOut {
        SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    /// The first element, for kernels that write the rows they are handed.
    pub fn ptr(&self) -> *mut f32 {
        self.ptr
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// `len` elements from `start` as a slice (panics when out of range).
    ///
    /// # Safety
    /// As `write`, for every element of the range.
    pub unsafe fn rows_mut<'a>(&self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(start + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }

    /// Store `v` at element `i`.
    ///
    /// # Safety
    /// `i < len`; no other thread reads or writes element `i` while the pool task runs; the
    /// slice given to `new` outlives every use.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: f32) {
        debug_assert!(i < self.len);
        *self.ptr.add(i) = v;
    }
}
