//! The io_uring backend.
//!
//! # Design
//!
//! **One ring and one driver thread per store.** [`UringStore::new`] spawns a thread that
//! creates and solely owns an `io_uring` (128 entries, `SINGLE_ISSUER | DEFER_TASKRUN` when the
//! kernel has them). Per store rather than per process: a slow or failing device stalls only
//! its own LUN, there is no cross-store locking, and the thread's lifetime is the store's.
//! The cost is one thread and one ring (a few pages) per open LUN, acceptable for the tens of
//! LUNs a node serves; a shared ring can come later behind the same [`UringStore`] API.
//!
//! **Submission path.** An async caller allocates the buffer (a `Vec` for buffered I/O, an
//! [`AlignedBuf`] for O_DIRECT, on its own thread, so the driver does no allocation or copy),
//! sends a [`Request`] with a [`tokio::sync::oneshot`] sender over a `std::sync::mpsc`
//! channel, and awaits the oneshot. The driver sleeps in `io_uring_enter`; to wake it for new
//! requests it keeps a read of an `eventfd` in the ring. A caller writes that eventfd only
//! when the driver announced (flag `waiting`, with a `SeqCst` fence on both sides) that it is
//! about to sleep, so under load submission costs no extra syscall.
//!
//! **Batching.** Each loop turn drains the channel (up to 128 operations in flight), pushes
//! all pending SQEs, calls `submit_and_wait(1)` once, and reaps every CQE available.
//!
//! **Buffer ownership.** Each operation, with its buffer and its iovec array, lives in a slab
//! slot keyed by `user_data` from the moment its SQE is pushed until its final CQE is reaped;
//! only then is the buffer handed back (as [`Bytes`] for reads) or dropped. Resubmissions
//! (short read or write, `EAGAIN`, `EINTR`) reuse the same slot. A read buffer is marked
//! initialized only after the kernel reported every byte, so a failed read never exposes
//! uninitialized memory.
//!
//! **Cancellation and shutdown.** Dropping an operation's future only drops the oneshot
//! receiver; the operation still runs to completion and its buffer is freed afterwards.
//! Dropping the last [`UringStore`] clone drops the channel sender and writes the eventfd;
//! the driver stops taking requests, waits for every in-flight operation (and its own eventfd
//! read) to complete, then exits and closes the ring. If the driver ever stops early (ring
//! error or panic), in-flight operations get an error and their buffers are leaked, never
//! freed while the kernel may still write them; later requests fail instead of hanging.
//!
//! **Semantics.** FUA writes carry `RWF_DSYNC` (one SQE; the kernel syncs the range, and
//! with O_DIRECT uses a FUA write). Flush is `IORING_OP_FSYNC` with `DATASYNC`. Discard is
//! `IORING_OP_FALLOCATE` with `PUNCH_HOLE | KEEP_SIZE`, write-zeroes `ZERO_RANGE | KEEP_SIZE`;
//! where the filesystem refuses those, both fall back to writing zeroes. Errors other than
//! `EAGAIN`/`EINTR` complete the operation with [`BackendError::Io`]; a read hitting end of
//! file (the file shrank) is `UnexpectedEof`.
//!
//! Registered buffers and fixed files are not used yet: the per-op cost is dominated by the
//! syscall batching above, and fixed buffers would need a copy into the registered pool.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::oneshot;

use super::file::{advance, is_aligned, zero_chunk, FileShared};
use super::pool;
use super::sys::{AlignedBuf, DIRECT_MEM_ALIGN};
use super::BackendError;

/// Submission queue size, and the cap on operations in flight per store (the completion
/// queue is twice as large, so it cannot overflow).
const RING_ENTRIES: u32 = 128;
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize;
/// `user_data` of the driver's eventfd read.
const KICK_KEY: u64 = u64::MAX;
/// Largest byte count put in one SQE; the kernel caps a single read or write just below
/// 2 GiB anyway, the rest is resubmitted.
const MAX_RW: usize = 1 << 30;
/// Largest iovec count per `writev` (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Checks that io_uring can serve stores: the ring can be created (not disabled by
/// `kernel.io_uring_disabled`, seccomp or an old kernel), a NOP round-trips, and the opcodes
/// we use (READ, WRITE, WRITEV, FSYNC, FALLOCATE) are supported. The result is computed once
/// per process.
///
/// # Errors
/// A human-readable reason, for logs and for tests that skip.
pub fn uring_available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_kernel).clone()
}

