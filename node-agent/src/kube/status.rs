//! A Target's `status` from one node-wide sync ([`NodeView`]): conditions a user can act on
//! and what the node actually serves. Pure: the clock comes in as `now`.
//!
//! # Conditions
//! - `Ready`: `True` when the Target is served with every LUN of its spec; `False` with the
//!   reason of the first problem otherwise.
//! - `TargetFailed`: `True` when the Target is not served at all (invalid spec, missing CHAP
//!   Secret, IQN taken by another Target on this node, invalid bound InitiatorGroup).
//! - `LUNFailed`: `True` when the Target is served but some LUNs are not (backing store
//!   missing or unusable, store failed to open); `Unknown` while the Target is not served.
//!
//! `lastTransitionTime` changes only when a condition's `status` does, so recomputing an
//! unchanged state yields an equal status and no API call.

use std::collections::{BTreeMap, BTreeSet};

use ktgt_operator::api::{
    condition, ObservedLun, Target, TargetActual, TargetCondition, TargetStatus,
};
use target_core::config::{Acl, AddressRule};

use crate::config::{ObjectError, ObjectKind, Problem};

/// What one node-wide sync found and did: the input of every Target's status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    /// Problems found resolving the API objects (all kinds), in a stable order.
    pub errors: Vec<ObjectError>,
    /// Names of this node's Targets left out because of an error in `errors`.
    pub failed_targets: BTreeSet<String>,
    /// What the table serves, by IQN.
    pub served: BTreeMap<String, ServedTarget>,
    /// LUNs of served Targets that are not served: `(iqn, lun)` -> why.
    pub lun_failures: BTreeMap<(String, u16), LunFailure>,
    /// InitiatorGroupBinding name -> the Target name it references, to report a broken
    /// binding on the Target it was meant to open.
    pub binding_targets: BTreeMap<String, String>,
}

/// One served target, as the table has it after the sync.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedTarget {
    /// The Target object that owns the IQN on this node.
    pub name: String,
    /// Stable small number of the IQN on this node.
    pub tid: i32,
    /// LUN numbers served, ascending.
    pub luns: Vec<u16>,
    /// Bytes each LUN serves now (it grows live with a larger `size`).
    pub sizes: BTreeMap<u16, u64>,
    pub acl: Acl,
    /// CHAP account names (incoming, then the mutual one); never secrets.
    pub accounts: Vec<String>,
}

/// Why a LUN is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunFailure {
    /// Condition reason, such as `BackingStoreNotFound`.
    pub reason: &'static str,
    pub message: String,
}

/// The condition reason of a problem: the names the docs and alerts use.
pub fn condition_reason(problem: &Problem) -> &'static str {
    match problem {
        Problem::DuplicateIqn { .. } => "DuplicateIQN",
        Problem::DuplicateLun(_) => "LUNConflict",
        Problem::BackingStoreNotFound { .. } => "BackingStoreNotFound",
        Problem::BackingStoreUnusable { .. } => "BackingStoreUnusable",
        Problem::SecretNotFound { .. } | Problem::SecretKeyMissing { .. } => "ChapSecretMissing",
        Problem::SecretKeyInvalid { .. }
        | Problem::ChapSecretTooShort { .. }
        | Problem::MutualSecretReused => "ChapSecretInvalid",
        Problem::InvalidBoundGroup { .. } => "InvalidInitiatorGroup",
        _ => "InvalidSpec",
    }
}

/// A problem as a sentence about this Target (field path first when there is one).
pub fn problem_message(e: &ObjectError) -> String {
    let text = match &e.problem {
        Problem::DuplicateIqn { iqn, other } => {
            format!("IQN {iqn} already served by Target {other} on this node")
        }
        p => p.to_string(),
    };
    if e.field.is_empty() || matches!(e.problem, Problem::DuplicateIqn { .. }) {
        text
    } else {
        format!("{}: {text}", e.field)
    }
}

