//! The machine's memory, for refusing work that cannot fit before allocating it.

/// Bytes of memory available to a new allocation without swapping (`MemAvailable` of
/// /proc/meminfo); `None` where the system does not say.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// `n` bytes for a message: "9.3 GiB", "512.0 MiB".
pub fn human(n: u64) -> String {
    let n = n as f64;
    if n >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", n / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", n / (1u64 << 20) as f64)
    }
}

/// Zeroed bytes for the large buffers the kernels stream once per token (the repacked
/// weights), carved from 2 MiB-aligned anonymous mappings advised `MADV_HUGEPAGE` on Linux.
///
/// With 4 KiB pages a sequential read crosses a page every 4 KiB: each crossing costs a TLB
/// miss and stops the hardware prefetchers, which then restart on the next page; transparent
/// huge pages (2 MiB) remove both (figures in benchmarks/README.md). Where transparent huge
/// pages are `never` (or not built into the kernel) the advice is ignored and the same
/// mappings are plain 4 KiB pages: everything works, only slower. Many small buffers (the
/// experts of a MoE layer, each under 2 MiB) share one mapping of [`ARENA_CHUNK`] bytes, so
/// they get huge pages too; a mapping is returned to the system when its last buffer is
/// dropped. Elsewhere than Linux the bytes are an ordinary heap allocation.
pub struct LargeBytes {
    #[cfg(target_os = "linux")]
    chunk: std::sync::Arc<huge::Chunk>,
    #[cfg(target_os = "linux")]
    off: usize,
    #[cfg(target_os = "linux")]
    len: usize,
    #[cfg(not(target_os = "linux"))]
    heap: Vec<u8>,
}

/// Bytes per shared mapping of [`LargeBytes`] (buffers at least this big get their own).
pub const ARENA_CHUNK: usize = 64 << 20;

impl LargeBytes {
    /// `len` zero bytes, 64-byte aligned; an error (not an abort) when the system refuses.
    pub fn zeroed(len: usize) -> crate::Result<LargeBytes> {
        #[cfg(target_os = "linux")]
        {
            let (chunk, off) = huge::carve(len)?;
            Ok(LargeBytes { chunk, off, len })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let mut heap = Vec::new();
            heap.try_reserve_exact(len).map_err(|_| {
                crate::Error::invalid(format!("cannot allocate {}", human(len as u64)))
            })?;
            heap.resize(len, 0);
            Ok(LargeBytes { heap })
        }
    }
}

impl std::ops::Deref for LargeBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: off..off + len lies inside the chunk's mapping, which lives as long as
            // `self.chunk`; no other LargeBytes covers these bytes.
            unsafe { std::slice::from_raw_parts(self.chunk.ptr.add(self.off), self.len) }
        }
        #[cfg(not(target_os = "linux"))]
        {
            &self.heap
        }
    }
}

impl std::ops::DerefMut for LargeBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: as in `deref`; `&mut self` is the only handle on these bytes.
            unsafe { std::slice::from_raw_parts_mut(self.chunk.ptr.add(self.off), self.len) }
        }
        #[cfg(not(target_os = "linux"))]
        {
            &mut self.heap
        }
    }
}

/// Bytes per second that `n_threads` threads read from memory at once: the fastest of the
/// [`READ_PATTERNS`], each timed `rounds` times. Each thread sums its interleaved sequential
/// streams of a `nbytes` buffer allocated as the weights are ([`LargeBytes`]), prefetching
/// each stream some bytes ahead or not; one stream alone leaves bandwidth unused on the CPUs
/// measured, and which count and prefetch read fastest differs between them (benchmarks/
/// README.md). The streams start a little more than `nbytes / streams` apart
/// ([`STREAM_SKEW`]): at exact power-of-two distances in huge pages they would hit the same
/// DRAM banks and read slower than one stream. AVX2 loads where the CPU has them. The
/// reference for the benchmarks' floor, so it takes the best any pattern gets.
pub fn read_bandwidth(nbytes: usize, n_threads: usize, rounds: usize) -> crate::Result<f64> {
    if rounds == 0 {
        return Err(crate::Error::invalid(
            "read_bandwidth: 0 rounds is too little to time",
        ));
    }
    let mut reader = BandwidthReader::new(nbytes, n_threads)?;
    Ok((0..rounds).map(|_| reader.read()).fold(0.0, f64::max))
}

