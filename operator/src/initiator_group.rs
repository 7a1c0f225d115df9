//! The InitiatorGroup controller: keeps `status.initiators` and `status.addresses` of every
//! InitiatorGroup true to the Node list.
//!
//! # Expected flow
//!
//! For each InitiatorGroup (on its own changes, on any Node change that could matter, and
//! every [`RESYNC`]): list the metadata of the Nodes matching `spec.nodeSelector`, compute the
//! status with [`compute_status`], merge-patch the status subresource when it differs, and
//! record Events for what changed and for Nodes left out.
//!
//! # Guarantees
//!
//! Idempotent: an unchanged Node list writes nothing. Errors requeue the one object with an
//! exponential backoff ([`Backoff`]), not a fixed interval.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};

use crate::api::{
    InitiatorGroup, InitiatorGroupSpec, InitiatorGroupStatus, InitiatorNameStrategyType,
};

/// Controller name, as in metrics and Events.
pub const CONTROLLER: &str = "initiatorgroup";
/// Field manager and Event reporter of the operator.
pub const MANAGER: &str = "ktgt-operator";
/// Reconcile every group this often even without a trigger (a missed watch event heals).
pub const RESYNC: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------------
// Status computation (pure)

/// What the controller needs of a Node.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
}

/// Why a selected Node contributes no initiator name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// `Annotation` strategy and the Node lacks the annotation.
    MissingAnnotation { node: String, key: String },
    /// The derived name is not an iSCSI name (the agent would refuse the whole group).
    InvalidName { node: String, name: String },
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skipped::MissingAnnotation { node, key } => {
                write!(f, "Node {node} has no annotation {key}")
            }
            Skipped::InvalidName { node, name } => {
                write!(f, "Node {node}: {name:?} is not an iSCSI name")
            }
        }
    }
}

/// The status an InitiatorGroup should have, and the Nodes left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub status: InitiatorGroupStatus,
    pub skipped: Vec<Skipped>,
}

/// Whether `labels` satisfy `selector` (every key present with the same value; an empty
/// selector matches every Node, as in tgtd-operator).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The status of an InitiatorGroup with `spec` given all `nodes` (those the selector does not
/// match are ignored). `default_prefix` is the operator's `--initiator-name-prefix`.
///
/// - `NodeName` strategy: `<prefix>:<node name>`.
/// - `Annotation` strategy: the value of annotation `annotationKey`; a Node without it is
///   skipped.
///
/// `initiators` is sorted and free of duplicates; `addresses` is `spec.addresses` as written.
pub fn compute_status<'a>(
    spec: &InitiatorGroupSpec,
    nodes: impl IntoIterator<Item = NodeView<'a>>,
    default_prefix: &str,
) -> Membership {
    let strategy = spec.initiator_name_strategy.clone().unwrap_or_default();
    let mut initiators = BTreeSet::new();
    let mut skipped = Vec::new();
    for node in nodes {
        if !selects(&spec.node_selector, node.labels) {
            continue;
        }
        let name = match strategy.type_ {
            InitiatorNameStrategyType::NodeName => {
                let prefix = strategy
                    .initiator_name_prefix
                    .as_deref()
                    .unwrap_or(default_prefix);
                format!("{prefix}:{}", node.name)
            }
            InitiatorNameStrategyType::Annotation => {
                // The CRD requires annotationKey with this type; an empty key finds nothing.
                let key = strategy.annotation_key.as_deref().unwrap_or("");
                match node.annotations.get(key) {
                    Some(value) => value.trim().to_owned(),
                    None => {
                        skipped.push(Skipped::MissingAnnotation {
                            node: node.name.to_owned(),
                            key: key.to_owned(),
                        });
                        continue;
                    }
                }
            }
        };
        if looks_like_iscsi_name(&name) {
            initiators.insert(name);
        } else {
            skipped.push(Skipped::InvalidName {
                node: node.name.to_owned(),
                name,
            });
        }
    }
    Membership {
        status: InitiatorGroupStatus {
            addresses: spec.addresses.clone(),
            initiators: initiators.into_iter().collect(),
        },
        skipped,
    }
}

/// A coarse iSCSI name check (the agent's is the precise one): a known type prefix, at most
/// 223 bytes, no whitespace, no uppercase ASCII in `iqn.` names.
fn looks_like_iscsi_name(name: &str) -> bool {
    let typed = name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa.");
    typed
        && name.len() > 4
        && name.len() <= 223
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
        && !(name.starts_with("iqn.") && name.chars().any(|c| c.is_ascii_uppercase()))
}

