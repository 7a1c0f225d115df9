//! iSCSI PDUs (RFC 7143 §11): typed Basic Header Segments for every opcode, both directions.
//!
//! A [`Pdu`] is a typed [`Header`] plus the raw Additional Header Segments and the data segment,
//! both `Bytes` slices of the receive buffer (no copy). [`Header::parse`] reads a 48-byte BHS;
//! [`Header::write`] produces one. Reserved fields are written as zero and ignored on receipt
//! (RFC 7143 §11.2: "Reserved fields ... MUST be 0 on transmission and ignored on reception"), except
//! where this module names a check.

use bytes::Bytes;

use crate::types::{Isid, Itt, Lun, Sn, Tsih, Ttt};

/// Length of the Basic Header Segment (RFC 7143 §11.2.1).
pub const BHS_LEN: usize = 48;

/// A BHS as it arrives on the wire.
pub type Bhs = [u8; BHS_LEN];

/// Opcodes (RFC 7143 §11.2.1.2). An open set: unknown values decode to [`Header::Unknown`].
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RejectReason(pub u8);

impl RejectReason {
    pub const DATA_DIGEST_ERROR: RejectReason = RejectReason(0x02);
    pub const SNACK_REJECT: RejectReason = RejectReason(0x03);
    pub const PROTOCOL_ERROR: RejectReason = RejectReason(0x04);
    pub const COMMAND_NOT_SUPPORTED: RejectReason = RejectReason(0x05);
    pub const IMMEDIATE_COMMAND_REJECT: RejectReason = RejectReason(0x06);
    pub const TASK_IN_PROGRESS: RejectReason = RejectReason(0x07);
    pub const INVALID_DATA_ACK: RejectReason = RejectReason(0x08);
    pub const INVALID_PDU_FIELD: RejectReason = RejectReason(0x09);
    pub const LONG_OPERATION_REJECT: RejectReason = RejectReason(0x0a);
    pub const WAITING_FOR_LOGOUT: RejectReason = RejectReason(0x0c);
}

/// Login stages (RFC 7143 §11.12.3: CSG and NSG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Security,
    Operational,
    /// Value 2 is reserved.
    Reserved,
    FullFeature,
}

impl Stage {
    fn from_bits(b: u8) -> Stage {
        match b & 3 {
            0 => Stage::Security,
            1 => Stage::Operational,
            2 => Stage::Reserved,
            _ => Stage::FullFeature,
        }
    }
    fn bits(self) -> u8 {
        match self {
            Stage::Security => 0,
            Stage::Operational => 1,
            Stage::Reserved => 2,
            Stage::FullFeature => 3,
        }
    }
}

// --- Initiator to target -------------------------------------------------------------------

/// NOP-Out (RFC 7143 §11.18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
}

/// Task attributes of a SCSI Command (RFC 7143 §11.3.1, ATTR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskAttr(pub u8);

impl TaskAttr {
    pub const UNTAGGED: TaskAttr = TaskAttr(0);
    pub const SIMPLE: TaskAttr = TaskAttr(1);
    pub const ORDERED: TaskAttr = TaskAttr(2);
    pub const HEAD_OF_QUEUE: TaskAttr = TaskAttr(3);
    pub const ACA: TaskAttr = TaskAttr(4);
}

/// SCSI Command (RFC 7143 §11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: TaskAttr,
    pub lun: Lun,
    pub itt: Itt,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
    /// The first 16 bytes of the CDB; longer CDBs continue in an Extended CDB AHS.
    pub cdb: [u8; 16],
}

/// Task Management Function Request (RFC 7143 §11.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    /// Function code (RFC 7143 §11.5.1), see [`TaskMgmtFunction`].
    pub function: u8,
    pub lun: Lun,
    pub itt: Itt,
    pub referenced_task_tag: Itt,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
    pub ref_cmd_sn: Sn,
    pub exp_data_sn: Sn,
}

/// Task management function codes (RFC 7143 §11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
}