fn probe_kernel() -> Result<(), String> {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .map(|s| s.trim().to_owned());
    if sysctl.as_deref() == Some("2") {
        return Err("disabled by sysctl kernel.io_uring_disabled=2".into());
    }
    let mut ring: IoUring = match IoUring::new(4) {
        Ok(ring) => ring,
        Err(e) => {
            let hint = match e.raw_os_error() {
                Some(libc::ENOSYS) => " (kernel without io_uring, or seccomp blocks it)",
                Some(libc::EPERM) => {
                    " (kernel.io_uring_disabled=1 and not in io_uring_group, or seccomp)"
                }
                _ => "",
            };
            return Err(format!("io_uring_setup failed: {e}{hint}"));
        }
    };
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE failed: {e} (kernel older than 5.6?)"))?;
    let needed = [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "kernel lacks io_uring opcodes {}",
            missing.join(", ")
        ));
    }
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| "empty ring refused a NOP".to_owned())?;
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter failed: {e}"))?;
    let cqe = ring.completion().next();
    match cqe {
        Some(cqe) if cqe.user_data() == 7 && cqe.result() == 0 => Ok(()),
        other => Err(format!("NOP did not complete as expected: {other:?}")),
    }
}

/// A store served by io_uring. Clones share the ring; the driver thread stops once the last
/// clone is dropped and in-flight operations finish (see the module docs).
#[derive(Clone)]
pub struct UringStore {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for UringStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringStore")
            .field("path", &self.handle.shared.path)
            .field("size", &self.handle.shared.size)
            .field("direct", &self.handle.shared.direct)
            .finish()
    }
}

/// What the store clones share. Field order matters: `tx` is dropped before `kick` writes
/// the eventfd, so the woken driver sees the channel closed.
struct Handle {
    tx: mpsc::Sender<Request>,
    shared: Arc<FileShared>,
    kick: Closer,
}

/// Wakes the driver one last time when the store is dropped.
struct Closer(Arc<Kick>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.kick();
    }
}

/// The driver's wake-up line.
struct Kick {
    /// A blocking eventfd (io_uring would complete a read on a non-blocking one with EAGAIN
    /// instead of waiting).
    eventfd: File,
    /// Set by the driver just before it sleeps; whoever clears it writes the eventfd.
    waiting: AtomicBool,
}

impl Kick {
    fn kick(&self) {
        // Adds 1 to the eventfd counter; can only fail if the counter would overflow, which
        // the driver's reads prevent.
        let _ = (&self.eventfd).write(&1u64.to_ne_bytes());
    }
}

type Done = oneshot::Sender<io::Result<()>>;

/// An operation on its way to the driver.
enum Request {
    Read {
        offset: u64,
        len: usize,
        buf: ReadBuf,
        tx: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        offset: u64,
        buf: WriteBuf,
        fua: bool,
        tx: Done,
    },
    Fsync {
        tx: Done,
    },
    Fallocate {
        offset: u64,
        len: u64,
        mode: libc::c_int,
        tx: Done,
    },
}

/// Destination of a read: a pool buffer with capacity for `len` bytes, initialized only once
/// the read completed.
struct ReadBuf(AlignedBuf);

impl ReadBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }

    /// The first `len` bytes as [`Bytes`], without a copy; the buffer goes back to the pool
    /// when the last clone is dropped.
    ///
    /// # Safety
    /// The buffer has capacity for `len` bytes and the kernel wrote all of `[0, len)`.
    unsafe fn into_bytes(mut self, len: usize) -> Bytes {
        // SAFETY: capacity >= len and `[0, len)` is initialized (caller's contract).
        unsafe { self.0.set_len(len) };
        pool::freeze(self.0)
    }
}

/// Source of a write: the caller's buffers as they are, or an aligned bounce copy.
enum WriteBuf {
    Parts(Vec<Bytes>),
    Aligned(AlignedBuf),
}

impl WriteBuf {
    fn iovecs(&self) -> Vec<libc::iovec> {
        let iov = |b: &[u8]| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        };
        match self {
            WriteBuf::Parts(parts) => parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| iov(p))
                .collect(),
            WriteBuf::Aligned(a) => vec![iov(a.as_ref())],
        }
    }

    fn len(&self) -> usize {
        match self {
            WriteBuf::Parts(parts) => parts.iter().map(Bytes::len).sum(),
            WriteBuf::Aligned(a) => a.as_ref().len(),
        }
    }
}

