//! SCSI target device emulation for a block logical unit (SPC-4, SBC-3).
//!
//! Transport-independent: the iSCSI session code hands each SCSI command to
//! [`LogicalUnit::execute`] (or [`execute_no_lun`] for a LUN the target does not have) and
//! sends back the [`ScsiResult`]. Before soliciting write data it asks
//! [`LogicalUnit::data_out_length`] how many bytes the CDB transfers.
//!
//! # What the transport does
//! - Task management, aborts and the task set: [`LogicalUnit::reset`] only raises the unit
//!   attention and resets mode parameters; aborting tasks is the transport's job.
//! - Residuals: compare the expected data transfer length with `data_in.len()` (reads) or with
//!   [`LogicalUnit::data_out_length`] (writes).
//! - Sense formatting on the wire: [`Sense::to_fixed`] (D_SENSE is always zero here).
//!
//! # Not implemented (INVALID COMMAND OPERATION CODE, so libiscsi skips)
//! XDWRITE*, WRITE ATOMIC, EXTENDED COPY, READ DEFECT DATA, LOG SENSE; SANITIZE
//! CRYPTOGRAPHIC ERASE. No protection information, D_SENSE fixed at zero, no saved mode
//! pages. APTPL only on LUs backed by a regular file (see [`pr_state`]).
//!
//! # Layout
//! - [`sense`]: status codes, [`Sense`], [`ScsiError`], [`UnitAttention`].
//! - `cdb`: operation codes and CDB field helpers.
//! - `spc`: primary commands (INQUIRY, REPORT LUNS, MODE SENSE/SELECT, REQUEST SENSE, ...).
//! - `sbc`: block commands (READ, WRITE, VERIFY, WRITE SAME, UNMAP, COMPARE AND WRITE, ...).
//! - `sanitize`: SANITIZE (OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE) and its LU states.
//! - `opcodes`: the command table behind REPORT SUPPORTED OPERATION CODES and dispatch.
//! - `pr`: PERSISTENT RESERVE IN/OUT, RESERVE/RELEASE(6/10) and the reservation access check;
//!   [`pr_state`]: their state file (APTPL).
//! - [`alua`]: target port groups, their access states, REPORT TARGET PORT GROUPS.
//!
//! # Concurrency
//! Commands run concurrently on one LU. The state mutex (unit attentions, LUN list) is never
//! held across `.await`; READ and WRITE touch it only when a unit attention may be pending
//! (an atomic flag says so), and the reservation state only while some reservation exists
//! (another flag). COMPARE AND WRITE and ORWRITE serialise with each other on the LU through
//! an async read-modify-write lock; they are not atomic against plain WRITEs to the same
//! blocks (as with tgtd).

pub mod alua;
mod cdb;
mod identity;
mod opcodes;
mod pr;
pub mod pr_state;
mod sanitize;
mod sbc;
pub mod sense;
mod spc;

#[cfg(test)]
mod alua_tests;
#[cfg(test)]
mod pr_tests;
#[cfg(test)]
mod sanitize_tests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::lun::Store;

pub use identity::{LuIdentity, MAX_SERIAL_LEN};
pub use pr::{initiator_port, MAX_REGISTRATIONS};
pub use sense::{status, ScsiError, Sense, SenseKey, UnitAttention};
pub use spc::report_luns;

use cdb::op;