/// Task management responses (RFC 7143 §11.6.1).
pub mod tmf_response {
    pub const COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const REJECTED: u8 = 255;
}

/// Login Request (RFC 7143 §11.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: Isid,
    pub tsih: Tsih,
    pub itt: Itt,
    pub cid: u16,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
}

/// Text Request (RFC 7143 §11.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
}

/// SCSI Data-Out (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub exp_stat_sn: Sn,
    pub data_sn: Sn,
    pub buffer_offset: u32,
}

/// Logout Request (RFC 7143 §11.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0 close the session, 1 close the connection, 2 remove the connection for recovery.
    pub reason: u8,
    pub itt: Itt,
    pub cid: u16,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
}

/// SNACK Request (RFC 7143 §11.16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnackRequest {
    pub snack_type: u8,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub exp_stat_sn: Sn,
    pub beg_run: u32,
    pub run_length: u32,
}

// --- Target to initiator -------------------------------------------------------------------

/// NOP-In (RFC 7143 §11.19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
}

/// SCSI Response (RFC 7143 §11.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// 0 command completed at target, 1 target failure (RFC 7143 §11.4.3).
    pub response: u8,
    pub status: u8,
    pub itt: Itt,
    pub snack_tag: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub exp_data_sn: Sn,
    pub bidi_read_residual_count: u32,
    pub residual_count: u32,
}

/// Task Management Function Response (RFC 7143 §11.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: Itt,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
}

/// Login Response (RFC 7143 §11.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: Isid,
    pub tsih: Tsih,
    pub itt: Itt,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Response (RFC 7143 §11.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub continue_: bool,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
}

/// SCSI Data-In (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub acknowledge: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// The S bit: status is carried in this PDU (phase collapse, RFC 7143 §11.7.4).
    pub status_present: bool,
    pub status: u8,
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub data_sn: Sn,
    pub buffer_offset: u32,
    pub residual_count: u32,
}

/// Logout Response (RFC 7143 §11.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: Itt,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer (RFC 7143 §11.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R2t {
    pub lun: Lun,
    pub itt: Itt,
    pub ttt: Ttt,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub r2t_sn: Sn,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

/// Asynchronous Message (RFC 7143 §11.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: Lun,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    /// AsyncEvent (RFC 7143 §11.9.1): 0 SCSI event, 1 logout request, 2 drop connection,
    /// 3 drop all connections, 4 renegotiate, 255 vendor.
    pub async_event: u8,
    pub async_vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
}

/// Reject (RFC 7143 §11.17). The data segment carries the rejected PDU's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: RejectReason,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub data_sn: Sn,
}

/// A typed BHS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
    /// A reserved or vendor opcode. Kept whole so the session can Reject it with the header
    /// (RFC 7143 §11.17.1, "Command not supported").
    Unknown(Box<Bhs>),
}

/// A whole PDU: header, AHS and data segment (padding and digests stripped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub header: Header,
    /// Raw Additional Header Segments (RFC 7143 §11.2.2), a multiple of 4 bytes.
    pub ahs: Bytes,
    pub data: Bytes,
}

impl Pdu {
    /// A PDU with no AHS.
    pub fn new(header: Header, data: Bytes) -> Pdu {
        Pdu {
            header,
            ahs: Bytes::new(),
            data,
        }
    }

    /// The opcode of the header.
    pub fn opcode(&self) -> u8 {
        self.header.opcode()
    }

    /// The Extended CDB AHS (type 1, RFC 7143 §11.3.5), if present: the CDB bytes beyond 16.
    pub fn extended_cdb(&self) -> Option<Bytes> {
        self.ahs_segment(1).map(|seg| {
            // AHSLength counts the reserved byte plus the CDB bytes (RFC 7143 §11.2.2.3).
            let len = u16::from_be_bytes([seg[0], seg[1]]) as usize;
            let end = (4 + len.saturating_sub(1)).min(seg.len());
            self.ahs.slice_ref(&seg[4..end])
        })
    }

