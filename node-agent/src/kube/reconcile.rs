//! The Target reconciler: finalizer, node-wide sync, status, events.
//!
//! # Flow (kube-runtime's finalizer helper)
//! 1. A Target of this node without the finalizer gets it (one JSON patch); nothing else.
//! 2. `Apply`: sync the node ([`Syncer::sync`]), compute the Target's status from the result,
//!    patch `/status` if it differs, publish an Event when `Ready` changes.
//! 3. `Cleanup` (the Target is being deleted): sync the node; the Target is left out, so
//!    `apply` removes it from the table, which ends its sessions (Asynchronous Message, then
//!    close) without waiting for the initiators. Then the helper removes the finalizer.
//!    Cleanup does not depend on Apply having run.
//!
//! Targets of other nodes are ignored: never patched, not even their finalizer (the agent of
//! the node they name owns it, under the same finalizer name).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ktgt_operator::api::{Target, TargetStatus, TARGET_FINALIZER};
use ktgt_operator::telemetry::ReconcileMetrics;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::status::{self, NodeView};
use super::sync::{Changes, Stores, Syncer};

/// Name of this controller in metrics and Events.
pub const CONTROLLER: &str = "target";
/// `reportingController` of the agent's Events.
pub const REPORTER: &str = "ktgt-agent";
/// Resync period of a served Target (catches changes no watch reports, such as a backing
/// file appearing).
const RESYNC: Duration = Duration::from_secs(300);
/// How long a reconcile may reuse the last sync's view when nothing changed since.
const VIEW_MAX_AGE: Duration = Duration::from_secs(5);
/// Retry after a finalizer patch that raced our own earlier write ([`Error::is_stale_cache`]).
const STALE_RETRY: Duration = Duration::from_millis(200);
/// Recheck period of a Target that is not fully served.
const RETRY_FAILED: Duration = Duration::from_secs(30);

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub syncer: Syncer,
    pub recorder: Recorder,
    pub metrics: ReconcileMetrics,
    /// Consecutive failures per Target name, for the error policy's backoff.
    failures: std::sync::Mutex<HashMap<String, u32>>,
    /// The clock for `lastTransitionTime` (fixed in tests).
    now: fn() -> String,
    /// Where CSI volumes' files live (`--csi-volume-dir`): the only directory in which the
    /// agent deletes a deleted Target's backing file, and only for a Target annotated
    /// [`DELETE_BACKING_ANNOTATION`].
    volume_dir: Option<PathBuf>,
    /// The watches' change counter: a reconcile reuses the last sync's view while it is
    /// current ([`Syncer::current_view`]).
    changes: Arc<Changes>,
}

/// Annotation (value `true`) of a Target whose LUN files the agent deletes with the Target,
/// when they lie under its `--csi-volume-dir`: volumes of the CSI driver (`csi.ktgt.io`).
pub const DELETE_BACKING_ANNOTATION: &str = "csi.ktgt.io/delete-backing-store";

impl Context {
    pub fn new(
        client: Client,
        stores: Stores,
        syncer: Syncer,
        metrics: ReconcileMetrics,
        reporter_instance: Option<String>,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: REPORTER.to_owned(),
                instance: reporter_instance,
            },
        );
        Context {
            client,
            stores,
            syncer,
            recorder,
            metrics,
            failures: Default::default(),
            now: now_rfc3339,
            volume_dir: None,
            changes: Arc::new(Changes::default()),
        }
    }

    /// The change counter the watches signal (see [`Changes`]).
    pub fn with_changes(mut self, changes: Arc<Changes>) -> Context {
        self.changes = changes;
        self
    }

    /// Deletes the files of deleted CSI volume Targets under `dir` (see [`Context`]).
    pub fn with_volume_dir(mut self, dir: PathBuf) -> Context {
        self.volume_dir = Some(dir);
        self
    }

    /// Uses `now` as the clock (tests).
    pub fn with_clock(mut self, now: fn() -> String) -> Context {
        self.now = now;
        self
    }

    /// The `--csi-volume-dir`, if any.
    pub fn volume_dir(&self) -> Option<&Path> {
        self.volume_dir.as_deref()
    }

    /// The current time for conditions (see [`Context::with_clock`]).
    pub fn now(&self) -> String {
        (self.now)()
    }

    /// Runs the node-wide sync.
    pub async fn sync(&self) -> Arc<NodeView> {
        let generation = self.changes.generation();
        self.syncer.sync_at(&self.stores, generation).await
    }

    /// The node's view for a reconcile: the last sync's while no change came since (and it is
    /// younger than [`VIEW_MAX_AGE`], so a file that appears is noticed on the next
    /// periodic reconcile), else a fresh sync.
    pub async fn view(&self) -> Arc<NodeView> {
        let generation = self.changes.generation();
        match self.syncer.current_view(generation, VIEW_MAX_AGE).await {
            Some(view) => view,
            None => self.syncer.sync_at(&self.stores, generation).await,
        }
    }
}