/// A buffer of `nbytes`, allocated and touched once, that `n_threads` threads read again and
/// again as [`read_bandwidth`] does: [`BandwidthReader::read`] times one pass of each of the
/// [`READ_PATTERNS`]. For measuring the bandwidth right beside another measurement (a token
/// of the model, say), many times over, on a machine whose bandwidth changes as other
/// tenants come and go.
pub struct BandwidthReader {
    pool: crate::pool::ThreadPool,
    buf: LargeBytes,
    sink: std::sync::atomic::AtomicU64,
}

impl BandwidthReader {
    pub fn new(nbytes: usize, n_threads: usize) -> crate::Result<BandwidthReader> {
        let (_, shortest) = stream_layout(nbytes, MAX_READ_STREAMS * n_threads.max(1));
        if shortest < 4096 || n_threads == 0 {
            return Err(crate::Error::invalid(format!(
                "read_bandwidth: {nbytes} bytes over {n_threads} threads is too little to time"
            )));
        }
        let pool = crate::pool::ThreadPool::new(n_threads)?;
        let mut buf = LargeBytes::zeroed(nbytes)?;
        for (i, chunk) in buf.chunks_mut(4096).enumerate() {
            chunk.fill(i as u8); // touch every page before timing
        }
        Ok(BandwidthReader {
            pool,
            buf,
            sink: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Bytes per second: the fastest of one pass of each of the [`READ_PATTERNS`].
    pub fn read(&mut self) -> f64 {
        let n_threads = self.pool.n_threads();
        let (buf, sink) = (&self.buf, &self.sink);
        let mut best = 0.0f64;
        for &(streams, ahead) in READ_PATTERNS {
            let (starts, len) = stream_layout(buf.len(), streams * n_threads);
            let t0 = std::time::Instant::now();
            self.pool.run(|i, _| {
                let mine = &starts[i * streams..(i + 1) * streams];
                let s = sum_streams(buf, mine, len, ahead);
                sink.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
            });
            let bw = (starts.len() * len) as f64 / t0.elapsed().as_secs_f64();
            best = best.max(bw);
        }
        std::hint::black_box(sink.load(std::sync::atomic::Ordering::Relaxed));
        best
    }
}

/// The ways [`read_bandwidth`] reads: (streams per thread, prefetch distance in bytes, 0 for
/// none). 4 streams without prefetch were the fastest on Zen 3; 4 or 8 streams prefetched
/// 2 KiB ahead read 10–15% faster on a Sapphire Rapids-class Xeon.
pub const READ_PATTERNS: &[(usize, usize)] = &[(4, 0), (4, 2048), (8, 2048)];

/// The most streams a thread reads in [`READ_PATTERNS`].
pub const MAX_READ_STREAMS: usize = {
    let (mut most, mut i) = (0, 0);
    while i < READ_PATTERNS.len() {
        if READ_PATTERNS[i].0 > most {
            most = READ_PATTERNS[i].0;
        }
        i += 1;
    }
    most
};

/// Extra distance between consecutive streams of [`read_bandwidth`], past an even split.
pub const STREAM_SKEW: usize = 17 * 64;

/// The starts of `n` streams in `nbytes` and their common length (a multiple of 64): stream
/// j starts at j · (stride + STREAM_SKEW), stride = nbytes / n, and all stay inside.
fn stream_layout(nbytes: usize, n: usize) -> (Vec<usize>, usize) {
    let stride = nbytes / n.max(1) / 64 * 64;
    let len = stride.saturating_sub(n.saturating_sub(1) * STREAM_SKEW) / 64 * 64;
    ((0..n).map(|j| j * (stride + STREAM_SKEW)).collect(), len)
}

/// A checksum of the `len` bytes (a multiple of 64) from each of `starts` (at most
/// [`MAX_READ_STREAMS`]) in `b`, read as interleaved streams; the AVX2 reader (4 or 8
/// streams) prefetches each `ahead` bytes ahead (0: not at all; the prefetches may reach past
/// the buffer, which is harmless), the portable one does not prefetch.
fn sum_streams(b: &[u8], starts: &[usize], len: usize, ahead: usize) -> u64 {
    assert!(len.is_multiple_of(64) && starts.iter().all(|&s| s + len <= b.len()));
    assert!(starts.len() <= MAX_READ_STREAMS);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected; every stream lies inside `b` (asserted).
        return unsafe {
            match (starts.len(), ahead) {
                (4, 0) => sum_streams_avx2::<4, false>(b, starts, len, 0),
                (4, _) => sum_streams_avx2::<4, true>(b, starts, len, ahead),
                (8, 0) => sum_streams_avx2::<8, false>(b, starts, len, 0),
                (8, _) => sum_streams_avx2::<8, true>(b, starts, len, ahead),
                _ => sum_streams_portable(b, starts, len),
            }
        };
    }
    let _ = ahead; // the portable reader does not prefetch
    sum_streams_portable(b, starts, len)
}

fn sum_streams_portable(b: &[u8], starts: &[usize], len: usize) -> u64 {
    let mut acc = [0u64; MAX_READ_STREAMS];
    for i in (0..len).step_by(8) {
        for (a, &s) in acc.iter_mut().zip(starts) {
            let v = u64::from_le_bytes(b[s + i..s + i + 8].try_into().unwrap_or([0; 8]));
            *a = a.wrapping_add(v);
        }
    }
    acc.iter().fold(0, |s, &a| s.wrapping_add(a))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_streams_avx2<const S: usize, const PREFETCH: bool>(
    b: &[u8],
    starts: &[usize],
    len: usize,
    ahead: usize,
) -> u64 {
    use std::arch::x86_64::*;
    let p = b.as_ptr();
    let starts: [usize; S] = std::array::from_fn(|k| starts[k]);
    let mut acc = [_mm256_setzero_si256(); S];
    let mut i = 0;
    while i + 64 <= len {
        for (a, &s) in acc.iter_mut().zip(&starts) {
            let q = p.add(s + i);
            if PREFETCH {
                _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(ahead) as *const i8);
            }
            *a = _mm256_add_epi64(*a, _mm256_loadu_si256(q as *const __m256i));
            *a = _mm256_add_epi64(*a, _mm256_loadu_si256(q.add(32) as *const __m256i));
        }
        i += 64;
    }
    let mut lanes = [0u64; 4];
    for a in acc {
        let mut l = [0u64; 4];
        _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, a);
        for j in 0..4 {
            lanes[j] = lanes[j].wrapping_add(l[j]);
        }
    }
    lanes.iter().fold(0, |s, &a| s.wrapping_add(a))
}

#[cfg(target_os = "linux")]
mod huge {
    use std::sync::{Arc, Mutex, Weak};

