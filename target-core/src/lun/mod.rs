//! LUN backing stores.
//!
//! A [`Store`] reads and writes byte ranges of a logical unit's backing: a RAM buffer
//! ([`mem::MemStore`]), or a file or block device. Every operation is async and owns its
//! buffers until it completes; a write returns only after the store accepted it, and a write
//! with `fua` or a [`Store::flush`] returns only after the data reached stable storage.
//!
//! Offsets and lengths are already validated against [`Store::size`] by the SCSI layer; stores
//! still check them and answer [`BackendError::OutOfRange`] rather than trust the caller.
//!
//! # Backends
//! - [`MemStore`]: RAM, for tests, fuzzing and demos.
//! - [`FileStore`] ([`Engine::ThreadPool`]): blocking `pread`/`pwrite`/`fdatasync`/`fallocate`
//!   on tokio's blocking pool. Portable; the reference in differential tests.
//! - [`UringStore`] ([`Engine::Uring`]): one io_uring per thread, shared by every store that
//!   thread runs operations of, submitted to and reaped on that thread; see [`uring`] for the
//!   design. [`Engine::Auto`] uses it when [`uring_available`] says so. With a buffered file
//!   it carries writes, flushes and fallocate; buffered reads that miss the fast path below go
//!   to tokio's blocking pool (a large copy or a page-cache miss runs beside the runtime).
//!
//! [`Store::open`] opens either file backend from a [`StoreConfig`].
//!
//! # Fast paths
//! Both file backends first try to finish a buffered (not O_DIRECT) operation on the
//! caller's thread, where handing it to the engine would cost more than doing it:
//! - a read of at most 64 KiB whose range is all in the page cache is copied out with
//!   `preadv2(RWF_NOWAIT)`, which never waits for the device (larger reads go to the
//!   blocking pool, so that their copy runs beside the session's work: measured faster for
//!   128 KiB reads);
//! - a write without FUA goes in with `pwritev2(RWF_NOWAIT)` where the filesystem supports
//!   it, else (ext4), when at most 256 KiB, with a plain `pwritev2`; an inline write slower
//!   than 20 ms (dirty-page throttling, journal) sends the store's writes to the engine for a
//!   second. See `FileShared::read_cached` and `FileShared::write_cached`.
//!
//! Read buffers come from [`pool`], recycled when the last `Bytes` is dropped.

pub mod clone;
pub mod file;
pub mod mem;
pub mod pool;
mod sys;
pub mod uring;

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

pub use file::FileStore;
pub use mem::MemStore;
pub use uring::{uring_available, UringStore};

/// Store failures. Each maps to a SCSI sense in the SCSI layer (MEDIUM ERROR for reads,
/// WRITE ERROR for writes, ...).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("range {offset}+{len} is beyond the store size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("store is read-only")]
    ReadOnly,
    /// The backing could not be opened or created.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The backing exists but cannot serve as a store (size, type, configuration).
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// A copy of `source_path` at `path` was asked for and the filesystem cannot make one
    /// without copying data (see [`clone::reflink`]).
    #[error("cannot make {} a reflink copy of {}: {reason}", path.display(), source_path.display())]
    CloneUnsupported {
        path: PathBuf,
        source_path: PathBuf,
        reason: String,
    },
    /// An engine was asked for that this kernel or process cannot provide.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An O_DIRECT store got a range that is not a multiple of its block size.
    #[error("range {offset}+{len} is not aligned to {align} bytes (O_DIRECT)")]
    Misaligned { offset: u64, len: u64, align: u64 },
}

/// Which I/O engine a file store uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Engine {
    /// io_uring when [`uring_available`] succeeds, else the thread pool (with a warning).
    #[default]
    Auto,
    /// io_uring or fail with [`BackendError::Unsupported`].
    Uring,
    /// Blocking syscalls on tokio's blocking pool.
    ThreadPool,
}

