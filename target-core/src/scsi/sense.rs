//! Status codes, sense data and the errors that carry them (SPC-4 §4.5, SAM-5 §5.3).
//!
//! Every [`ScsiError`] knows the sense data it becomes ([`ScsiError::sense`]); a command
//! handler returns `Err(ScsiError)` and [`super::ScsiResult::from_error`] turns it into
//! CHECK CONDITION with that sense.

use crate::lun::BackendError;

/// SAM-5 §5.3.1 status codes.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// A sense key (SPC-4 §4.5.6, table 27). An open set: unknown values pass through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SenseKey(pub u8);

impl SenseKey {
    pub const NO_SENSE: SenseKey = SenseKey(0x0);
    pub const RECOVERED_ERROR: SenseKey = SenseKey(0x1);
    pub const NOT_READY: SenseKey = SenseKey(0x2);
    pub const MEDIUM_ERROR: SenseKey = SenseKey(0x3);
    pub const HARDWARE_ERROR: SenseKey = SenseKey(0x4);
    pub const ILLEGAL_REQUEST: SenseKey = SenseKey(0x5);
    pub const UNIT_ATTENTION: SenseKey = SenseKey(0x6);
    pub const DATA_PROTECT: SenseKey = SenseKey(0x7);
    pub const ABORTED_COMMAND: SenseKey = SenseKey(0xB);
    pub const MISCOMPARE: SenseKey = SenseKey(0xE);
}

/// Sense data: key, additional sense code and qualifier, plus the optional INFORMATION and
/// SENSE KEY SPECIFIC fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (e.g. the offset of a miscompare), if valid.
    pub info: Option<u64>,
    /// The three SENSE KEY SPECIFIC bytes, SKSV bit included, if valid.
    pub sks: Option<[u8; 3]>,
}

/// Length of fixed-format sense data as we build it (SPC-4 §4.5.3: 18 bytes with an ADDITIONAL
/// SENSE LENGTH of 10).
pub const FIXED_SENSE_LEN: usize = 18;

/// Upper bound of descriptor-format sense data as we build it: header, information
/// descriptor, sense key specific descriptor.
pub const MAX_DESCRIPTOR_SENSE_LEN: usize = 8 + 12 + 8;

impl Sense {
    /// Sense data without INFORMATION or SENSE KEY SPECIFIC fields.
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            sks: None,
        }
    }

    /// NO SENSE, NO ADDITIONAL SENSE INFORMATION: what REQUEST SENSE reports when nothing is
    /// pending.
    pub const NO_SENSE: Sense = Sense::new(SenseKey::NO_SENSE, 0x00, 0x00);

    /// Fixed-format sense data (SPC-4 §4.5.3), response code 70h (current error).
    ///
    /// SPC-4 §4.5.3: "If the information field contains a value that is not valid or is too
    /// large to fit in the INFORMATION field, the VALID bit shall be set to zero". An INFORMATION
    /// value above `u32::MAX` is therefore dropped here; descriptor format carries 8 bytes.
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key.0 & 0x0F;
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(sks) = self.sks {
            b[15..18].copy_from_slice(&sks);
        }
        b
    }

    /// Descriptor-format sense data (SPC-4 §4.5.2), response code 72h, with an information
    /// descriptor (§4.5.2.2) and a sense key specific descriptor (§4.5.2.4) when those fields
    /// are set. Returns the buffer and the number of valid bytes in it.
    pub fn to_descriptor(&self) -> ([u8; MAX_DESCRIPTOR_SENSE_LEN], usize) {
        let mut b = [0u8; MAX_DESCRIPTOR_SENSE_LEN];
        b[0] = 0x72;
        b[1] = self.key.0 & 0x0F;
        b[2] = self.asc;
        b[3] = self.ascq;
        let mut n = 8;
        if let Some(info) = self.info {
            // Information descriptor: type 00h, additional length 0Ah, VALID bit.
            b[n] = 0x00;
            b[n + 1] = 0x0A;
            b[n + 2] = 0x80;
            b[n + 4..n + 12].copy_from_slice(&info.to_be_bytes());
            n += 12;
        }
        if let Some(sks) = self.sks {
            // Sense key specific descriptor: type 02h, additional length 06h.
            b[n] = 0x02;
            b[n + 1] = 0x06;
            b[n + 4..n + 7].copy_from_slice(&sks);
            n += 8;
        }
        b[7] = (n - 8) as u8;
        (b, n)
    }
}