/// Largest single READ/WRITE/VERIFY transfer, in bytes (BLOCK LIMITS MAXIMUM TRANSFER LENGTH
/// is this divided by the block size). 32 MiB: 65536 blocks of 512 bytes, which is also the
/// kernel iscsi_tcp initiator's default max_sectors and what libiscsi's WRITE SAME tests read
/// back in one command.
pub const MAX_TRANSFER_BYTES: u32 = 32 * 1024 * 1024;
/// BLOCK LIMITS WSNZ (SBC-3 §6.5.3): WRITE SAME with NUMBER OF LOGICAL BLOCKS zero is refused.
/// With `false` zero means "to the end of the medium"; that makes libiscsi's
/// WriteSame{10,16}.ZeroBlocks pass but WriteSame{10,16}.UnmapUntilEnd fail (it sends 0xFF data
/// with UNMAP=1 and expects the blocks to read back zero, i.e. deallocation whatever the data).
pub const WRITE_SAME_NON_ZERO: bool = true;
/// BLOCK LIMITS MAXIMUM WRITE SAME LENGTH, in blocks.
pub const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 22;
/// BLOCK LIMITS MAXIMUM COMPARE AND WRITE LENGTH, in blocks.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 128;
/// BLOCK LIMITS MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT: as many as a 16-bit parameter list
/// length can carry ((65535 - 8) / 16).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 4095;
/// BLOCK LIMITS MAXIMUM UNMAP LBA COUNT: FFFF_FFFFh means no limit (SBC-3 §6.5.3).
pub const MAX_UNMAP_LBA_COUNT: u32 = u32::MAX;
/// Most Data-Out bytes solicited for PERSISTENT RESERVE OUT.
const MAX_PR_OUT_PARAMETER_LIST: u64 = 4096;
/// Pending unit attentions kept per I_T nexus; older non-reset ones are dropped beyond this.
const MAX_PENDING_UA: usize = 8;

/// The outcome of one command: status, Data-In and, for CHECK CONDITION, the sense data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResult {
    /// A [`status`] code.
    pub status: u8,
    /// Data-In (for reads, the store's buffer as is). Already cut to the ALLOCATION LENGTH.
    pub data_in: Bytes,
    /// Sense data, present with CHECK CONDITION.
    pub sense: Option<Sense>,
}

impl ScsiResult {
    /// GOOD with `data_in`.
    pub fn good(data_in: Bytes) -> ScsiResult {
        ScsiResult {
            status: status::GOOD,
            data_in,
            sense: None,
        }
    }

    /// The error's status ([`ScsiError::status`]): CHECK CONDITION with its sense, or
    /// RESERVATION CONFLICT without sense data.
    pub fn from_error(e: ScsiError) -> ScsiResult {
        let status = e.status();
        ScsiResult {
            status,
            data_in: Bytes::new(),
            sense: (status == status::CHECK_CONDITION).then(|| e.sense()),
        }
    }

    fn from(r: Result<Bytes, ScsiError>) -> ScsiResult {
        match r {
            Ok(d) => ScsiResult::good(d),
            Err(e) => ScsiResult::from_error(e),
        }
    }
}

/// Why a [`LogicalUnit`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LuError {
    #[error("block size {0} is not supported (512 or 4096)")]
    BlockSize(u32),
    #[error("store of {size} bytes holds no whole block of {block_size} bytes")]
    TooSmall { size: u64, block_size: u32 },
}

/// One SCSI logical unit backed by a [`Store`].
#[derive(Debug)]
pub struct LogicalUnit {
    pub lun: u16,
    pub store: Store,
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Capacity in logical blocks (the store size divided by the block size); grows with
    /// [`LogicalUnit::grow`], never shrinks.
    num_blocks: AtomicU64,
    pub read_only: bool,
    pub identity: LuIdentity,
    block_shift: u32,
    /// True when some nexus may have a unit attention queued: the fast path checks this
    /// before touching `state`.
    ua_pending: AtomicBool,
    /// True when some reservation (persistent or SPC-2) exists: commands check `state`'s
    /// reservations only then.
    reserved: AtomicBool,
    /// True when some target port group is in a state that refuses commands (see
    /// [`alua`]): commands check their nexus's group only then.
    alua_restricted: AtomicBool,
    /// Caching mode page WCE (SBC-3 §6.4.5). With WCE=0 every write is FUA.
    wce: AtomicBool,
    /// Control mode page SWP (SPC-4 §7.5.8): software write protect, set by MODE SELECT,
    /// cleared by a reset.
    swp: AtomicBool,
    /// Whether a SANITIZE runs or failed (see [`sanitize`]); shared with its task.
    sanitize: Arc<sanitize::SanitizeFlag>,
    state: Mutex<LuState>,
    /// Serialises the read-modify-write commands (COMPARE AND WRITE, ORWRITE).
    read_modify_write: tokio::sync::Mutex<()>,
    /// This LU's I/O counters in the global registry, looked up once (see
    /// [`crate::stats::Probe::start`]).
    pub(crate) stats: std::sync::OnceLock<Arc<crate::stats::LunStats>>,
    /// Where persistent reservations are saved while APTPL is in effect (see [`pr_state`]);
    /// `None`: APTPL is refused.
    pr_file: Option<pr_state::PrFile>,
}