impl UringStore {
    /// Starts the driver thread and its ring for `shared`.
    ///
    /// # Errors
    /// [`BackendError::Io`] when the ring, the eventfd or the thread cannot be created.
    pub(crate) fn new(shared: Arc<FileShared>) -> Result<UringStore, BackendError> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(BackendError::Io(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let eventfd = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let kick = Arc::new(Kick {
            eventfd,
            waiting: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let driver_file = shared.clone();
        let driver_kick = kick.clone();
        std::thread::Builder::new()
            .name("ktgt-uring".into())
            .spawn(move || {
                // The ring is created on the thread that submits to it (SINGLE_ISSUER).
                match build_ring() {
                    Ok(ring) => {
                        let _ = ready_tx.send(Ok(()));
                        Driver::new(ring, rx, driver_file, driver_kick).run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(BackendError::Io)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BackendError::Io(e)),
            Err(_) => {
                return Err(BackendError::Io(io::Error::other(
                    "io_uring driver thread exited during setup",
                )))
            }
        }
        Ok(UringStore {
            handle: Arc::new(Handle {
                tx,
                shared,
                kick: Closer(kick),
            }),
        })
    }

    pub fn size(&self) -> u64 {
        self.handle.shared.size
    }

    pub fn path(&self) -> &Path {
        &self.handle.shared.path
    }

    pub(crate) fn shared(&self) -> &FileShared {
        &self.handle.shared
    }

    /// Lets tests observe when the driver thread has let go of the file.
    #[cfg(test)]
    pub(crate) fn file_weak(&self) -> std::sync::Weak<FileShared> {
        Arc::downgrade(&self.handle.shared)
    }

    fn submit(&self, req: Request) -> Result<(), BackendError> {
        self.handle.tx.send(req).map_err(|_| driver_gone())?;
        // Pairs with the fence in `Driver::run`: either the driver sees our request before it
        // sleeps, or we see its `waiting` flag and wake it.
        fence(Ordering::SeqCst);
        let kick = &self.handle.kick.0;
        if kick.waiting.load(Ordering::SeqCst) && kick.waiting.swap(false, Ordering::SeqCst) {
            kick.kick();
        }
        Ok(())
    }

    async fn call(&self, make: impl FnOnce(Done) -> Request) -> Result<(), BackendError> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(tx))?;
        answer(rx.await)
    }

    pub(crate) async fn read(&self, offset: u64, len: usize) -> Result<Bytes, BackendError> {
        let shared = &self.handle.shared;
        shared.check(offset, len as u64, false)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Some(cached) = shared.read_cached(offset, len) {
            return Ok(cached);
        }
        let align = shared.direct_align().unwrap_or(DIRECT_MEM_ALIGN);
        let buf = ReadBuf(pool::take(len, align));
        let (tx, rx) = oneshot::channel();
        self.submit(Request::Read {
            offset,
            len,
            buf,
            tx,
        })?;
        answer(rx.await)
    }

    pub(crate) async fn write(
        &self,
        offset: u64,
        data: Vec<Bytes>,
        fua: bool,
    ) -> Result<(), BackendError> {
        let shared = &self.handle.shared;
        let total: u64 = data.iter().map(|b| b.len() as u64).sum();
        shared.check(offset, total, true)?;
        if total == 0 {
            return if fua { self.flush().await } else { Ok(()) };
        }
        let (offset, data) = if fua {
            (offset, data)
        } else {
            let n = shared.write_cached(offset, &data);
            if n as u64 == total {
                return Ok(());
            }
            (offset + n as u64, advance(data, n))
        };
        let buf = match shared.direct_align() {
            Some(align) if !is_aligned(&data, align) => {
                WriteBuf::Aligned(AlignedBuf::copy_from(&data, align))
            }
            _ => WriteBuf::Parts(data),
        };
        self.call(|tx| Request::Write {
            offset,
            buf,
            fua,
            tx,
        })
        .await
    }

    pub(crate) async fn flush(&self) -> Result<(), BackendError> {
        if self.handle.shared.read_only {
            return Ok(());
        }
        self.call(|tx| Request::Fsync { tx }).await
    }

    pub(crate) async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let shared = &self.handle.shared;
        shared.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        if shared.punch_hole_supported() {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if shared.note_punch_hole(self.fallocate(offset, len, mode).await?)? {
                return Ok(());
            }
        }
        self.write_zeroes(offset, len).await
    }

    pub(crate) async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let shared = &self.handle.shared;
        shared.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        if shared.zero_range_supported() {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            if shared.note_zero_range(self.fallocate(offset, len, mode).await?)? {
                return Ok(());
            }
        }
        let zeroes = zero_chunk();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            self.write(pos, vec![zeroes.slice(..n)], false).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Runs one fallocate; the outer error is the driver being gone, the inner one the
    /// syscall's (for the caller to tell "unsupported" from "failed").
    async fn fallocate(
        &self,
        offset: u64,
        len: u64,
        mode: libc::c_int,
    ) -> Result<io::Result<()>, BackendError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Request::Fallocate {
            offset,
            len,
            mode,
            tx,
        })?;
        rx.await.map_err(|_| driver_gone())
    }
}

