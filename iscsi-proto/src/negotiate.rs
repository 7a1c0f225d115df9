//! Operational key negotiation (RFC 7143 §6.2 and §13), target side.
//!
//! A [`Negotiator`] answers the initiator's operational keys one by one, each by the rule of
//! its key (list, minimum, maximum, AND, OR, declarative), adds the target's own declarations
//! and offers, and finally yields the negotiated [`SessionParams`]. Declarative login keys
//! (InitiatorName, TargetName, SessionType, aliases) and security keys (AuthMethod, CHAP_*) are
//! handled by [`crate::login`]; [`classify`] tells which is which.
//!
//! # Rules common to all keys (RFC 7143 §6.2)
//! - "the Text Response for a key that was not understood MUST be key=NotUnderstood."
//! - "If a specific key is not relevant for the current negotiation, the responder may answer
//!   with the constant "Irrelevant" for all types of negotiation." We do so for session keys
//!   in a discovery session and for leading-only keys in a non-leading login.
//! - Offering "Reject", "Irrelevant" or "NotUnderstood" is a protocol error.
//! - A malformed or out-of-range offer is answered "Reject" and the key keeps its default
//!   ("If the acceptor sends "Reject" as an answer, the negotiated key is left at its current
//!   value (or default if no value was set)."), except a malformed declaration of
//!   MaxRecvDataSegmentLength, which we cannot answer and which fails the login.

use crate::text::{self, TextBuilder};
use crate::types::{Isid, Tsih};

/// RFC 7143 §13.12 default MaxRecvDataSegmentLength ("Default is 8192 bytes."), also in force
/// during login.
pub const DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 8192;
/// RFC 7143 §13.13: "Default is 262144 (256 Kbytes)."
pub const DEFAULT_MAX_BURST_LENGTH: u32 = 262_144;
/// RFC 7143 §13.14: "Default is 65536 (64 Kbytes)."
pub const DEFAULT_FIRST_BURST_LENGTH: u32 = 65_536;
/// Lower bound of the data length keys (RFC 7143 §13.12–§13.14,
/// "<numerical-value-512-to-(2**24 - 1)>").
pub const MIN_DATA_LENGTH: u32 = 512;
/// Upper bound of the data length keys.
pub const MAX_DATA_LENGTH: u32 = (1 << 24) - 1;
/// The iSCSIProtocolLevel this target implements (RFC 7143 §13.24: RFC 7143 is level 1).
pub const PROTOCOL_LEVEL_IMPLEMENTED: u64 = 1;

/// Key names, RFC spelling.
pub mod key {
    pub const HEADER_DIGEST: &str = "HeaderDigest";
    pub const DATA_DIGEST: &str = "DataDigest";
    pub const MAX_CONNECTIONS: &str = "MaxConnections";
    pub const SEND_TARGETS: &str = "SendTargets";
    pub const TARGET_NAME: &str = "TargetName";
    pub const INITIATOR_NAME: &str = "InitiatorName";
    pub const TARGET_ALIAS: &str = "TargetAlias";
    pub const INITIATOR_ALIAS: &str = "InitiatorAlias";
    pub const TARGET_ADDRESS: &str = "TargetAddress";
    pub const TARGET_PORTAL_GROUP_TAG: &str = "TargetPortalGroupTag";
    pub const INITIAL_R2T: &str = "InitialR2T";
    pub const IMMEDIATE_DATA: &str = "ImmediateData";
    pub const MAX_RECV_DATA_SEGMENT_LENGTH: &str = "MaxRecvDataSegmentLength";
    pub const MAX_BURST_LENGTH: &str = "MaxBurstLength";
    pub const FIRST_BURST_LENGTH: &str = "FirstBurstLength";
    pub const DEFAULT_TIME2WAIT: &str = "DefaultTime2Wait";
    pub const DEFAULT_TIME2RETAIN: &str = "DefaultTime2Retain";
    pub const MAX_OUTSTANDING_R2T: &str = "MaxOutstandingR2T";
    pub const DATA_PDU_IN_ORDER: &str = "DataPDUInOrder";
    pub const DATA_SEQUENCE_IN_ORDER: &str = "DataSequenceInOrder";
    pub const ERROR_RECOVERY_LEVEL: &str = "ErrorRecoveryLevel";
    pub const SESSION_TYPE: &str = "SessionType";
    pub const AUTH_METHOD: &str = "AuthMethod";
    pub const TASK_REPORTING: &str = "TaskReporting";
    pub const PROTOCOL_LEVEL: &str = "iSCSIProtocolLevel";
    pub const IF_MARKER: &str = "IFMarker";
    pub const OF_MARKER: &str = "OFMarker";
    pub const IF_MARK_INT: &str = "IFMarkInt";
    pub const OF_MARK_INT: &str = "OFMarkInt";
    pub const NODE_ARCHITECTURE: &str = "X#NodeArchitecture";
}

/// Session type (RFC 7143 §13.21: "SessionType= <Discovery|Normal> Default is Normal.").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SessionType {
    Discovery,
    #[default]
    Normal,
}

impl SessionType {
    /// Parses the SessionType value; `None` for anything else.
    pub fn parse(s: &str) -> Option<SessionType> {
        match s {
            "Discovery" => Some(SessionType::Discovery),
            "Normal" => Some(SessionType::Normal),
            _ => None,
        }
    }
}

