//! Opening a file or block device as a store, and the portable thread-pool backend.
//!
//! [`FileStore`] runs each operation as blocking `pread`/`pwrite`/`fdatasync`/`fallocate`
//! calls on tokio's blocking pool ([`tokio::task::spawn_blocking`]). It works wherever std
//! does and is the reference the io_uring backend is tested against; it costs a thread hop
//! per operation, so [`super::Engine::Auto`] prefers io_uring when the kernel allows it.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::pool;
use super::sys::{self, AlignedBuf, DIRECT_MEM_ALIGN};
use super::{check_range, BackendError, StoreConfig};

/// Size of the shared zero buffer used when the filesystem cannot zero a range itself.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// Largest read served inline from the page cache (see [`FileShared::read_cached`]).
pub(crate) const CACHED_READ_MAX: usize = 64 << 10;
/// Largest buffered write done inline (see [`FileShared::write_cached`]).
pub(crate) const INLINE_WRITE_MAX: usize = 256 << 10;
/// An inline write slower than this pauses inline writes for the store... (Wall time, so
/// it includes preemption: well above a scheduler time slice on a loaded machine, well below
/// what dirty-page throttling makes a writer sleep, up to 200 ms.)
pub(crate) const INLINE_WRITE_SLOW: std::time::Duration = std::time::Duration::from_millis(20);
/// ... for this long.
pub(crate) const INLINE_WRITE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Nanoseconds since the first call in this process (never 0 afterwards).
fn process_nanos() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    epoch.elapsed().as_nanos() as u64 + 1
}

/// A 1 MiB page-aligned buffer of zeroes, shared by every fallback write-zeroes (aligned, so
/// it also serves O_DIRECT).
pub(crate) fn zero_chunk() -> Bytes {
    static ZEROES: OnceLock<Bytes> = OnceLock::new();
    ZEROES
        .get_or_init(|| Bytes::from_owner(AlignedBuf::zeroed(ZERO_CHUNK, DIRECT_MEM_ALIGN)))
        .clone()
}

/// An open backing file or block device plus what was learned about it at open time. Shared
/// by the thread-pool and io_uring backends.
#[derive(Debug)]
pub(crate) struct FileShared {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// Bytes served; grows (never shrinks) with [`FileShared::grow`].
    size: AtomicU64,
    pub(crate) block_size: u32,
    pub(crate) direct: bool,
    pub(crate) read_only: bool,
    pub(crate) block_device: bool,
    /// `FALLOC_FL_PUNCH_HOLE` worked so far (cleared on the first EOPNOTSUPP).
    punch_hole: AtomicBool,
    /// `FALLOC_FL_ZERO_RANGE` worked so far (cleared on the first EOPNOTSUPP).
    zero_range: AtomicBool,
    /// `RWF_NOWAIT` reads worked so far (cleared when the file refuses them).
    nowait_read: AtomicBool,
    /// `RWF_NOWAIT` writes worked so far (cleared when the file refuses them).
    nowait_write: AtomicBool,
    /// [`process_nanos`] until which inline blocking writes are off (0: never paused).
    inline_paused_until: AtomicU64,
}

