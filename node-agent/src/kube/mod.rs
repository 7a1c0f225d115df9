//! Cluster mode: serve the Targets whose `spec.nodeName` is this node, configured from the
//! Kubernetes API (`ktgt-agent kubernetes`).
//!
//! # Layout
//! - [`sync`]: reflector stores -> desired state (the standalone mode's pure functions) ->
//!   [`TargetTable::apply`]; one node-wide sync, run on every change.
//! - [`status`]: a Target's conditions and observed state from a sync's [`status::NodeView`].
//! - [`reconcile`]: the Target controller (finalizer, status patch, Events).
//! - [`snapshot`]: the TargetSnapshot controller (reflink copies of this node's LUN files).
//! - [`notices`]: rate-limited Events on a Target for refused logins and dropped sessions.
//!
//! # Watches
//! Targets (all, filtered by `spec.nodeName` here: custom resources have no field selectors),
//! InitiatorGroups, InitiatorGroupBindings, Secrets in the namespaces this node's Targets
//! reference for CHAP, and TargetSnapshots (their own controller, [`snapshot`]; those of
//! other nodes are ignored). Any event triggers a (debounced) sync, then a reconcile of every Target
//! so statuses follow; each Target's own changes also reconcile it directly.

pub mod notices;
pub mod reconcile;
pub mod snapshot;
pub mod status;
pub mod sync;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ktgt_operator::api::{InitiatorGroup, InitiatorGroupBinding, Target, TargetSnapshot};
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

/// What the agent's flags add to cluster mode.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--csi-volume-dir`: where TargetSnapshots and deleted volumes' files may be removed.
    pub volume_dir: Option<std::path::PathBuf>,
    /// `--discovery-chap-secret` and `--discovery-chap-mutual-secret`.
    pub discovery: Option<crate::config::DiscoveryChap>,
}

/// Runs cluster mode for `node` until `shutdown` is cancelled. Marks [`READY_INITIAL_SYNC`]
/// on `readiness` after the first sync.
pub async fn run(
    client: Client,
    node: String,
    table: Arc<TargetTable>,
    metrics: ReconcileMetrics,
    readiness: Readiness,
    shutdown: CancellationToken,
    options: Options,
) {
    let Options {
        volume_dir,
        discovery,
    } = options;
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
    .inspect({
        let mut seen = TargetChanges::default();
        move |event| match event {
            Ok(e) if seen.matters(e) => target_changes.signal(),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "watching Targets failed; retrying"),
        }
    })
    .applied_objects();

    let mut ctx = Context::new(
        client,
        stores,
        Syncer::new(node.clone(), table).with_discovery_chap(discovery),
        metrics,
        Some(format!("ktgt-agent-{node}")),
    )
    .with_changes(changes.clone());
    if let Some(dir) = volume_dir {
        ctx = ctx.with_volume_dir(dir);
    }
    let ctx = Arc::new(ctx);
    // Refused logins and dropped sessions become (rate-limited) Events on their Target.
    tasks.push(tokio::spawn(notices::run(
        ctx.clone(),
        target_core::events::global().subscribe(),
        shutdown.clone(),
    )));

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

    info!(node = %node, "watching Targets, InitiatorGroups, InitiatorGroupBindings and TargetSnapshots");
    // TargetSnapshots of this node: reflink copies of LUN files (see [`snapshot`]).
    let snapshots = Controller::new(
        Api::<TargetSnapshot>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().concurrency(2))
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(snapshot::reconcile, snapshot::error_policy, ctx.clone())
    .for_each(|result| async move {
        if let Err(e) = result {
            debug!(error = %e, "snapshot reconcile failed");
        }
    });
    let targets = Controller::for_stream(target_stream, targets)
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
        });
    futures::join!(targets, snapshots);
    for task in tasks {
        task.abort();
    }
}

/// Which Target events can change what the node serves: a Target appearing or going, its
/// spec changing (`metadata.generation`: the status subresource keeps status writes out of
/// it), its labels or annotations changing (a user's edit, such as an annotation to make the
/// agent look again), its deletion starting, and the end of a (re)list. Not our own status
/// and finalizer writes, which would otherwise make every reconcile's view stale and cost a
/// node-wide sync per Target.
#[derive(Default)]
struct TargetChanges {
    /// Name -> what matters of it, as last seen.
    seen: std::collections::HashMap<String, TargetKey>,
    /// The objects of a relist in progress (they replace `seen` when it is done).
    relist: std::collections::HashMap<String, TargetKey>,
}

type TargetKey = (Option<i64>, bool, u64);

fn target_key(t: &Target) -> TargetKey {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.metadata.labels.hash(&mut h);
    t.metadata.annotations.hash(&mut h);
    (
        t.metadata.generation,
        t.metadata.deletion_timestamp.is_some(),
        h.finish(),
    )
}

impl TargetChanges {
    fn matters(&mut self, event: &watcher::Event<Target>) -> bool {
        let name = |t: &Target| t.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Apply(t) => {
                self.seen.insert(name(t), target_key(t)) != Some(target_key(t))
            }
            watcher::Event::Delete(t) => {
                self.seen.remove(&name(t));
                true
            }
            watcher::Event::Init => {
                self.relist.clear();
                false
            }
            watcher::Event::InitApply(t) => {
                self.relist.insert(name(t), target_key(t));
                false
            }
            // A relist is done: whatever it found replaces what was seen, in one change.
            watcher::Event::InitDone => {
                self.seen = std::mem::take(&mut self.relist);
                true
            }
        }
    }
}

#[cfg(test)]
mod target_changes_tests {
    use super::*;
    use ktgt_operator::api::TargetSpec;

    fn target(generation: i64, annotation: Option<&str>) -> Target {
        let mut t = Target::new("t", TargetSpec::default());
        t.metadata.generation = Some(generation);
        if let Some(a) = annotation {
            t.metadata.annotations = Some([("a".to_owned(), a.to_owned())].into());
        }
        t
    }

    #[test]
    fn status_and_finalizer_writes_do_not_matter_spec_and_annotation_edits_do() {
        use watcher::Event::*;
        let mut c = TargetChanges::default();
        assert!(!c.matters(&Init));
        assert!(!c.matters(&InitApply(target(1, None))));
        assert!(c.matters(&InitDone));
        // The same generation again (our status patch, our finalizer): nothing.
        assert!(!c.matters(&Apply(target(1, None))));
        let mut with_finalizer = target(1, None);
        with_finalizer.metadata.finalizers = Some(vec!["f".into()]);
        assert!(!c.matters(&Apply(with_finalizer)));
        // A spec edit, an annotation, a deletion: each matters once.
        assert!(c.matters(&Apply(target(2, None))));
        assert!(!c.matters(&Apply(target(2, None))));
        assert!(c.matters(&Apply(target(2, Some("poke")))));
        let mut deleting = target(2, Some("poke"));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(c.matters(&Apply(deleting)));
        assert!(c.matters(&Delete(target(2, None))));
        // Re-created under the same name: new.
        assert!(c.matters(&Apply(target(1, None))));
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
