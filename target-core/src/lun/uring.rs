//! The io_uring backend.
//!
//! # Design
//!
//! **One ring per thread, reaped on that thread.** Each thread that runs store operations
//! has its own `io_uring` (256 entries, made by its first operation), shared by every store
//! the thread serves; an SQE names its file's descriptor. The thread pushes the SQE and calls
//! `io_uring_enter` itself (under the ring's mutex, held only for that and never across an
//! await), so an operation reaches the kernel with no thread hand-off. A reaper task,
//! started on the runtime by the thread's first operation, waits in the runtime's reactor for
//! the ring's own descriptor to become readable (the kernel wakes pollers of an io_uring fd
//! when it posts completions; an eventfd beside it cost two more `read(2)` calls per
//! wake-up), reaps every CQE, resubmits partial operations and completes the others through
//! their [`tokio::sync::oneshot`]. On a connection thread (a current-thread runtime,
//! [`crate::workers`]) the reaper runs beside the connection that submitted, so a completion
//! wakes nobody else. With one ring per store, the reaper lived on whichever thread touched
//! the store first, and completions for connections on other threads crossed over (A/B
//! runs on the 2-vCPU VM showed the two designs level, docs/performance.md; the per-thread
//! ring also means a handful of rings on a node with many LUNs). An earlier design with a
//! driver thread per store cost two cross-thread wake-ups per operation.
//!
//! **Bounds.** At most 256 SQEs per ring are in the kernel at a time (the completion queue is
//! twice as large, so it cannot overflow); further operations wait in a backlog that every
//! reap feeds.
//!
//! **Buffer ownership.** Each operation, with its buffer and its iovec array, lives in a slab
//! slot keyed by `user_data` from the moment its SQE is pushed until its final CQE is reaped;
//! only then is the buffer handed back (as [`Bytes`] for reads) or dropped. The operation also
//! holds its store's file, so the descriptor stays open while the kernel uses it. Resubmissions
//! (short read or write, `EAGAIN`, `EINTR`) reuse the same slot. A read buffer is marked
//! initialized only after the kernel reported every byte, so a failed read never exposes
//! uninitialized memory.
//!
//! **Cancellation and shutdown.** Dropping an operation's future only drops the oneshot
//! receiver; the operation still runs to completion and its buffer is freed afterwards. A
//! store's file closes when its last [`UringStore`] clone and its last operation are gone.
//! A thread's ring lives as long as the thread, or its reaper's runtime if that is shorter;
//! if the runtime that ran the reaper shuts down, the thread's next operation starts a new
//! reaper on its own runtime. A ring dropped with operations still in the kernel leaks their
//! buffers rather than free memory the kernel may still write. If `io_uring_enter` fails for
//! good, the ring's in-flight operations fail (their memory leaked the same way) and the
//! thread's next operation gets a new ring. An operation needs a tokio runtime (the reaper's
//! home); outside one it fails with an error.
//!
//! **Semantics.** FUA writes carry `RWF_DSYNC` (one SQE; the kernel syncs the range, and
//! with O_DIRECT uses a FUA write). Flush is `IORING_OP_FSYNC` with `DATASYNC`. Discard is
//! `IORING_OP_FALLOCATE` with `PUNCH_HOLE | KEEP_SIZE`, write-zeroes `ZERO_RANGE | KEEP_SIZE`;
//! where the filesystem refuses those, both fall back to writing zeroes. Errors other than
//! `EAGAIN`/`EINTR` complete the operation with [`BackendError::Io`]; a read hitting end of
//! file (the file shrank) is `UnexpectedEof`.
//!
//! Registered buffers and fixed files are not used yet: fixed buffers would need a copy into
//! the registered pool (read buffers come from [`super::pool`] instead).
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use super::file::{advance, is_aligned, read_blocking, zero_chunk, FileShared};
use super::pool;
use super::sys::{AlignedBuf, DIRECT_MEM_ALIGN};
use super::BackendError;

/// Submission queue size, and the cap on operations in flight per ring (the completion
/// queue is twice as large, so it cannot overflow).
const RING_ENTRIES: u32 = 256;
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize;
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

/// A store served by io_uring: its operations go to the ring of the thread that runs them
/// (see the module docs). Clones share the file.
#[derive(Clone)]
pub struct UringStore {
    file: Arc<FileShared>,
}

