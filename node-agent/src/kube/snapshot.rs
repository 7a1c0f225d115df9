//! The TargetSnapshot reconciler: reflink copies of a LUN's file on this node.
//!
//! # Contract
//! - Only TargetSnapshots whose `spec.nodeName` is this node are touched (finalizer, status,
//!   file); the rest are ignored, as Targets of other nodes are.
//! - A snapshot is made once: the copy is taken when the object has no `readyToUse` status
//!   yet, with [`target_core::lun::clone::reflink`] (no data copied, whole or not at all),
//!   from the file of `spec.lun` of the Target `spec.targetRef.name`, which must be served by
//!   this node. It is never retaken: a copy made later would be another point in time, so a
//!   copy whose file went missing is reported (`FileMissing`), not remade.
//! - Failures are conditions: `SourceNotFound` (no such Target or LUN file on this node yet:
//!   retried), `CloneUnsupported` (the filesystem cannot reflink: final until the object
//!   changes), `CopyFailed` (any other error: retried), `InvalidSpec` (a path that is not
//!   plain and absolute).
//! - Deleting the object deletes the copy's file when the object is annotated
//!   [`DELETE_BACKING_ANNOTATION`] and the path lies under `--csi-volume-dir` (the Target
//!   rule), then the finalizer goes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ktgt_operator::api::{
    Quantity, Target, TargetCondition, TargetSnapshot, TargetSnapshotStatus, SNAPSHOT_FINALIZER,
};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use target_core::lun::BackendError;
use tracing::{info, warn};

use super::reconcile::{deletable_path, Context, Error, DELETE_BACKING_ANNOTATION};

/// Name of this controller in metrics.
pub const CONTROLLER: &str = "targetsnapshot";
/// Recheck period of a snapshot whose source is not there yet, or whose copy failed.
const RETRY: Duration = Duration::from_secs(5);

/// Reconciles one TargetSnapshot (see the module docs).
pub async fn reconcile(snap: Arc<TargetSnapshot>, ctx: Arc<Context>) -> Result<Action, Error> {
    if snap.spec.node_name != ctx.syncer.node() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let api: Api<TargetSnapshot> = Api::all(ctx.client.clone());
    let result = finalizer(&api, SNAPSHOT_FINALIZER, snap, |event| async {
        match event {
            finalizer::Event::Apply(s) => apply(&s, &ctx, &api).await,
            finalizer::Event::Cleanup(s) => Ok(cleanup(&s, &ctx)),
        }
    })
    .await
    .map_err(Error::from_finalizer);
    ctx.metrics.record(
        CONTROLLER,
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result
}

/// Requeue after a failed reconcile (a status or finalizer patch): the Target policy's.
pub fn error_policy(snap: Arc<TargetSnapshot>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_stale_cache() {
        return Action::requeue(Duration::from_millis(200));
    }
    warn!(snapshot = %snap.name_any(), error = %error, "snapshot reconcile failed");
    Action::requeue(RETRY)
}

/// What one look at a snapshot found.
enum Outcome {
    Made {
        size: u64,
    },
    Failed {
        reason: &'static str,
        message: String,
    },
}

async fn apply(
    snap: &TargetSnapshot,
    ctx: &Context,
    api: &Api<TargetSnapshot>,
) -> Result<Action, Error> {
    let name = snap.name_any();
    let path = Path::new(&snap.spec.path);
    let previous = snap.status.clone().unwrap_or_default();
    if previous.ready_to_use {
        if path.is_file() {
            return Ok(Action::await_change());
        }
        let status = failed(
            snap,
            &previous,
            "FileMissing",
            format!(
                "the copy's file {} is gone; a snapshot is not retaken (it would be another point in time)",
                path.display()
            ),
            &ctx.now(),
        );
        patch_status(api, &name, &status).await?;
        return Ok(Action::await_change());
    }

    let outcome = match source_file(snap, ctx) {
        Err((reason, message)) => Outcome::Failed { reason, message },
        Ok(source) => {
            let dest = path.to_path_buf();
            let made = tokio::task::spawn_blocking(move || {
                target_core::lun::clone::reflink(&source, &dest, None)
            })
            .await;
            match made {
                Ok(Ok(size)) => Outcome::Made { size },
                Ok(Err(e @ BackendError::CloneUnsupported { .. })) => Outcome::Failed {
                    reason: "CloneUnsupported",
                    message: e.to_string(),
                },
                Ok(Err(BackendError::Open { path: p, source: e }))
                    if p.as_path() == path && e.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    Outcome::Failed {
                        reason: "InvalidSpec",
                        message: format!(
                            "spec.path {} exists already and is not this snapshot's copy",
                            path.display()
                        ),
                    }
                }
                Ok(Err(e)) => Outcome::Failed {
                    reason: "CopyFailed",
                    message: e.to_string(),
                },
                Err(e) => Outcome::Failed {
                    reason: "CopyFailed",
                    message: format!("the copy task failed: {e}"),
                },
            }
        }
    };
    let now = ctx.now();
    match outcome {
        Outcome::Made { size } => {
            info!(snapshot = %name, path = %path.display(), size, "snapshot made");
            let status = TargetSnapshotStatus {
                ready_to_use: true,
                size: Some(Quantity(size.to_string())),
                creation_time: Some(now.clone()),
                conditions: vec![condition(
                    "True",
                    "Created",
                    format!("reflink copy {} made", path.display()),
                    snap,
                    &previous,
                    &now,
                )],
                observed_generation: snap.metadata.generation,
            };
            patch_status(api, &name, &status).await?;
            Ok(Action::await_change())
        }
        Outcome::Failed { reason, message } => {
            let status = failed(snap, &previous, reason, message.clone(), &now);
            if snap.status.as_ref() != Some(&status) {
                warn!(snapshot = %name, reason, %message, "snapshot not made");
                patch_status(api, &name, &status).await?;
            }
            // A filesystem does not learn reflink, nor a spec fix itself: wait for a change.
            Ok(match reason {
                "CloneUnsupported" | "InvalidSpec" => Action::await_change(),
                _ => Action::requeue(RETRY),
            })
        }
    }
}