/// Unit attention conditions this target establishes (SAM-5 §5.14, SPC-4 table 28 codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnitAttention {
    /// 29h/00h POWER ON, RESET, OR BUS DEVICE RESET OCCURRED: a new I_T nexus.
    PowerOnReset,
    /// 29h/03h BUS DEVICE RESET FUNCTION OCCURRED: a LOGICAL UNIT RESET from another nexus.
    LunReset,
    /// 29h/07h I_T NEXUS LOSS OCCURRED.
    NexusLoss,
    /// 2Ah/01h MODE PARAMETERS CHANGED: another nexus ran MODE SELECT.
    ModeParametersChanged,
    /// 2Ah/03h RESERVATIONS PREEMPTED: another nexus ran PERSISTENT RESERVE OUT CLEAR (or a
    /// PREEMPT that released the reservation this nexus was registered under).
    ReservationsPreempted,
    /// 2Ah/04h RESERVATIONS RELEASED: a registrants-only or all-registrants persistent
    /// reservation was released by another nexus.
    ReservationsReleased,
    /// 2Ah/05h REGISTRATIONS PREEMPTED: another nexus's PREEMPT removed this nexus's
    /// registration.
    RegistrationsPreempted,
    /// 2Ah/06h ASYMMETRIC ACCESS STATE CHANGED: a target port group changed state.
    AsymmetricAccessStateChanged,
    /// 2Ah/09h CAPACITY DATA HAS CHANGED: the store was resized.
    CapacityDataChanged,
    /// 2Fh/00h COMMANDS CLEARED BY ANOTHER INITIATOR: another I_T nexus's CLEAR TASK SET
    /// aborted commands of this one (SAM-5 §5.6, TAS 0).
    CommandsClearedByAnotherInitiator,
    /// 3Fh/03h INQUIRY DATA HAS CHANGED.
    InquiryDataChanged,
    /// 3Fh/0Eh REPORTED LUNS DATA HAS CHANGED: a LUN was added to or removed from the target.
    ReportedLunsDataChanged,
}

impl UnitAttention {
    /// The UNIT ATTENTION sense for this condition.
    pub const fn sense(self) -> Sense {
        let (asc, ascq) = match self {
            UnitAttention::PowerOnReset => (0x29, 0x00),
            UnitAttention::LunReset => (0x29, 0x03),
            UnitAttention::NexusLoss => (0x29, 0x07),
            UnitAttention::ModeParametersChanged => (0x2A, 0x01),
            UnitAttention::ReservationsPreempted => (0x2A, 0x03),
            UnitAttention::ReservationsReleased => (0x2A, 0x04),
            UnitAttention::RegistrationsPreempted => (0x2A, 0x05),
            UnitAttention::AsymmetricAccessStateChanged => (0x2A, 0x06),
            UnitAttention::CapacityDataChanged => (0x2A, 0x09),
            UnitAttention::CommandsClearedByAnotherInitiator => (0x2F, 0x00),
            UnitAttention::InquiryDataChanged => (0x3F, 0x03),
            UnitAttention::ReportedLunsDataChanged => (0x3F, 0x0E),
        };
        Sense::new(SenseKey::UNIT_ATTENTION, asc, ascq)
    }

    /// Reset-class conditions (29h/xx) outrank the others: SAM-5 §5.14 lets a device server
    /// report the highest-priority condition first, and a reset implies every other change.
    pub(crate) const fn is_reset(self) -> bool {
        matches!(
            self,
            UnitAttention::PowerOnReset | UnitAttention::LunReset | UnitAttention::NexusLoss
        )
    }
}