/// The label selector string for `nodeSelector` (`k1=v1,k2=v2`).
pub fn label_selector(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A one-line summary of a change of initiators: `+a, -b`.
pub fn describe_change(old: &[String], new: &[String]) -> String {
    let old: BTreeSet<&String> = old.iter().collect();
    let new: BTreeSet<&String> = new.iter().collect();
    let added = new.difference(&old).map(|s| format!("+{s}"));
    let removed = old.difference(&new).map(|s| format!("-{s}"));
    let parts: Vec<String> = added.chain(removed).collect();
    if parts.is_empty() {
        "addresses changed".to_owned()
    } else {
        parts.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// Reconciler

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("listing Nodes: {0}")]
    ListNodes(#[source] kube::Error),
    #[error("patching the status: {0}")]
    PatchStatus(#[source] kube::Error),
}

impl Error {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::ListNodes(_) => "ListNodes",
            Error::PatchStatus(_) => "PatchStatus",
        }
    }
}

/// Per-object exponential backoff: 1 s, 2 s, 4 s, ... up to `max`, reset by a success.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failure of `key` and returns how long to wait before retrying it.
    pub fn fail(&self, key: &str) -> Duration {
        // The lock is never held across an await; a poisoned map only loses counts.
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_owned()).or_insert(0);
        let delay = self.base.saturating_mul(1u32 << (*n).min(16)).min(self.max);
        *n = n.saturating_add(1);
        delay
    }

    /// Forgets the failures of `key`.
    pub fn succeed(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(key);
    }
}

/// Called after every reconcile with its duration and error label (metrics hook).
pub type ReconcileObserver = Box<dyn Fn(Duration, Option<&'static str>) + Send + Sync>;

/// Shared state of the reconciler.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// `--initiator-name-prefix`.
    pub default_prefix: String,
    pub backoff: Backoff,
    /// The skipped Nodes last reported per group, so a Warning is sent once per change
    /// rather than on every reconcile.
    reported: Mutex<HashMap<String, Vec<Skipped>>>,
    observer: Option<ReconcileObserver>,
}

impl Context {
    pub fn new(client: Client, default_prefix: &str) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            default_prefix: default_prefix.to_owned(),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            reported: Mutex::new(HashMap::new()),
            observer: None,
        }
    }

    /// Calls `observer` after every reconcile (for metrics).
    pub fn with_observer(mut self, observer: ReconcileObserver) -> Self {
        self.observer = Some(observer);
        self
    }
}

/// Reconciles one InitiatorGroup (see the module docs).
///
/// # Errors
/// [`Error`] when the Nodes cannot be listed or the status cannot be written. Event failures
/// are logged, not returned: the status is what matters.
pub async fn reconcile(group: Arc<InitiatorGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = tokio::time::Instant::now();
    let result = reconcile_inner(&group, &ctx).await;
    let name = group.name_any();
    match &result {
        Ok(_) => ctx.backoff.succeed(&name),
        Err(e) => tracing::warn!(initiator_group = %name, error = %e, "reconcile failed"),
    }
    if let Some(observer) = &ctx.observer {
        observer(
            started.elapsed(),
            result.as_ref().err().map(Error::metric_label),
        );
    }
    result
}

async fn reconcile_inner(group: &InitiatorGroup, ctx: &Context) -> Result<Action, Error> {
    if group.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = group.name_any();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let params = ListParams::default().labels(&label_selector(&group.spec.node_selector));
    let list = nodes
        .list_metadata(&params)
        .await
        .map_err(Error::ListNodes)?;
    let views = list.items.iter().map(node_view);
    let membership = compute_status(&group.spec, views, &ctx.default_prefix);

    let old = group.status.clone().unwrap_or_default();
    let reference = group.object_ref(&());
    if old != membership.status {
        // Both lists always present: a merge patch leaves an omitted field as it was.
        let patch = serde_json::json!({
            "status": {
                "addresses": membership.status.addresses,
                "initiators": membership.status.initiators,
            }
        });
        let api: Api<InitiatorGroup> = Api::all(ctx.client.clone());
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(Error::PatchStatus)?;
        tracing::info!(
            initiator_group = %name,
            initiators = ?membership.status.initiators,
            "status updated"
        );
        let event = Event {
            type_: EventType::Normal,
            reason: "MembersChanged".to_owned(),
            note: Some(truncate(
                &describe_change(&old.initiators, &membership.status.initiators),
                1000,
            )),
            action: "UpdateStatus".to_owned(),
            secondary: None,
        };
        publish(ctx, &event, &reference).await;
    }

    let changed_skips = {
        let mut reported = ctx.reported.lock().unwrap_or_else(|e| e.into_inner());
        let previous = reported.insert(name.clone(), membership.skipped.clone());
        previous.as_ref() != Some(&membership.skipped) && !membership.skipped.is_empty()
    };
    if changed_skips {
        let note = membership
            .skipped
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let event = Event {
            type_: EventType::Warning,
            reason: "NodeSkipped".to_owned(),
            note: Some(truncate(&format!("left out: {note}"), 1000)),
            action: "SelectNodes".to_owned(),
            secondary: None,
        };
        publish(ctx, &event, &reference).await;
    }
    Ok(Action::requeue(RESYNC))
}