    use super::{human, ARENA_CHUNK};
    use crate::{Error, Result};

    const HUGE_PAGE: usize = 2 << 20;
    const ALIGN: usize = 64;

    /// One anonymous mapping, `len` bytes at `ptr` (2 MiB aligned), unmapped on drop.
    pub(super) struct Chunk {
        pub(super) ptr: *mut u8,
        len: usize,
    }
    // SAFETY: the mapping is plain memory; each `LargeBytes` touches only its own range.
    unsafe impl Send for Chunk {}
    unsafe impl Sync for Chunk {}

    impl Drop for Chunk {
        fn drop(&mut self) {
            // SAFETY: `ptr..ptr + len` is a mapping this chunk owns and nothing refers to
            // any more (the last `LargeBytes` holding it is being dropped).
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }

    /// The mapping small buffers are carved from, and its first free offset.
    static ARENA: Mutex<(Weak<Chunk>, usize)> = Mutex::new((Weak::new(), 0));

    pub(super) fn carve(len: usize) -> Result<(Arc<Chunk>, usize)> {
        let need = len.max(1).next_multiple_of(ALIGN);
        if need >= ARENA_CHUNK / 4 {
            return Ok((map(need)?, 0));
        }
        let mut arena = crate::pool::lock(&ARENA);
        if let Some(chunk) = arena.0.upgrade() {
            let off = arena.1;
            if off + need <= chunk.len {
                arena.1 = off + need;
                return Ok((chunk, off));
            }
        }
        let chunk = map(ARENA_CHUNK)?;
        *arena = (Arc::downgrade(&chunk), need);
        Ok((chunk, 0))
    }