impl FileShared {
    /// Opens and validates `cfg.path` (see [`super::Store::open`] for the rules).
    pub(crate) fn open(cfg: &StoreConfig) -> Result<FileShared, BackendError> {
        let path = &cfg.path;
        let invalid = |reason: String| BackendError::Invalid {
            path: path.clone(),
            reason,
        };
        let bs = cfg.block_size;
        if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
            return Err(invalid(format!(
                "block size {bs} is not a power of two between 512 and 65536"
            )));
        }
        match std::fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match (&cfg.clone_from, cfg.create_size) {
                    (Some(source), size) => match super::clone::reflink(source, path, size) {
                        Ok(_) => {}
                        // Made meanwhile by someone else: theirs is used (and validated) as is.
                        Err(BackendError::Open { source: e, .. })
                            if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    },
                    (None, Some(size)) => create_sparse(path, size, bs)?,
                    (None, None) => {
                        return Err(BackendError::Open {
                            path: path.clone(),
                            source: io::Error::new(
                                io::ErrorKind::NotFound,
                                "no such file, and no create_size to create it",
                            ),
                        })
                    }
                }
            }
            Err(source) => {
                return Err(BackendError::Open {
                    path: path.clone(),
                    source,
                })
            }
        }

        let mut opts = OpenOptions::new();
        opts.read(true).write(!cfg.read_only);
        if cfg.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(path).map_err(|source| BackendError::Open {
            path: path.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| BackendError::Open {
            path: path.clone(),
            source,
        })?;
        let file_type = meta.file_type();
        let (size, block_device) = if file_type.is_file() {
            (meta.len(), false)
        } else if file_type.is_block_device() {
            // A block device's st_size is 0; its end is its size.
            let size = file
                .seek(SeekFrom::End(0))
                .map_err(|source| BackendError::Open {
                    path: path.clone(),
                    source,
                })?;
            (size, true)
        } else {
            return Err(invalid(
                "is neither a regular file nor a block device".into(),
            ));
        };
        if size == 0 {
            return Err(invalid("is empty (size 0)".into()));
        }
        if !aligned_to(size, u64::from(bs)) {
            return Err(invalid(format!(
                "size {size} is not a multiple of the block size {bs}"
            )));
        }
        if cfg.direct {
            // O_DIRECT needs I/O aligned to the device's logical block size; a LUN block size
            // below it would fail every request with EINVAL. One read at open finds out.
            let mut probe = AlignedBuf::zeroed(bs as usize, DIRECT_MEM_ALIGN.max(bs as usize));
            if let Err(e) = file.read_exact_at(probe.as_mut_slice(), 0) {
                return Err(invalid(format!(
                    "O_DIRECT read of one {bs}-byte block failed ({e}); is the block size \
                     smaller than the device's logical block size?"
                )));
            }
        }
        Ok(FileShared {
            file,
            path: path.clone(),
            size: AtomicU64::new(size),
            block_size: bs,
            direct: cfg.direct,
            read_only: cfg.read_only,
            block_device,
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
            nowait_read: AtomicBool::new(!cfg.direct),
            nowait_write: AtomicBool::new(!cfg.direct && !cfg.read_only),
            inline_paused_until: AtomicU64::new(0),
        })
    }

    /// Bytes served.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows what is served: a regular file is extended (sparse) to `want` bytes when that is
    /// more than its length, then what the file or block device now holds, in whole blocks,
    /// is served. Returns the size served. Never shrinks: a `want` below the size served, or
    /// a file or device that got smaller, is refused and the size served is kept.
    pub(crate) fn grow(&self, want: Option<u64>) -> Result<u64, BackendError> {
        let served = self.size();
        let invalid = |reason: String| BackendError::Invalid {
            path: self.path.clone(),
            reason,
        };
        if let Some(w) = want.filter(|w| *w < served) {
            return Err(invalid(format!(
                "size {w} is below the {served} bytes served: shrinking a LUN is refused"
            )));
        }
        let io = |source| BackendError::Open {
            path: self.path.clone(),
            source,
        };
        let now = if self.block_device {
            // A block device's size is its end (an LV or zvol grown outside).
            (&self.file).seek(SeekFrom::End(0)).map_err(io)?
        } else {
            let len = self.file.metadata().map_err(io)?.len();
            match want {
                Some(w) if w > len && !self.read_only => {
                    self.file.set_len(w).map_err(io)?;
                    w
                }
                _ => len,
            }
        };
        let now = now - now % u64::from(self.block_size);
        if now < served {
            return Err(invalid(format!(
                "now holds {now} bytes, fewer than the {served} served: shrinking is refused"
            )));
        }
        self.size.store(now, Ordering::Release);
        Ok(now)
    }

    /// Memory alignment for O_DIRECT buffers, or `None` for buffered I/O.
    pub(crate) fn direct_align(&self) -> Option<usize> {
        self.direct
            .then(|| DIRECT_MEM_ALIGN.max(self.block_size as usize))
    }

    /// Range check, write permission and O_DIRECT alignment of an operation.
    pub(crate) fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), BackendError> {
        if write && self.read_only {
            return Err(BackendError::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        let align = u64::from(self.block_size);
        if self.direct && !(aligned_to(offset, align) && aligned_to(len, align)) {
            return Err(BackendError::Misaligned { offset, len, align });
        }
        Ok(())
    }

    /// The fast path of a buffered read: when the whole range is in the page cache, copy it
    /// out right here, on the caller's thread, with no hand-off to the I/O engine (one
    /// `preadv2` with `RWF_NOWAIT`, which never waits for the device). `None` when the caller
    /// must take the asynchronous path: O_DIRECT, not all cached, or any error (which the
    /// asynchronous path then reports with its full handling). The range is checked already.
    pub(crate) fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        if len > CACHED_READ_MAX || !self.nowait_read.load(Ordering::Relaxed) {
            return None;
        }
        let mut buf = pool::take(len, DIRECT_MEM_ALIGN);
        match sys::pread_nowait(&self.file, &mut buf, len, offset) {
            Ok(n) if n == len => return Some(pool::freeze(buf)),
            Ok(_) => {}
            Err(e) => self.note_nowait(&self.nowait_read, &e, "reads"),
        }
        pool::give_back(buf);
        None
    }

    /// The fast path of a buffered write without FUA, on the caller's thread. Returns the
    /// bytes written, 0 when none (the caller writes the rest through the I/O engine). The
    /// range is checked already.
    ///
    /// Where the filesystem offers non-blocking buffered writes, `pwritev2(RWF_NOWAIT)` takes
    /// what the page cache accepts without waiting. Where it does not (ext4), a buffered write
    /// of at most [`INLINE_WRITE_MAX`] bytes is a copy into the page cache that normally
    /// takes microseconds, and handing it to the engine costs more than the copy; it is done
    /// here with a plain `pwritev2`. A buffered write can still wait (dirty-page throttling,
    /// journal commits, reclaim): one that takes longer than [`INLINE_WRITE_SLOW`] sends the
    /// store's writes to the engine for [`INLINE_WRITE_PAUSE`], so a slow disk stalls the
    /// caller's thread at most once per pause.
    pub(crate) fn write_cached(&self, offset: u64, parts: &[Bytes]) -> usize {
        if self.direct || self.read_only {
            return 0;
        }
        if self.nowait_write.load(Ordering::Relaxed) {
            match sys::pwrite_nowait(&self.file, parts, offset) {
                Ok(n) => return n,
                Err(e) => {
                    self.note_nowait(&self.nowait_write, &e, "writes");
                    if self.nowait_write.load(Ordering::Relaxed) {
                        return 0;
                    }
                }
            }
        }
        let total: usize = parts.iter().map(Bytes::len).sum();
        if total > INLINE_WRITE_MAX || !self.inline_writes_allowed() {
            return 0;
        }
        let start = std::time::Instant::now();
        let res = sys::pwrite_all(&self.file, parts, offset, false);
        let took = start.elapsed();
        if took > INLINE_WRITE_SLOW {
            self.pause_inline_writes(took);
        }
        // On an error nothing is claimed written: the engine repeats the whole write (the
        // same bytes at the same place) and reports the failure with its full handling.
        if res.is_ok() {
            total
        } else {
            0
        }
    }

    /// For tests: the filesystem takes `RWF_NOWAIT` writes.
    #[cfg(test)]
    pub(crate) fn has_nowait_writes(&self) -> bool {
        self.nowait_write.load(Ordering::Relaxed)
    }

    fn inline_writes_allowed(&self) -> bool {
        let until = self.inline_paused_until.load(Ordering::Relaxed);
        until == 0 || process_nanos() >= until
    }

    pub(crate) fn pause_inline_writes(&self, took: std::time::Duration) {
        let until = process_nanos() + INLINE_WRITE_PAUSE.as_nanos() as u64;
        if self.inline_paused_until.swap(until, Ordering::Relaxed) == 0 {
            tracing::debug!(path = %self.path.display(), ?took,
                "slow buffered write; writes go through the I/O engine for a while");
        }
    }

    /// `EAGAIN` is the expected "would wait"; anything else turns the fast path off for this
    /// file (the asynchronous path reports real I/O errors).
    fn note_nowait(&self, flag: &AtomicBool, e: &io::Error, what: &str) {
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return;
        }
        if flag.swap(false, Ordering::Relaxed) {
            tracing::debug!(path = %self.path.display(), error = %e,
                "non-blocking {what} unavailable here; every request goes to the I/O engine");
        }
    }

    /// Whether the bytes at `offset` are allocated, and how far that lasts (to the next
    /// change, or the end of the served size), from `SEEK_DATA`/`SEEK_HOLE`. `None` for block
    /// devices and where the filesystem cannot tell.
    pub(crate) fn extent(&self, offset: u64) -> Option<(bool, u64)> {
        use rustix::fs::{seek, SeekFrom};
        let size = self.size();
        if self.block_device || offset >= size {
            return None;
        }
        match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(data) if data > offset => Some((false, data.min(size) - offset)),
            Ok(_) => {
                let hole = seek(&self.file, SeekFrom::Hole(offset)).ok()?;
                Some((true, hole.min(size).max(offset + 1) - offset))
            }
            // ENXIO: no data at or after `offset`: a hole to the end.
            Err(e) if e == rustix::io::Errno::NXIO => Some((false, size - offset)),
            Err(_) => None,
        }
    }

    pub(crate) fn punch_hole_supported(&self) -> bool {
        self.punch_hole.load(Ordering::Relaxed)
    }

    pub(crate) fn zero_range_supported(&self) -> bool {
        self.zero_range.load(Ordering::Relaxed)
    }

    /// Records the outcome of a punch-hole attempt: `Ok(true)` done, `Ok(false)` unsupported
    /// here (fall back to writing zeroes), `Err` a real failure.
    pub(crate) fn note_punch_hole(&self, res: io::Result<()>) -> io::Result<bool> {
        Self::note(&self.punch_hole, res, &self.path, "FALLOC_FL_PUNCH_HOLE")
    }

    /// As [`Self::note_punch_hole`], for `FALLOC_FL_ZERO_RANGE`.
    pub(crate) fn note_zero_range(&self, res: io::Result<()>) -> io::Result<bool> {
        Self::note(&self.zero_range, res, &self.path, "FALLOC_FL_ZERO_RANGE")
    }

    fn note(flag: &AtomicBool, res: io::Result<()>, path: &Path, what: &str) -> io::Result<bool> {
        match res {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(&e) => {
                if flag.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %path.display(), error = %e,
                        "{what} unsupported, writing zeroes instead");
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Errors that mean "this fallocate mode is not available on this file", not "I/O failed".
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY)
    )
}

