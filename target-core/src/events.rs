//! What happens at the session layer, counted by reason, and a feed of the events an
//! administrator should hear about.
//!
//! Sessions report logins (accepted or refused, by reason), Reject PDUs (by RFC 7143 reason),
//! task management functions (by function and response), unit attentions established, and
//! how each session ended. [`Registry::snapshot`] gives the counts to exporters (the agent's
//! `/metrics`); [`Registry::subscribe`] gives a feed of [`Notice`]s (refused logins and
//! dropped sessions of served targets) that cluster mode turns into Kubernetes Events.
//!
//! # Bounds
//! Nothing here grows with what a peer sends: a label is either a fixed name chosen here or
//! the IQN of a target the table serves (a refused login naming an unknown target counts under
//! the empty target). Series of targets that are no longer served go with
//! [`Registry::retain_targets`]. The notice feed is a bounded broadcast channel: a slow or
//! absent subscriber loses notices, never blocks a session.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use iscsi_proto::login::LoginError;
use iscsi_proto::pdu::{tmf, tmf_response, RejectReason};
use tokio::sync::broadcast;

use crate::scsi::UnitAttention;
use crate::table::EndReason;

/// Notices buffered for a subscriber that has not caught up.
const NOTICE_CAPACITY: usize = 256;

/// The outcome of a login, as counted in `ktgt_logins_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoginOutcome {
    Success,
    /// CHAP failed or was required and not offered (0x0201).
    AuthFailed,
    /// The ACL does not admit this initiator from this address (0x0202).
    NotInAcl,
    /// No such target (0x0203).
    UnknownTarget,
    /// Any other refusal: bad text, failed negotiation, a missing parameter, ...
    ProtocolError,
}

impl LoginOutcome {
    pub fn of_error(e: &LoginError) -> LoginOutcome {
        match e {
            LoginError::AuthenticationFailed(_) => LoginOutcome::AuthFailed,
            LoginError::AuthorizationFailed => LoginOutcome::NotInAcl,
            LoginError::TargetNotFound => LoginOutcome::UnknownTarget,
            _ => LoginOutcome::ProtocolError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LoginOutcome::Success => "success",
            LoginOutcome::AuthFailed => "auth_failed",
            LoginOutcome::NotInAcl => "not_in_acl",
            LoginOutcome::UnknownTarget => "unknown_target",
            LoginOutcome::ProtocolError => "protocol_error",
        }
    }

    /// The reason of the Kubernetes Event for a refusal (CamelCase, as Event reasons are).
    pub fn event_reason(self) -> &'static str {
        match self {
            LoginOutcome::Success => "LoginSucceeded",
            LoginOutcome::AuthFailed => "LoginAuthFailed",
            LoginOutcome::NotInAcl => "LoginNotInACL",
            LoginOutcome::UnknownTarget => "LoginUnknownTarget",
            LoginOutcome::ProtocolError => "LoginProtocolError",
        }
    }
}

/// How a full-feature session ended, as counted in `ktgt_sessions_ended_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SessionEnd {
    /// The initiator logged out.
    Logout,
    /// The initiator closed the connection without logging out.
    ConnectionClosed,
    /// The initiator stopped answering NOP-In pings.
    NopTimeout,
    /// A transport or protocol error ended the connection.
    ConnectionError,
    /// The target ended it (ACL/CHAP change, target removed, reinstatement, shutdown).
    Target(EndReason),
}

impl SessionEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Logout => "logout",
            SessionEnd::ConnectionClosed => "connection_closed",
            SessionEnd::NopTimeout => "nop_timeout",
            SessionEnd::ConnectionError => "connection_error",
            SessionEnd::Target(EndReason::AccessRevoked) => "access_revoked",
            SessionEnd::Target(EndReason::TargetRemoved) => "target_removed",
            SessionEnd::Target(EndReason::Reinstated) => "reinstated",
            SessionEnd::Target(EndReason::Shutdown) => "shutdown",
            SessionEnd::Target(EndReason::ColdReset) => "cold_reset",
        }
    }

    /// Whether the end is one an administrator should hear about: the session was lost, not
    /// closed on purpose by either side (logout, reinstatement by the same initiator, our own
    /// shutdown, a removed target).
    pub fn is_drop(self) -> bool {
        matches!(
            self,
            SessionEnd::ConnectionClosed
                | SessionEnd::NopTimeout
                | SessionEnd::ConnectionError
                | SessionEnd::Target(EndReason::AccessRevoked)
        )
    }

    /// The reason of the Kubernetes Event for a dropped session.
    pub fn event_reason(self) -> &'static str {
        match self {
            SessionEnd::NopTimeout => "SessionTimedOut",
            SessionEnd::Target(EndReason::AccessRevoked) => "SessionAccessRevoked",
            _ => "SessionDropped",
        }
    }
}

