//! The supported command table: dispatch uses it to tell unknown operation codes apart, and
//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35) reports it.

use bytes::Bytes;

use super::cdb::{self, be16, be32, op};
use super::ScsiError;

/// One supported command: operation code, service action (for opcodes that have them) and
/// the CDB USAGE DATA bitmap (SPC-4 §6.35.3: a bit is one if the device server evaluates the
/// corresponding CDB bit). Its length is the CDB length.
struct Command {
    opcode: u8,
    service_action: Option<u8>,
    usage: &'static [u8],
}

const fn cmd(opcode: u8, usage: &'static [u8]) -> Command {
    Command {
        opcode,
        service_action: None,
        usage,
    }
}

const fn sa_cmd(opcode: u8, sa: u8, usage: &'static [u8]) -> Command {
    Command {
        opcode,
        service_action: Some(sa),
        usage,
    }
}

/// PERSISTENT RESERVE IN: SERVICE ACTION, ALLOCATION LENGTH.
const PRIN_USAGE: &[u8] = &[0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0];
/// PERSISTENT RESERVE OUT: SERVICE ACTION, SCOPE and TYPE, PARAMETER LIST LENGTH.
const PROUT_USAGE: &[u8] = &[0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0];

// The CONTROL byte is reported as 00h: NACA and LINK are refused.
const COMMANDS: &[Command] = &[
    cmd(op::TEST_UNIT_READY, &[0x00, 0, 0, 0, 0, 0]),
    cmd(op::REQUEST_SENSE, &[0x03, 0x01, 0, 0, 0xFF, 0]),
    cmd(op::READ_6, &[0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::WRITE_6, &[0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::INQUIRY, &[0x12, 0x01, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::MODE_SELECT_6, &[0x15, 0x11, 0, 0, 0xFF, 0]),
    cmd(op::RESERVE_6, &[0x16, 0, 0, 0, 0, 0]),
    cmd(op::RELEASE_6, &[0x17, 0, 0, 0, 0, 0]),
    cmd(op::MODE_SENSE_6, &[0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0]),
    cmd(op::START_STOP_UNIT, &[0x1B, 0x01, 0, 0x0F, 0xF7, 0]),
    cmd(op::PREVENT_ALLOW_MEDIUM_REMOVAL, &[0x1E, 0, 0, 0, 0x03, 0]),
    cmd(
        op::READ_CAPACITY_10,
        &[0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0],
    ),
    cmd(
        op::READ_10,
        &[0x28, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
    ),
    cmd(
        op::WRITE_10,
        &[0x2A, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
    ),
    cmd(
        op::WRITE_AND_VERIFY_10,
        &[0x2E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
    ),
    cmd(
        op::VERIFY_10,
        &[0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
    ),
    cmd(
        op::PRE_FETCH_10,
        &[0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
    ),
    cmd(
        op::SYNCHRONIZE_CACHE_10,
        &[0x35, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
    ),
    cmd(
        op::WRITE_SAME_10,
        &[0x41, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
    ),
    cmd(op::UNMAP, &[0x42, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0]),
    sa_cmd(
        op::SANITIZE,
        super::sanitize::sa::OVERWRITE,
        &[0x48, 0xA1, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
    ),
    sa_cmd(
        op::SANITIZE,
        super::sanitize::sa::BLOCK_ERASE,
        &[0x48, 0xA2, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
    ),
    sa_cmd(
        op::SANITIZE,
        super::sanitize::sa::EXIT_FAILURE_MODE,
        &[0x48, 0xBF, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
    ),
    cmd(
        op::MODE_SELECT_10,
        &[0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
    ),
    cmd(op::RESERVE_10, &[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]),
    cmd(op::RELEASE_10, &[0x57, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]),
    cmd(
        op::MODE_SENSE_10,
        &[0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0],
    ),
    sa_cmd(op::PERSISTENT_RESERVE_IN, 0x00, PRIN_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_IN, 0x01, PRIN_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_IN, 0x02, PRIN_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_IN, 0x03, PRIN_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x00, PROUT_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x01, PROUT_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x02, PROUT_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x03, PROUT_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x04, PROUT_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x05, PROUT_USAGE),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x06, PROUT_USAGE),
    cmd(
        op::READ_16,
        &[
            0x88, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0,
        ],
    ),
    cmd(
        op::COMPARE_AND_WRITE,
        &[
            0x89, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0x1F, 0,
        ],
    ),
    cmd(
        op::WRITE_16,
        &[
            0x8A, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0,
        ],
    ),
    cmd(
        op::ORWRITE,
        &[
            0x8B, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0,
        ],
    ),
    cmd(
        op::WRITE_AND_VERIFY_16,
        &[
            0x8E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0,
        ],
    ),
    cmd(
        op::VERIFY_16,
        &[
            0x8F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0,
        ],
    ),
    cmd(
        op::PRE_FETCH_16,
        &[
            0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0,
        ],
    ),
    cmd(
        op::SYNCHRONIZE_CACHE_16,
        &[
            0x91, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0,
        ],
    ),
    cmd(
        op::WRITE_SAME_16,
        &[
            0x93, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x1F, 0,
        ],
    ),
    sa_cmd(
        op::SERVICE_ACTION_IN_16,
        op::SA_READ_CAPACITY_16,
        &[
            0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0,
        ],
    ),
    cmd(
        op::REPORT_LUNS,
        &[0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
    ),
    sa_cmd(
        op::MAINTENANCE_IN,
        op::SA_REPORT_TARGET_PORT_GROUPS,
        &[0xA3, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
    ),
    sa_cmd(
        op::MAINTENANCE_IN,
        op::SA_REPORT_SUPPORTED_OPCODES,
        &[
            0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0,
        ],
    ),
    cmd(
        op::READ_12,
        &[
            0xA8, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0,
        ],
    ),
    cmd(
        op::WRITE_12,
        &[
            0xAA, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0,
        ],
    ),
    cmd(
        op::WRITE_AND_VERIFY_12,
        &[
            0xAE, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0,
        ],
    ),
    cmd(
        op::VERIFY_12,
        &[
            0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0,
        ],
    ),
];

/// The CDB length of a supported operation code, or `None` if we do not support it.
pub(crate) fn cdb_len(opcode: u8) -> Option<usize> {
    COMMANDS
        .iter()
        .find(|c| c.opcode == opcode)
        .map(|c| c.usage.len())
}

/// Command timeouts descriptor (SPC-4 §6.35.4): length 0Ah, no command-specific data,
/// nominal and recommended timeouts in seconds (0: not specified; 30 s recommended).
const TIMEOUTS: [u8; 12] = [0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30];

/// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN; REPORT TARGET PORT GROUPS is the LU's,
/// see `alua.rs`).
/// `offered(opcode, service action)` leaves out what this LU does not support.
pub(crate) fn maintenance_in(
    cdb: &[u8],
    offered: impl Fn(u8, Option<u8>) -> bool,
) -> Result<Bytes, ScsiError> {
    let commands = || {
        COMMANDS
            .iter()
            .filter(|c| offered(c.opcode, c.service_action))
    };
    let c = cdb::fixed::<12>(cdb)?;
    if c[1] & 0x1F != op::SA_REPORT_SUPPORTED_OPCODES {
        return Err(ScsiError::cdb_bit(1, 4));
    }
    let rctd = c[2] & 0x80 != 0;
    let options = c[2] & 0x07;
    let req_op = c[3];
    let req_sa = be16([c[4], c[5]]);
    let alloc = be32([c[6], c[7], c[8], c[9]]) as usize;
    let mut out = Vec::new();
    match options {
        // SPC-4 §6.35.2 table 254: 000b: all commands; the other request fields are ignored.
        0 => {
            out.extend_from_slice(&[0; 4]);
            for cmd in commands() {
                let sa = cmd.service_action.unwrap_or(0);
                let mut flags = 0u8;
                if cmd.service_action.is_some() {
                    flags |= 0x01; // SERVACTV
                }
                if rctd {
                    flags |= 0x02; // CTDP
                }
                let [l_hi, l_lo] = (cmd.usage.len() as u16).to_be_bytes();
                out.extend_from_slice(&[cmd.opcode, 0, 0, sa, 0, flags, l_hi, l_lo]);
                if rctd {
                    out.extend_from_slice(&TIMEOUTS);
                }
            }
            let len = (out.len() - 4) as u32;
            out[..4].copy_from_slice(&len.to_be_bytes());
        }
        // 001b: one command by operation code. "If the REQUESTED OPERATION CODE field
        // specifies an operation code that has service actions, then the device server shall
        // terminate the command ... INVALID FIELD IN CDB."
        // 010b: one command by operation code and service action; "If the REQUESTED OPERATION
        // CODE field specifies an operation code that does not have service actions, then
        // the device server shall terminate the command ... INVALID FIELD IN CDB."
        1 | 2 => {
            let has_sa = commands().any(|c| c.opcode == req_op && c.service_action.is_some());
            if options == 1 && has_sa {
                return Err(ScsiError::cdb(3));
            }
            if options == 2 && !has_sa {
                return Err(ScsiError::cdb(3));
            }
            let found = commands().find(|c| {
                c.opcode == req_op
                    && (options == 1 || c.service_action.map(u16::from) == Some(req_sa))
            });
            let ctdp = if rctd { 0x80 } else { 0 };
            match found {
                // SUPPORT 011b: supported in conformance with a standard.
                Some(cmd) => {
                    let [l_hi, l_lo] = (cmd.usage.len() as u16).to_be_bytes();
                    out.extend_from_slice(&[0, ctdp | 0x03, l_hi, l_lo]);
                    out.extend_from_slice(cmd.usage);
                    if rctd {
                        out.extend_from_slice(&TIMEOUTS);
                    }
                }
                // SUPPORT 001b: not supported; no CDB usage data.
                None => out.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return Err(ScsiError::cdb_bit(2, 2)),
    }
    out.truncate(alloc);
    Ok(Bytes::from(out))
}