    /// A fresh zeroed mapping of at least `len` bytes, 2 MiB aligned, advised huge pages.
    fn map(len: usize) -> Result<Arc<Chunk>> {
        let refused = |what: &str| {
            Error::io(
                format!("cannot map {} for the weights ({what})", human(len as u64)),
                std::io::Error::last_os_error(),
            )
        };
        let len = len
            .checked_next_multiple_of(HUGE_PAGE)
            .ok_or_else(|| Error::invalid(format!("cannot map {len} bytes")))?;
        let span = len + HUGE_PAGE;
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(refused("mmap"));
        }
        // keep the 2 MiB-aligned `len` bytes inside the span, give back the rest
        let start = (raw as usize).next_multiple_of(HUGE_PAGE);
        let head = start - raw as usize;
        let tail = span - head - len;
        // SAFETY: head and tail are the parts of our own mapping outside start..start + len.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
            // advice only: EINVAL where the kernel has no transparent huge pages
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Ok(Arc::new(Chunk {
            ptr: start as *mut u8,
            len,
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn available_memory_is_known_on_linux() {
        if cfg!(target_os = "linux") {
            let n = super::available_bytes().unwrap();
            assert!(n > 1 << 20, "{n}");
        }
        assert_eq!(super::human(3 << 29), "1.5 GiB");
        assert_eq!(super::human(1 << 20), "1.0 MiB");
    }

    #[test]
    fn read_bandwidth_reads_and_refuses_tiny_buffers() {
        let bw = super::read_bandwidth(8 << 20, 2, 2).unwrap();
        assert!(bw > 1e8, "{bw}");
        assert!(super::read_bandwidth(100, 1, 1).is_err());
        assert!(super::read_bandwidth(8 << 20, 1, 0).is_err());
        // the reader keeps its buffer: every read is a pass over the same bytes
        let mut r = super::BandwidthReader::new(8 << 20, 2).unwrap();
        assert!(r.read() > 1e8 && r.read() > 1e8);
        assert!(super::BandwidthReader::new(100, 1).is_err());
        assert!(super::BandwidthReader::new(8 << 20, 0).is_err());
        // the streams are disjoint, inside the buffer, and both readers sum exactly them
        let n = 64 * 1024 + 192;
        let b: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        for &(streams, ahead) in super::READ_PATTERNS.iter().chain(&[(8, 0), (3, 64)]) {
            let (starts, len) = super::stream_layout(n, streams);
            assert!(len > 0 && len % 64 == 0);
            for w in starts.windows(2) {
                assert!(w[0] + len <= w[1]);
            }
            assert!(starts[streams - 1] + len <= n);
            let want = starts.iter().fold(0u64, |s, &st| {
                b[st..st + len]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .fold(s, |s, v| s.wrapping_add(v))
            });
            assert_eq!(
                super::sum_streams(&b, &starts, len, ahead),
                want,
                "{streams} {ahead}"
            );
            assert_eq!(super::sum_streams_portable(&b, &starts, len), want);
        }
    }

    #[test]
    fn large_bytes_are_zeroed_disjoint_and_freed() {
        use super::{LargeBytes, ARENA_CHUNK};
        // small buffers share a mapping, big ones get their own; all are zero and separate
        let sizes = [1, 100, 4096, 3 << 20, ARENA_CHUNK / 4, ARENA_CHUNK + 1, 5];
        let mut bufs: Vec<LargeBytes> = sizes
            .iter()
            .map(|&n| LargeBytes::zeroed(n).unwrap())
            .collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.len(), sizes[i]);
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert!(b.iter().all(|&v| v == 0));
            b.fill(i as u8 + 1);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(
                b.iter().all(|&v| v == i as u8 + 1),
                "buffer {i} was overwritten"
            );
        }
        drop(bufs);
        // a buffer after every earlier one was dropped starts from zero again
        let b = LargeBytes::zeroed(1000).unwrap();
        assert!(b.iter().all(|&v| v == 0));
    }
}