/// What the target can do: its side of every negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetLimits {
    /// Our MaxRecvDataSegmentLength, declared in every operational stage.
    pub max_recv_data_segment_length: u32,
    /// Our MaxBurstLength (result function: minimum).
    pub max_burst_length: u32,
    /// Our FirstBurstLength (minimum). Must not exceed `max_burst_length`.
    pub first_burst_length: u32,
    /// Our MaxOutstandingR2T (minimum), 1..=65535.
    pub max_outstanding_r2t: u16,
    /// Whether we accept ImmediateData=Yes (AND).
    pub immediate_data: bool,
    /// Whether we accept InitialR2T=No (OR): unsolicited Data-Out PDUs.
    pub allow_initial_r2t_no: bool,
    /// Whether we agree to CRC32C header digests.
    pub header_digest: bool,
    /// Whether we agree to CRC32C data digests.
    pub data_digest: bool,
    /// Highest ErrorRecoveryLevel we implement (minimum), 0..=2.
    pub error_recovery_level: u8,
    /// MaxConnections per session (minimum), 1..=65535.
    pub max_connections: u16,
    /// Our DefaultTime2Wait (maximum), 0..=3600.
    pub default_time2wait: u16,
    /// Our DefaultTime2Retain (minimum), 0..=3600.
    pub default_time2retain: u16,
}

impl Default for TargetLimits {
    fn default() -> Self {
        TargetLimits {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: DEFAULT_FIRST_BURST_LENGTH,
            max_outstanding_r2t: 1,
            immediate_data: true,
            allow_initial_r2t_no: true,
            header_digest: true,
            data_digest: true,
            error_recovery_level: 0,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

impl TargetLimits {
    /// Checks every field against its key's range.
    ///
    /// # Errors
    /// A description of the first bad field.
    pub fn check(&self) -> Result<(), &'static str> {
        let data = MIN_DATA_LENGTH..=MAX_DATA_LENGTH;
        if !data.contains(&self.max_recv_data_segment_length) {
            return Err("MaxRecvDataSegmentLength must be 512..=16777215");
        }
        if !data.contains(&self.max_burst_length) || !data.contains(&self.first_burst_length) {
            return Err("MaxBurstLength and FirstBurstLength must be 512..=16777215");
        }
        // RFC 7143 §13.14: "FirstBurstLength MUST NOT exceed MaxBurstLength."
        if self.first_burst_length > self.max_burst_length {
            return Err("FirstBurstLength must not exceed MaxBurstLength");
        }
        if self.max_outstanding_r2t == 0 || self.max_connections == 0 {
            return Err("MaxOutstandingR2T and MaxConnections must be at least 1");
        }
        if self.error_recovery_level > 2 {
            return Err("ErrorRecoveryLevel must be 0..=2");
        }
        if self.default_time2wait > 3600 || self.default_time2retain > 3600 {
            return Err("DefaultTime2Wait and DefaultTime2Retain must be 0..=3600");
        }
        Ok(())
    }
}

/// Everything the full feature phase needs from login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// `None` for discovery sessions.
    pub target_name: Option<String>,
    pub isid: Isid,
    /// The TSIH of the login request: zero for a new session (the caller assigns one).
    pub tsih: Tsih,
    /// Connection ID of this connection.
    pub cid: u16,
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
    /// The initiator's declared MaxRecvDataSegmentLength: the largest data segment we may
    /// send it.
    pub max_send_data_segment_length: u32,
    /// Our declared MaxRecvDataSegmentLength: the largest data segment we accept.
    pub max_recv_data_segment_length: u32,
    /// The CHAP name the initiator authenticated with, if any.
    pub chap_user: Option<String>,
}

/// The identity half of [`SessionParams`], known to the login machine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionIdentity {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub target_name: Option<String>,
    pub isid: Isid,
    pub tsih: Tsih,
    pub cid: u16,
    pub chap_user: Option<String>,
}

/// Where a key may appear (RFC 7143 §13, "Use").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyClass {
    /// Declarative, any stage: InitiatorName, TargetName, SessionType, aliases,
    /// TargetAddress, TargetPortalGroupTag, X#NodeArchitecture.
    Declarative,
    /// Security stage only: AuthMethod and the CHAP_* keys.
    Security,
    /// Operational stage only: everything [`Negotiator::handle_key`] answers.
    Operational,
    /// Full feature phase only: SendTargets.
    FullFeatureOnly,
    /// Not a key we know (answered NotUnderstood in any stage).
    Unknown,
}

/// Classifies a key name.
pub fn classify(k: &str) -> KeyClass {
    use key::*;
    match k {
        INITIATOR_NAME
        | TARGET_NAME
        | SESSION_TYPE
        | INITIATOR_ALIAS
        | TARGET_ALIAS
        | TARGET_ADDRESS
        | TARGET_PORTAL_GROUP_TAG
        | NODE_ARCHITECTURE => KeyClass::Declarative,
        AUTH_METHOD => KeyClass::Security,
        _ if k.starts_with("CHAP_") => KeyClass::Security,
        HEADER_DIGEST
        | DATA_DIGEST
        | MAX_CONNECTIONS
        | INITIAL_R2T
        | IMMEDIATE_DATA
        | MAX_RECV_DATA_SEGMENT_LENGTH
        | MAX_BURST_LENGTH
        | FIRST_BURST_LENGTH
        | DEFAULT_TIME2WAIT
        | DEFAULT_TIME2RETAIN
        | MAX_OUTSTANDING_R2T
        | DATA_PDU_IN_ORDER
        | DATA_SEQUENCE_IN_ORDER
        | ERROR_RECOVERY_LEVEL
        | TASK_REPORTING
        | PROTOCOL_LEVEL
        | IF_MARKER
        | OF_MARKER
        | IF_MARK_INT
        | OF_MARK_INT => KeyClass::Operational,
        SEND_TARGETS => KeyClass::FullFeatureOnly,
        _ => KeyClass::Unknown,
    }
}

