//! The two things the file backends need that std does not offer: a heap buffer with a
//! chosen alignment (O_DIRECT wants block-aligned memory) and `fallocate(2)` (discard and
//! write-zeroes).
//!
//! This module and [`super::uring`] are the only places in `target-core` with `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use bytes::Bytes;

/// Memory alignment used for O_DIRECT buffers: a page, which satisfies every logical block
/// size up to 4 KiB and every DMA alignment we know of. Larger block sizes use their own size.
pub(crate) const DIRECT_MEM_ALIGN: usize = 4096;

/// An owned, fixed-capacity byte buffer whose start is aligned to `align` bytes.
///
/// Bytes `[0, len)` are initialized; `[len, capacity)` may not be. It hands out the
/// initialized part only, so a read that failed halfway never exposes stale memory. A read
/// buffer becomes a [`Bytes`] through [`Bytes::from_owner`] without a copy.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    layout: Layout,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Vec<u8>`); nothing else points to
// it, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]` of the initialized part; mutation needs
// `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer with room for `capacity` bytes, aligned to `align` (a power of two).
    ///
    /// # Panics
    /// Aborts through [`alloc::handle_alloc_error`] when the allocation fails, like `Vec`.
    pub(crate) fn with_capacity(capacity: usize, align: usize) -> AlignedBuf {
        Self::alloc(capacity, align, false)
    }

    /// A buffer of `len` zero bytes, aligned to `align` (a power of two).
    pub(crate) fn zeroed(len: usize, align: usize) -> AlignedBuf {
        let mut buf = Self::alloc(len, align, true);
        buf.len = len;
        buf
    }

    /// The concatenation of `parts` in a fresh aligned buffer (the O_DIRECT bounce buffer).
    pub(crate) fn copy_from(parts: &[Bytes], align: usize) -> AlignedBuf {
        let total = parts.iter().map(Bytes::len).sum();
        let mut buf = Self::with_capacity(total, align);
        for part in parts {
            buf.extend_from_slice(part);
        }
        buf
    }

    fn alloc(capacity: usize, align: usize, zero: bool) -> AlignedBuf {
        // A zero-size layout cannot be allocated; the dangling pointer is never dereferenced
        // because every access is bounded by `len` and `capacity`, both zero.
        let layout = match Layout::from_size_align(capacity.max(1), align) {
            Ok(layout) => layout,
            Err(_) => panic!("AlignedBuf: invalid size {capacity} or alignment {align}"),
        };
        // SAFETY: `layout` has a non-zero size (at least 1 byte, see above).
        let raw = unsafe {
            if zero {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len: 0,
            cap: capacity,
            layout,
        }
    }

    /// Appends `data`.
    ///
    /// # Panics
    /// When `data` does not fit in the remaining capacity (a bug in the caller).
    pub(crate) fn extend_from_slice(&mut self, data: &[u8]) {
        assert!(
            data.len() <= self.capacity() - self.len,
            "AlignedBuf overflow"
        );
        // SAFETY: the destination `[len, len + data.len())` lies inside the allocation (checked
        // above), `data` cannot overlap a buffer we uniquely own, and u8 has no alignment needs.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().add(self.len),
                data.len(),
            );
        }
        self.len += data.len();
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// The alignment of the allocation.
    pub(crate) fn align(&self) -> usize {
        self.layout.align()
    }

    /// Forgets the contents (the capacity stays).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// The start of the allocation, for the kernel to fill.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The initialized bytes, mutable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `[0, len)` is initialized and inside the allocation; `&mut self` makes the
        // borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Marks the first `len` bytes as initialized.
    ///
    /// # Safety
    /// `len <= self.capacity()` and bytes `[0, len)` have been written (by the kernel, say).
    pub(crate) unsafe fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity());
        self.len = len;
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `[0, len)` is initialized and inside the allocation, which lives as long as
        // `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc`/`alloc_zeroed` with exactly `self.layout`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("align", &self.layout.align())
            .finish()
    }
}

/// `fallocate(2)` on `file`, retried on EINTR.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "fallocate range beyond i64");
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    loop {
        // SAFETY: a plain syscall on a descriptor that `file` keeps open for the call; it
        // takes no pointers.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Reads up to `len` bytes at `offset` into `buf` (replacing its contents) only as far as
/// that needs no waiting: `preadv2(2)` with `RWF_NOWAIT`, which copies what the page cache
/// holds and fails with `EAGAIN` where it would have to wait for the device. Returns the
/// bytes read, possibly fewer than `len`; `buf` then holds exactly those.
///
/// # Panics
/// When `len` exceeds the buffer's capacity (a bug in the caller).
pub(crate) fn pread_nowait(
    file: &File,
    buf: &mut AlignedBuf,
    len: usize,
    offset: u64,
) -> io::Result<usize> {
    buf.clear();
    pread_append(file, buf, len, offset, libc::RWF_NOWAIT)
}

/// Reads exactly `len` bytes at `offset` into `buf` (replacing its contents), blocking.
/// `UnexpectedEof` when the file ends first.
pub(crate) fn pread_exact(
    file: &File,
    buf: &mut AlignedBuf,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    buf.clear();
    // Short reads (a signal, the end of the file) go on where they stopped.
    while buf.as_ref().len() < len {
        let done = buf.as_ref().len();
        if pread_append(file, buf, len - done, offset + done as u64, 0)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("end of file at offset {}", offset + done as u64),
            ));
        }
    }
    Ok(())
}