/// Something an administrator should hear about, on a target the table serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    LoginRefused {
        target: String,
        initiator: String,
        peer: SocketAddr,
        outcome: LoginOutcome,
        /// The refusal as the log says it (never a secret: login errors name no values).
        message: String,
    },
    SessionDropped {
        target: String,
        initiator: String,
        peer: SocketAddr,
        end: SessionEnd,
    },
}

impl Notice {
    pub fn target(&self) -> &str {
        match self {
            Notice::LoginRefused { target, .. } | Notice::SessionDropped { target, .. } => target,
        }
    }
}

/// The name of a Reject reason code (RFC 7143 §11.17.1), for metric labels.
pub fn reject_reason_name(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::DATA_DIGEST_ERROR => "data_digest_error",
        RejectReason::SNACK_REJECT => "snack_reject",
        RejectReason::PROTOCOL_ERROR => "protocol_error",
        RejectReason::COMMAND_NOT_SUPPORTED => "command_not_supported",
        RejectReason::IMMEDIATE_COMMAND_REJECT => "immediate_command_reject",
        RejectReason::TASK_IN_PROGRESS => "task_in_progress",
        RejectReason::INVALID_DATA_ACK => "invalid_data_ack",
        RejectReason::INVALID_PDU_FIELD => "invalid_pdu_field",
        RejectReason::LONG_OPERATION_REJECT => "long_operation_reject",
        RejectReason::WAITING_FOR_LOGOUT => "waiting_for_logout",
        _ => "other",
    }
}

/// The name of a task management function code (RFC 7143 §11.5.1).
pub fn tmf_function_name(function: u8) -> &'static str {
    match function {
        tmf::ABORT_TASK => "abort_task",
        tmf::ABORT_TASK_SET => "abort_task_set",
        tmf::CLEAR_ACA => "clear_aca",
        tmf::CLEAR_TASK_SET => "clear_task_set",
        tmf::LOGICAL_UNIT_RESET => "logical_unit_reset",
        tmf::TARGET_WARM_RESET => "target_warm_reset",
        tmf::TARGET_COLD_RESET => "target_cold_reset",
        tmf::TASK_REASSIGN => "task_reassign",
        _ => "other",
    }
}

/// The name of a task management response code (RFC 7143 §11.6.1).
pub fn tmf_response_name(response: u8) -> &'static str {
    match response {
        tmf_response::COMPLETE => "complete",
        tmf_response::TASK_DOES_NOT_EXIST => "task_does_not_exist",
        tmf_response::LUN_DOES_NOT_EXIST => "lun_does_not_exist",
        tmf_response::NOT_SUPPORTED => "not_supported",
        tmf_response::REASSIGNMENT_NOT_SUPPORTED => "reassignment_not_supported",
        tmf_response::REJECTED => "rejected",
        _ => "other",
    }
}

/// The name of a unit attention condition, for metric labels.
pub fn unit_attention_name(ua: UnitAttention) -> &'static str {
    match ua {
        UnitAttention::PowerOnReset => "power_on_reset",
        UnitAttention::LunReset => "lun_reset",
        UnitAttention::NexusLoss => "nexus_loss",
        UnitAttention::ModeParametersChanged => "mode_parameters_changed",
        UnitAttention::ReservationsPreempted => "reservations_preempted",
        UnitAttention::ReservationsReleased => "reservations_released",
        UnitAttention::RegistrationsPreempted => "registrations_preempted",
        UnitAttention::AsymmetricAccessStateChanged => "asymmetric_access_state_changed",
        UnitAttention::CapacityDataChanged => "capacity_data_changed",
        UnitAttention::CommandsClearedByAnotherInitiator => "commands_cleared_by_another_initiator",
        UnitAttention::InquiryDataChanged => "inquiry_data_changed",
        UnitAttention::ReportedLunsDataChanged => "reported_luns_data_changed",
    }
}

/// The counts, as read by an exporter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// (target IQN or "", outcome) → logins.
    pub logins: BTreeMap<(String, LoginOutcome), u64>,
    /// (target IQN, end) → sessions ended.
    pub sessions_ended: BTreeMap<(String, SessionEnd), u64>,
    /// Reject reason name → Reject PDUs sent.
    pub rejects: BTreeMap<&'static str, u64>,
    /// (function name, response name) → task management functions answered.
    pub task_management: BTreeMap<(&'static str, &'static str), u64>,
    /// Condition name → unit attentions established (one per I_T nexus it was queued for).
    pub unit_attentions: BTreeMap<&'static str, u64>,
}

