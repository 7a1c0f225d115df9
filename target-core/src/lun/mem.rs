//! A RAM store for tests, fuzzing and demos. Contents are lost when the process exits.

use std::sync::{Arc, RwLock};

use bytes::Bytes;

use super::{check_range, BackendError};

/// A zero-filled RAM buffer of fixed size, shared by clones.
#[derive(Debug, Clone)]
pub struct MemStore {
    data: Arc<RwLock<Vec<u8>>>,
    size: u64,
}

impl MemStore {
    /// A zeroed store of `size` bytes.
    pub fn new(size: u64) -> Result<MemStore, BackendError> {
        let len = usize::try_from(size).map_err(|_| BackendError::OutOfRange {
            offset: 0,
            len: size,
            size: usize::MAX as u64,
        })?;
        Ok(MemStore {
            data: Arc::new(RwLock::new(vec![0u8; len])),
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn read(&self, offset: u64, len: usize) -> Result<Bytes, BackendError> {
        check_range(offset, len as u64, self.size)?;
        // A poisoned lock means a writer panicked mid-copy; the bytes are still memory.
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        Ok(Bytes::copy_from_slice(&data[start..start + len]))
    }

    pub(crate) fn write(&self, offset: u64, bufs: &[Bytes]) -> Result<(), BackendError> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let mut pos = offset as usize;
        for b in bufs {
            data[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        Ok(())
    }

    pub(crate) fn zero(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        check_range(offset, len, self.size)?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}