/// How to open a file or block device as a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// A regular file or a block device.
    pub path: PathBuf,
    /// Open with O_DIRECT (bypass the page cache). Every range must then be a multiple of
    /// `block_size`, which must be at least the device's logical block size.
    pub direct: bool,
    /// Open read-only; writes, discards and write-zeroes fail with [`BackendError::ReadOnly`].
    pub read_only: bool,
    /// If `path` does not exist, create it as a sparse file of this many bytes. An existing
    /// file is never truncated or grown.
    pub create_size: Option<u64>,
    /// If `path` does not exist, create it as a reflink copy of this file instead (grown to
    /// `create_size` when that is larger; see [`clone::reflink`]), never by copying data.
    pub clone_from: Option<PathBuf>,
    /// Logical block size: a power of two in 512..=65536. The size must be a multiple of it.
    pub block_size: u32,
    pub engine: Engine,
}

impl StoreConfig {
    /// A read-write, buffered, [`Engine::Auto`] store of an existing `path`.
    pub fn new(path: impl Into<PathBuf>, block_size: u32) -> StoreConfig {
        StoreConfig {
            path: path.into(),
            direct: false,
            read_only: false,
            create_size: None,
            clone_from: None,
            block_size,
            engine: Engine::Auto,
        }
    }
}

/// A logical unit's backing store.
#[derive(Debug, Clone)]
pub enum Store {
    Memory(MemStore),
    ThreadPool(FileStore),
    Uring(UringStore),
}

impl Store {
    /// Opens a regular file or block device.
    ///
    /// Creates the file sparse when it is missing and `cfg.create_size` is set; never
    /// truncates or grows an existing one. Probes io_uring for [`Engine::Auto`] and falls back
    /// to the thread pool with a `warn!` naming the reason.
    ///
    /// # Errors
    /// Every error names the path: [`BackendError::Open`] when it is missing (and no
    /// `create_size`), unreadable, or not writable for a read-write store;
    /// [`BackendError::Invalid`] when it is not a regular file or block device, is empty, its
    /// size is not a multiple of `block_size`, or `block_size` is bad;
    /// [`BackendError::Unsupported`] for [`Engine::Uring`] without io_uring.
    pub fn open(cfg: &StoreConfig) -> Result<Store, BackendError> {
        let use_uring = match cfg.engine {
            Engine::ThreadPool => false,
            Engine::Uring => match uring_available() {
                Ok(()) => true,
                Err(reason) => {
                    return Err(BackendError::Unsupported(format!(
                        "io_uring for {}: {reason}",
                        cfg.path.display()
                    )))
                }
            },
            Engine::Auto => match uring_available() {
                Ok(()) => true,
                Err(reason) => {
                    tracing::warn!(path = %cfg.path.display(), %reason,
                        "io_uring unavailable, using the thread-pool backend");
                    false
                }
            },
        };
        let shared = std::sync::Arc::new(file::FileShared::open(cfg)?);
        let store = if use_uring {
            match UringStore::new(shared.clone()) {
                Ok(u) => Store::Uring(u),
                Err(e) if cfg.engine == Engine::Auto => {
                    tracing::warn!(path = %cfg.path.display(), error = %e,
                        "io_uring setup failed, using the thread-pool backend");
                    Store::ThreadPool(FileStore::new(shared.clone()))
                }
                Err(e) => return Err(e),
            }
        } else {
            Store::ThreadPool(FileStore::new(shared.clone()))
        };
        tracing::info!(path = %cfg.path.display(), size = shared.size(),
            block_device = shared.block_device, direct = shared.direct,
            read_only = shared.read_only, engine = store.kind(), "opened LUN store");
        Ok(store)
    }

    /// Opens the store a [`LunConfig`](crate::config::LunConfig) describes: a RAM store for
    /// `Backing::Memory`, else [`Store::open`] with the LUN's path, flags and block size.
    ///
    /// # Errors
    /// As [`Store::open`]; for memory, [`BackendError::OutOfRange`] when the size does not fit.
    pub fn from_lun_config(
        lun: &crate::config::LunConfig,
        engine: Engine,
    ) -> Result<Store, BackendError> {
        match &lun.backing {
            crate::config::Backing::Memory { size } => Ok(Store::Memory(MemStore::new(*size)?)),
            crate::config::Backing::Path(path) => Store::open(&StoreConfig {
                path: path.clone(),
                direct: lun.direct,
                read_only: lun.read_only,
                create_size: lun.create_size,
                clone_from: lun.clone_from.clone(),
                block_size: lun.block_size,
                engine,
            }),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Store::Memory(m) => m.size(),
            Store::ThreadPool(f) => f.size(),
            Store::Uring(u) => u.size(),
        }
    }