/// The current time, RFC 3339 with seconds (as `metav1.Time`).
pub fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// Reconcile errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("patching the status of {name}: {source}")]
    PatchStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("adding the finalizer: {0}")]
    AddFinalizer(#[source] kube::Error),
    #[error("removing the finalizer: {0}")]
    RemoveFinalizer(#[source] kube::Error),
    #[error("the Target has no name")]
    Unnamed,
    #[error("invalid finalizer name")]
    InvalidFinalizer,
}

impl Error {
    /// Stable label for `ktgt_reconcile_errors_total{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::PatchStatus { .. } => "PatchStatus",
            Error::AddFinalizer(_) => "AddFinalizer",
            Error::RemoveFinalizer(_) => "RemoveFinalizer",
            Error::Unnamed => "Unnamed",
            Error::InvalidFinalizer => "InvalidFinalizer",
        }
    }

    /// A finalizer patch that lost a race with our own earlier write: kube's finalizer helper
    /// guards its JSON patch with a `test` of the finalizer list it saw, and a reconcile that
    /// runs on a cached object older than that write fails the test (422) or conflicts (409).
    /// Removing the finalizer of a Target that is gone already (404) is the same race: an
    /// earlier reconcile removed it and the API server deleted the object. The next reconcile
    /// sees the fresh object (or none); nothing is wrong.
    pub fn is_stale_cache(&self) -> bool {
        match self {
            Error::AddFinalizer(kube::Error::Api(s)) => s.code == 422 || s.code == 409,
            Error::RemoveFinalizer(kube::Error::Api(s)) => {
                s.code == 422 || s.code == 409 || s.code == 404
            }
            _ => false,
        }
    }

    pub(crate) fn from_finalizer(e: finalizer::Error<Error>) -> Error {
        match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(e) => Error::AddFinalizer(e),
            finalizer::Error::RemoveFinalizer(e) => Error::RemoveFinalizer(e),
            finalizer::Error::UnnamedObject => Error::Unnamed,
            finalizer::Error::InvalidFinalizer => Error::InvalidFinalizer,
        }
    }
}

/// Whether `target` is served by this node.
pub fn is_ours(target: &Target, node: &str) -> bool {
    target.spec.node_name.as_deref() == Some(node)
}