#[derive(Debug, Default)]
struct LuState {
    /// Pending unit attentions per session, highest priority first.
    ua: HashMap<u64, VecDeque<UnitAttention>>,
    /// The I_T nexus (initiator port, see [`initiator_port`], and target port) of each
    /// session.
    ports: HashMap<u64, pr::ItNexus>,
    /// The target port groups the LU is reached through (see [`alua`]).
    port_groups: Vec<alua::TargetPortGroup>,
    /// Registrations and reservations.
    res: pr::Reservations,
    /// LUN numbers REPORT LUNS lists (the whole target's).
    target_luns: Vec<u16>,
}

/// Caching mode page WCE default: the store may cache writes (page cache) until a flush.
const DEFAULT_WCE: bool = true;

impl LogicalUnit {
    /// A LU over `store`. The capacity is the store size in whole blocks; a partial tail block
    /// is not addressable.
    pub fn new(
        lun: u16,
        store: Store,
        block_size: u32,
        read_only: bool,
        identity: LuIdentity,
    ) -> Result<LogicalUnit, LuError> {
        let block_shift = match block_size {
            512 => 9,
            4096 => 12,
            other => return Err(LuError::BlockSize(other)),
        };
        let size = store.size();
        let num_blocks = size >> block_shift;
        if num_blocks == 0 {
            return Err(LuError::TooSmall { size, block_size });
        }
        Ok(LogicalUnit {
            lun,
            store,
            block_size,
            num_blocks: AtomicU64::new(num_blocks),
            read_only,
            identity,
            block_shift,
            ua_pending: AtomicBool::new(false),
            reserved: AtomicBool::new(false),
            alua_restricted: AtomicBool::new(false),
            wce: AtomicBool::new(DEFAULT_WCE),
            swp: AtomicBool::new(false),
            sanitize: Arc::default(),
            state: Mutex::new(LuState {
                target_luns: vec![lun],
                port_groups: alua::default_groups(),
                ..LuState::default()
            }),
            read_modify_write: tokio::sync::Mutex::new(()),
            stats: std::sync::OnceLock::new(),
            pr_file: None,
        })
    }

    /// Keeps persistent reservations in `file` while APTPL is in effect, starting from what
    /// it holds (see [`pr_state`]). Fails for a file that is unreadable, corrupt or another
    /// LU's: the LU must not be served without its reservations.
    pub fn with_reservation_file(
        mut self,
        file: pr_state::PrFile,
    ) -> Result<LogicalUnit, pr_state::PrStateError> {
        if let Some(res) = file.load()? {
            let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            st.res = res;
            let any = st.res.any();
            *self.reserved.get_mut() = any;
            tracing::info!(path = %file.path().display(), registrations = st.res.registered().count(),
                "persistent reservations restored (APTPL)");
        }
        self.pr_file = Some(file);
        Ok(self)
    }

    /// Whether writes are refused: the LUN is configured read-only, or software write
    /// protect (SWP) is set.
    pub(crate) fn write_protected(&self) -> bool {
        self.read_only || self.swp.load(Ordering::Acquire)
    }