/// A command failure: CHECK CONDITION with the sense from [`ScsiError::sense`], except
/// [`ScsiError::ReservationConflict`], which is RESERVATION CONFLICT status without sense data
/// ([`ScsiError::status`] says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScsiError {
    /// ILLEGAL REQUEST, 20h/00h INVALID COMMAND OPERATION CODE.
    #[error("invalid command operation code")]
    InvalidOpcode,
    /// ILLEGAL REQUEST, 24h/00h INVALID FIELD IN CDB, with a field pointer (SPC-4 §4.5.2.4.2)
    /// to `byte` and, if given, `bit` (the most significant bit of the bad field).
    #[error("invalid field in CDB (byte {byte}, bit {bit:?})")]
    InvalidFieldInCdb { byte: u16, bit: Option<u8> },
    /// ILLEGAL REQUEST, 26h/00h INVALID FIELD IN PARAMETER LIST, with a field pointer into the
    /// parameter list.
    #[error("invalid field in parameter list (byte {byte}, bit {bit:?})")]
    InvalidFieldInParameterList { byte: u16, bit: Option<u8> },
    /// ILLEGAL REQUEST, 1Ah/00h PARAMETER LIST LENGTH ERROR.
    #[error("parameter list length error")]
    ParameterListLengthError,
    /// ILLEGAL REQUEST, 21h/00h LOGICAL BLOCK ADDRESS OUT OF RANGE.
    #[error("logical block address out of range")]
    LbaOutOfRange,
    /// ILLEGAL REQUEST, 25h/00h LOGICAL UNIT NOT SUPPORTED.
    #[error("logical unit not supported")]
    LunNotSupported,
    /// ILLEGAL REQUEST, 39h/00h SAVING PARAMETERS NOT SUPPORTED.
    #[error("saving parameters not supported")]
    SavingParametersNotSupported,
    /// DATA PROTECT, 27h/00h WRITE PROTECTED.
    #[error("write protected")]
    WriteProtected,
    /// MEDIUM ERROR, 11h/00h UNRECOVERED READ ERROR.
    #[error("unrecovered read error")]
    UnrecoveredReadError,
    /// MEDIUM ERROR, 0Ch/00h WRITE ERROR.
    #[error("write error")]
    WriteError,
    /// MISCOMPARE, 1Dh/00h MISCOMPARE DURING VERIFY OPERATION; INFORMATION holds the offset of
    /// the first differing byte in the Data-Out buffer (SBC-3 §5.33, §5.2).
    #[error("miscompare at data-out offset {offset}")]
    Miscompare { offset: u64 },
    /// HARDWARE ERROR, 44h/00h INTERNAL TARGET FAILURE.
    #[error("internal target failure")]
    InternalTargetFailure,
    /// ILLEGAL REQUEST, 0Eh/03h INVALID FIELD IN COMMAND INFORMATION UNIT: the transport's
    /// expected data transfer length disagrees with the CDB (FCP-4 §9.4.2 option b, which
    /// iSCSI targets apply the same way; no data is transferred).
    #[error("invalid field in command information unit")]
    InvalidFieldInCommandInformationUnit,
    /// NOT READY, 04h LOGICAL UNIT NOT ACCESSIBLE: the command came through a target port
    /// group whose asymmetric access state does not serve it (SPC-4 §5.15.2.4): ASCQ 0Ah
    /// transitioning, 0Bh standby, 0Ch unavailable.
    #[error("logical unit not accessible: target port group {0:?}")]
    NotAccessible(super::alua::AccessState),
    /// NOT READY, 04h/1Bh LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS (SBC-3 §4.11).
    #[error("sanitize in progress")]
    SanitizeInProgress,
    /// MEDIUM ERROR, 31h/03h SANITIZE COMMAND FAILED: the LU is in sanitize failure mode.
    #[error("sanitize failed")]
    SanitizeFailed,
    /// UNIT ATTENTION with the condition's code.
    #[error("unit attention {0:?}")]
    UnitAttention(UnitAttention),
    /// RESERVATION CONFLICT status (SAM-5 §5.3.1), no sense data: the command conflicts with a
    /// reservation held through another I_T nexus.
    #[error("reservation conflict")]
    ReservationConflict,
    /// ILLEGAL REQUEST, 26h/04h INVALID RELEASE OF PERSISTENT RESERVATION (SPC-4 §5.12.11.2:
    /// RELEASE by the holder with a TYPE or SCOPE that differs from the reservation's).
    #[error("invalid release of persistent reservation")]
    InvalidReleaseOfPersistentReservation,
    /// ILLEGAL REQUEST, 55h/04h INSUFFICIENT REGISTRATION RESOURCES: the LU keeps no more
    /// persistent reservation registrations.
    #[error("insufficient registration resources")]
    InsufficientRegistrationResources,
}

impl ScsiError {
    /// INVALID FIELD IN CDB pointing at a whole byte.
    pub const fn cdb(byte: u16) -> ScsiError {
        ScsiError::InvalidFieldInCdb { byte, bit: None }
    }

