//! LUN backing stores.
//!
//! A [`Store`] reads and writes byte ranges of a logical unit's backing: a RAM buffer
//! ([`mem::MemStore`]), or a file or block device. Every operation is async and owns its
//! buffers until it completes; a write returns only after the store accepted it, and a write
//! with `fua` or a [`Store::flush`] returns only after the data reached stable storage.
//!
//! Offsets and lengths are already validated against [`Store::size`] by the SCSI layer; stores
//! still check them and answer [`BackendError::OutOfRange`] rather than trust the caller.

pub mod mem;

use std::io;

use bytes::Bytes;

pub use mem::MemStore;

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
}

/// A logical unit's backing store.
#[derive(Debug, Clone)]
pub enum Store {
    Memory(MemStore),
}

impl Store {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Store::Memory(m) => m.size(),
        }
    }

    /// A short name for logs and status: `memory`, `io_uring`, `threadpool`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
        }
    }

    /// Whether [`Store::discard`] deallocates (punches holes). When false, discard still
    /// succeeds by writing zeroes.
    pub fn supports_discard(&self) -> bool {
        match self {
            Store::Memory(_) => true,
        }
    }

    /// Reads `len` bytes at `offset` into a fresh buffer that the caller can send as is.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, BackendError> {
        match self {
            Store::Memory(m) => m.read(offset, len),
        }
    }

    /// Writes the concatenation of `data` at `offset`. With `fua`, returns only once the data
    /// is on stable storage.
    pub async fn write(&self, offset: u64, data: Vec<Bytes>, fua: bool) -> Result<(), BackendError> {
        let _ = fua;
        match self {
            Store::Memory(m) => m.write(offset, &data),
        }
    }

    /// Makes every completed write durable (fdatasync).
    pub async fn flush(&self) -> Result<(), BackendError> {
        match self {
            Store::Memory(_) => Ok(()),
        }
    }

    /// Deallocates `len` bytes at `offset`; afterwards they read as zeroes.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self {
            Store::Memory(m) => m.zero(offset, len),
        }
    }

    /// Writes zeroes over `len` bytes at `offset`.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self {
            Store::Memory(m) => m.zero(offset, len),
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
