//! CDB access helpers and operation codes.
//!
//! Handlers take fixed-size arrays (`&[u8; 10]`, ...) from [`fixed`], so every field access
//! is at a constant index the compiler checks: no slicing of peer input after dispatch.

use super::ScsiError;

/// Operation codes we know (SPC-4 and SBC-3).
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const SANITIZE: u8 = 0x48;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE: u8 = 0x8B;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;

    /// SERVICE ACTION IN(16) service actions (SBC-3 §5.16, §5.17).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service action REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35).
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    /// MAINTENANCE IN service action REPORT TARGET PORT GROUPS (SPC-4 §6.36).
    pub const SA_REPORT_TARGET_PORT_GROUPS: u8 = 0x0A;
}

/// The CDB length implied by the GROUP CODE of `opcode` (SPC-4 §4.2.5.1), or `None` for the
/// reserved and vendor-specific groups.
pub fn group_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// The first `N` bytes of `cdb` as an array. A CDB shorter than its opcode's group length
/// cannot be parsed: answered as INVALID FIELD IN CDB at the operation code.
pub fn fixed<const N: usize>(cdb: &[u8]) -> Result<&[u8; N], ScsiError> {
    cdb.get(..N)
        .and_then(|s| <&[u8; N]>::try_from(s).ok())
        .ok_or(ScsiError::cdb(0))
}

pub fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

pub fn be24(b: [u8; 3]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

pub fn be32(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

pub fn be64(b: [u8; 8]) -> u64 {
    u64::from_be_bytes(b)
}

/// Checks the CONTROL byte (SAM-5 §5.2): we support neither ACA (NACA bit) nor linked
/// commands (LINK bit, obsolete).
///
/// SAM-5 §5.2: "If the NACA bit is set to one but the device server does not support
/// ACA, the device server shall terminate the command with CHECK CONDITION status, ... ILLEGAL
/// REQUEST, ... INVALID FIELD IN CDB."
pub fn check_control(cdb: &[u8], len: usize) -> Result<(), ScsiError> {
    let idx = len.saturating_sub(1);
    match cdb.get(idx) {
        Some(c) if c & 0x04 != 0 => Err(ScsiError::cdb_bit(idx as u16, 2)),
        Some(c) if c & 0x01 != 0 => Err(ScsiError::cdb_bit(idx as u16, 0)),
        _ => Ok(()),
    }
}