/// The status `target` should have after the sync described by `view`. `now` is an RFC 3339
/// timestamp for conditions whose status changes.
pub fn target_status(target: &Target, view: &NodeView, now: &str) -> TargetStatus {
    let name = target.metadata.name.as_deref().unwrap_or("");
    let generation = target.metadata.generation;
    let previous = target
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let cond = |type_: &str, status: &str, reason: &str, message: String| {
        make_condition(type_, status, reason, message, generation, now, previous)
    };

    let own_errors: Vec<&ObjectError> = view
        .errors
        .iter()
        .filter(|e| e.kind == ObjectKind::Target && e.name == name)
        .collect();
    let served = view
        .served
        .get(&target.spec.iqn)
        .filter(|s| s.name == name && !view.failed_targets.contains(name));

    let (conditions, observed_state) = match served {
        None if view.failed_targets.contains(name) || !own_errors.is_empty() => {
            let reason = own_errors
                .first()
                .map(|e| condition_reason(&e.problem))
                .unwrap_or("InvalidSpec");
            let message = join(own_errors.iter().map(|e| problem_message(e)));
            (
                vec![
                    cond(condition::READY, "False", reason, message.clone()),
                    cond(condition::TARGET_FAILED, "True", reason, message),
                    cond(
                        condition::LUN_FAILED,
                        "Unknown",
                        "TargetFailed",
                        "the Target is not served".to_owned(),
                    ),
                ],
                None,
            )
        }
        None => (
            vec![
                cond(
                    condition::READY,
                    "Unknown",
                    "Pending",
                    "not applied on this node yet".to_owned(),
                ),
                cond(
                    condition::TARGET_FAILED,
                    "Unknown",
                    "Pending",
                    "not applied on this node yet".to_owned(),
                ),
                cond(
                    condition::LUN_FAILED,
                    "Unknown",
                    "Pending",
                    "not applied on this node yet".to_owned(),
                ),
            ],
            None,
        ),
        Some(served) => {
            let failures: Vec<(u16, &LunFailure)> = view
                .lun_failures
                .range((target.spec.iqn.clone(), 0)..=(target.spec.iqn.clone(), u16::MAX))
                .map(|((_, lun), f)| (*lun, f))
                .collect();
            let served_msg = format!(
                "serving {} LUN(s) {:?} to {}",
                served.luns.len(),
                served.luns,
                acl_summary(&served.acl)
            );
            let binding_notes = join(
                view.errors
                    .iter()
                    .filter(|e| {
                        e.kind == ObjectKind::InitiatorGroupBinding
                            && view.binding_targets.get(&e.name).map(String::as_str) == Some(name)
                    })
                    .map(|e| e.to_string()),
            );
            let with_notes = |msg: String| {
                if binding_notes.is_empty() {
                    msg
                } else {
                    format!("{msg}; {binding_notes}")
                }
            };
            let conditions = if let Some((_, first)) = failures.first() {
                let lun_msg = join(
                    failures
                        .iter()
                        .map(|(lun, f)| format!("LUN {lun}: {}", f.message)),
                );
                vec![
                    cond(
                        condition::READY,
                        "False",
                        first.reason,
                        with_notes(format!("{lun_msg}; {served_msg}")),
                    ),
                    cond(
                        condition::TARGET_FAILED,
                        "False",
                        "Served",
                        served_msg.clone(),
                    ),
                    cond(condition::LUN_FAILED, "True", first.reason, lun_msg),
                ]
            } else {
                vec![
                    cond(
                        condition::READY,
                        "True",
                        "Served",
                        with_notes(served_msg.clone()),
                    ),
                    cond(condition::TARGET_FAILED, "False", "Served", served_msg),
                    cond(
                        condition::LUN_FAILED,
                        "False",
                        "Served",
                        "every LUN is served".to_owned(),
                    ),
                ]
            };
            (conditions, Some(observed(target, served)))
        }
    };

    TargetStatus {
        conditions,
        observed_generation: generation,
        observed_state,
    }
}

fn observed(target: &Target, served: &ServedTarget) -> TargetActual {
    let luns = served
        .luns
        .iter()
        .map(|&n| {
            let spec = target.spec.luns.iter().find(|l| l.lun == i32::from(n));
            ObservedLun {
                lun: Some(i32::from(n)),
                backing_store: spec.and_then(|l| l.backing_store.clone()),
                bs_type: Some(
                    spec.and_then(|l| l.bs_type.clone())
                        .unwrap_or_else(|| "rdwr".to_owned()),
                ),
                bs_opts: spec.and_then(|l| l.bs_opts.clone()),
                size: served
                    .sizes
                    .get(&n)
                    .map(|b| ktgt_operator::api::Quantity(b.to_string())),
            }
        })
        .collect();
    TargetActual {
        tid: Some(served.tid),
        iqn: Some(target.spec.iqn.clone()),
        luns,
        accounts: served.accounts.clone(),
        acls: acl_entries(&served.acl),
    }
}

/// Initiator names, then addresses (`ALL` or CIDR blocks), as one list.
pub fn acl_entries(acl: &Acl) -> Vec<String> {
    acl.initiators()
        .into_iter()
        .chain(acl.addresses().iter().map(|rule| match rule {
            AddressRule::All => "ALL".to_owned(),
            AddressRule::Net(net) => net.to_string(),
        }))
        .collect()
}

fn acl_summary(acl: &Acl) -> String {
    if acl.admits_nobody() {
        return "nobody: no InitiatorGroupBinding grants access to this Target".to_owned();
    }
    let (initiators, addresses) = (acl.initiators(), acl.addresses());
    let mut parts = Vec::new();
    if !initiators.is_empty() {
        parts.push(format!("{} initiator name(s)", initiators.len()));
    }
    if !addresses.is_empty() {
        parts.push(format!("{} address rule(s)", addresses.len()));
    }
    format!("{} in {} grant(s)", parts.join(" and "), acl.grants.len())
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join("; ")
}

fn make_condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &str,
    previous: &[TargetCondition],
) -> TargetCondition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_owned());
    TargetCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        last_transition_time: Some(last_transition_time),
        reason: Some(reason.to_owned()),
        message: Some(message),
        observed_generation: generation,
    }
}

/// The `Ready` condition of a status, if any.
pub fn ready_condition(status: Option<&TargetStatus>) -> Option<&TargetCondition> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
}
