//! SANITIZE (SBC-3 §5.30): OVERWRITE, BLOCK ERASE and EXIT FAILURE MODE, and the states a
//! sanitize leaves the logical unit in.
//!
//! # Contract
//! - OVERWRITE writes the initialization pattern into every logical block (repeated within
//!   each block), OVERWRITE COUNT times, inverted on alternate passes when INVERT is set, each
//!   pass written through to the medium (FUA) and the store flushed at the end.
//! - BLOCK ERASE deallocates every block (thin LUNs only: the store must support discard);
//!   afterwards blocks read as zeroes (LBPRZ), so reads need no write first: WABEREQ 01b in the
//!   Block Device Characteristics VPD page. CRYPTOGRAPHIC ERASE is not supported.
//! - The sanitize runs in a task of its own: ABORT TASK, the task set functions, resets, a
//!   dropped connection or a logout do not stop it (SBC-3 §4.11.2: "the sanitize operation
//!   shall continue"). With IMMED the command completes once the operation has started;
//!   without it, when it ends.
//! - While it runs, every command but INQUIRY, REPORT LUNS and REQUEST SENSE ends in NOT
//!   READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS (04h/1Bh), on every I_T nexus. If it
//!   fails, the LU is in failure mode: the same commands end in MEDIUM ERROR, SANITIZE
//!   FAILED (31h/03h), until a SANITIZE completes or EXIT FAILURE MODE is received.

use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;

use super::cdb::{self, be16, op};
use super::{DataOut, LogicalUnit, ScsiError};
use crate::lun::Store;

/// SANITIZE service actions (SBC-3 §5.30.1, table 71).
pub(crate) mod sa {
    pub const OVERWRITE: u8 = 0x01;
    pub const BLOCK_ERASE: u8 = 0x02;
    pub const EXIT_FAILURE_MODE: u8 = 0x1F;
}

/// What the LU is doing about sanitizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum SanitizeState {
    Idle = 0,
    InProgress = 1,
    Failed = 2,
}

/// The LU's sanitize state, shared with the task running a sanitize.
#[derive(Debug, Default)]
pub(crate) struct SanitizeFlag(AtomicU8);

impl SanitizeFlag {
    pub(crate) fn get(&self) -> SanitizeState {
        match self.0.load(Ordering::Acquire) {
            1 => SanitizeState::InProgress,
            2 => SanitizeState::Failed,
            _ => SanitizeState::Idle,
        }
    }

    fn set(&self, s: SanitizeState) {
        self.0.store(s as u8, Ordering::Release);
    }

    #[cfg(test)]
    pub(crate) fn set_for_test(&self, s: SanitizeState) {
        self.set(s)
    }

    /// Idle or failed → in progress; false when one already runs.
    fn start(&self) -> bool {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur == SanitizeState::InProgress as u8 {
                return false;
            }
            match self.0.compare_exchange(
                cur,
                SanitizeState::InProgress as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }
}

/// Bytes written per store call while overwriting.
const CHUNK: usize = 1 << 20;

/// One sanitize to run.
enum Operation {
    Overwrite {
        pattern: Vec<u8>,
        passes: u8,
        invert: bool,
    },
    BlockErase,
}

impl LogicalUnit {
    /// Refuses `opcode` while a sanitize runs or failed (see the module docs). Called only
    /// when the state is not idle.
    pub(crate) fn check_sanitize(&self, opcode: u8) -> Result<(), ScsiError> {
        if matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) {
            return Ok(());
        }
        match self.sanitize.get() {
            SanitizeState::Idle => Ok(()),
            SanitizeState::InProgress => Err(ScsiError::SanitizeInProgress),
            // SBC-3 §4.11.4: in failure mode a new SANITIZE may be requested.
            SanitizeState::Failed if opcode == op::SANITIZE => Ok(()),
            SanitizeState::Failed => Err(ScsiError::SanitizeFailed),
        }
    }