    /// Capacity in logical blocks.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    /// Grows the LU to `want` bytes (a file store is extended), or to what its file or block
    /// device now holds. When the capacity grew, every I_T nexus gets CAPACITY DATA HAS
    /// CHANGED (SBC-3 §4.6: "the device server shall establish a unit attention condition for
    /// the initiator port associated with each I_T nexus ... with the additional sense code
    /// set to CAPACITY DATA HAS CHANGED" when the capacity changes). Returns the new capacity
    /// in bytes if it grew. Shrinking is refused, and the capacity served is kept.
    pub fn grow(&self, want: Option<u64>) -> Result<Option<u64>, crate::lun::BackendError> {
        let bytes = self.store.grow(want)?;
        let blocks = bytes >> self.block_shift;
        let old = self.num_blocks.fetch_max(blocks, Ordering::AcqRel);
        if blocks > old {
            self.raise_unit_attention(UnitAttention::CapacityDataChanged, None);
            Ok(Some(blocks << self.block_shift))
        } else {
            Ok(None)
        }
    }

    /// Executes one command from I_T nexus `nexus` (the session's id).
    ///
    /// `data_out` is the write data the transport collected and `data_out_len` how many bytes
    /// of it count (the smaller of the two is used). When the initiator sent less than the
    /// CDB asks for (iSCSI Expected Data Transfer Length below the SCSI transfer length), WRITE
    /// stores only the whole blocks it got; extra data beyond the CDB is ignored.
    ///
    /// Never panics on any CDB or data; the result is GOOD or CHECK CONDITION.
    pub async fn execute(
        &self,
        nexus: u64,
        cdb: &[u8],
        data_out: Vec<Bytes>,
        data_out_len: u32,
    ) -> ScsiResult {
        let avail = data_out
            .iter()
            .map(|b| b.len())
            .fold(0usize, usize::saturating_add)
            .min(data_out_len as usize);
        let data = DataOut {
            bufs: data_out,
            len: avail,
        };
        ScsiResult::from(self.dispatch(nexus, cdb, data).await)
    }

    async fn dispatch(&self, nexus: u64, cdb: &[u8], data: DataOut) -> Result<Bytes, ScsiError> {
        let Some(&opcode) = cdb.first() else {
            return Err(ScsiError::InvalidOpcode);
        };
        // SBC-3 §4.11: a sanitize in progress (or failed) answers for the LU before anything
        // else, unit attentions included, on every I_T nexus.
        if self.sanitize.get() != sanitize::SanitizeState::Idle {
            self.check_sanitize(opcode)?;
        }
        // SAM-5 §5.14 / SPC-4 §5.14: a pending unit attention is reported for any command
        // except INQUIRY, REPORT LUNS and REQUEST SENSE (which reports it as sense data).
        if self.ua_pending.load(Ordering::Acquire)
            && !matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
        {
            if let Some(ua) = self.take_unit_attention(nexus) {
                return Err(ScsiError::UnitAttention(ua));
            }
        }
        if self.alua_restricted.load(Ordering::Acquire) {
            self.check_access_state(nexus, opcode, cdb)?;
        }
        match opcode {
            // The hot path first: one atomic load when no reservation exists.
            op::READ_10 | op::READ_16 | op::READ_6 | op::READ_12 => {
                if self.reserved.load(Ordering::Acquire) {
                    self.check_reservation(nexus, opcode, cdb)?;
                }
                self.read(cdb).await
            }
            op::WRITE_10 | op::WRITE_16 | op::WRITE_6 | op::WRITE_12 => {
                if self.reserved.load(Ordering::Acquire) {
                    self.check_reservation(nexus, opcode, cdb)?;
                }
                self.write(cdb, data, false).await.map(|()| Bytes::new())
            }
            _ => {
                let len = opcodes::cdb_len(opcode).ok_or(ScsiError::InvalidOpcode)?;
                if cdb.len() < len {
                    return Err(ScsiError::cdb(0));
                }
                cdb::check_control(cdb, len)?;
                // SPC-4 §5.12.1 / SPC-2 §5.5.1: a command that conflicts with a reservation
                // ends in RESERVATION CONFLICT before it does anything.
                if self.reserved.load(Ordering::Acquire) {
                    self.check_reservation(nexus, opcode, cdb)?;
                }
                self.dispatch_other(nexus, opcode, cdb, data).await
            }
        }
    }