fn answer<T>(r: Result<io::Result<T>, oneshot::error::RecvError>) -> Result<T, BackendError> {
    match r {
        Ok(res) => res.map_err(BackendError::Io),
        Err(_) => Err(driver_gone()),
    }
}

fn driver_gone() -> BackendError {
    BackendError::Io(io::Error::other("io_uring driver thread is gone"))
}

/// Builds the ring with the flags that suit a single submitting thread, falling back to a
/// plain ring on kernels that lack them (added in 6.0 / 6.1).
fn build_ring() -> io::Result<IoUring> {
    match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
    {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(RING_ENTRIES),
        Err(e) => Err(e),
    }
}

/// An operation the kernel owns: buffers and iovecs stay here until its last CQE.
enum Op {
    Read {
        offset: u64,
        len: usize,
        done: usize,
        buf: ReadBuf,
        tx: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        offset: u64,
        total: usize,
        done: usize,
        /// Point into `buf`; advanced in place on a short write.
        iovecs: Vec<libc::iovec>,
        /// First iovec not fully written.
        next: usize,
        rw_flags: libc::c_int,
        buf: WriteBuf,
        tx: Done,
    },
    Fsync {
        tx: Done,
    },
    Fallocate {
        offset: u64,
        len: u64,
        mode: libc::c_int,
        tx: Done,
    },
}

impl Op {
    fn from_request(req: Request) -> Op {
        match req {
            Request::Read {
                offset,
                len,
                buf,
                tx,
            } => Op::Read {
                offset,
                len,
                done: 0,
                buf,
                tx,
            },
            Request::Write {
                offset,
                buf,
                fua,
                tx,
            } => Op::Write {
                offset,
                total: buf.len(),
                done: 0,
                iovecs: buf.iovecs(),
                next: 0,
                rw_flags: if fua { libc::RWF_DSYNC } else { 0 },
                buf,
                tx,
            },
            Request::Fsync { tx } => Op::Fsync { tx },
            Request::Fallocate {
                offset,
                len,
                mode,
                tx,
            } => Op::Fallocate {
                offset,
                len,
                mode,
                tx,
            },
        }
    }

    /// The SQE for the remaining part of this operation.
    fn sqe(&mut self, fd: types::Fd) -> squeue::Entry {
        match self {
            Op::Read {
                offset,
                len,
                done,
                buf,
                ..
            } => {
                let n = (*len - *done).min(MAX_RW) as u32;
                opcode::Read::new(fd, buf.as_mut_ptr().wrapping_add(*done), n)
                    .offset(*offset + *done as u64)
                    .build()
            }
            Op::Write {
                offset,
                done,
                iovecs,
                next,
                rw_flags,
                ..
            } => {
                let rest = &iovecs[*next..];
                let at = *offset + *done as u64;
                if rest.len() == 1 {
                    let n = rest[0].iov_len.min(MAX_RW) as u32;
                    opcode::Write::new(fd, rest[0].iov_base as *const u8, n)
                        .offset(at)
                        .rw_flags(*rw_flags)
                        .build()
                } else {
                    let n = rest.len().min(IOV_MAX) as u32;
                    opcode::Writev::new(fd, rest.as_ptr(), n)
                        .offset(at)
                        .rw_flags(*rw_flags)
                        .build()
                }
            }
            Op::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate {
                offset, len, mode, ..
            } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        }
    }