    /// SANITIZE (SBC-3 §5.30).
    pub(crate) async fn sanitize_command(
        &self,
        cdb: &[u8],
        data: &DataOut,
    ) -> Result<Bytes, ScsiError> {
        let c = cdb::fixed::<10>(cdb)?;
        let immed = c[1] & 0x80 != 0;
        let action = c[1] & 0x1F;
        // Byte 1 bit 6 and bytes 2 to 6 are reserved.
        if c[1] & 0x40 != 0 {
            return Err(ScsiError::cdb_bit(1, 6));
        }
        if let Some(i) = (2..7).find(|&i| c[i] != 0) {
            return Err(ScsiError::cdb(i as u16));
        }
        let param_len = usize::from(be16([c[7], c[8]]));
        let bs = self.block_size as usize;
        let operation = match action {
            sa::OVERWRITE => {
                // §5.30.2: "If the PARAMETER LIST LENGTH field is set to a value less than
                // 0005h or greater than (logical block length + 4), then the device server
                // shall terminate the command ... INVALID FIELD IN CDB."
                if param_len < 5 || param_len > bs + 4 {
                    return Err(ScsiError::cdb(7));
                }
                let list = data.contiguous(0, param_len);
                if list.len() < param_len {
                    return Err(ScsiError::ParameterListLengthError);
                }
                let invert = list[0] & 0x80 != 0;
                // TEST (bits 6..5) is vendor specific: we have no test modes.
                if list[0] & 0x60 != 0 {
                    return Err(ScsiError::param_bit(0, 6));
                }
                let passes = list[0] & 0x1F;
                // "An OVERWRITE COUNT field set to 00h is reserved."
                if passes == 0 {
                    return Err(ScsiError::param_bit(0, 4));
                }
                let len = usize::from(be16([list[2], list[3]]));
                // "INITIALIZATION PATTERN LENGTH ... set to zero or to a value greater than
                // the logical block length, ... INVALID FIELD IN PARAMETER LIST", and it must
                // describe the rest of the list.
                if len == 0 || len > bs || len + 4 != param_len {
                    return Err(ScsiError::param(2));
                }
                Operation::Overwrite {
                    pattern: list[4..4 + len].to_vec(),
                    passes,
                    invert,
                }
            }
            sa::BLOCK_ERASE if self.store.supports_discard() => {
                // §5.30.3: "The PARAMETER LIST LENGTH field shall be set to zero" (else
                // INVALID FIELD IN CDB).
                if param_len != 0 {
                    return Err(ScsiError::cdb(7));
                }
                Operation::BlockErase
            }
            sa::EXIT_FAILURE_MODE => {
                if param_len != 0 {
                    return Err(ScsiError::cdb(7));
                }
                // §5.30.5: completes the failed sanitize without the data having been
                // sanitized; outside failure mode there is nothing to do.
                if self.sanitize.get() == SanitizeState::Failed {
                    self.sanitize.set(SanitizeState::Idle);
                }
                return Ok(Bytes::new());
            }
            // CRYPTOGRAPHIC ERASE, BLOCK ERASE on a LU that cannot deallocate, and the
            // reserved codes: INVALID FIELD IN CDB.
            _ => return Err(ScsiError::cdb_bit(1, 4)),
        };
        if self.write_protected() {
            return Err(ScsiError::WriteProtected);
        }
        if !self.sanitize.start() {
            return Err(ScsiError::SanitizeInProgress);
        }
        let store = self.store.clone();
        let flag = self.sanitize.clone();
        let bytes = self.num_blocks() * u64::from(self.block_size);
        let block = bs;
        let run = tokio::spawn(async move {
            let result = run(&store, operation, bytes, block).await;
            match &result {
                Ok(()) => flag.set(SanitizeState::Idle),
                Err(e) => {
                    tracing::error!(error = %e, "SANITIZE failed; the LU is in sanitize failure mode");
                    flag.set(SanitizeState::Failed);
                }
            }
            result
        });
        if immed {
            return Ok(Bytes::new());
        }
        match run.await {
            Ok(Ok(())) => Ok(Bytes::new()),
            _ => Err(ScsiError::SanitizeFailed),
        }
    }
}

/// Carries out one sanitize over `bytes` bytes of `store`.
async fn run(
    store: &Store,
    operation: Operation,
    bytes: u64,
    block: usize,
) -> Result<(), crate::lun::BackendError> {
    match operation {
        Operation::BlockErase => {
            let mut at = 0;
            while at < bytes {
                let len = (bytes - at).min(1 << 30);
                store.discard(at, len).await?;
                at += len;
            }
        }
        Operation::Overwrite {
            pattern,
            passes,
            invert,
        } => {
            for pass in 0..passes {
                // §5.30.2: with INVERT the pattern is inverted between passes, and the last
                // pass writes it as given.
                let flip = invert && (passes - 1 - pass) % 2 == 1;
                let one: Vec<u8> = (0..block)
                    .map(|i| {
                        let b = pattern[i % pattern.len()];
                        if flip {
                            !b
                        } else {
                            b
                        }
                    })
                    .collect();
                let chunk = Bytes::from(one.repeat(CHUNK / block));
                let mut at = 0;
                while at < bytes {
                    let len = (bytes - at).min(CHUNK as u64) as usize;
                    store.write(at, vec![chunk.slice(..len)], true).await?;
                    at += len as u64;
                }
            }
        }
    }
    store.flush().await
}