impl std::fmt::Debug for UringStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringStore")
            .field("path", &self.file.path)
            .field("size", &self.file.size())
            .field("direct", &self.file.direct)
            .finish()
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
    /// A store for `shared`. Makes the calling thread's ring (if it has none yet), so a
    /// kernel that refuses io_uring is found here rather than by the first operation.
    ///
    /// # Errors
    /// [`BackendError::Io`] when the ring cannot be created.
    pub(crate) fn new(shared: Arc<FileShared>) -> Result<UringStore, BackendError> {
        thread_ring()?;
        Ok(UringStore { file: shared })
    }

    pub fn size(&self) -> u64 {
        self.file.size()
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    pub(crate) fn shared(&self) -> &FileShared {
        &self.file
    }

    /// Lets tests observe when the store's clones and operations have let go of the file.
    #[cfg(test)]
    pub(crate) fn file_weak(&self) -> std::sync::Weak<FileShared> {
        Arc::downgrade(&self.file)
    }

    fn submit(&self, req: Request) -> Result<(), BackendError> {
        thread_ring()?.start(Op::from_request(req, self.file.clone()))
    }

    async fn call(&self, make: impl FnOnce(Done) -> Request) -> Result<(), BackendError> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(tx))?;
        answer(rx.await)
    }

    pub(crate) async fn read(&self, offset: u64, len: usize) -> Result<Bytes, BackendError> {
        let shared = &self.file;
        shared.check(offset, len as u64, false)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Some(cached) = shared.read_cached(offset, len) {
            return Ok(cached);
        }
        if !shared.direct {
            // A buffered read the fast path did not take is a large copy or a page-cache
            // miss: the blocking pool does it beside the runtime (measured faster for
            // 128 KiB reads than a copy inside io_uring_enter or an io-wq round trip).
            return read_blocking(self.file.clone(), offset, len).await;
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
        let shared = &self.file;
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
        if self.file.read_only {
            return Ok(());
        }
        self.call(|tx| Request::Fsync { tx }).await
    }

    pub(crate) async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let shared = &self.file;
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
        let shared = &self.file;
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
    BackendError::Io(io::Error::other("the store's io_uring stopped"))
}

/// Builds a ring. Completions must be posted without the submitter's help (on the shared
/// multi-threaded runtime the reaper task may run on another thread than the one that
/// submitted), so no `SINGLE_ISSUER`/`DEFER_TASKRUN`.
fn build_ring() -> io::Result<IoUring> {
    IoUring::builder().build(RING_ENTRIES)
}

/// An operation the kernel owns, with the file it works on: buffers, iovecs and the file
/// (its descriptor) stay here until its last CQE.
struct Op {
    file: Arc<FileShared>,
    kind: OpKind,
}

enum OpKind {
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
    fn from_request(req: Request, file: Arc<FileShared>) -> Op {
        let kind = match req {
            Request::Read {
                offset,
                len,
                buf,
                tx,
            } => OpKind::Read {
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
            } => OpKind::Write {
                offset,
                total: buf.len(),
                done: 0,
                iovecs: buf.iovecs(),
                next: 0,
                rw_flags: if fua { libc::RWF_DSYNC } else { 0 },
                buf,
                tx,
            },
            Request::Fsync { tx } => OpKind::Fsync { tx },
            Request::Fallocate {
                offset,
                len,
                mode,
                tx,
            } => OpKind::Fallocate {
                offset,
                len,
                mode,
                tx,
            },
        };
        Op { file, kind }
    }