/// Creates `path` as a sparse file of `size` bytes. Never touches an existing file: if
/// someone else created it first, theirs is used (and validated) as is.
fn create_sparse(path: &Path, size: u64, block_size: u32) -> Result<(), BackendError> {
    if size == 0 || !aligned_to(size, u64::from(block_size)) {
        return Err(BackendError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "create_size {size} is not a positive multiple of the block size {block_size}"
            ),
        });
    }
    let file = match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(source) => {
            return Err(BackendError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if let Err(source) = file.set_len(size) {
        // Do not leave a half-made file that a retry would take as the real one.
        let _ = std::fs::remove_file(path);
        return Err(BackendError::Open {
            path: path.to_path_buf(),
            source,
        });
    }
    tracing::info!(path = %path.display(), size, "created sparse backing file");
    Ok(())
}

/// The portable backend: blocking syscalls on tokio's blocking thread pool. Clones share the
/// open file.
#[derive(Debug, Clone)]
pub struct FileStore {
    shared: Arc<FileShared>,
}

impl FileStore {
    pub(crate) fn new(shared: Arc<FileShared>) -> FileStore {
        FileStore { shared }
    }

    pub fn size(&self) -> u64 {
        self.shared.size()
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub(crate) fn shared(&self) -> &FileShared {
        &self.shared
    }

    pub(crate) async fn read(&self, offset: u64, len: usize) -> Result<Bytes, BackendError> {
        self.shared.check(offset, len as u64, false)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Some(cached) = self.shared.read_cached(offset, len) {
            return Ok(cached);
        }
        read_blocking(self.shared.clone(), offset, len).await
    }

    pub(crate) async fn write(
        &self,
        offset: u64,
        data: Vec<Bytes>,
        fua: bool,
    ) -> Result<(), BackendError> {
        let total: u64 = data.iter().map(|b| b.len() as u64).sum();
        self.shared.check(offset, total, true)?;
        if total == 0 && !fua {
            return Ok(());
        }
        let (offset, data) = if fua {
            (offset, data)
        } else {
            let n = self.shared.write_cached(offset, &data);
            if n as u64 == total {
                return Ok(());
            }
            (offset + n as u64, advance(data, n))
        };
        let shared = self.shared.clone();
        blocking(move || {
            match shared.direct_align() {
                Some(align) if !is_aligned(&data, align) => {
                    let bounce = AlignedBuf::copy_from(&data, align);
                    shared.file.write_all_at(bounce.as_ref(), offset)?;
                }
                _ => {
                    let mut pos = offset;
                    for part in &data {
                        shared.file.write_all_at(part, pos)?;
                        pos += part.len() as u64;
                    }
                }
            }
            if fua {
                shared.file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn flush(&self) -> Result<(), BackendError> {
        if self.shared.read_only {
            return Ok(());
        }
        let shared = self.shared.clone();
        blocking(move || shared.file.sync_data()).await
    }

    pub(crate) async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.shared.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let shared = self.shared.clone();
        blocking(move || {
            if shared.punch_hole_supported() {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let res = sys::fallocate(&shared.file, mode, offset, len);
                if shared.note_punch_hole(res)? {
                    return Ok(());
                }
            }
            zero_blocking(&shared, offset, len)
        })
        .await
    }

    pub(crate) async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.shared.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let shared = self.shared.clone();
        blocking(move || zero_blocking(&shared, offset, len)).await
    }
}

/// Reads `len` bytes at `offset` into a pool buffer on tokio's blocking pool (aligned for
/// O_DIRECT stores). The range is checked already.
pub(crate) async fn read_blocking(
    shared: Arc<FileShared>,
    offset: u64,
    len: usize,
) -> Result<Bytes, BackendError> {
    blocking(move || {
        let align = shared.direct_align().unwrap_or(DIRECT_MEM_ALIGN);
        let mut buf = pool::take(len, align);
        sys::pread_exact(&shared.file, &mut buf, len, offset)?;
        Ok(pool::freeze(buf))
    })
    .await
}

/// Zeroes a range: `FALLOC_FL_ZERO_RANGE` when the filesystem has it, else plain writes.
fn zero_blocking(shared: &FileShared, offset: u64, len: u64) -> io::Result<()> {
    if shared.zero_range_supported() {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let res = sys::fallocate(&shared.file, mode, offset, len);
        if shared.note_zero_range(res)? {
            return Ok(());
        }
    }
    let zeroes = zero_chunk();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(zeroes.len() as u64) as usize;
        shared.file.write_all_at(&zeroes[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// `parts` without their first `n` bytes.
pub(crate) fn advance(mut parts: Vec<Bytes>, n: usize) -> Vec<Bytes> {
    if n == 0 {
        return parts;
    }
    let first = crate::parts::consume(&mut parts, 0, n);
    parts.drain(..first);
    parts
}

/// Whether every part can go to an O_DIRECT write as is (address and length aligned).
pub(crate) fn is_aligned(parts: &[Bytes], align: usize) -> bool {
    parts.iter().all(|p| {
        aligned_to(p.as_ptr() as u64, align as u64) && aligned_to(p.len() as u64, align as u64)
    })
}

/// `x` is a multiple of `align`, a power of two (block sizes are validated to be).
fn aligned_to(x: u64, align: u64) -> bool {
    debug_assert!(align.is_power_of_two());
    x & (align - 1) == 0
}

/// Runs blocking file I/O on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, BackendError>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(res) => res.map_err(BackendError::Io),
        Err(join) => Err(BackendError::Io(io::Error::other(format!(
            "blocking I/O task failed: {join}"
        )))),
    }
}