/// Reconciles one Target (see the module docs).
pub async fn reconcile(target: Arc<Target>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !is_ours(&target, ctx.syncer.node()) {
        crate::metrics::target_readiness().remove(&target.name_any());
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let name = target.name_any();
    let api: Api<Target> = Api::all(ctx.client.clone());
    let result = finalizer(&api, TARGET_FINALIZER, target, |event| async {
        match event {
            finalizer::Event::Apply(t) => apply(&t, &ctx, &api).await,
            finalizer::Event::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer);
    ctx.metrics.record(
        CONTROLLER,
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
    }
    result
}

/// Requeue after a failed reconcile: exponential per Target, 1 s to 5 min.
pub fn error_policy(target: Arc<Target>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = target.name_any();
    if error.is_stale_cache() {
        debug!(target_name = %name, error = %error, "finalizer patch raced our own write; retrying");
        return Action::requeue(STALE_RETRY);
    }
    let n = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(name.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_secs(1u64 << n.min(9)).min(Duration::from_secs(300));
    warn!(target_name = %name, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn apply(target: &Target, ctx: &Context, api: &Api<Target>) -> Result<Action, Error> {
    let name = target.name_any();
    let view = ctx.view().await;
    let status = status::target_status(target, &view, &(ctx.now)());
    if target.status.as_ref() != Some(&status) {
        patch_status(api, &name, &status).await?;
    }
    publish_transition(ctx, target, target.status.as_ref(), &status).await;
    let condition = status::ready_condition(Some(&status));
    let ready = condition.is_some_and(|c| c.status == "True");
    crate::metrics::target_readiness().set(
        &name,
        &target.spec.iqn,
        ready,
        condition.and_then(|c| c.reason.as_deref()).unwrap_or(""),
    );
    Ok(Action::requeue(if ready { RESYNC } else { RETRY_FAILED }))
}

/// Replaces `/status` whole: a merge patch would leave fields the new status no longer has
/// (an `observedState` of a Target that stopped being served, a removed ACL entry).
async fn patch_status(api: &Api<Target>, name: &str, status: &TargetStatus) -> Result<(), Error> {
    let value = serde_json::to_value(status).unwrap_or_default();
    let patch = json_patch::Patch(vec![json_patch::PatchOperation::Add(
        json_patch::AddOperation {
            path: json_patch::jsonptr::PointerBuf::from_tokens(["status"]),
            value,
        },
    )]);
    api.patch_status(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(|source| Error::PatchStatus {
            name: name.to_owned(),
            source,
        })?;
    Ok(())
}

/// An Event when the Ready condition changes status or reason.
async fn publish_transition(
    ctx: &Context,
    target: &Target,
    old: Option<&TargetStatus>,
    new: &TargetStatus,
) {
    let old = status::ready_condition(old);
    let Some(new) = status::ready_condition(Some(new)) else {
        return;
    };
    if old.is_some_and(|o| o.status == new.status && o.reason == new.reason) {
        return;
    }
    let (type_, reason) = match new.status.as_str() {
        "True" => (EventType::Normal, "Served".to_owned()),
        "False" => (
            EventType::Warning,
            new.reason.clone().unwrap_or_else(|| "Failed".to_owned()),
        ),
        _ => return,
    };
    publish(
        ctx,
        target,
        Event {
            type_,
            reason,
            note: new.message.clone(),
            action: "Serve".to_owned(),
            secondary: None,
        },
    )
    .await;
}

async fn cleanup(target: &Target, ctx: &Context) -> Result<Action, Error> {
    crate::metrics::target_readiness().remove(&target.name_any());
    let iqn = &target.spec.iqn;
    let sessions = ctx
        .syncer
        .table()
        .target(iqn)
        .map(|t| t.sessions().len())
        .unwrap_or(0);
    // The Target has a deletionTimestamp, so the sync leaves it out and `apply` removes it,
    // ending its sessions; it does not wait for initiators to log out.
    let view = ctx.sync().await;
    let still_served = view
        .served
        .get(iqn)
        .is_some_and(|s| s.name == target.name_any());
    if still_served {
        // Cannot happen for a Target with a deletionTimestamp; keep the finalizer if it does.
        warn!(target_name = %target.name_any(), "still served after cleanup");
    }
    info!(target_name = %target.name_any(), target_iqn = %iqn, sessions, "Target removed");
    if !still_served {
        remove_volume_files(target, ctx.volume_dir.as_deref());
    }
    publish(
        ctx,
        target,
        Event {
            type_: EventType::Normal,
            reason: "Removed".to_owned(),
            note: Some(format!(
                "stopped serving {iqn}; {sessions} session(s) logged out"
            )),
            action: "Cleanup".to_owned(),
            secondary: None,
        },
    )
    .await;
    Ok(Action::await_change())
}

/// The LUN files of a deleted CSI volume Target that may be deleted: those of a Target
/// annotated [`DELETE_BACKING_ANNOTATION`], each a plain path strictly under `dir` (no `..`).
pub fn volume_files(target: &Target, dir: Option<&Path>) -> Vec<PathBuf> {
    let Some(dir) = dir else {
        return Vec::new();
    };
    let annotated = target
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DELETE_BACKING_ANNOTATION))
        .is_some_and(|v| v == "true");
    if !annotated {
        return Vec::new();
    }
    target
        .spec
        .luns
        .iter()
        .filter_map(|l| l.backing_store.as_deref())
        .map(PathBuf::from)
        .filter(|p| deletable_path(p, dir))
        .collect()
}

/// Whether the agent may delete file `p` because it lies under `dir` (`--csi-volume-dir`):
/// a plain absolute path strictly below it (no `..`).
pub fn deletable_path(p: &Path, dir: &Path) -> bool {
    p.is_absolute()
        && p.starts_with(dir)
        && p != dir
        && !p.components().any(|c| c == std::path::Component::ParentDir)
}

fn remove_volume_files(target: &Target, dir: Option<&Path>) {
    // With each volume file goes its persistent reservation state (`<file>.pr`, APTPL).
    let files = volume_files(target, dir).into_iter().flat_map(|p| {
        let mut pr = p.clone().into_os_string();
        pr.push(".pr");
        [p, PathBuf::from(pr)]
    });
    for path in files {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                info!(target_name = %target.name_any(), path = %path.display(), "volume file deleted")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(target_name = %target.name_any(), path = %path.display(), error = %e,
                "deleting the volume file failed"),
        }
    }
}

/// Events are best effort: a failure is logged, never fails the reconcile.
pub(crate) async fn publish(ctx: &Context, target: &Target, event: Event) {
    let reference = target.object_ref(&());
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        warn!(target_name = %target.name_any(), error = %e, reason = %event.reason,
            "publishing an Event failed");
    }
}

#[cfg(test)]
mod volume_file_tests {
    use super::*;
    use ktgt_operator::api::{TargetLun, TargetSpec};

    fn target(annotated: bool, paths: &[&str]) -> Target {
        let mut t = Target::new(
            "v",
            TargetSpec {
                iqn: "iqn.2026-11.io.ktgt.csi:v".into(),
                luns: paths
                    .iter()
                    .enumerate()
                    .map(|(i, p)| TargetLun {
                        lun: i as i32,
                        backing_store: Some((*p).to_owned()),
                        ..TargetLun::default()
                    })
                    .collect(),
                ..TargetSpec::default()
            },
        );
        if annotated {
            t.metadata.annotations = Some(
                [(DELETE_BACKING_ANNOTATION.to_owned(), "true".to_owned())]
                    .into_iter()
                    .collect(),
            );
        }
        t
    }

    #[test]
    fn only_annotated_files_under_the_volume_dir_are_deleted() {
        let dir = Path::new("/var/lib/ktgt/csi");
        let t = target(
            true,
            &[
                "/var/lib/ktgt/csi/pool/a.img",
                "/var/lib/ktgt/csi/../etc/passwd",
                "/srv/other.img",
                "relative.img",
                "/var/lib/ktgt/csi",
            ],
        );
        assert_eq!(
            volume_files(&t, Some(dir)),
            vec![PathBuf::from("/var/lib/ktgt/csi/pool/a.img")]
        );
        assert!(
            volume_files(&t, None).is_empty(),
            "no --csi-volume-dir: nothing"
        );
        let plain = target(false, &["/var/lib/ktgt/csi/pool/a.img"]);
        assert!(
            volume_files(&plain, Some(dir)).is_empty(),
            "not annotated: nothing"
        );
    }

    #[test]
    fn a_deleted_volume_takes_its_reservation_state_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("pool/a.img");
        std::fs::create_dir_all(img.parent().unwrap()).unwrap();
        std::fs::write(&img, b"data").unwrap();
        std::fs::write(dir.path().join("pool/a.img.pr"), b"state").unwrap();
        let t = target(true, &[img.to_str().unwrap()]);
        remove_volume_files(&t, Some(dir.path()));
        assert_eq!(
            std::fs::read_dir(dir.path().join("pool")).unwrap().count(),
            0
        );
    }
}

#[cfg(test)]
mod stale_cache_tests {
    use super::Error;
    use kube::core::Status;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("x", "Reason").with_code(code).boxed())
    }

    /// The two races seen on a real API server (tests/kube): a finalizer added twice (JSON
    /// patch `test` fails, 422) and one removed from a Target already deleted (404).
    #[test]
    fn finalizer_races_with_our_own_writes_are_stale_cache_not_failures() {
        assert!(Error::AddFinalizer(api(422)).is_stale_cache());
        assert!(Error::AddFinalizer(api(409)).is_stale_cache());
        assert!(Error::RemoveFinalizer(api(404)).is_stale_cache());
        assert!(!Error::AddFinalizer(api(403)).is_stale_cache());
        assert!(!Error::AddFinalizer(api(404)).is_stale_cache());
        assert!(!Error::RemoveFinalizer(api(500)).is_stale_cache());
    }
}