    /// INVALID FIELD IN CDB pointing at `bit` of `byte`.
    pub const fn cdb_bit(byte: u16, bit: u8) -> ScsiError {
        ScsiError::InvalidFieldInCdb {
            byte,
            bit: Some(bit),
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at a whole byte.
    pub const fn param(byte: u16) -> ScsiError {
        ScsiError::InvalidFieldInParameterList { byte, bit: None }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `bit` of `byte`.
    pub const fn param_bit(byte: u16, bit: u8) -> ScsiError {
        ScsiError::InvalidFieldInParameterList {
            byte,
            bit: Some(bit),
        }
    }

    /// The SCSI status this error is reported with: RESERVATION CONFLICT for
    /// [`ScsiError::ReservationConflict`], CHECK CONDITION for everything else.
    pub const fn status(&self) -> u8 {
        match self {
            ScsiError::ReservationConflict => status::RESERVATION_CONFLICT,
            _ => status::CHECK_CONDITION,
        }
    }

    /// The sense data this error is reported with. RESERVATION CONFLICT carries no sense
    /// data (check [`ScsiError::status`] first); it maps to NO SENSE here.
    pub fn sense(&self) -> Sense {
        use SenseKey as K;
        match *self {
            ScsiError::InvalidOpcode => Sense::new(K::ILLEGAL_REQUEST, 0x20, 0x00),
            ScsiError::InvalidFieldInCdb { byte, bit } => Sense {
                sks: Some(field_pointer(true, byte, bit)),
                ..Sense::new(K::ILLEGAL_REQUEST, 0x24, 0x00)
            },
            ScsiError::InvalidFieldInParameterList { byte, bit } => Sense {
                sks: Some(field_pointer(false, byte, bit)),
                ..Sense::new(K::ILLEGAL_REQUEST, 0x26, 0x00)
            },
            ScsiError::ParameterListLengthError => Sense::new(K::ILLEGAL_REQUEST, 0x1A, 0x00),
            ScsiError::LbaOutOfRange => Sense::new(K::ILLEGAL_REQUEST, 0x21, 0x00),
            ScsiError::LunNotSupported => Sense::new(K::ILLEGAL_REQUEST, 0x25, 0x00),
            ScsiError::SavingParametersNotSupported => Sense::new(K::ILLEGAL_REQUEST, 0x39, 0x00),
            ScsiError::WriteProtected => Sense::new(K::DATA_PROTECT, 0x27, 0x00),
            ScsiError::UnrecoveredReadError => Sense::new(K::MEDIUM_ERROR, 0x11, 0x00),
            ScsiError::WriteError => Sense::new(K::MEDIUM_ERROR, 0x0C, 0x00),
            ScsiError::Miscompare { offset } => Sense {
                info: Some(offset),
                ..Sense::new(K::MISCOMPARE, 0x1D, 0x00)
            },
            ScsiError::InternalTargetFailure => Sense::new(K::HARDWARE_ERROR, 0x44, 0x00),
            ScsiError::InvalidFieldInCommandInformationUnit => {
                Sense::new(K::ILLEGAL_REQUEST, 0x0e, 0x03)
            }
            ScsiError::NotAccessible(state) => {
                use super::alua::AccessState as A;
                let ascq = match state {
                    A::Transitioning => 0x0A,
                    A::Standby => 0x0B,
                    // Active states never refuse; unavailable is the closest answer.
                    A::Unavailable | A::ActiveOptimized | A::ActiveNonOptimized => 0x0C,
                };
                Sense::new(K::NOT_READY, 0x04, ascq)
            }
            ScsiError::SanitizeInProgress => Sense::new(K::NOT_READY, 0x04, 0x1B),
            ScsiError::SanitizeFailed => Sense::new(K::MEDIUM_ERROR, 0x31, 0x03),
            ScsiError::UnitAttention(ua) => ua.sense(),
            ScsiError::ReservationConflict => Sense::NO_SENSE,
            ScsiError::InvalidReleaseOfPersistentReservation => {
                Sense::new(K::ILLEGAL_REQUEST, 0x26, 0x04)
            }
            ScsiError::InsufficientRegistrationResources => {
                Sense::new(K::ILLEGAL_REQUEST, 0x55, 0x04)
            }
        }
    }

    /// A failed store read: MEDIUM ERROR, UNRECOVERED READ ERROR.
    pub(crate) fn from_read(e: BackendError) -> ScsiError {
        tracing::warn!(error = %e, "store read failed");
        ScsiError::UnrecoveredReadError
    }

    /// A failed store write, flush or discard: MEDIUM ERROR, WRITE ERROR.
    pub(crate) fn from_write(e: BackendError) -> ScsiError {
        tracing::warn!(error = %e, "store write failed");
        ScsiError::WriteError
    }
}

/// SPC-4 §4.5.2.4.2 field pointer sense key specific bytes: SKSV, C/D (CDB or parameter
/// list), BPV + BIT POINTER, FIELD POINTER.
fn field_pointer(in_cdb: bool, byte: u16, bit: Option<u8>) -> [u8; 3] {
    let mut b0 = 0x80;
    if in_cdb {
        b0 |= 0x40;
    }
    if let Some(bit) = bit {
        b0 |= 0x08 | (bit & 0x07);
    }
    let [hi, lo] = byte.to_be_bytes();
    [b0, hi, lo]
}