    /// Grows the store to serve `want` bytes (a file is extended sparse), or to what its file
    /// or block device now holds; returns the size served. Never shrinks (see
    /// [`file::FileShared::grow`]); a memory store cannot grow.
    pub fn grow(&self, want: Option<u64>) -> Result<u64, BackendError> {
        match self {
            Store::Memory(m) => match want {
                Some(w) if w != m.size() => Err(BackendError::Invalid {
                    path: "<memory>".into(),
                    reason: format!(
                        "a memory store keeps its size ({} bytes), not {w}",
                        m.size()
                    ),
                }),
                _ => Ok(m.size()),
            },
            Store::ThreadPool(f) => f.shared().grow(want),
            Store::Uring(u) => u.shared().grow(want),
        }
    }

    /// A short name for logs and status: `memory`, `io_uring`, `threadpool`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::ThreadPool(_) => "threadpool",
            Store::Uring(_) => "io_uring",
        }
    }

    /// The backing path, for file stores.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Store::Memory(_) => None,
            Store::ThreadPool(f) => Some(f.path()),
            Store::Uring(u) => Some(u.path()),
        }
    }

    /// Whether the store was opened read-only.
    pub fn read_only(&self) -> bool {
        match self {
            Store::Memory(_) => false,
            Store::ThreadPool(f) => f.shared().read_only,
            Store::Uring(u) => u.shared().read_only,
        }
    }

    /// Whether [`Store::discard`] deallocates (punches holes). When false, discard still
    /// succeeds by writing zeroes. For files this turns false after the filesystem first
    /// refuses a punch-hole.
    pub fn supports_discard(&self) -> bool {
        match self {
            Store::Memory(_) => true,
            Store::ThreadPool(f) => f.shared().punch_hole_supported(),
            Store::Uring(u) => u.shared().punch_hole_supported(),
        }
    }

    /// Whether the bytes at `offset` are allocated and for how many bytes that holds (see
    /// `FileShared::extent`); `None` where the store cannot tell (memory, block devices).
    pub fn extent(&self, offset: u64) -> Option<(bool, u64)> {
        match self {
            Store::Memory(_) => None,
            Store::ThreadPool(f) => f.shared().extent(offset),
            Store::Uring(u) => u.shared().extent(offset),
        }
    }

    /// Reads `len` bytes at `offset` into a fresh buffer that the caller can send as is.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, BackendError> {
        match self {
            Store::Memory(m) => m.read(offset, len),
            Store::ThreadPool(f) => f.read(offset, len).await,
            Store::Uring(u) => u.read(offset, len).await,
        }
    }

    /// Writes the concatenation of `data` at `offset`. With `fua`, returns only once the data
    /// is on stable storage.
    pub async fn write(
        &self,
        offset: u64,
        data: Vec<Bytes>,
        fua: bool,
    ) -> Result<(), BackendError> {
        match self {
            Store::Memory(m) => m.write(offset, &data),
            Store::ThreadPool(f) => f.write(offset, data, fua).await,
            Store::Uring(u) => u.write(offset, data, fua).await,
        }
    }

    /// Makes every completed write durable (fdatasync).
    pub async fn flush(&self) -> Result<(), BackendError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::ThreadPool(f) => f.flush().await,
            Store::Uring(u) => u.flush().await,
        }
    }

    /// Deallocates `len` bytes at `offset`; afterwards they read as zeroes.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self {
            Store::Memory(m) => m.zero(offset, len),
            Store::ThreadPool(f) => f.discard(offset, len).await,
            Store::Uring(u) => u.discard(offset, len).await,
        }
    }

    /// Writes zeroes over `len` bytes at `offset`.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self {
            Store::Memory(m) => m.zero(offset, len),
            Store::ThreadPool(f) => f.write_zeroes(offset, len).await,
            Store::Uring(u) => u.write_zeroes(offset, len).await,
        }
    }
}

/// Checks `offset + len <= size` without overflow.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BackendError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests;