    /// The Bidirectional Read Expected Data Transfer Length AHS (type 2, RFC 7143 §11.3.4).
    pub fn bidi_read_length(&self) -> Option<u32> {
        self.ahs_segment(2)
            .filter(|s| s.len() >= 8)
            .map(|s| u32::from_be_bytes([s[4], s[5], s[6], s[7]]))
    }

    /// The first AHS of `ahs_type`, including its 4-byte header and padding.
    fn ahs_segment(&self, ahs_type: u8) -> Option<&[u8]> {
        let mut rest: &[u8] = &self.ahs;
        while rest.len() >= 4 {
            let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
            let total = (4 + len.saturating_sub(1)).next_multiple_of(4).max(4);
            let seg = &rest[..total.min(rest.len())];
            if rest[2] == ahs_type {
                return Some(seg);
            }
            rest = &rest[seg.len()..];
        }
        None
    }
}

fn u16_at(b: &Bhs, off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &Bhs, off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn sn_at(b: &Bhs, off: usize) -> Sn {
    Sn(u32_at(b, off))
}

fn lun_at(b: &Bhs) -> Lun {
    let mut l = [0u8; 8];
    l.copy_from_slice(&b[8..16]);
    Lun(l)
}

fn put_u16(b: &mut Bhs, off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn put_u32(b: &mut Bhs, off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

const F: u8 = 0x80;
const C: u8 = 0x40;
const IMMEDIATE: u8 = 0x40;

/// The opcode of a raw BHS (RFC 7143 §11.2.1.2: the low six bits of byte 0).
pub fn bhs_opcode(b: &Bhs) -> u8 {
    b[0] & 0x3f
}

/// TotalAHSLength in bytes (RFC 7143 §11.2.1.4: "in units of four-byte words").
pub fn bhs_total_ahs_len(b: &Bhs) -> usize {
    usize::from(b[4]) * 4
}

/// DataSegmentLength in bytes (RFC 7143 §11.2.1.5), without padding.
pub fn bhs_data_segment_len(b: &Bhs) -> usize {
    (usize::from(b[5]) << 16) | (usize::from(b[6]) << 8) | usize::from(b[7])
}

/// Initiator Task Tag of any BHS (RFC 7143 §11.2.1.6, bytes 16–19).
pub fn bhs_itt(b: &Bhs) -> Itt {
    Itt(u32_at(b, 16))
}

impl Header {
    /// Decodes the typed fields of a BHS. Never fails: field validity is checked where the
    /// PDU is handled, so that the error can be answered with the right Reject or status.
    pub fn parse(b: &Bhs) -> Header {
        let imm = b[0] & IMMEDIATE != 0;
        let fl = b[1];
        let itt = bhs_itt(b);
        match bhs_opcode(b) {
            opcode::NOP_OUT => Header::NopOut(NopOut {
                immediate: imm,
                lun: lun_at(b),
                itt,
                ttt: Ttt(u32_at(b, 20)),
                cmd_sn: sn_at(b, 24),
                exp_stat_sn: sn_at(b, 28),
            }),
            opcode::SCSI_COMMAND => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(&b[32..48]);
                Header::ScsiCommand(ScsiCommand {
                    immediate: imm,
                    final_: fl & F != 0,
                    read: fl & 0x40 != 0,
                    write: fl & 0x20 != 0,
                    attr: TaskAttr(fl & 0x07),
                    lun: lun_at(b),
                    itt,
                    expected_data_transfer_length: u32_at(b, 20),
                    cmd_sn: sn_at(b, 24),
                    exp_stat_sn: sn_at(b, 28),
                    cdb,
                })
            }
            opcode::TASK_MGMT_REQUEST => Header::TaskMgmtRequest(TaskMgmtRequest {
                immediate: imm,
                function: fl & 0x7f,
                lun: lun_at(b),
                itt,
                referenced_task_tag: Itt(u32_at(b, 20)),
                cmd_sn: sn_at(b, 24),
                exp_stat_sn: sn_at(b, 28),
                ref_cmd_sn: sn_at(b, 32),
                exp_data_sn: sn_at(b, 36),
            }),
            opcode::LOGIN_REQUEST => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Header::LoginRequest(LoginRequest {
                    transit: fl & F != 0,
                    continue_: fl & C != 0,
                    csg: Stage::from_bits(fl >> 2),
                    nsg: Stage::from_bits(fl),
                    version_max: b[2],
                    version_min: b[3],
                    isid: Isid(isid),
                    tsih: Tsih(u16_at(b, 14)),
                    itt,
                    cid: u16_at(b, 20),
                    cmd_sn: sn_at(b, 24),
                    exp_stat_sn: sn_at(b, 28),
                })
            }
            opcode::TEXT_REQUEST => Header::TextRequest(TextRequest {
                immediate: imm,
                final_: fl & F != 0,
                continue_: fl & C != 0,
                lun: lun_at(b),
                itt,
                ttt: Ttt(u32_at(b, 20)),
                cmd_sn: sn_at(b, 24),
                exp_stat_sn: sn_at(b, 28),
            }),
            opcode::DATA_OUT => Header::DataOut(DataOut {
                final_: fl & F != 0,
                lun: lun_at(b),
                itt,
                ttt: Ttt(u32_at(b, 20)),
                exp_stat_sn: sn_at(b, 28),
                data_sn: sn_at(b, 36),
                buffer_offset: u32_at(b, 40),
            }),
            opcode::LOGOUT_REQUEST => Header::LogoutRequest(LogoutRequest {
                immediate: imm,
                reason: fl & 0x7f,
                itt,
                cid: u16_at(b, 20),
                cmd_sn: sn_at(b, 24),
                exp_stat_sn: sn_at(b, 28),
            }),
            opcode::SNACK_REQUEST => Header::SnackRequest(SnackRequest {
                snack_type: fl & 0x0f,
                lun: lun_at(b),
                itt,
                ttt: Ttt(u32_at(b, 20)),
                exp_stat_sn: sn_at(b, 28),
                beg_run: u32_at(b, 40),
                run_length: u32_at(b, 44),
            }),
            opcode::NOP_IN => Header::NopIn(NopIn {
                lun: lun_at(b),
                itt,
                ttt: Ttt(u32_at(b, 20)),
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
            }),
            opcode::SCSI_RESPONSE => Header::ScsiResponse(ScsiResponse {
                bidi_overflow: fl & 0x10 != 0,
                bidi_underflow: fl & 0x08 != 0,
                overflow: fl & 0x04 != 0,
                underflow: fl & 0x02 != 0,
                response: b[2],
                status: b[3],
                itt,
                snack_tag: u32_at(b, 20),
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
                exp_data_sn: sn_at(b, 36),
                bidi_read_residual_count: u32_at(b, 40),
                residual_count: u32_at(b, 44),
            }),
            opcode::TASK_MGMT_RESPONSE => Header::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt,
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
            }),
            opcode::LOGIN_RESPONSE => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Header::LoginResponse(LoginResponse {
                    transit: fl & F != 0,
                    continue_: fl & C != 0,
                    csg: Stage::from_bits(fl >> 2),
                    nsg: Stage::from_bits(fl),
                    version_max: b[2],
                    version_active: b[3],
                    isid: Isid(isid),
                    tsih: Tsih(u16_at(b, 14)),
                    itt,
                    stat_sn: sn_at(b, 24),
                    exp_cmd_sn: sn_at(b, 28),
                    max_cmd_sn: sn_at(b, 32),
                    status_class: b[36],
                    status_detail: b[37],
                })
            }
            opcode::TEXT_RESPONSE => Header::TextResponse(TextResponse {
                final_: fl & F != 0,
                continue_: fl & C != 0,
                lun: lun_at(b),
                itt,
                ttt: Ttt(u32_at(b, 20)),
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
            }),
            opcode::DATA_IN => Header::DataIn(DataIn {
                final_: fl & F != 0,
                acknowledge: fl & 0x40 != 0,
                overflow: fl & 0x04 != 0,
                underflow: fl & 0x02 != 0,
                status_present: fl & 0x01 != 0,
                status: b[3],
                lun: lun_at(b),
                itt,
                ttt: Ttt(u32_at(b, 20)),
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
                data_sn: sn_at(b, 36),
                buffer_offset: u32_at(b, 40),
                residual_count: u32_at(b, 44),
            }),
            opcode::LOGOUT_RESPONSE => Header::LogoutResponse(LogoutResponse {
                response: b[2],
                itt,
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
                time2wait: u16_at(b, 40),
                time2retain: u16_at(b, 42),
            }),
            opcode::R2T => Header::R2t(R2t {
                lun: lun_at(b),
                itt,
                ttt: Ttt(u32_at(b, 20)),
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
                r2t_sn: sn_at(b, 36),
                buffer_offset: u32_at(b, 40),
                desired_data_transfer_length: u32_at(b, 44),
            }),
            opcode::ASYNC_MESSAGE => Header::AsyncMessage(AsyncMessage {
                lun: lun_at(b),
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
                async_event: b[36],
                async_vcode: b[37],
                parameter1: u16_at(b, 38),
                parameter2: u16_at(b, 40),
                parameter3: u16_at(b, 42),
            }),
            opcode::REJECT => Header::Reject(Reject {
                reason: RejectReason(b[2]),
                stat_sn: sn_at(b, 24),
                exp_cmd_sn: sn_at(b, 28),
                max_cmd_sn: sn_at(b, 32),
                data_sn: sn_at(b, 36),
            }),
            _ => Header::Unknown(Box::new(*b)),
        }
    }

    /// The opcode this header encodes to.
    pub fn opcode(&self) -> u8 {
        match self {
            Header::NopOut(_) => opcode::NOP_OUT,
            Header::ScsiCommand(_) => opcode::SCSI_COMMAND,
            Header::TaskMgmtRequest(_) => opcode::TASK_MGMT_REQUEST,
            Header::LoginRequest(_) => opcode::LOGIN_REQUEST,
            Header::TextRequest(_) => opcode::TEXT_REQUEST,
            Header::DataOut(_) => opcode::DATA_OUT,
            Header::LogoutRequest(_) => opcode::LOGOUT_REQUEST,
            Header::SnackRequest(_) => opcode::SNACK_REQUEST,
            Header::NopIn(_) => opcode::NOP_IN,
            Header::ScsiResponse(_) => opcode::SCSI_RESPONSE,
            Header::TaskMgmtResponse(_) => opcode::TASK_MGMT_RESPONSE,
            Header::LoginResponse(_) => opcode::LOGIN_RESPONSE,
            Header::TextResponse(_) => opcode::TEXT_RESPONSE,
            Header::DataIn(_) => opcode::DATA_IN,
            Header::LogoutResponse(_) => opcode::LOGOUT_RESPONSE,
            Header::R2t(_) => opcode::R2T,
            Header::AsyncMessage(_) => opcode::ASYNC_MESSAGE,
            Header::Reject(_) => opcode::REJECT,
            Header::Unknown(b) => bhs_opcode(b),
        }
    }

    /// The Initiator Task Tag (`0xffffffff` for PDUs that carry none).
    pub fn itt(&self) -> Itt {
        match self {
            Header::NopOut(h) => h.itt,
            Header::ScsiCommand(h) => h.itt,
            Header::TaskMgmtRequest(h) => h.itt,
            Header::LoginRequest(h) => h.itt,
            Header::TextRequest(h) => h.itt,
            Header::DataOut(h) => h.itt,
            Header::LogoutRequest(h) => h.itt,
            Header::SnackRequest(h) => h.itt,
            Header::NopIn(h) => h.itt,
            Header::ScsiResponse(h) => h.itt,
            Header::TaskMgmtResponse(h) => h.itt,
            Header::LoginResponse(h) => h.itt,
            Header::TextResponse(h) => h.itt,
            Header::DataIn(h) => h.itt,
            Header::LogoutResponse(h) => h.itt,
            Header::R2t(h) => h.itt,
            Header::AsyncMessage(_) | Header::Reject(_) => Itt::RESERVED,
            Header::Unknown(b) => bhs_itt(b),
        }
    }

    /// Writes the 48-byte BHS with the given AHS and data segment lengths.
    ///
    /// # Panics
    /// If `total_ahs_len` is not a multiple of 4 or exceeds 1020 bytes, or `data_len` exceeds
    /// 2^24 - 1: callers build these from [`Pdu`]s whose sizes they control.
    pub fn write(&self, total_ahs_len: usize, data_len: usize) -> Bhs {
        assert!(
            total_ahs_len.is_multiple_of(4) && total_ahs_len <= 255 * 4,
            "AHS length"
        );
        assert!(data_len < (1 << 24), "DataSegmentLength is 24 bits");
        let mut b = [0u8; BHS_LEN];
        if let Header::Unknown(raw) = self {
            b.copy_from_slice(&raw[..]);
        }
        b[0] = self.opcode();
        b[4] = (total_ahs_len / 4) as u8;
        b[5] = (data_len >> 16) as u8;
        b[6] = (data_len >> 8) as u8;
        b[7] = data_len as u8;
        put_u32(&mut b, 16, self.itt().0);
        let imm = |v: bool| if v { IMMEDIATE } else { 0 };
        let bit = |v: bool, m: u8| if v { m } else { 0 };
        match self {
            Header::NopOut(h) => {
                b[0] |= imm(h.immediate);
                b[1] = F;
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.ttt.0);
                put_u32(&mut b, 24, h.cmd_sn.0);
                put_u32(&mut b, 28, h.exp_stat_sn.0);
            }
            Header::ScsiCommand(h) => {
                b[0] |= imm(h.immediate);
                b[1] = bit(h.final_, F) | bit(h.read, 0x40) | bit(h.write, 0x20) | (h.attr.0 & 7);
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.expected_data_transfer_length);
                put_u32(&mut b, 24, h.cmd_sn.0);
                put_u32(&mut b, 28, h.exp_stat_sn.0);
                b[32..48].copy_from_slice(&h.cdb);
            }
            Header::TaskMgmtRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = F | (h.function & 0x7f);
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.referenced_task_tag.0);
                put_u32(&mut b, 24, h.cmd_sn.0);
                put_u32(&mut b, 28, h.exp_stat_sn.0);
                put_u32(&mut b, 32, h.ref_cmd_sn.0);
                put_u32(&mut b, 36, h.exp_data_sn.0);
            }
            Header::LoginRequest(h) => {
                // RFC 7143 §11.12: the I bit is always 1 in a Login Request.
                b[0] |= IMMEDIATE;
                b[1] = bit(h.transit, F) | bit(h.continue_, C) | (h.csg.bits() << 2) | h.nsg.bits();
                b[2] = h.version_max;
                b[3] = h.version_min;
                b[8..14].copy_from_slice(&h.isid.0);
                put_u16(&mut b, 14, h.tsih.0);
                put_u16(&mut b, 20, h.cid);
                put_u32(&mut b, 24, h.cmd_sn.0);
                put_u32(&mut b, 28, h.exp_stat_sn.0);
            }
            Header::TextRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = bit(h.final_, F) | bit(h.continue_, C);
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.ttt.0);
                put_u32(&mut b, 24, h.cmd_sn.0);
                put_u32(&mut b, 28, h.exp_stat_sn.0);
            }
            Header::DataOut(h) => {
                b[1] = bit(h.final_, F);
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.ttt.0);
                put_u32(&mut b, 28, h.exp_stat_sn.0);
                put_u32(&mut b, 36, h.data_sn.0);
                put_u32(&mut b, 40, h.buffer_offset);
            }
            Header::LogoutRequest(h) => {
                b[0] |= imm(h.immediate);
                b[1] = F | (h.reason & 0x7f);
                put_u16(&mut b, 20, h.cid);
                put_u32(&mut b, 24, h.cmd_sn.0);
                put_u32(&mut b, 28, h.exp_stat_sn.0);
            }
            Header::SnackRequest(h) => {
                b[1] = F | (h.snack_type & 0x0f);
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.ttt.0);
                put_u32(&mut b, 28, h.exp_stat_sn.0);
                put_u32(&mut b, 40, h.beg_run);
                put_u32(&mut b, 44, h.run_length);
            }
            Header::NopIn(h) => {
                b[1] = F;
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.ttt.0);
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
            }
            Header::ScsiResponse(h) => {
                b[1] = F
                    | bit(h.bidi_overflow, 0x10)
                    | bit(h.bidi_underflow, 0x08)
                    | bit(h.overflow, 0x04)
                    | bit(h.underflow, 0x02);
                b[2] = h.response;
                b[3] = h.status;
                put_u32(&mut b, 20, h.snack_tag);
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
                put_u32(&mut b, 36, h.exp_data_sn.0);
                put_u32(&mut b, 40, h.bidi_read_residual_count);
                put_u32(&mut b, 44, h.residual_count);
            }
            Header::TaskMgmtResponse(h) => {
                b[1] = F;
                b[2] = h.response;
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
            }
            Header::LoginResponse(h) => {
                b[1] = bit(h.transit, F) | bit(h.continue_, C) | (h.csg.bits() << 2) | h.nsg.bits();
                b[2] = h.version_max;
                b[3] = h.version_active;
                b[8..14].copy_from_slice(&h.isid.0);
                put_u16(&mut b, 14, h.tsih.0);
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
                b[36] = h.status_class;
                b[37] = h.status_detail;
            }
            Header::TextResponse(h) => {
                b[1] = bit(h.final_, F) | bit(h.continue_, C);
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.ttt.0);
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
            }
            Header::DataIn(h) => {
                b[1] = bit(h.final_, F)
                    | bit(h.acknowledge, 0x40)
                    | bit(h.overflow, 0x04)
                    | bit(h.underflow, 0x02)
                    | bit(h.status_present, 0x01);
                b[3] = h.status;
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.ttt.0);
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
                put_u32(&mut b, 36, h.data_sn.0);
                put_u32(&mut b, 40, h.buffer_offset);
                put_u32(&mut b, 44, h.residual_count);
            }
            Header::LogoutResponse(h) => {
                b[1] = F;
                b[2] = h.response;
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
                put_u16(&mut b, 40, h.time2wait);
                put_u16(&mut b, 42, h.time2retain);
            }
            Header::R2t(h) => {
                b[1] = F;
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 20, h.ttt.0);
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
                put_u32(&mut b, 36, h.r2t_sn.0);
                put_u32(&mut b, 40, h.buffer_offset);
                put_u32(&mut b, 44, h.desired_data_transfer_length);
            }
            Header::AsyncMessage(h) => {
                b[1] = F;
                b[8..16].copy_from_slice(&h.lun.0);
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
                b[36] = h.async_event;
                b[37] = h.async_vcode;
                put_u16(&mut b, 38, h.parameter1);
                put_u16(&mut b, 40, h.parameter2);
                put_u16(&mut b, 42, h.parameter3);
            }
            Header::Reject(h) => {
                b[1] = F;
                b[2] = h.reason.0;
                put_u32(&mut b, 24, h.stat_sn.0);
                put_u32(&mut b, 28, h.exp_cmd_sn.0);
                put_u32(&mut b, 32, h.max_cmd_sn.0);
                put_u32(&mut b, 36, h.data_sn.0);
            }
            Header::Unknown(raw) => {
                b[0] = raw[0];
            }
        }
        b
    }
}
