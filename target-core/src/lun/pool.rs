//! Recycled read buffers.
//!
//! Every READ needs a buffer that the store fills and the session sends as Data-In. Fresh
//! allocations of 128 KiB and more come from `mmap` and go back with `munmap`, so each such
//! read also pays a page fault and a page clear per 4 KiB (measured: 15% of the target's CPU
//! on 1 MiB sequential reads). Buffers therefore come from power-of-two size classes, 4 KiB to
//! 4 MiB, page aligned (so they also serve O_DIRECT with blocks up to 4 KiB), and go back to
//! their class when the last [`Bytes`] referring to them is dropped.
//!
//! # Bounds
//! The pool keeps at most [`POOL_BYTES_MAX`] bytes of idle buffers in the whole process;
//! buffers beyond that, larger than the biggest class, or with a stricter alignment are freed
//! normally. Buffers in use are bounded by what sessions may have in flight (queue depth ×
//! transfer size), not by the pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::sys::{AlignedBuf, DIRECT_MEM_ALIGN};

/// Smallest class: 4 KiB.
const MIN_SHIFT: u32 = 12;
/// Largest class: 4 MiB.
const MAX_SHIFT: u32 = 22;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Idle bytes the pool may hold, all classes together.
pub const POOL_BYTES_MAX: usize = 64 << 20;

static FREE: [Mutex<Vec<AlignedBuf>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];
static IDLE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The class index and capacity for a request of `len` bytes, if pooled.
fn class_of(len: usize) -> Option<(usize, usize)> {
    let cap = len.max(1 << MIN_SHIFT).checked_next_power_of_two()?;
    let shift = cap.trailing_zeros();
    (shift <= MAX_SHIFT).then(|| ((shift - MIN_SHIFT) as usize, cap))
}

/// An empty buffer with room for at least `len` bytes, aligned to `align` (a power of two),
/// from the pool when one is idle.
pub(crate) fn take(len: usize, align: usize) -> AlignedBuf {
    if align > DIRECT_MEM_ALIGN {
        return AlignedBuf::with_capacity(len, align);
    }
    let Some((class, cap)) = class_of(len) else {
        return AlignedBuf::with_capacity(len, align);
    };
    let reused = FREE[class].lock().unwrap_or_else(|e| e.into_inner()).pop();
    match reused {
        Some(mut buf) => {
            IDLE_BYTES.fetch_sub(cap, Ordering::Relaxed);
            buf.clear();
            buf
        }
        None => AlignedBuf::with_capacity(cap, DIRECT_MEM_ALIGN),
    }
}

/// `buf`'s initialized bytes as [`Bytes`]; the buffer returns to the pool when the last
/// clone is dropped.
pub(crate) fn freeze(buf: AlignedBuf) -> Bytes {
    Bytes::from_owner(Pooled(Some(buf)))
}

/// The class a returned buffer belongs to: page aligned with exactly a class capacity.
fn home_class(buf: &AlignedBuf) -> Option<usize> {
    let cap = buf.capacity();
    if buf.align() != DIRECT_MEM_ALIGN {
        return None;
    }
    class_of(cap).and_then(|(class, class_cap)| (class_cap == cap).then_some(class))
}

/// Gives a buffer back (or frees it when it does not belong to a class or the pool is full).
pub(crate) fn give_back(buf: AlignedBuf) {
    let Some(class) = home_class(&buf) else {
        return;
    };
    let cap = buf.capacity();
    if IDLE_BYTES.fetch_add(cap, Ordering::Relaxed) + cap > POOL_BYTES_MAX {
        IDLE_BYTES.fetch_sub(cap, Ordering::Relaxed);
        return;
    }
    FREE[class]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(buf);
}

/// Idle bytes held by the pool now (for tests and metrics).
pub fn idle_bytes() -> usize {
    IDLE_BYTES.load(Ordering::Relaxed)
}

/// The owner behind a pooled [`Bytes`].
struct Pooled(Option<AlignedBuf>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], AlignedBuf::as_ref)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_to_powers_of_two() {
        assert_eq!(class_of(0), Some((0, 4096)));
        assert_eq!(class_of(4096), Some((0, 4096)));
        assert_eq!(class_of(4097), Some((1, 8192)));
        assert_eq!(class_of(1 << 20), Some((8, 1 << 20)));
        assert_eq!(class_of(4 << 20), Some((10, 4 << 20)));
        assert_eq!(class_of((4 << 20) + 1), None);
        assert_eq!(class_of(usize::MAX), None);
    }

    #[test]
    fn buffers_come_back_and_are_reused() {
        // A class no other test uses, so parallel tests do not interfere.
        let len = 3 << 20; // 4 MiB class
        let mut a = take(len, 512);
        let addr = a.as_mut_ptr() as usize;
        assert_eq!(addr % DIRECT_MEM_ALIGN, 0);
        assert!(a.capacity() >= len);
        a.extend_from_slice(&[7u8; 100]);
        let bytes = freeze(a);
        assert_eq!(&bytes[..], &[7u8; 100][..]);
        let clone = bytes.slice(10..20);
        drop(bytes);
        // Still referenced by the slice: not back yet.
        assert_eq!(&clone[..], &[7u8; 10][..]);
        drop(clone);
        let mut b = take(len, 4096);
        assert_eq!(b.as_mut_ptr() as usize, addr, "the idle buffer is reused");
        assert!(b.as_ref().is_empty(), "a reused buffer starts empty");
    }

    #[test]
    fn oversized_and_strictly_aligned_buffers_bypass_the_pool() {
        let big = take((4 << 20) + 1, 4096);
        assert!(big.capacity() > 4 << 20);
        assert_eq!(home_class(&big), None);
        let strict = take(8192, 65536);
        assert_eq!(strict.align(), 65536);
        assert_eq!(home_class(&strict), None);
        assert_eq!(home_class(&take(8192, 512)), Some(1));
    }
}