/// Negotiation failures. Each fails the login with an initiator error (0x0200).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NegotiationError {
    /// RFC 7143 §6.2: "Violation of this rule is a protocol error (in particular, the use of
    /// "Reject", "Irrelevant", and "NotUnderstood" as proposed values)."
    #[error("reserved constant offered as the value of {key}")]
    ReservedValueOffered { key: &'static str },
    /// A key offered twice in one login (RFC 7143 §6.2: "Sending the key again would be a
    /// re-negotiation and is forbidden for many keys.").
    #[error("{key} negotiated twice")]
    Renegotiated { key: &'static str },
    /// A declaration we cannot answer with Reject and cannot honour.
    #[error("invalid value for {key}")]
    InvalidDeclaration { key: &'static str },
    /// The initiator refused an offer whose default we cannot accept.
    #[error("initiator refused {key}, whose default the target cannot accept")]
    OfferRefused { key: &'static str },
}

/// The negotiation state of one login, target side.
#[derive(Debug, Clone)]
pub struct Negotiator {
    limits: TargetLimits,
    session_type: SessionType,
    leading: bool,
    header_digest: bool,
    data_digest: bool,
    max_connections: u16,
    initial_r2t: bool,
    immediate_data: bool,
    max_burst_length: u32,
    first_burst_length: u32,
    default_time2wait: u16,
    default_time2retain: u16,
    max_outstanding_r2t: u16,
    data_pdu_in_order: bool,
    data_sequence_in_order: bool,
    error_recovery_level: u8,
    max_send_data_segment_length: u32,
    /// Keys settled in this login (offered by either side and answered).
    done: Vec<&'static str>,
    /// Keys we offered that await the initiator's answer.
    offered: Vec<&'static str>,
    /// Whether we declared our MaxRecvDataSegmentLength.
    declared: bool,
    /// Whether we already made our own offers.
    offers_made: bool,
}

/// Reads an in-range number or answers Reject.
fn number_or_reject(
    out: &mut TextBuilder,
    k: &'static str,
    v: &str,
    min: u64,
    max: u64,
) -> Option<u64> {
    match text::parse_number_in(v, min, max) {
        Ok(n) => Some(n),
        Err(_) => {
            out.push(k, text::REJECT);
            None
        }
    }
}

impl Negotiator {
    /// A negotiator with every key at its RFC default. `leading` is false for a login that
    /// adds a connection to an existing session (non-zero TSIH).
    pub fn new(limits: TargetLimits, session_type: SessionType, leading: bool) -> Negotiator {
        Negotiator {
            limits,
            session_type,
            leading,
            // RFC 7143 §13.1: "Default is None for both HeaderDigest and DataDigest."
            header_digest: false,
            data_digest: false,
            // RFC 7143 §13.2: "Default is 1."
            max_connections: 1,
            // §13.10, §13.11: "Default is Yes."
            initial_r2t: true,
            immediate_data: true,
            max_burst_length: DEFAULT_MAX_BURST_LENGTH,
            first_burst_length: DEFAULT_FIRST_BURST_LENGTH,
            // §13.15: "Default is 2."; §13.16: "Default is 20."
            default_time2wait: 2,
            default_time2retain: 20,
            // §13.17: "Default is 1."
            max_outstanding_r2t: 1,
            // §13.18, §13.19: "Default is Yes."
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            // §13.20: "Default is 0."
            error_recovery_level: 0,
            max_send_data_segment_length: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            done: Vec::new(),
            offered: Vec::new(),
            declared: false,
            offers_made: false,
        }
    }

    /// The session type being negotiated.
    pub fn session_type(&self) -> SessionType {
        self.session_type
    }

    /// Whether offers we made still await answers (the target must not transit then: RFC 7143
    /// §11.13.1, "A Login Response with the T bit set to 1 MUST NOT contain key=value pairs
    /// that may require additional answers from the initiator within the same stage.").
    pub fn awaiting_answers(&self) -> bool {
        !self.offered.is_empty()
    }

    /// Answers one operational key (see [`classify`]) from the initiator into `out`.
    ///
    /// # Errors
    /// [`NegotiationError`], which fails the login.
    pub fn handle_key(
        &mut self,
        k: &str,
        v: &str,
        out: &mut TextBuilder,
    ) -> Result<(), NegotiationError> {
        use key::*;
        let Some(k) = known_key(k) else {
            // RFC 7143 §6.2: "the Text Response for a key that was not understood MUST be
            // key=NotUnderstood." (X- private keys included.)
            if classify(k) == KeyClass::Unknown {
                out.push(k, text::NOT_UNDERSTOOD);
            }
            return Ok(());
        };
        if let Some(i) = self.offered.iter().position(|o| *o == k) {
            self.offered.swap_remove(i);
            return self.handle_answer(k, v);
        }
        if text::is_reserved_answer(v) {
            return Err(NegotiationError::ReservedValueOffered { key: k });
        }
        if self.done.contains(&k) {
            return Err(NegotiationError::Renegotiated { key: k });
        }
        self.done.push(k);

        let discovery = self.session_type == SessionType::Discovery;
        let session_key = matches!(
            k,
            MAX_CONNECTIONS
                | INITIAL_R2T
                | IMMEDIATE_DATA
                | MAX_BURST_LENGTH
                | FIRST_BURST_LENGTH
                | MAX_OUTSTANDING_R2T
                | DATA_PDU_IN_ORDER
                | DATA_SEQUENCE_IN_ORDER
                | TASK_REPORTING
                | PROTOCOL_LEVEL
        );
        // RFC 7143 §13.2 ff.: "Irrelevant when: SessionType=Discovery".
        if discovery && session_key {
            out.push(k, text::IRRELEVANT);
            return Ok(());
        }
        // Leading-only keys ("Use: LO") in a login that adds a connection: the session's
        // values stand, so the key is irrelevant here.
        let leading_only = session_key
            || matches!(
                k,
                DEFAULT_TIME2WAIT | DEFAULT_TIME2RETAIN | ERROR_RECOVERY_LEVEL
            );
        if !self.leading && leading_only {
            out.push(k, text::IRRELEVANT);
            return Ok(());
        }

        match k {
            // RFC 7143 §13.1: list negotiation; RFC 7143 §6.2: the responder answers "with the
            // first value it supports from the list" or "Reject". Unknown values are ignored.
            HEADER_DIGEST | DATA_DIGEST => {
                let allowed = if k == HEADER_DIGEST {
                    self.limits.header_digest
                } else {
                    self.limits.data_digest
                };
                let choice =
                    text::parse_list(v).find(|d| *d == "None" || (allowed && *d == "CRC32C"));
                match choice {
                    Some(d) => {
                        let on = d == "CRC32C";
                        if k == HEADER_DIGEST {
                            self.header_digest = on;
                        } else {
                            self.data_digest = on;
                        }
                        out.push(k, d);
                    }
                    None => {
                        out.push(k, text::REJECT);
                    }
                }
            }
            // §13.2: "MaxConnections=<numerical-value-from-1-to-65535> ... Result function is
            // Minimum."
            MAX_CONNECTIONS => {
                if let Some(n) = number_or_reject(out, k, v, 1, 65_535) {
                    let r = n.min(u64::from(self.limits.max_connections)) as u16;
                    self.max_connections = r;
                    out.push_number(k, u64::from(r));
                }
            }
            // §13.10: "InitialR2T=<boolean-value> ... Result function is OR."
            INITIAL_R2T => match text::parse_bool(v) {
                Ok(b) => {
                    let r = b || !self.limits.allow_initial_r2t_no;
                    self.initial_r2t = r;
                    out.push_bool(k, r);
                }
                Err(_) => {
                    out.push(k, text::REJECT);
                }
            },
            // §13.11: "ImmediateData=<boolean-value> ... Result function is AND."
            IMMEDIATE_DATA => match text::parse_bool(v) {
                Ok(b) => {
                    let r = b && self.limits.immediate_data;
                    self.immediate_data = r;
                    out.push_bool(k, r);
                }
                Err(_) => {
                    out.push(k, text::REJECT);
                }
            },
            // §13.12: "MaxRecvDataSegmentLength=<numerical-value-512-to-(2**24 - 1)> ...
            // The initiator or target declares the maximum data segment length in bytes it
            // can receive in an iSCSI PDU." Declarative: no answer. We cannot Reject a
            // declaration, and guessing would overrun the initiator, so a bad one fails.
            MAX_RECV_DATA_SEGMENT_LENGTH => {
                let n = text::parse_number_in(
                    v,
                    u64::from(MIN_DATA_LENGTH),
                    u64::from(MAX_DATA_LENGTH),
                )
                .map_err(|_| NegotiationError::InvalidDeclaration { key: k })?;
                self.max_send_data_segment_length = n as u32;
            }
            // §13.13: "MaxBurstLength=<numerical-value-512-to-(2**24 - 1)> ... Result function
            // is Minimum."
            MAX_BURST_LENGTH => {
                if let Some(n) = number_or_reject(
                    out,
                    k,
                    v,
                    u64::from(MIN_DATA_LENGTH),
                    u64::from(MAX_DATA_LENGTH),
                ) {
                    let r = n.min(u64::from(self.limits.max_burst_length)) as u32;
                    self.max_burst_length = r;
                    out.push_number(k, u64::from(r));
                }
            }
            // §13.14: "FirstBurstLength=<numerical-value-512-to-(2**24 - 1)> ... Result
            // function is Minimum." and "FirstBurstLength MUST NOT exceed MaxBurstLength."
            // Our own FirstBurstLength never exceeds our MaxBurstLength (TargetLimits::check);
            // SessionParams clamps in case the initiator's offers contradict each other.
            FIRST_BURST_LENGTH => {
                if let Some(n) = number_or_reject(
                    out,
                    k,
                    v,
                    u64::from(MIN_DATA_LENGTH),
                    u64::from(MAX_DATA_LENGTH),
                ) {
                    let r = n.min(u64::from(self.limits.first_burst_length)) as u32;
                    self.first_burst_length = r;
                    out.push_number(k, u64::from(r));
                }
            }
            // §13.15: "DefaultTime2Wait=<numerical-value-0-to-3600> ... Result function is
            // Maximum."
            DEFAULT_TIME2WAIT => {
                if let Some(n) = number_or_reject(out, k, v, 0, 3600) {
                    let r = n.max(u64::from(self.limits.default_time2wait)) as u16;
                    self.default_time2wait = r;
                    out.push_number(k, u64::from(r));
                }
            }
            // §13.16: "DefaultTime2Retain=<numerical-value-0-to-3600> ... Result function is
            // Minimum."
            DEFAULT_TIME2RETAIN => {
                if let Some(n) = number_or_reject(out, k, v, 0, 3600) {
                    let r = n.min(u64::from(self.limits.default_time2retain)) as u16;
                    self.default_time2retain = r;
                    out.push_number(k, u64::from(r));
                }
            }
            // §13.17: "MaxOutstandingR2T=<numerical-value-from-1-to-65535> ... Result function
            // is Minimum."
            MAX_OUTSTANDING_R2T => {
                if let Some(n) = number_or_reject(out, k, v, 1, 65_535) {
                    let r = n.min(u64::from(self.limits.max_outstanding_r2t)) as u16;
                    self.max_outstanding_r2t = r;
                    out.push_number(k, u64::from(r));
                }
            }
            // §13.18, §13.19: "Result function is OR." We want in-order data (Yes), so the
            // result is always Yes.
            DATA_PDU_IN_ORDER | DATA_SEQUENCE_IN_ORDER => match text::parse_bool(v) {
                Ok(_) => {
                    out.push_bool(k, true);
                }
                Err(_) => {
                    out.push(k, text::REJECT);
                }
            },
            // §13.20: "ErrorRecoveryLevel=<numerical-value-0-to-2> ... Result function is
            // Minimum."
            ERROR_RECOVERY_LEVEL => {
                if let Some(n) = number_or_reject(out, k, v, 0, 2) {
                    let r = n.min(u64::from(self.limits.error_recovery_level)) as u8;
                    self.error_recovery_level = r;
                    out.push_number(k, u64::from(r));
                }
            }
            // §13.23: "TaskReporting=<list-of-values> ... Default is RFC3720." We implement
            // only the RFC 3720 behaviour.
            TASK_REPORTING => {
                if text::parse_list(v).any(|t| t == "RFC3720") {
                    out.push(k, "RFC3720");
                } else {
                    out.push(k, text::REJECT);
                }
            }
            // §13.24: "iSCSIProtocolLevel=<numerical-value-from-0-to-31> ... Result function
            // is Minimum."
            PROTOCOL_LEVEL => {
                if let Some(n) = number_or_reject(out, k, v, 0, 31) {
                    out.push_number(k, n.min(PROTOCOL_LEVEL_IMPLEMENTED));
                }
            }
            // §13.25: "When an IFMarker or OFMarker key is received, a compliant iSCSI
            // implementation SHOULD respond with the constant "Reject" value. The
            // implementation MAY alternatively respond with a "No" value." We answer "No":
            // RFC 3720 initiators understand it, and it is the value they offer.
            IF_MARKER | OF_MARKER => {
                out.push(k, text::NO);
            }
            // §13.25: "When an IFMarkInt or OFMarkInt key is received, a compliant iSCSI
            // implementation MUST respond with the constant "Reject" value."
            IF_MARK_INT | OF_MARK_INT => {
                out.push(k, text::REJECT);
            }
            _ => {
                out.push(k, text::NOT_UNDERSTOOD);
            }
        }
        Ok(())
    }

    /// The initiator's answer to one of our offers.
    fn handle_answer(&mut self, k: &'static str, v: &str) -> Result<(), NegotiationError> {
        use key::*;
        self.done.push(k);
        let refused = text::is_reserved_answer(v);
        match k {
            IMMEDIATE_DATA => {
                // AND: our offer was No, so the result is No whatever the answer.
                if refused {
                    return Err(NegotiationError::OfferRefused { key: k });
                }
                self.immediate_data = false;
            }
            MAX_BURST_LENGTH | FIRST_BURST_LENGTH => {
                let n = text::parse_number_in(
                    v,
                    u64::from(MIN_DATA_LENGTH),
                    u64::from(MAX_DATA_LENGTH),
                )
                .map_err(|_| NegotiationError::OfferRefused { key: k })?;
                let (mine, slot) = if k == MAX_BURST_LENGTH {
                    (self.limits.max_burst_length, &mut self.max_burst_length)
                } else {
                    (self.limits.first_burst_length, &mut self.first_burst_length)
                };
                // Minimum: the answer must not exceed what we offered.
                if n > u64::from(mine) {
                    return Err(NegotiationError::OfferRefused { key: k });
                }
                *slot = n as u32;
            }
            _ => {}
        }
        Ok(())
    }

    /// Adds the target's declarations and offers to a response in the operational stage.
    /// Returns whether any offer needs an answer (then the response must not transit).
    ///
    /// We always declare MaxRecvDataSegmentLength (RFC 7143 §13.12; open-iscsi relies on
    /// the declaration, and without it the initiator would assume 8192). We offer the keys
    /// whose RFC default we cannot accept and that the initiator did not offer: ImmediateData
    /// (when we refuse immediate data), MaxBurstLength and FirstBurstLength (when ours are
    /// below the defaults).
    pub fn write_target_keys(&mut self, out: &mut TextBuilder) -> bool {
        use key::*;
        if !self.declared {
            self.declared = true;
            out.push_number(
                MAX_RECV_DATA_SEGMENT_LENGTH,
                u64::from(self.limits.max_recv_data_segment_length),
            );
        }
        if self.offers_made || self.session_type == SessionType::Discovery || !self.leading {
            return self.awaiting_answers();
        }
        self.offers_made = true;
        if !self.limits.immediate_data && !self.done.contains(&IMMEDIATE_DATA) {
            out.push_bool(IMMEDIATE_DATA, false);
            self.offered.push(IMMEDIATE_DATA);
        }
        if self.limits.max_burst_length < DEFAULT_MAX_BURST_LENGTH
            && !self.done.contains(&MAX_BURST_LENGTH)
        {
            out.push_number(MAX_BURST_LENGTH, u64::from(self.limits.max_burst_length));
            self.offered.push(MAX_BURST_LENGTH);
        }
        if self.limits.first_burst_length < DEFAULT_FIRST_BURST_LENGTH
            && !self.done.contains(&FIRST_BURST_LENGTH)
        {
            out.push_number(
                FIRST_BURST_LENGTH,
                u64::from(self.limits.first_burst_length),
            );
            self.offered.push(FIRST_BURST_LENGTH);
        }
        self.awaiting_answers()
    }

    /// Whether the RFC defaults of the keys not negotiated are acceptable to us, so that the
    /// login may skip the operational stage.
    pub fn defaults_acceptable(&self) -> bool {
        self.session_type == SessionType::Discovery
            || !self.leading
            || (self.limits.immediate_data
                && self.limits.max_burst_length >= DEFAULT_MAX_BURST_LENGTH
                && self.limits.first_burst_length >= DEFAULT_FIRST_BURST_LENGTH)
    }

    /// The negotiated parameters.
    pub fn session_params(&self, id: SessionIdentity) -> SessionParams {
        SessionParams {
            session_type: self.session_type,
            initiator_name: id.initiator_name,
            initiator_alias: id.initiator_alias,
            target_name: id.target_name,
            isid: id.isid,
            tsih: id.tsih,
            cid: id.cid,
            header_digest: self.header_digest,
            data_digest: self.data_digest,
            max_connections: self.max_connections,
            initial_r2t: self.initial_r2t,
            immediate_data: self.immediate_data,
            max_burst_length: self.max_burst_length,
            // RFC 7143 §13.14: "FirstBurstLength MUST NOT exceed MaxBurstLength."
            first_burst_length: self.first_burst_length.min(self.max_burst_length),
            default_time2wait: self.default_time2wait,
            default_time2retain: self.default_time2retain,
            max_outstanding_r2t: self.max_outstanding_r2t,
            data_pdu_in_order: self.data_pdu_in_order,
            data_sequence_in_order: self.data_sequence_in_order,
            error_recovery_level: self.error_recovery_level,
            max_send_data_segment_length: self.max_send_data_segment_length,
            // Without our declaration the initiator assumes the default.
            max_recv_data_segment_length: if self.declared {
                self.limits.max_recv_data_segment_length
            } else {
                DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
            },
            chap_user: id.chap_user,
        }
    }
}

/// The `&'static str` spelling of an operational key, for bookkeeping without allocation.
fn known_key(k: &str) -> Option<&'static str> {
    use key::*;
    const ALL: [&str; 20] = [
        HEADER_DIGEST,
        DATA_DIGEST,
        MAX_CONNECTIONS,
        INITIAL_R2T,
        IMMEDIATE_DATA,
        MAX_RECV_DATA_SEGMENT_LENGTH,
        MAX_BURST_LENGTH,
        FIRST_BURST_LENGTH,
        DEFAULT_TIME2WAIT,
        DEFAULT_TIME2RETAIN,
        MAX_OUTSTANDING_R2T,
        DATA_PDU_IN_ORDER,
        DATA_SEQUENCE_IN_ORDER,
        ERROR_RECOVERY_LEVEL,
        TASK_REPORTING,
        PROTOCOL_LEVEL,
        IF_MARKER,
        OF_MARKER,
        IF_MARK_INT,
        OF_MARK_INT,
    ];
    ALL.into_iter().find(|a| *a == k)
}

/// The query of a SendTargets key (RFC 7143 §13.3), for the full-feature Text handler of a
/// discovery session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendTargetsQuery<'a> {
    /// "SendTargets=All": every target this initiator may see.
    All,
    /// "SendTargets=<iSCSI-target-name>": that target only.
    Target(&'a str),
    /// "SendTargets=" (empty): the target of this (normal) session.
    SessionTarget,
}

/// Parses a SendTargets value.
pub fn parse_send_targets(v: &str) -> SendTargetsQuery<'_> {
    match v {
        "All" => SendTargetsQuery::All,
        "" => SendTargetsQuery::SessionTarget,
        name => SendTargetsQuery::Target(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(
        n: &mut Negotiator,
        k: &str,
        v: &str,
    ) -> Result<Vec<(String, String)>, NegotiationError> {
        let mut out = TextBuilder::new();
        n.handle_key(k, v, &mut out)?;
        let bytes = out.finish();
        Ok(text::parse(&bytes)
            .unwrap()
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect())
    }

    fn one(n: &mut Negotiator, k: &str, v: &str) -> String {
        let a = answer(n, k, v).unwrap();
        assert_eq!(a.len(), 1, "{k}={v} -> {a:?}");
        assert_eq!(a[0].0, k);
        a[0].1.clone()
    }

    fn normal() -> Negotiator {
        Negotiator::new(TargetLimits::default(), SessionType::Normal, true)
    }

    fn params(n: &Negotiator) -> SessionParams {
        n.session_params(SessionIdentity::default())
    }

    #[test]
    fn defaults_without_offers() {
        let p = params(&normal());
        assert!(!p.header_digest && !p.data_digest);
        assert!(p.initial_r2t && p.immediate_data);
        assert_eq!(p.max_burst_length, 262_144);
        assert_eq!(p.first_burst_length, 65_536);
        assert_eq!(p.max_send_data_segment_length, 8192);
        assert_eq!(p.max_recv_data_segment_length, 8192);
        assert_eq!((p.default_time2wait, p.default_time2retain), (2, 20));
        assert_eq!(p.max_outstanding_r2t, 1);
        assert_eq!(p.error_recovery_level, 0);
    }

    #[test]
    fn digests_pick_first_supported() {
        let mut n = normal();
        assert_eq!(one(&mut n, "HeaderDigest", "CRC32C,None"), "CRC32C");
        assert_eq!(one(&mut n, "DataDigest", "None,CRC32C"), "None");
        let p = params(&n);
        assert!(p.header_digest && !p.data_digest);

        let limits = TargetLimits {
            header_digest: false,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(limits, SessionType::Normal, true);
        assert_eq!(one(&mut n, "HeaderDigest", "Foo,CRC32C,None"), "None");
        assert_eq!(one(&mut n, "DataDigest", "Foo"), "Reject");
        assert!(!params(&n).header_digest);
    }

    #[test]
    fn minimum_maximum_and_ranges() {
        let mut n = normal();
        assert_eq!(one(&mut n, "MaxConnections", "8"), "1");
        assert_eq!(one(&mut n, "MaxBurstLength", "16776192"), "1048576");
        assert_eq!(one(&mut n, "FirstBurstLength", "262144"), "65536");
        assert_eq!(one(&mut n, "DefaultTime2Wait", "0"), "2");
        assert_eq!(one(&mut n, "DefaultTime2Retain", "0"), "0");
        assert_eq!(one(&mut n, "MaxOutstandingR2T", "8"), "1");
        assert_eq!(one(&mut n, "ErrorRecoveryLevel", "2"), "0");
        assert_eq!(one(&mut n, "iSCSIProtocolLevel", "2"), "1");
        let p = params(&n);
        assert_eq!(p.max_burst_length, 1_048_576);
        assert_eq!(p.default_time2retain, 0);

        let mut n = normal();
        assert_eq!(one(&mut n, "MaxBurstLength", "511"), "Reject");
        assert_eq!(one(&mut n, "FirstBurstLength", "16777216"), "Reject");
        assert_eq!(one(&mut n, "MaxOutstandingR2T", "0"), "Reject");
        assert_eq!(one(&mut n, "ErrorRecoveryLevel", "3"), "Reject");
        assert_eq!(one(&mut n, "DefaultTime2Wait", "3601"), "Reject");
        assert_eq!(one(&mut n, "MaxConnections", "abc"), "Reject");
        assert_eq!(params(&n).max_burst_length, DEFAULT_MAX_BURST_LENGTH);
        // Hex is a valid numerical encoding.
        assert_eq!(one(&mut n, "DefaultTime2Retain", "0x10"), "16");
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let mut n = normal();
        assert_eq!(one(&mut n, "MaxBurstLength", "4096"), "4096");
        assert_eq!(one(&mut n, "FirstBurstLength", "65536"), "65536");
        let p = params(&n);
        assert_eq!(p.first_burst_length, 4096);
    }

    #[test]
    fn booleans_and_or() {
        let mut n = normal();
        assert_eq!(one(&mut n, "InitialR2T", "No"), "No");
        assert_eq!(one(&mut n, "ImmediateData", "Yes"), "Yes");
        assert_eq!(one(&mut n, "DataPDUInOrder", "No"), "Yes");
        assert_eq!(one(&mut n, "DataSequenceInOrder", "Yes"), "Yes");
        let p = params(&n);
        assert!(!p.initial_r2t && p.immediate_data);

        let strict = TargetLimits {
            immediate_data: false,
            allow_initial_r2t_no: false,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(strict, SessionType::Normal, true);
        assert_eq!(one(&mut n, "InitialR2T", "No"), "Yes");
        assert_eq!(one(&mut n, "ImmediateData", "Yes"), "No");
        assert_eq!(one(&mut n, "DataPDUInOrder", "maybe"), "Reject");
        let p = params(&n);
        assert!(p.initial_r2t && !p.immediate_data);
    }

    #[test]
    fn declarations() {
        let mut n = normal();
        assert!(answer(&mut n, "MaxRecvDataSegmentLength", "65536")
            .unwrap()
            .is_empty());
        assert_eq!(
            answer(&mut normal(), "MaxRecvDataSegmentLength", "100"),
            Err(NegotiationError::InvalidDeclaration {
                key: "MaxRecvDataSegmentLength"
            })
        );
        let mut out = TextBuilder::new();
        assert!(!n.write_target_keys(&mut out));
        assert_eq!(&out.finish()[..], b"MaxRecvDataSegmentLength=262144\0");
        let p = params(&n);
        assert_eq!(p.max_send_data_segment_length, 65536);
        assert_eq!(p.max_recv_data_segment_length, 262_144);
    }

    #[test]
    fn target_offers_what_defaults_do_not_allow() {
        let limits = TargetLimits {
            immediate_data: false,
            max_burst_length: 131_072,
            first_burst_length: 16_384,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(limits, SessionType::Normal, true);
        assert_eq!(one(&mut n, "MaxBurstLength", "262144"), "131072");
        assert!(!n.defaults_acceptable());
        let mut out = TextBuilder::new();
        assert!(n.write_target_keys(&mut out));
        let t = out.finish();
        let pairs = text::parse(&t).unwrap();
        assert!(pairs.contains(&("ImmediateData", "No")));
        assert!(pairs.contains(&("FirstBurstLength", "16384")));
        assert!(!pairs.iter().any(|(k, _)| *k == "MaxBurstLength"));
        // Answers need no reply.
        assert!(answer(&mut n, "ImmediateData", "No").unwrap().is_empty());
        assert!(answer(&mut n, "FirstBurstLength", "8192")
            .unwrap()
            .is_empty());
        assert!(!n.awaiting_answers());
        let p = params(&n);
        assert!(!p.immediate_data);
        assert_eq!(p.first_burst_length, 8192);
        assert_eq!(p.max_burst_length, 131_072);

        // A refused offer fails.
        let limits = TargetLimits {
            immediate_data: false,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(limits, SessionType::Normal, true);
        n.write_target_keys(&mut TextBuilder::new());
        assert_eq!(
            answer(&mut n, "ImmediateData", "Reject"),
            Err(NegotiationError::OfferRefused {
                key: "ImmediateData"
            })
        );
    }

    #[test]
    fn discovery_and_non_leading_irrelevance() {
        let mut n = Negotiator::new(TargetLimits::default(), SessionType::Discovery, true);
        for k in [
            "MaxConnections",
            "InitialR2T",
            "ImmediateData",
            "MaxBurstLength",
        ] {
            let v = if k.ends_with("R2T") || k.starts_with("Imm") {
                "Yes"
            } else {
                "4096"
            };
            assert_eq!(one(&mut n, k, v), "Irrelevant");
        }
        assert_eq!(one(&mut n, "HeaderDigest", "None"), "None");
        assert_eq!(one(&mut n, "ErrorRecoveryLevel", "0"), "0");

        let mut n = Negotiator::new(TargetLimits::default(), SessionType::Normal, false);
        assert_eq!(one(&mut n, "ErrorRecoveryLevel", "0"), "Irrelevant");
        assert_eq!(one(&mut n, "HeaderDigest", "None"), "None");
    }

    #[test]
    fn special_keys_and_errors() {
        let mut n = normal();
        assert_eq!(one(&mut n, "IFMarker", "No"), "No");
        assert_eq!(one(&mut n, "OFMarkInt", "2048~8192"), "Reject");
        assert_eq!(one(&mut n, "TaskReporting", "FastAbort,RFC3720"), "RFC3720");
        assert_eq!(one(&mut n, "X-com.example.Foo", "1"), "NotUnderstood");
        assert_eq!(one(&mut n, "Bogus", "1"), "NotUnderstood");
        assert_eq!(
            answer(&mut n, "InitialR2T", "Reject"),
            Err(NegotiationError::ReservedValueOffered { key: "InitialR2T" })
        );
        assert_eq!(one(&mut n, "MaxConnections", "1"), "1");
        assert_eq!(
            answer(&mut n, "MaxConnections", "1"),
            Err(NegotiationError::Renegotiated {
                key: "MaxConnections"
            })
        );
    }

    #[test]
    fn classification() {
        assert_eq!(classify("InitiatorName"), KeyClass::Declarative);
        assert_eq!(classify("CHAP_R"), KeyClass::Security);
        assert_eq!(classify("AuthMethod"), KeyClass::Security);
        assert_eq!(classify("MaxBurstLength"), KeyClass::Operational);
        assert_eq!(classify("SendTargets"), KeyClass::FullFeatureOnly);
        assert_eq!(classify("X-foo"), KeyClass::Unknown);
        assert_eq!(parse_send_targets("All"), SendTargetsQuery::All);
        assert_eq!(parse_send_targets(""), SendTargetsQuery::SessionTarget);
        assert_eq!(
            parse_send_targets("iqn.x"),
            SendTargetsQuery::Target("iqn.x")
        );
        assert!(TargetLimits::default().check().is_ok());
        assert!(TargetLimits {
            first_burst_length: 2_000_000,
            ..TargetLimits::default()
        }
        .check()
        .is_err());
    }
}