async fn publish(
    ctx: &Context,
    event: &Event,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
) {
    if let Err(e) = ctx.recorder.publish(event, reference).await {
        tracing::warn!(error = %e, reason = %event.reason, "could not record an Event");
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn node_view(node: &PartialObjectMeta<Node>) -> NodeView<'_> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    NodeView {
        name: node.metadata.name.as_deref().unwrap_or(""),
        labels: node.metadata.labels.as_ref().unwrap_or(&EMPTY),
        annotations: node.metadata.annotations.as_ref().unwrap_or(&EMPTY),
    }
}

/// The retry delay after a failed reconcile: per object, exponential.
pub fn error_policy(group: Arc<InitiatorGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.fail(&group.name_any());
    tracing::debug!(initiator_group = %group.name_any(), error = %error, ?delay, "retrying");
    Action::requeue(delay)
}

// ---------------------------------------------------------------------------------------------
// Node triggers

/// What about a Node can change a group's status: its labels and annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeFingerprint {
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

fn node_fingerprint(node: &PartialObjectMeta<Node>) -> NodeFingerprint {
    NodeFingerprint {
        labels: node.metadata.labels.clone(),
        annotations: node.metadata.annotations.clone(),
    }
}

/// Decides which Node watch events can change a group: a Node appearing, disappearing, or
/// changing labels or annotations. Status-only updates (heartbeats, conditions) do not.
#[derive(Debug, Default)]
pub struct NodeChanges {
    seen: HashMap<String, NodeFingerprint>,
    /// Nodes of a relist in progress.
    relist: Option<HashMap<String, NodeFingerprint>>,
}

impl NodeChanges {
    /// Whether `event` may change some group's status.
    pub fn handle_event(&mut self, event: watcher::Event<PartialObjectMeta<Node>>) -> bool {
        match event {
            watcher::Event::Apply(node) => {
                let fp = node_fingerprint(&node);
                self.seen.insert(node.name_any(), fp.clone()) != Some(fp)
            }
            watcher::Event::Delete(node) => self.seen.remove(&node.name_any()).is_some(),
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(node) => {
                if let Some(relist) = self.relist.as_mut() {
                    relist.insert(node.name_any(), node_fingerprint(&node));
                }
                false
            }
            watcher::Event::InitDone => {
                // After a relist: changed if anything differs from what we knew.
                let relist = self.relist.take().unwrap_or_default();
                let changed = relist != self.seen;
                self.seen = relist;
                changed
            }
        }
    }
}

/// A stream that yields `()` whenever [`NodeChanges`] says a Node event matters.
pub fn node_changes(client: Client) -> impl Stream<Item = ()> + Send + 'static {
    let nodes: Api<PartialObjectMeta<Node>> = Api::all(client);
    let mut changes = NodeChanges::default();
    crate::watch::backoff(watcher::watcher(nodes, watcher::Config::default())).filter_map(
        move |event| {
            let changed = match event {
                Ok(event) => changes.handle_event(event),
                Err(e) => {
                    tracing::warn!(error = %e, "Node watch");
                    false
                }
            };
            futures::future::ready(changed.then_some(()))
        },
    )
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let groups: Api<InitiatorGroup> = Api::all(ctx.client.clone());
    // Controller::new would wrap the watch in kube's default backoff, which never grows
    // while lists fail (see `crate::watch`).
    let (reader, writer) = kube::runtime::reflector::store();
    let stream = kube::runtime::reflector(
        writer,
        crate::watch::backoff(watcher::watcher(groups, watcher::Config::default())),
    )
    .applied_objects();
    Controller::for_stream(stream, reader)
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(500)),
        )
        .reconcile_all_on(node_changes(ctx.client.clone()))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller");
            }
        })
        .await;
}

#[cfg(test)]
mod tests;
