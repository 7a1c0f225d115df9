//! Cluster mode: serve the Targets whose `spec.nodeName` is this node, configured from the
//! Kubernetes API (`ktgt-agent kubernetes`).
//!
//! # Layout
//! - [`sync`]: reflector stores -> desired state (the standalone mode's pure functions) ->
//!   [`TargetTable::apply`]; one node-wide sync, run on every change.
//! - [`status`]: a Target's conditions and observed state from a sync's [`status::NodeView`].
//! - [`reconcile`]: the Target controller (finalizer, status patch, Events).
//! - [`metrics`]: sessions and per-LUN counters for `/metrics`.
//!
//! # Watches
//! Targets (all, filtered by `spec.nodeName` here: custom resources have no field selectors),
//! InitiatorGroups, InitiatorGroupBindings, and Secrets in the namespaces this node's Targets
//! reference for CHAP. Any event triggers a (debounced) sync, then a reconcile of every Target
//! so statuses follow; each Target's own changes also reconcile it directly.

pub mod metrics;
pub mod reconcile;
pub mod status;
pub mod sync;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ktgt_operator::api::{InitiatorGroup, InitiatorGroupBinding, Target};
use ktgt_operator::telemetry::{Readiness, ReconcileMetrics};
use ktgt_operator::watch::{backoff, is_progress};
use kube::runtime::controller::Controller;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use target_core::table::TargetTable;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use reconcile::{error_policy, reconcile, Context, Error};
pub use sync::{Changes, SecretStores, Stores, Syncer};

/// Readiness check: the first sync from complete API lists has been applied.
pub const READY_INITIAL_SYNC: &str = "initial sync";
/// Readiness check: the portal listens.
pub const READY_PORTAL: &str = "portal";

/// Target reconciles running at once.
const RECONCILE_CONCURRENCY: u16 = 8;
/// Changes arriving closer together than this are applied in one sync.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Runs cluster mode for `node` until `shutdown` is cancelled. Marks [`READY_INITIAL_SYNC`]
/// on `readiness` after the first sync.
pub async fn run(
    client: Client,
    node: String,
    table: Arc<TargetTable>,
    metrics: ReconcileMetrics,
    readiness: Readiness,
    shutdown: CancellationToken,
    volume_dir: Option<std::path::PathBuf>,
) {
    let changes = Arc::new(Changes::default());
    let (targets, targets_writer) = reflector::store::<Target>();
    let (groups, groups_writer) = reflector::store::<InitiatorGroup>();
    let (bindings, bindings_writer) = reflector::store::<InitiatorGroupBinding>();
    let stores = Stores {
        targets: targets.clone(),
        groups,
        bindings,
        secrets: Arc::new(SecretStores::new(client.clone(), changes.clone())),
    };

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(drive(
        reflector(
            groups_writer,
            backoff(watcher(
                Api::<InitiatorGroup>::all(client.clone()),
                Default::default(),
            )),
        ),
        changes.clone(),
        "InitiatorGroup",
    )));
    tasks.push(tokio::spawn(drive(
        reflector(
            bindings_writer,
            backoff(watcher(
                Api::<InitiatorGroupBinding>::all(client.clone()),
                Default::default(),
            )),
        ),
        changes.clone(),
        "InitiatorGroupBinding",
    )));
    let target_changes = changes.clone();
    let target_stream = reflector(
        targets_writer,
        backoff(watcher(
            Api::<Target>::all(client.clone()),
            watcher::Config::default(),
        )),
    )
    .inspect(move |event| match event {
        Ok(e) if is_progress(e) => target_changes.signal(),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "watching Targets failed; retrying"),
    })
    .applied_objects();

    let mut ctx = Context::new(
        client,
        stores,
        Syncer::new(node.clone(), table),
        metrics,
        Some(format!("ktgt-agent-{node}")),
    )
    .with_changes(changes.clone());
    if let Some(dir) = volume_dir {
        ctx = ctx.with_volume_dir(dir);
    }
    let ctx = Arc::new(ctx);

    // The node-wide sync loop: applies every change at once (revocation does not wait for a
    // Target reconcile), then asks for every Target's status to be recomputed.
    let (trigger_tx, trigger_rx) = tokio::sync::mpsc::channel::<()>(1);
    let sync_ctx = ctx.clone();
    let sync_shutdown = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        sync_ctx.stores.wait_until_ready().await;
        sync_ctx.sync().await;
        readiness.set(READY_INITIAL_SYNC, true);
        info!(node = %sync_ctx.syncer.node(), "initial sync applied");
        let _ = trigger_tx.try_send(());
        loop {
            tokio::select! {
                _ = changes.notified() => {}
                _ = sync_shutdown.cancelled() => break,
            }
            tokio::time::sleep(DEBOUNCE).await;
            sync_ctx.sync().await;
            // A full channel already holds a pending "reconcile all".
            let _ = trigger_tx.try_send(());
        }
    }));
    let trigger = futures::stream::unfold(trigger_rx, |mut rx| async move {
        rx.recv().await.map(|()| ((), rx))
    });

    info!(node = %node, "watching Targets, InitiatorGroups and InitiatorGroupBindings");
    Controller::for_stream(target_stream, targets)
        // Bounded: every reconcile may patch the API server, and a node with hundreds of
        // Targets reconciled at once (at start, on "reconcile all") would have the API server
        // refuse most of them (429) and the cache lag behind our own writes.
        .with_config(
            kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
        )
        .reconcile_all_on(trigger)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(target_name = %obj.name, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
    for task in tasks {
        task.abort();
    }
}

/// Drives a reflector (its watcher wrapped in [`backoff`]), signalling `changes` on every
/// event that can change what is served (not the `Init` that starts each list attempt).
async fn drive<S, K>(stream: S, changes: Arc<Changes>, kind: &'static str)
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(e) if is_progress(&e) => changes.signal(),
            Ok(_) => {}
            Err(e) => warn!(kind, error = %e, "watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests;