    /// Accounts for a CQE: `None` to resubmit the rest, `Some(result)` when finished.
    fn progress(&mut self, res: i32) -> Option<io::Result<()>> {
        if res < 0 {
            return match -res {
                libc::EAGAIN | libc::EINTR => None,
                errno => Some(Err(io::Error::from_raw_os_error(errno))),
            };
        }
        let n = res as usize;
        match self {
            Op::Read {
                offset, len, done, ..
            } => {
                if n == 0 {
                    return Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("end of file at offset {}", *offset + *done as u64),
                    )));
                }
                *done += n;
                (*done >= *len).then_some(Ok(()))
            }
            Op::Write {
                total,
                done,
                iovecs,
                next,
                ..
            } => {
                if n == 0 {
                    return Some(Err(io::ErrorKind::WriteZero.into()));
                }
                *done += n;
                let mut left = n;
                while left > 0 && *next < iovecs.len() {
                    let iov = &mut iovecs[*next];
                    if left >= iov.iov_len {
                        left -= iov.iov_len;
                        *next += 1;
                    } else {
                        iov.iov_base = (iov.iov_base as *mut u8).wrapping_add(left).cast();
                        iov.iov_len -= left;
                        left = 0;
                    }
                }
                (*done >= *total || *next >= iovecs.len()).then_some(Ok(()))
            }
            Op::Fsync { .. } | Op::Fallocate { .. } => Some(Ok(())),
        }
    }

    /// Hands the result to the waiting caller (who may have gone away).
    fn finish(self, result: io::Result<()>) {
        match self {
            Op::Read { len, buf, tx, .. } => {
                // SAFETY: `Ok` only comes from `progress` once `done >= len`, i.e. the kernel
                // wrote all of `[0, len)`; the buffer was allocated with capacity `len`.
                let res = result.map(|()| unsafe { buf.into_bytes(len) });
                let _ = tx.send(res);
            }
            Op::Write { tx, .. } | Op::Fsync { tx } | Op::Fallocate { tx, .. } => {
                let _ = tx.send(result);
            }
        }
    }

    /// Fails the operation without freeing its memory: the kernel may still write it.
    fn abandon(self) {
        let err = || io::Error::other("io_uring driver stopped");
        match self {
            Op::Read { buf, tx, .. } => {
                std::mem::forget(buf);
                let _ = tx.send(Err(err()));
            }
            Op::Write {
                iovecs, buf, tx, ..
            } => {
                std::mem::forget(iovecs);
                std::mem::forget(buf);
                let _ = tx.send(Err(err()));
            }
            Op::Fsync { tx } | Op::Fallocate { tx, .. } => {
                let _ = tx.send(Err(err()));
            }
        }
    }
}

/// In-flight operations keyed by `user_data`.
struct Slab {
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    len: usize,
}

impl Slab {
    fn new() -> Slab {
        Slab {
            slots: Vec::with_capacity(MAX_IN_FLIGHT),
            free: Vec::with_capacity(MAX_IN_FLIGHT),
            len: 0,
        }
    }

    fn insert(&mut self, op: Op) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(key) => {
                self.slots[key] = Some(op);
                key
            }
            None => {
                self.slots.push(Some(op));
                self.slots.len() - 1
            }
        }
    }

    fn get_mut(&mut self, key: usize) -> Option<&mut Op> {
        self.slots.get_mut(key).and_then(Option::as_mut)
    }

    fn remove(&mut self, key: usize) -> Option<Op> {
        let op = self.slots.get_mut(key)?.take()?;
        self.free.push(key);
        self.len -= 1;
        Some(op)
    }

    fn abandon_all(&mut self) {
        for op in self.slots.drain(..).flatten() {
            op.abandon();
        }
        self.free.clear();
        self.len = 0;
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // Empty after a normal shutdown. Non-empty only when the driver unwinds from a panic
        // with operations in flight: their memory must outlive the kernel's use of it.
        self.abandon_all();
    }
}

/// The driver thread's state. Lives and dies on that thread.
struct Driver {
    ring: IoUring,
    rx: mpsc::Receiver<Request>,
    file: Arc<FileShared>,
    kick: Arc<Kick>,
    slab: Slab,
    /// Slab keys whose next SQE is not in the submission queue yet.
    queue: VecDeque<usize>,
    /// Target of the eventfd read; from `Box::into_raw`, freed in `Drop` unless still armed.
    kick_buf: *mut u64,
    kick_armed: bool,
    closing: bool,
    cqes: Vec<(u64, i32)>,
}