    /// The SQE for the remaining part of this operation.
    fn sqe(&mut self) -> squeue::Entry {
        let fd = types::Fd(self.file.file.as_raw_fd());
        match &mut self.kind {
            OpKind::Read {
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
            OpKind::Write {
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
            OpKind::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::Fallocate {
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
        match &mut self.kind {
            OpKind::Read {
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
            OpKind::Write {
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
            OpKind::Fsync { .. } | OpKind::Fallocate { .. } => Some(Ok(())),
        }
    }

    /// Hands the result to the waiting caller (who may have gone away).
    fn finish(self, result: io::Result<()>) {
        match self.kind {
            OpKind::Read { len, buf, tx, .. } => {
                // SAFETY: `Ok` only comes from `progress` once `done >= len`, i.e. the kernel
                // wrote all of `[0, len)`; the buffer was allocated with capacity `len`.
                let res = result.map(|()| unsafe { buf.into_bytes(len) });
                let _ = tx.send(res);
            }
            OpKind::Write { tx, .. } | OpKind::Fsync { tx } | OpKind::Fallocate { tx, .. } => {
                let _ = tx.send(result);
            }
        }
    }

    /// Fails the operation without freeing its memory: the kernel may still write it.
    fn abandon(self) {
        let err = || io::Error::other("io_uring driver stopped");
        // The descriptor too must stay open: the kernel may still use it.
        std::mem::forget(self.file);
        match self.kind {
            OpKind::Read { buf, tx, .. } => {
                std::mem::forget(buf);
                let _ = tx.send(Err(err()));
            }
            OpKind::Write {
                iovecs, buf, tx, ..
            } => {
                std::mem::forget(iovecs);
                std::mem::forget(buf);
                let _ = tx.send(Err(err()));
            }
            OpKind::Fsync { tx } | OpKind::Fallocate { tx, .. } => {
                let _ = tx.send(Err(err()));
            }
        }
    }
}

// SAFETY: an `Op` owns everything its raw pointers (the write iovecs) point to: its own
// buffers, heap data that stays put when the `Op` moves (the file is an `Arc`, `Send` itself). The pointers go to the kernel; on
// our side the `Op` is only touched under the ring's state mutex, by one thread at a time.
unsafe impl Send for Op {}

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

thread_local! {
    /// This thread's ring, made by its first store operation.
    static THREAD_RING: RefCell<Option<Arc<Ring>>> = const { RefCell::new(None) };
}

/// The calling thread's ring: made on first use, and again after the previous one died.
fn thread_ring() -> Result<Arc<Ring>, BackendError> {
    THREAD_RING.with(|slot| {
        let mut slot = slot.borrow_mut();
        if let Some(ring) = slot.as_ref().filter(|r| !r.is_dead()) {
            return Ok(ring.clone());
        }
        let ring = Arc::new(Ring::new().map_err(BackendError::Io)?);
        *slot = Some(ring.clone());
        Ok(ring)
    })
}

/// A thread's ring and the operations it owns.
struct Ring {
    state: Mutex<State>,
    /// The ring's descriptor (owned by `state.ring`, open as long as this `Ring`): the reaper
    /// waits for it to become readable, which it does when completions are posted.
    ring_fd: RawFd,
    /// A reaper task is running (set by whoever starts one, cleared when it ends).
    reaper: AtomicBool,
    /// `State::dead`, readable without the lock (the thread's next operation then makes a
    /// new ring).
    dead: AtomicBool,
}

struct State {
    ring: IoUring,
    slab: Slab,
    /// Slab keys whose next SQE is not in the submission queue yet.
    backlog: VecDeque<usize>,
    /// SQEs pushed whose final CQE has not been reaped (kept <= MAX_IN_FLIGHT, so the
    /// completion queue, twice as large, cannot overflow).
    in_ring: usize,
    /// `io_uring_enter` failed for good: operations fail, their memory is leaked.
    dead: bool,
}

impl Ring {
    fn new() -> io::Result<Ring> {
        let ring = build_ring()?;
        Ok(Ring {
            ring_fd: ring.as_raw_fd(),
            state: Mutex::new(State {
                ring,
                slab: Slab::new(),
                backlog: VecDeque::with_capacity(MAX_IN_FLIGHT),
                in_ring: 0,
                dead: false,
            }),
            reaper: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state: the slab still owns
        // every buffer the kernel may use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes an operation: it goes to the kernel now (one `io_uring_enter`, no thread
    /// hand-off) or, when MAX_IN_FLIGHT are in the ring, as soon as one completes.
    fn start(self: &Arc<Ring>, op: Op) -> Result<(), BackendError> {
        self.ensure_reaper()?;
        let mut st = self.lock();
        if st.dead {
            drop(st);
            op.finish(Err(io::Error::other("the thread's io_uring stopped")));
            return Ok(());
        }
        let key = st.slab.insert(op);
        st.backlog.push_back(key);
        st.push_backlog();
        st.submit();
        if st.dead {
            self.dead.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Starts a reaper on the current runtime unless one is running.
    fn ensure_reaper(self: &Arc<Ring>) -> Result<(), BackendError> {
        if self.reaper.load(Ordering::Acquire) || self.reaper.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(reap(self.clone()));
                Ok(())
            }
            Err(_) => {
                self.reaper.store(false, Ordering::Release);
                Err(BackendError::Io(io::Error::other(
                    "io_uring store used outside a tokio runtime",
                )))
            }
        }
    }

    /// The reaper cannot go on: every operation fails from now on (those in flight keep
    /// their memory, leaked, since the kernel may still use it).
    fn fail(&self, e: &dyn std::fmt::Display, what: &str) {
        tracing::error!(error = %e,
            "{what}; its operations fail, the thread's next operation gets a new ring");
        let mut st = self.lock();
        st.dead = true;
        self.dead.store(true, Ordering::Release);
        st.slab.abandon_all();
        st.backlog.clear();
        st.in_ring = 0;
    }

    /// Reaps every available completion, resubmits partial operations, feeds the backlog.
    /// Returns the finished operations with their results (finished outside the lock) and
    /// whether the ring is dead.
    fn reap_some(&self, finished: &mut Vec<(Op, io::Result<()>)>) -> bool {
        let mut st = self.lock();
        let st = &mut *st;
        for cqe in st.ring.completion() {
            let (user_data, res) = (cqe.user_data(), cqe.result());
            let key = user_data as usize;
            let Some(op) = st.slab.get_mut(key) else {
                tracing::error!(user_data, "io_uring completion for an unknown operation");
                continue;
            };
            st.in_ring = st.in_ring.saturating_sub(1);
            match op.progress(res) {
                None => st.backlog.push_back(key),
                Some(result) => {
                    if let Some(op) = st.slab.remove(key) {
                        finished.push((op, result));
                    }
                }
            }
        }
        st.push_backlog();
        st.submit();
        if st.dead {
            self.dead.store(true, Ordering::Release);
            st.slab.abandon_all();
            st.backlog.clear();
            st.in_ring = 0;
        }
        st.dead
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
}

impl State {
    /// Moves backlog operations into the submission queue while the ring has room.
    fn push_backlog(&mut self) {
        let mut sq = self.ring.submission();
        while self.in_ring < MAX_IN_FLIGHT {
            let Some(&key) = self.backlog.front() else {
                break;
            };
            let Some(op) = self.slab.get_mut(key) else {
                self.backlog.pop_front();
                continue;
            };
            let direct = op.file.direct;
            let mut entry = op.sqe().user_data(key as u64);
            if !direct && matches!(op.kind, OpKind::Write { .. }) {
                // Buffered writes that reach the ring are the ones the caller's thread did not
                // finish itself (FUA, large, or inline writes paused): straight to an io-wq
                // worker, skipping the non-blocking attempt that ext4 would refuse anyway.
                entry = entry.flags(squeue::Flags::ASYNC);
            }
            // SAFETY: the entry points into `op`'s buffer and iovecs, which stay in the slab,
            // unmoved on the heap, until this entry's CQE is reaped (`reap_some` removes an
            // op only on its final CQE, and `Slab` leaks rather than frees ops still in
            // flight). The descriptor is kept open by the op's `file`.
            if unsafe { sq.push(&entry) }.is_err() {
                break; // full: the rest goes after the next submit
            }
            self.backlog.pop_front();
            self.in_ring += 1;
        }
    }

    /// Hands the queued SQEs to the kernel. Busy rings retry on the next reap.
    fn submit(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        match self.ring.submit() {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => {
                tracing::error!(error = %e,
                    "io_uring_enter failed; this ring's operations fail, the thread's next one gets a new ring");
                self.dead = true;
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if st.slab.len > 0 {
            // Only when the runtime that ran the reaper went away with operations in flight:
            // their memory must outlive the kernel's use of it.
            st.slab.abandon_all();
        }
    }
}

/// Clears [`Ring::reaper`] when the reaper ends, also when its runtime drops it.
struct ReaperAlive<'a>(&'a AtomicBool);

impl Drop for ReaperAlive<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The ring's descriptor as the reactor sees it (the `Ring` keeps it open).
struct RingFd(Arc<Ring>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ring_fd
    }
}

/// The reaper: waits in the runtime's reactor for the ring to become readable, then completes
/// what the ring finished. On a current-thread runtime it runs on the thread that submitted,
/// so a completion wakes the waiting task without crossing threads.
async fn reap(ring: Arc<Ring>) {
    let _alive = ReaperAlive(&ring.reaper);
    // SAFETY: `RingFd` returns the ring's descriptor, which the `Arc<Ring>` inside it keeps
    // open and unchanged for as long as the `AsyncFd` (which owns that `RingFd`) lives.
    let registered =
        unsafe { AsyncFd::register_with_interest(RingFd(ring.clone()), Interest::READABLE) };
    let afd = match registered {
        Ok(afd) => afd,
        Err(e) => return ring.fail(&e, "cannot watch the io_uring descriptor"),
    };
    let mut finished = Vec::with_capacity(MAX_IN_FLIGHT);
    loop {
        let done = ring.reap_some(&mut finished);
        for (op, res) in finished.drain(..) {
            op.finish(res);
        }
        if done {
            return;
        }
        let mut ready = match afd.readable().await {
            Ok(ready) => ready,
            Err(e) => return ring.fail(&e, "the io_uring descriptor failed"),
        };
        // Cleared before the reap at the top of the loop: the kernel wakes the ring's pollers
        // for every completion it posts, so one posted after this raises a new edge.
        ready.clear_ready();
    }
}
