//! Large zeroed buffers backed by transparent huge pages where the kernel allows.
//!
//! Repacked weights are GBs of anonymous memory written once at load. With 4 KiB pages the
//! first touch of each page is a page fault (about a million for a 7B model, seconds of system
//! time on a VM); with 2 MiB pages it is 512 times fewer. Transparent huge pages are often in
//! `madvise` mode, so the buffer is mapped 2 MiB-aligned and advised `MADV_HUGEPAGE`. Where
//! that is not possible (not Linux, mapping refused) it falls back to a plain `Vec`.

use std::ops::{Deref, DerefMut};

/// Size of a transparent huge page on x86_64 and of the usual aarch64 configuration.
const HUGE: usize = 2 << 20;

/// Below this size a buffer is a plain `Vec` (a huge page would be mostly unused).
const MIN_HUGE: usize = 4 * HUGE;

/// A zeroed byte buffer of fixed length.
pub struct ZeroedBuf {
    inner: Inner,
}

enum Inner {
    Vec(Vec<u8>),
    #[cfg(target_os = "linux")]
    Mapped {
        /// the whole mapping (for `munmap`)
        map: *mut libc::c_void,
        map_len: usize,
        /// the 2 MiB-aligned start of the buffer inside it
        ptr: *mut u8,
        len: usize,
    },
}

// SAFETY: the mapping is owned by this value alone, like a Vec's heap block.
unsafe impl Send for ZeroedBuf {}
unsafe impl Sync for ZeroedBuf {}

impl ZeroedBuf {
    /// `len` zero bytes, on huge pages when `len` is large and the kernel allows it.
    pub fn new(len: usize) -> ZeroedBuf {
        #[cfg(target_os = "linux")]
        if len >= MIN_HUGE {
            if let Some(b) = Self::mapped(len) {
                return b;
            }
        }
        ZeroedBuf {
            inner: Inner::Vec(vec![0u8; len]),
        }
    }

    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Option<ZeroedBuf> {
        let map_len = len.checked_add(HUGE)?;
        // SAFETY: a fresh private anonymous mapping (zero-filled by the kernel); no existing
        // memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        let offset = (map as usize).next_multiple_of(HUGE) - map as usize;
        let ptr = (map as *mut u8).wrapping_add(offset);
        // SAFETY: `ptr..ptr + len` lies inside the mapping just made. A refused advice only
        // means 4 KiB pages.
        unsafe {
            libc::madvise(ptr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Some(ZeroedBuf {
            inner: Inner::Mapped {
                map,
                map_len,
                ptr,
                len,
            },
        })
    }

    /// Whether the buffer was mapped and advised for huge pages (not a plain `Vec`).
    pub fn is_huge_advised(&self) -> bool {
        !matches!(self.inner, Inner::Vec(_))
    }
}

impl Deref for ZeroedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.inner {
            Inner::Vec(v) => v,
            // SAFETY: `ptr..ptr + len` is mapped readable and zero-initialized for as long as
            // `self` lives.
            #[cfg(target_os = "linux")]
            Inner::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl DerefMut for ZeroedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.inner {
            Inner::Vec(v) => v,
            // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
            #[cfg(target_os = "linux")]
            Inner::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
        }
    }
}

impl Drop for ZeroedBuf {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Inner::Mapped { map, map_len, .. } = self.inner {
            // SAFETY: the mapping made in `mapped`, unmapped once; nothing borrows it now.
            unsafe {
                libc::munmap(map, map_len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_buffers_are_zeroed_and_writable() {
        for len in [0, 100, MIN_HUGE + 12345] {
            let mut b = ZeroedBuf::new(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                b[len - 1] = 7;
                b[0] = 3;
                assert_eq!((b[0], b[len - 1]), (3, 7));
            }
            if len >= MIN_HUGE && cfg!(target_os = "linux") {
                assert!(b.is_huge_advised());
                assert!((b.as_ptr() as usize).is_multiple_of(HUGE));
            } else {
                assert!(!b.is_huge_advised());
            }
        }
    }
}