/// One `preadv2(2)` of up to `len` bytes at `offset`, appended to `buf`'s contents; retried
/// on EINTR. Returns the bytes read.
///
/// # Panics
/// When the bytes would not fit in the buffer's capacity (a bug in the caller).
fn pread_append(
    file: &File,
    buf: &mut AlignedBuf,
    len: usize,
    offset: u64,
    flags: libc::c_int,
) -> io::Result<usize> {
    let start = buf.as_ref().len();
    assert!(
        len <= buf.capacity() - start,
        "pread beyond the buffer's capacity"
    );
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond i64"))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().wrapping_add(start).cast(),
        iov_len: len,
    };
    loop {
        // SAFETY: the single iovec covers `[start, start + len)` of `buf`'s allocation
        // (checked against the capacity above), which `&mut buf` keeps alive and unaliased
        // for the call; the descriptor is kept open by `file`.
        let rc = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, flags) };
        if rc >= 0 {
            let n = rc as usize;
            // SAFETY: `[0, start)` was initialized already, the kernel wrote
            // `[start, start + n)`, and n <= len, so start + n <= capacity.
            unsafe { buf.set_len(start + n) };
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Writes the concatenation of `parts` at `offset` only as far as that needs no waiting:
/// `pwritev2(2)` with `RWF_NOWAIT`. Returns the bytes written, possibly fewer than asked;
/// `EAGAIN` when nothing could be written at once, `EOPNOTSUPP` where the filesystem does not
/// offer non-blocking buffered writes.
pub(crate) fn pwrite_nowait(file: &File, parts: &[Bytes], offset: u64) -> io::Result<usize> {
    pwritev2(file, parts, offset, libc::RWF_NOWAIT)
}

/// Writes all of `parts` at `offset` (blocking), with `RWF_DSYNC` when `dsync`: the data is
/// on stable storage when this returns.
pub(crate) fn pwrite_all(file: &File, parts: &[Bytes], offset: u64, dsync: bool) -> io::Result<()> {
    let total: usize = parts.iter().map(Bytes::len).sum();
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    let mut done = 0;
    // After a short write: a copy of `parts` whose first unwritten part starts at `rest[first]`,
    // advanced in place, so an initiator that splits a write into thousands of tiny Data-Out
    // segments (more than one call's 1024 iovecs) costs linear, not quadratic, work.
    let mut rest: Vec<Bytes> = Vec::new();
    let mut first = 0;
    while done < total {
        let n = if done == 0 {
            pwritev2(file, parts, offset, flags)?
        } else {
            pwritev2(file, &rest[first..], offset + done as u64, flags)?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if done == 0 && n < total {
            rest = parts.to_vec();
        }
        done += n;
        first = crate::parts::consume(&mut rest, first, n);
    }
    Ok(())
}

/// One `pwritev2(2)` of `parts` (at most 1024 of them) at `offset`, retried on EINTR.
fn pwritev2(file: &File, parts: &[Bytes], offset: u64, flags: libc::c_int) -> io::Result<usize> {
    const INLINE: usize = 16;
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond i64"))?;
    let iov = |b: &Bytes| libc::iovec {
        iov_base: b.as_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    };
    let mut stack = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; INLINE];
    let heap: Vec<libc::iovec>;
    let iovecs: &[libc::iovec] = if parts.len() <= INLINE {
        for (slot, part) in stack.iter_mut().zip(parts) {
            *slot = iov(part);
        }
        &stack[..parts.len()]
    } else {
        // Linux takes at most UIO_MAXIOV (1024) vectors; the rest is a short write.
        heap = parts.iter().take(1024).map(iov).collect();
        &heap
    };
    loop {
        // SAFETY: every iovec points into a `Bytes` of `parts`, borrowed for the call, and the
        // kernel only reads through them; the descriptor is kept open by `file`.
        let rc = unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
                offset,
                flags,
            )
        };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_bounded() {
        let mut b = AlignedBuf::with_capacity(10_000, 4096);
        assert_eq!(b.as_mut_ptr() as usize & 4095, 0);
        assert!(b.as_ref().is_empty());
        b.extend_from_slice(&[1, 2, 3]);
        assert_eq!(b.as_ref(), &[1, 2, 3]);
        let z = AlignedBuf::zeroed(8192, 4096);
        assert!(z.as_ref().iter().all(|&x| x == 0));
        let parts = [Bytes::from_static(b"ab"), Bytes::from_static(b"cde")];
        let c = AlignedBuf::copy_from(&parts, 512);
        assert_eq!(c.as_ref(), b"abcde");
        let e = AlignedBuf::zeroed(0, 4096);
        assert_eq!(e.capacity(), 0);
        assert!(e.as_ref().is_empty());
        let bytes = Bytes::from_owner(c);
        assert_eq!(&bytes[..], b"abcde");
    }
}