    async fn dispatch_other(
        &self,
        nexus: u64,
        opcode: u8,
        cdb: &[u8],
        data: DataOut,
    ) -> Result<Bytes, ScsiError> {
        match opcode {
            op::TEST_UNIT_READY => Ok(Bytes::new()),
            op::REQUEST_SENSE => self.request_sense(nexus, cdb),
            op::INQUIRY => self.inquiry(nexus, cdb),
            op::REPORT_LUNS => {
                let luns = {
                    let mut st = self.lock();
                    // SPC-4 §6.33: the REPORTED LUNS DATA HAS CHANGED unit attention is
                    // cleared on the nexus by a REPORT LUNS command.
                    if let Some(q) = st.ua.get_mut(&nexus) {
                        q.retain(|u| *u != UnitAttention::ReportedLunsDataChanged);
                    }
                    self.refresh_ua_pending(&st);
                    st.target_luns.clone()
                };
                report_luns(cdb, &luns)
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => self.mode_select(nexus, cdb, &data),
            op::START_STOP_UNIT => spc::start_stop_unit(cdb),
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => spc::prevent_allow(cdb),
            op::MAINTENANCE_IN if cdb[1] & 0x1F == cdb::op::SA_REPORT_TARGET_PORT_GROUPS => {
                self.report_target_port_groups(cdb)
            }
            op::MAINTENANCE_IN => opcodes::maintenance_in(cdb, |opcode, sa| {
                opcode != op::SANITIZE
                    || sa != Some(sanitize::sa::BLOCK_ERASE)
                    || self.store.supports_discard()
            }),
            op::READ_CAPACITY_10 => self.read_capacity_10(cdb),
            op::SERVICE_ACTION_IN_16 => self.service_action_in_16(cdb).await,
            op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
                self.write(cdb, data, true).await.map(|()| Bytes::new())
            }
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => self.verify(cdb, &data).await,
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
                self.synchronize_cache(cdb).await
            }
            op::PRE_FETCH_10 | op::PRE_FETCH_16 => self.pre_fetch(cdb),
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(cdb, &data).await,
            op::UNMAP => self.unmap(cdb, &data).await,
            op::COMPARE_AND_WRITE => self.compare_and_write(cdb, data).await,
            op::ORWRITE => self.orwrite(cdb, data).await,
            op::SANITIZE => self.sanitize_command(cdb, &data).await,
            op::PERSISTENT_RESERVE_IN => self.persistent_reserve_in(cdb),
            op::PERSISTENT_RESERVE_OUT => self.persistent_reserve_out(nexus, cdb, &data),
            op::RESERVE_6 | op::RESERVE_10 => self.reserve_spc2(nexus, cdb),
            op::RELEASE_6 | op::RELEASE_10 => self.release_spc2(nexus, cdb),
            _ => Err(ScsiError::InvalidOpcode),
        }
    }

    /// Checks a transport's expected data transfer length against the CDB when they differ.
    /// Most commands then run with the smaller amount and a residual (FCP-4 §9.4.2 option
    /// a). COMPARE AND WRITE cannot: SBC-3 §5.2 defines its Data-Out buffer as exactly the
    /// verify and the write instance (2 × NUMBER OF LOGICAL BLOCKS), so a different length
    /// means the CDB does not describe the transfer: INVALID FIELD IN CDB (NUMBER OF LOGICAL
    /// BLOCKS), as tgtd answers and libiscsi's CompareAndWrite tests expect.
    pub fn check_expected_length(&self, cdb: &[u8], expected: u64) -> Result<(), ScsiError> {
        if cdb.first() == Some(&op::COMPARE_AND_WRITE) && self.data_out_length(cdb)? != expected {
            return Err(ScsiError::cdb(13));
        }
        Ok(())
    }

    /// How many Data-Out bytes `cdb` transfers, so the transport knows what to solicit.
    ///
    /// # Errors
    /// A CDB whose transfer size cannot be determined (malformed, over the limits). The
    /// transport may answer the error at once, or call [`LogicalUnit::execute`] with no data,
    /// which finds the same error (or reports a pending unit attention first).
    /// Unknown operation codes transfer nothing: `Ok(0)`, and `execute` rejects them.
    pub fn data_out_length(&self, cdb: &[u8]) -> Result<u64, ScsiError> {
        let Some(&opcode) = cdb.first() else {
            return Ok(0);
        };
        let bs = u64::from(self.block_size);
        match opcode {
            op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16
            | op::ORWRITE => {
                let rw = sbc::RwCdb::parse(cdb)?;
                self.check_transfer(&rw)?;
                Ok(u64::from(rw.blocks) * bs)
            }
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
                let rw = sbc::RwCdb::parse(cdb)?;
                self.check_transfer(&rw)?;
                match sbc::bytchk(rw.flags)? {
                    sbc::ByteCheck::None => Ok(0),
                    sbc::ByteCheck::All => Ok(u64::from(rw.blocks) * bs),
                    sbc::ByteCheck::OneBlock if rw.blocks == 0 => Ok(0),
                    sbc::ByteCheck::OneBlock => Ok(bs),
                }
            }
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
                let rw = sbc::RwCdb::parse(cdb)?;
                Ok(if opcode == op::WRITE_SAME_16 && rw.flags & 0x01 != 0 {
                    0
                } else {
                    bs
                })
            }
            op::COMPARE_AND_WRITE => {
                let c = cdb::fixed::<16>(cdb)?;
                if c[13] > MAX_COMPARE_AND_WRITE_BLOCKS {
                    return Err(ScsiError::cdb(13));
                }
                Ok(2 * u64::from(c[13]) * bs)
            }
            op::UNMAP | op::MODE_SELECT_10 => {
                let c = cdb::fixed::<10>(cdb)?;
                Ok(u64::from(cdb::be16([c[7], c[8]])))
            }
            // At most a block and 4 bytes are a valid list (sanitize.rs); more is refused
            // without buffering it.
            op::SANITIZE => {
                let c = cdb::fixed::<10>(cdb)?;
                let len = u64::from(cdb::be16([c[7], c[8]]));
                Ok(len.min(u64::from(self.block_size) + 8))
            }
            op::MODE_SELECT_6 => Ok(u64::from(cdb::fixed::<6>(cdb)?[4])),
            op::PERSISTENT_RESERVE_OUT => {
                // Only the 24-byte basic parameter list is accepted (pr.rs): solicit no more
                // than a small bound of a larger PARAMETER LIST LENGTH, which then ends in
                // PARAMETER LIST LENGTH ERROR without buffering gigabytes first.
                let c = cdb::fixed::<10>(cdb)?;
                let len = u64::from(cdb::be32([c[5], c[6], c[7], c[8]]));
                Ok(len.min(MAX_PR_OUT_PARAMETER_LIST))
            }
            _ => Ok(0),
        }
    }

    /// Session `nexus` logged in through initiator port `initiator_port` (build it with
    /// [`initiator_port`]) and target port `target_port` (its portal group's TPGT): together
    /// the I_T nexus. It starts with POWER ON, RESET, OR BUS DEVICE RESET
    /// OCCURRED (29h/00h) pending (SAM-5 §5.14: established for each I_T nexus), and finds the
    /// persistent reservation registrations of its port again (SPC-4 §5.12.4).
    ///
    /// Unit attentions are only kept for sessions registered here: a session that never calls
    /// it sees none, and its reservations belong to it alone. Call
    /// [`LogicalUnit::remove_nexus`] when the session ends.
    pub fn add_nexus(&self, nexus: u64, initiator_port: &str, target_port: u16) {
        let mut st = self.lock();
        st.ua
            .insert(nexus, VecDeque::from([UnitAttention::PowerOnReset]));
        crate::events::global().unit_attention(UnitAttention::PowerOnReset);
        st.ports
            .insert(nexus, pr::ItNexus::new(initiator_port, target_port));
        self.refresh_ua_pending(&st);
    }

    /// Session `nexus` is gone (I_T nexus loss): forget its unit attentions and release an
    /// SPC-2 reservation it held (SPC-2 §5.5.1: reservations are released on I_T nexus loss).
    /// Persistent reservations and registrations stay (SPC-4 §5.12.4). Unknown ids are
    /// ignored, so calling it twice is harmless.
    pub fn remove_nexus(&self, nexus: u64) {
        let mut st = self.lock();
        st.ua.remove(&nexus);
        if let Some(port) = st.ports.remove(&nexus) {
            // Another live session of the same port keeps the nexus (and the reservation).
            if !st.ports.values().any(|p| *p == port) {
                self.release_spc2_for(&mut st, Some(&port));
            }
        }
        self.refresh_ua_pending(&st);
    }

    /// Establishes `ua` for every known I_T nexus except `except`.
    pub fn raise_unit_attention(&self, ua: UnitAttention, except: Option<u64>) {
        let mut st = self.lock();
        for (nexus, q) in st.ua.iter_mut() {
            if Some(*nexus) != except {
                push_ua(q, ua);
            }
        }
        self.refresh_ua_pending(&st);
    }

    /// Establishes `ua` for I_T nexus `nexus` only (unknown ids are ignored).
    pub fn unit_attention_for(&self, nexus: u64, ua: UnitAttention) {
        let mut st = self.lock();
        if let Some(q) = st.ua.get_mut(&nexus) {
            push_ua(q, ua);
        }
        self.refresh_ua_pending(&st);
    }

    /// LOGICAL UNIT RESET (SAM-5 §6.3.3): mode parameters return to their defaults and a
    /// unit attention BUS DEVICE RESET FUNCTION OCCURRED (29h/03h) is established for every
    /// I_T nexus, the requester's included ("for all I_T nexuses" — libiscsi's
    /// MultipathIO.Reset checks the requesting path too). An SPC-2 reservation is released
    /// (SAM-5 §6.3.3; persistent reservations are kept, SPC-4 §5.12.4). Aborting tasks is the
    /// transport's job.
    pub fn reset(&self) {
        self.wce.store(DEFAULT_WCE, Ordering::Release);
        self.swp.store(false, Ordering::Release);
        {
            let mut st = self.lock();
            self.release_spc2_for(&mut st, None);
        }
        self.raise_unit_attention(UnitAttention::LunReset, None);
    }

    /// Sets the LUN numbers REPORT LUNS lists (all LUNs of the target). Callers that change
    /// the set should also raise [`UnitAttention::ReportedLunsDataChanged`].
    pub fn set_target_luns(&self, luns: &[u16]) {
        let mut st = self.lock();
        st.target_luns.clear();
        st.target_luns.extend_from_slice(luns);
    }

    /// Removes and returns the highest-priority pending unit attention of `nexus`.
    fn take_unit_attention(&self, nexus: u64) -> Option<UnitAttention> {
        let mut st = self.lock();
        let ua = st.ua.get_mut(&nexus).and_then(|q| q.pop_front());
        self.refresh_ua_pending(&st);
        ua
    }

    fn refresh_ua_pending(&self, st: &LuState) {
        let any = st.ua.values().any(|q| !q.is_empty());
        self.ua_pending.store(any, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, LuState> {
        // A poisoned lock means a panic while holding it; the state (queues of plain enums)
        // is still consistent, so carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wce(&self) -> bool {
        self.wce.load(Ordering::Acquire)
    }

    /// BLOCK LIMITS MAXIMUM TRANSFER LENGTH, in blocks.
    fn max_transfer_blocks(&self) -> u32 {
        MAX_TRANSFER_BYTES >> self.block_shift
    }
}

/// Queues `ua`: reset-class conditions supersede everything else (a reset implies all other
/// changes); otherwise append unless already pending.
fn push_ua(q: &mut VecDeque<UnitAttention>, ua: UnitAttention) {
    if ua.is_reset() {
        if q.front().is_some_and(|u| u.is_reset()) {
            return;
        }
        q.clear();
        q.push_back(ua);
        crate::events::global().unit_attention(ua);
        return;
    }
    if q.contains(&ua) {
        return;
    }
    crate::events::global().unit_attention(ua);
    if q.len() >= MAX_PENDING_UA {
        // Keep a queued reset at the front; drop the oldest other condition.
        let idx = usize::from(q.front().is_some_and(|u| u.is_reset()));
        q.remove(idx);
    }
    q.push_back(ua);
}

/// Write data handed to a command: the buffers and how many bytes of them count.
#[derive(Debug, Default)]
pub(crate) struct DataOut {
    bufs: Vec<Bytes>,
    len: usize,
}

impl DataOut {
    /// The first `len` bytes (at most what is there) as buffers, without copying.
    fn take(self, len: usize) -> Vec<Bytes> {
        let mut bufs = self.bufs;
        let mut left = len.min(self.len);
        let mut keep = 0;
        for b in bufs.iter_mut() {
            if left == 0 {
                break;
            }
            if b.len() > left {
                b.truncate(left);
            }
            left -= b.len();
            keep += 1;
        }
        bufs.truncate(keep);
        bufs
    }

    /// Bytes `start..start + len` (clamped to what is there) as one contiguous buffer:
    /// zero-copy when one buffer holds them, a copy otherwise (parameter lists, patterns).
    fn contiguous(&self, start: usize, len: usize) -> Bytes {
        let end = start.saturating_add(len).min(self.len);
        if start >= end {
            return Bytes::new();
        }
        let mut pos = 0usize;
        for b in &self.bufs {
            let b_end = pos + b.len();
            if start >= pos && end <= b_end {
                return b.slice(start - pos..end - pos);
            }
            if b_end > start {
                break;
            }
            pos = b_end;
        }
        let mut out = Vec::with_capacity(end - start);
        let mut pos = 0usize;
        for b in &self.bufs {
            let b_end = pos + b.len();
            let s = start.max(pos);
            let e = end.min(b_end);
            if s < e {
                out.extend_from_slice(&b[s - pos..e - pos]);
            }
            pos = b_end;
            if pos >= end {
                break;
            }
        }
        Bytes::from(out)
    }
}

/// Executes a command addressed to a LUN the target does not have (SPC-4 §4.4, SAM-5 §5.9.5):
/// INQUIRY reports peripheral qualifier 011b / device type 1Fh, REPORT LUNS lists `luns`,
/// REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED sense data, and every other command
/// ends in CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h).
pub fn execute_no_lun(cdb: &[u8], luns: &[u16]) -> ScsiResult {
    ScsiResult::from(spc::no_lun(cdb, luns))
}

/// Test and fuzzing hooks. Not part of the stable interface.
#[doc(hidden)]
pub mod internal {
    use super::*;
    use crate::lun::MemStore;

    /// Runs `data` through a small in-memory LU: the first byte picks the CDB length (6..=16),
    /// the CDB follows, the rest is Data-Out. Asserts the result is GOOD, CHECK
    /// CONDITION with sense, or RESERVATION CONFLICT without sense.
    pub fn fuzz_cdb(data: &[u8]) {
        let Some((&sel, rest)) = data.split_first() else {
            return;
        };
        let cdb_len = (6 + usize::from(sel % 11)).min(rest.len());
        let (cdb, payload) = rest.split_at(cdb_len);
        let Ok(store) = MemStore::new(64 * 1024) else {
            return;
        };
        let Ok(lu) = LogicalUnit::new(
            0,
            Store::Memory(store),
            512,
            sel & 0x80 != 0,
            LuIdentity::derive("iqn.2024-01.io.ktgt:fuzz", 0, None),
        ) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
            return;
        };
        let payload = Bytes::copy_from_slice(payload);
        let len = payload.len() as u32;
        let _ = lu.data_out_length(cdb);
        let r = rt.block_on(lu.execute(1, cdb, vec![payload], len));
        assert!(
            (r.status == status::GOOD && r.sense.is_none())
                || (r.status == status::CHECK_CONDITION && r.sense.is_some())
                || (r.status == status::RESERVATION_CONFLICT && r.sense.is_none()),
            "unexpected result {r:?}"
        );
        let r = execute_no_lun(cdb, &[0, 1]);
        assert!(r.status == status::GOOD || r.status == status::CHECK_CONDITION);
    }
}