/// The counters and the notice feed. Recording takes one short lock: these events are rare
/// next to commands (a login, a Reject, a TMF), so no per-event allocation is avoided.
#[derive(Debug)]
pub struct Registry {
    counts: Mutex<Snapshot>,
    notices: broadcast::Sender<Notice>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            counts: Mutex::new(Snapshot::default()),
            notices: broadcast::channel(NOTICE_CAPACITY).0,
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        // Plain counters stay consistent across a panic elsewhere.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a login for `target` (the IQN of a served target, or `None`: discovery, or a
    /// name the table does not serve).
    pub fn login(&self, target: Option<&str>, outcome: LoginOutcome) {
        *self
            .counts()
            .logins
            .entry((target.unwrap_or("").to_owned(), outcome))
            .or_default() += 1;
    }

    pub fn session_ended(&self, target: &str, end: SessionEnd) {
        *self
            .counts()
            .sessions_ended
            .entry((target.to_owned(), end))
            .or_default() += 1;
    }

    pub fn reject(&self, reason: RejectReason) {
        *self
            .counts()
            .rejects
            .entry(reject_reason_name(reason))
            .or_default() += 1;
    }

    pub fn task_management(&self, function: u8, response: u8) {
        *self
            .counts()
            .task_management
            .entry((tmf_function_name(function), tmf_response_name(response)))
            .or_default() += 1;
    }

    pub fn unit_attention(&self, ua: UnitAttention) {
        *self
            .counts()
            .unit_attentions
            .entry(unit_attention_name(ua))
            .or_default() += 1;
    }

    /// Sends `notice` to the subscribers, if any (never blocks).
    pub fn notify(&self, notice: Notice) {
        let _ = self.notices.send(notice);
    }

    /// A feed of the notices from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.counts().clone()
    }

    /// Drops the series of targets for which `keep` is false (the empty target stays).
    pub fn retain_targets(&self, mut keep: impl FnMut(&str) -> bool) {
        let mut c = self.counts();
        c.logins.retain(|(t, _), _| t.is_empty() || keep(t));
        c.sessions_ended.retain(|(t, _), _| keep(t));
    }
}

/// The process-wide registry the sessions record into.
pub fn global() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_label_and_prunes_removed_targets() {
        let r = Registry::new();
        r.login(Some("iqn.a"), LoginOutcome::Success);
        r.login(Some("iqn.a"), LoginOutcome::Success);
        r.login(None, LoginOutcome::UnknownTarget);
        r.login(Some("iqn.b"), LoginOutcome::AuthFailed);
        r.reject(RejectReason::PROTOCOL_ERROR);
        r.reject(RejectReason(0x77));
        r.task_management(tmf::ABORT_TASK, tmf_response::COMPLETE);
        r.unit_attention(UnitAttention::PowerOnReset);
        r.session_ended("iqn.b", SessionEnd::Logout);
        let s = r.snapshot();
        assert_eq!(s.logins[&("iqn.a".into(), LoginOutcome::Success)], 2);
        assert_eq!(s.logins[&(String::new(), LoginOutcome::UnknownTarget)], 1);
        assert_eq!(s.rejects["protocol_error"], 1);
        assert_eq!(s.rejects["other"], 1);
        assert_eq!(s.task_management[&("abort_task", "complete")], 1);
        assert_eq!(s.unit_attentions["power_on_reset"], 1);

        r.retain_targets(|t| t == "iqn.a");
        let s = r.snapshot();
        assert_eq!(s.logins.len(), 2, "{:?}", s.logins);
        assert!(s.sessions_ended.is_empty());
    }

    #[test]
    fn drops_are_the_ends_nobody_asked_for() {
        assert!(!SessionEnd::Logout.is_drop());
        assert!(!SessionEnd::Target(EndReason::Shutdown).is_drop());
        assert!(!SessionEnd::Target(EndReason::Reinstated).is_drop());
        assert!(SessionEnd::NopTimeout.is_drop());
        assert!(SessionEnd::ConnectionClosed.is_drop());
        assert!(SessionEnd::Target(EndReason::AccessRevoked).is_drop());
    }

    #[tokio::test]
    async fn notices_reach_subscribers_and_never_block() {
        let r = Registry::new();
        // No subscriber: dropped silently.
        let n = Notice::SessionDropped {
            target: "iqn.a".into(),
            initiator: "iqn.i".into(),
            peer: "127.0.0.1:1".parse().unwrap(),
            end: SessionEnd::NopTimeout,
        };
        r.notify(n.clone());
        let mut rx = r.subscribe();
        for _ in 0..NOTICE_CAPACITY * 2 {
            r.notify(n.clone());
        }
        // A lagging subscriber loses the oldest, then reads on.
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        assert_eq!(rx.recv().await.unwrap(), n);
    }
}