impl Driver {
    fn new(
        ring: IoUring,
        rx: mpsc::Receiver<Request>,
        file: Arc<FileShared>,
        kick: Arc<Kick>,
    ) -> Driver {
        Driver {
            ring,
            rx,
            file,
            kick,
            slab: Slab::new(),
            queue: VecDeque::with_capacity(MAX_IN_FLIGHT),
            kick_buf: Box::into_raw(Box::new(0u64)),
            kick_armed: false,
            closing: false,
            cqes: Vec::with_capacity(2 * MAX_IN_FLIGHT),
        }
    }

    fn run(mut self) {
        loop {
            if !self.closing {
                self.intake();
            }
            self.fill_submission_queue();
            if self.closing && self.slab.len == 0 && !self.kick_armed {
                return;
            }
            if !self.closing && self.queue.is_empty() && self.slab.len < MAX_IN_FLIGHT {
                // About to sleep: announce it, then look once more (see `UringStore::submit`).
                self.kick.waiting.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.rx.try_recv() {
                    Ok(req) => {
                        self.kick.waiting.store(false, Ordering::Relaxed);
                        self.accept(req);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => {
                        self.kick.waiting.store(false, Ordering::Relaxed);
                        self.start_closing();
                        continue;
                    }
                    Err(TryRecvError::Empty) => {}
                }
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    tracing::error!(path = %self.file.path.display(), error = %e,
                        "io_uring_enter failed; stopping the store's driver");
                    // Their memory is leaked, not freed (the kernel may still use it).
                    self.slab.abandon_all();
                    return;
                }
            }
            self.kick.waiting.store(false, Ordering::Relaxed);
            self.reap();
        }
    }

    /// Moves queued requests into the slab while there is room.
    fn intake(&mut self) {
        while self.slab.len < MAX_IN_FLIGHT {
            match self.rx.try_recv() {
                Ok(req) => self.accept(req),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.start_closing();
                    break;
                }
            }
        }
    }

    fn accept(&mut self, req: Request) {
        let key = self.slab.insert(Op::from_request(req));
        self.queue.push_back(key);
    }

    fn start_closing(&mut self) {
        if !self.closing {
            self.closing = true;
            // Make sure our own pending eventfd read completes so we can exit.
            if self.kick_armed {
                self.kick.kick();
            }
        }
    }

    fn fill_submission_queue(&mut self) {
        let fd = types::Fd(self.file.file.as_raw_fd());
        let mut sq = self.ring.submission();
        while let Some(&key) = self.queue.front() {
            let Some(op) = self.slab.get_mut(key) else {
                self.queue.pop_front();
                continue;
            };
            let entry = op.sqe(fd).user_data(key as u64);
            // SAFETY: the entry points into `op`'s buffer and iovecs, which stay in the slab,
            // unmoved on the heap, until this entry's CQE is reaped (`reap` removes an op only
            // on its final CQE, and `Slab` leaks rather than frees ops still in flight). The
            // file descriptor is kept open by `self.file`.
            if unsafe { sq.push(&entry) }.is_err() {
                break; // full: the rest goes after the next submit
            }
            self.queue.pop_front();
        }
        if !self.closing && !self.kick_armed {
            let entry = opcode::Read::new(
                types::Fd(self.kick.eventfd.as_raw_fd()),
                self.kick_buf.cast::<u8>(),
                8,
            )
            .build()
            .user_data(KICK_KEY);
            // SAFETY: `kick_buf` is an 8-byte heap allocation owned by the driver and freed
            // only in `Drop` when no read is armed; the eventfd is kept open by `self.kick`.
            if unsafe { sq.push(&entry) }.is_ok() {
                self.kick_armed = true;
            }
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, res) in &cqes {
            if user_data == KICK_KEY {
                self.kick_armed = false;
                continue;
            }
            let key = user_data as usize;
            let Some(op) = self.slab.get_mut(key) else {
                tracing::error!(user_data, "io_uring completion for an unknown operation");
                continue;
            };
            match op.progress(res) {
                None => self.queue.push_back(key),
                Some(result) => {
                    if let Some(op) = self.slab.remove(key) {
                        op.finish(result);
                    }
                }
            }
        }
        self.cqes = cqes;
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.kick_armed {
            // SAFETY: `kick_buf` came from `Box::into_raw` in `new` and no read into it is
            // pending, so the kernel no longer uses it and nothing else frees it.
            drop(unsafe { Box::from_raw(self.kick_buf) });
        }
        // Else leak 8 bytes: a read into them may still complete after the ring is gone.
    }
}