/// The file of the snapshotted LUN, from the Target as this node sees it.
fn source_file(
    snap: &TargetSnapshot,
    ctx: &Context,
) -> Result<std::path::PathBuf, (&'static str, String)> {
    let path = Path::new(&snap.spec.path);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        || path.file_name().is_none()
    {
        return Err((
            "InvalidSpec",
            format!(
                "spec.path {:?}: an absolute path of a file, without '..'",
                snap.spec.path
            ),
        ));
    }
    let target_name = &snap.spec.target_ref.name;
    let target = ctx
        .stores
        .targets
        .get(&ObjectRef::<Target>::new(target_name))
        .ok_or_else(|| {
            (
                "SourceNotFound",
                format!("Target {target_name} does not exist"),
            )
        })?;
    if target.spec.node_name.as_deref() != Some(ctx.syncer.node()) {
        return Err((
            "SourceNotFound",
            format!(
                "Target {target_name} is served by node {}, not by this one ({})",
                target.spec.node_name.as_deref().unwrap_or("(none)"),
                ctx.syncer.node()
            ),
        ));
    }
    let lun = target
        .spec
        .luns
        .iter()
        .find(|l| l.lun == snap.spec.lun)
        .ok_or_else(|| {
            (
                "SourceNotFound",
                format!("Target {target_name} has no LUN {}", snap.spec.lun),
            )
        })?;
    let file = lun.backing_store.as_deref().ok_or_else(|| {
        (
            "InvalidSpec",
            format!(
                "LUN {} of Target {target_name} has no file (a RAM LUN cannot be snapshotted)",
                snap.spec.lun
            ),
        )
    })?;
    if !Path::new(file).exists() {
        return Err((
            "SourceNotFound",
            format!(
                "LUN {} of Target {target_name}: {file} does not exist yet",
                snap.spec.lun
            ),
        ));
    }
    Ok(file.into())
}

fn failed(
    snap: &TargetSnapshot,
    previous: &TargetSnapshotStatus,
    reason: &str,
    message: String,
    now: &str,
) -> TargetSnapshotStatus {
    TargetSnapshotStatus {
        ready_to_use: false,
        conditions: vec![condition("False", reason, message, snap, previous, now)],
        observed_generation: snap.metadata.generation,
        ..previous.clone()
    }
}

fn condition(
    status: &str,
    reason: &str,
    message: String,
    snap: &TargetSnapshot,
    previous: &TargetSnapshotStatus,
    now: &str,
) -> TargetCondition {
    let old = previous.conditions.iter().find(|c| c.type_ == "Ready");
    let last_transition_time = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => Some(now.to_owned()),
    };
    TargetCondition {
        type_: "Ready".to_owned(),
        status: status.to_owned(),
        last_transition_time,
        reason: Some(reason.to_owned()),
        message: Some(message),
        observed_generation: snap.metadata.generation,
    }
}

async fn patch_status(
    api: &Api<TargetSnapshot>,
    name: &str,
    status: &TargetSnapshotStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::PatchStatus {
            name: name.to_owned(),
            source,
        })?;
    Ok(())
}

fn cleanup(snap: &TargetSnapshot, ctx: &Context) -> Action {
    let annotated = snap
        .annotations()
        .get(DELETE_BACKING_ANNOTATION)
        .is_some_and(|v| v == "true");
    let path = Path::new(&snap.spec.path);
    match ctx.volume_dir() {
        Some(dir) if annotated && deletable_path(path, dir) => match std::fs::remove_file(path) {
            Ok(()) => {
                info!(snapshot = %snap.name_any(), path = %path.display(), "snapshot file deleted")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(snapshot = %snap.name_any(), path = %path.display(), error = %e,
                "deleting the snapshot file failed"),
        },
        _ => info!(snapshot = %snap.name_any(), path = %path.display(),
            "snapshot deleted; its file is kept (not annotated for deletion or not under --csi-volume-dir)"),
    }
    Action::await_change()
}
