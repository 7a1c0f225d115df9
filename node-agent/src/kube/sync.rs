//! The node-wide sync: reflector stores -> [`Objects`] -> desired state for this node ->
//! [`TargetTable::apply`] -> [`NodeView`].
//!
//! Every Target of the node shares one table, so there is one sync, not one per Target: any
//! change (a Target, a group, a binding, a Secret) recomputes the whole desired state with the
//! same pure functions the standalone mode uses, and `apply` changes only what differs. That
//! is what makes revocation immediate (a deleted binding or group drops out of the ACL and
//! `apply` ends the sessions the new ACL refuses) and a restart exact (the table is rebuilt
//! from the API objects alone).
//!
//! Targets being deleted (`metadata.deletionTimestamp` set) are left out, so the sync run by a
//! finalizer's cleanup removes them from the table.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use ktgt_operator::api::{document, InitiatorGroup, InitiatorGroupBinding, Target};
use ktgt_operator::watch::{backoff, is_progress};
use kube::runtime::reflector::Store;
use kube::runtime::{reflector, watcher};
use kube::{Api, Client};
use std::sync::atomic::{AtomicU64, Ordering};
use target_core::config::DesiredState;
use target_core::table::TargetTable;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::status::{condition_reason, LunFailure, NodeView, ServedTarget};
use crate::config::{self, Objects, DEFAULT_NAMESPACE};

/// How long a sync waits for a newly watched namespace's Secrets to be listed before it
/// computes without them (the Target then reports `ChapSecretMissing` until they arrive).
const SECRET_LIST_WAIT: Duration = Duration::from_secs(10);
/// How often a waiter re-polls a store's readiness (see [`wait_ready`]).
const READY_POLL: Duration = Duration::from_millis(200);
/// How often LUNs that failed to open are retried while nothing else changes.
const OPEN_RETRY: Duration = Duration::from_secs(30);

/// The reflector stores the sync reads.
#[derive(Clone)]
pub struct Stores {
    pub targets: Store<Target>,
    pub groups: Store<InitiatorGroup>,
    pub bindings: Store<InitiatorGroupBinding>,
    pub secrets: Arc<SecretStores>,
}

impl Stores {
    /// Waits until the Target, InitiatorGroup and InitiatorGroupBinding stores have been
    /// listed once: computing from a partial list would serve partial ACLs.
    pub async fn wait_until_ready(&self) {
        wait_ready(&self.targets).await;
        wait_ready(&self.groups).await;
        wait_ready(&self.bindings).await;
    }
}

/// `Store::wait_until_ready`, safe with several waiters: kube-runtime 5's readiness future
/// keeps only the waker of the task that polled it last, so a task that started waiting
/// earlier (the sync loop, before the controller) is never woken. Polling again with a short
/// timeout re-registers this task; once ready the answer is memoized and immediate.
async fn wait_ready<K>(store: &Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(READY_POLL, store.wait_until_ready()).await {
            // An error means the writer was dropped (shutdown); the store stays as it is.
            Ok(_) => return,
            Err(_) => continue,
        }
    }
}

/// What the watches tell the sync loop: something changed (`notify`), and how many changes
/// there have been (`generation`), so a reconcile can tell whether the last sync's view is
/// still current.
#[derive(Debug, Default)]
pub struct Changes {
    notify: Notify,
    generation: AtomicU64,
}

impl Changes {
    /// A watch saw a change.
    pub fn signal(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Changes so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Waits for the next [`Changes::signal`] (or one that came since the last wait).
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// Secrets, watched per namespace: only the namespaces that this node's Targets reference in
/// `spec.chap`, so the agent needs no cluster-wide Secret access.
pub struct SecretStores {
    /// `None` in tests: the stores are given, nothing is watched.
    client: Option<Client>,
    changes: Arc<Changes>,
    watched: std::sync::Mutex<BTreeMap<String, Watched>>,
}

struct Watched {
    store: Store<Secret>,
    task: Option<JoinHandle<()>>,
}

impl SecretStores {
    /// Watches namespaces on demand with `client`, notifying `changes` on every event.
    pub fn new(client: Client, changes: Arc<Changes>) -> SecretStores {
        SecretStores {
            client: Some(client),
            changes,
            watched: Default::default(),
        }
    }

    /// Fixed stores by namespace (tests).
    pub fn fixed(stores: BTreeMap<String, Store<Secret>>) -> SecretStores {
        SecretStores {
            client: None,
            changes: Arc::new(Changes::default()),
            watched: std::sync::Mutex::new(
                stores
                    .into_iter()
                    .map(|(ns, store)| (ns, Watched { store, task: None }))
                    .collect(),
            ),
        }
    }

    /// Starts watching the namespaces in `wanted` not watched yet and stops watching the
    /// others; waits (bounded) for new namespaces' first list.
    async fn ensure(&self, wanted: &BTreeSet<String>) {
        let Some(client) = &self.client else {
            return;
        };
        let mut started = Vec::new();
        {
            let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            watched.retain(|ns, w| {
                let keep = wanted.contains(ns);
                if !keep {
                    if let Some(task) = &w.task {
                        task.abort();
                    }
                    debug!(namespace = %ns, "no longer watching Secrets");
                }
                keep
            });
            for ns in wanted {
                if watched.contains_key(ns) {
                    continue;
                }
                let (store, writer) = reflector::store();
                let api: Api<Secret> = Api::namespaced(client.clone(), ns);
                let changes = self.changes.clone();
                let namespace = ns.clone();
                let task = tokio::spawn(async move {
                    use futures::StreamExt;
                    let stream =
                        reflector(writer, backoff(watcher(api, watcher::Config::default())));
                    futures::pin_mut!(stream);
                    while let Some(event) = stream.next().await {
                        match event {
                            Ok(e) if is_progress(&e) => changes.signal(),
                            Ok(_) => {}
                            Err(e) => warn!(namespace = %namespace, error = %e,
                                "watching Secrets failed; retrying"),
                        }
                    }
                });
                info!(namespace = %ns, "watching Secrets for CHAP");
                started.push(store.clone());
                watched.insert(
                    ns.clone(),
                    Watched {
                        store,
                        task: Some(task),
                    },
                );
            }
        }
        for store in started {
            let _ = tokio::time::timeout(SECRET_LIST_WAIT, wait_ready(&store)).await;
        }
    }

    /// Every watched Secret, in the resolver's form.
    fn snapshot(&self) -> Vec<document::Secret> {
        let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<document::Secret> = watched
            .values()
            .flat_map(|w| w.store.state())
            .map(|s| secret_document(&s))
            .collect();
        out.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        out
    }
}

impl Drop for SecretStores {
    fn drop(&mut self) {
        let watched = self.watched.get_mut().unwrap_or_else(|e| e.into_inner());
        for w in watched.values() {
            if let Some(task) = &w.task {
                task.abort();
            }
        }
    }
}

/// A core Secret as the resolver reads it (`data` base64-encoded, as in YAML).
pub fn secret_document(s: &Secret) -> document::Secret {
    let b64 = base64::engine::general_purpose::STANDARD;
    document::Secret {
        api_version: "v1".to_owned(),
        kind: "Secret".to_owned(),
        metadata: (&s.metadata).into(),
        type_: s.type_.clone(),
        data: s
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), b64.encode(&v.0)))
            .collect(),
        string_data: s.string_data.clone().unwrap_or_default(),
        immutable: s.immutable,
    }
}

/// The API objects the desired state of `node` depends on, from `targets` (all nodes'),
/// oldest first so the first Target to claim an IQN keeps it. Targets being deleted are left
/// out.
pub fn objects(
    targets: &[Arc<Target>],
    groups: &[Arc<InitiatorGroup>],
    bindings: &[Arc<InitiatorGroupBinding>],
    secrets: Vec<document::Secret>,
) -> Objects {
    let mut targets: Vec<&Arc<Target>> = targets
        .iter()
        .filter(|t| t.metadata.deletion_timestamp.is_none())
        .collect();
    targets.sort_by(|a, b| {
        let key = |t: &Target| {
            (
                t.metadata.creation_timestamp.clone(),
                t.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    let mut groups: Vec<document::InitiatorGroup> = groups.iter().map(|g| (&**g).into()).collect();
    groups.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut bindings: Vec<document::InitiatorGroupBinding> =
        bindings.iter().map(|b| (&**b).into()).collect();
    bindings.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Objects {
        targets: targets.into_iter().map(|t| (&**t).into()).collect(),
        initiator_groups: groups,
        bindings,
        secrets,
    }
}

/// Namespaces of the Secrets this node's Targets reference.
fn secret_namespaces(targets: &[Arc<Target>], node: &str) -> BTreeSet<String> {
    targets
        .iter()
        .filter(|t| t.spec.node_name.as_deref() == Some(node))
        .filter_map(|t| t.spec.chap.as_ref())
        .flat_map(|c| std::iter::once(&c.secret_ref).chain(c.mutual_secret_ref.as_ref()))
        .map(|r| {
            r.namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
        })
        .collect()
}

/// Small stable numbers per IQN (tgtd's `tid`), for `status.observedState.tid`. A number is
/// kept while its IQN is served and reused from the Target's status after a restart when
/// free, so it survives restarts too.
#[derive(Debug, Default)]
pub struct Tids {
    by_iqn: BTreeMap<String, i32>,
}

impl Tids {
    /// The number of `iqn`, allocating `hint` if free, else the lowest free one (from 1).
    pub fn assign(&mut self, iqn: &str, hint: Option<i32>) -> i32 {
        if let Some(&tid) = self.by_iqn.get(iqn) {
            return tid;
        }
        let used: BTreeSet<i32> = self.by_iqn.values().copied().collect();
        let tid = match hint {
            Some(h) if h > 0 && !used.contains(&h) => h,
            _ => (1..).find(|n| !used.contains(n)).unwrap_or(1),
        };
        self.by_iqn.insert(iqn.to_owned(), tid);
        tid
    }

    /// Frees the numbers of IQNs for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.by_iqn.retain(|iqn, _| keep(iqn));
    }
}

/// Serialises syncs and remembers what was applied.
pub struct Syncer {
    node: String,
    table: Arc<TargetTable>,
    /// `--discovery-chap-secret` (and mutual), read from the API like the Targets' Secrets.
    discovery: Option<config::DiscoveryChap>,
    state: tokio::sync::Mutex<SyncState>,
}

#[derive(Default)]
struct SyncState {
    /// The desired state last handed to `apply` (after backing store checks).
    applied: Option<DesiredState>,
    applied_at: Option<Instant>,
    /// The last discovery CHAP problem logged (logged again only when it changes).
    discovery_problem: Option<String>,
    /// LUNs that failed to open at the last `apply`.
    open_failures: BTreeMap<(String, u16), LunFailure>,
    tids: Tids,
    view: Arc<NodeView>,
    /// The [`Changes::generation`] `view` was computed at, and when.
    view_generation: Option<u64>,
    view_at: Option<Instant>,
}

impl Syncer {
    pub fn new(node: impl Into<String>, table: Arc<TargetTable>) -> Syncer {
        Syncer {
            node: node.into(),
            table,
            discovery: None,
            state: Default::default(),
        }
    }

    /// Requires CHAP on discovery sessions with the credentials of `discovery`'s Secrets.
    /// While they cannot be read, discovery fails closed (nobody authenticates) and the
    /// problem is logged.
    pub fn with_discovery_chap(mut self, discovery: Option<config::DiscoveryChap>) -> Syncer {
        self.discovery = discovery;
        self
    }

    /// The node this syncer serves.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The table it applies to.
    pub fn table(&self) -> &Arc<TargetTable> {
        &self.table
    }

    /// The view of the last sync.
    pub async fn last_view(&self) -> Arc<NodeView> {
        self.state.lock().await.view.clone()
    }

    /// The last sync's view if it was computed at `generation` less than `max_age` ago: then
    /// no watch has reported a change since, and a reconcile can use it instead of syncing
    /// the whole node again (one sync per change, not one per Target).
    pub async fn current_view(&self, generation: u64, max_age: Duration) -> Option<Arc<NodeView>> {
        let state = self.state.lock().await;
        (state.view_generation == Some(generation)
            && state.view_at.is_some_and(|at| at.elapsed() < max_age))
        .then(|| state.view.clone())
    }

    /// [`Syncer::sync`], recording that its view reflects the stores as of `generation` (read
    /// before the sync starts, so a change during it makes the view stale).
    pub async fn sync_at(&self, stores: &Stores, generation: u64) -> Arc<NodeView> {
        let view = self.sync(stores).await;
        let mut state = self.state.lock().await;
        if Arc::ptr_eq(&state.view, &view) {
            state.view_generation = Some(generation);
            state.view_at = Some(Instant::now());
        }
        view
    }

    /// Recomputes the desired state from `stores` and applies it if it differs from the last
    /// one applied (or some LUN failed to open a while ago). Idempotent and cheap when
    /// nothing changed.
    pub async fn sync(&self, stores: &Stores) -> Arc<NodeView> {
        stores.wait_until_ready().await;
        let targets = stores.targets.state();
        let mut namespaces = secret_namespaces(&targets, &self.node);
        if let Some(d) = &self.discovery {
            for r in std::iter::once(&d.secret_ref).chain(&d.mutual_secret_ref) {
                namespaces.insert(
                    r.namespace
                        .clone()
                        .unwrap_or_else(|| config::DEFAULT_NAMESPACE.to_owned()),
                );
            }
        }
        stores.secrets.ensure(&namespaces).await;
        let objects = objects(
            &targets,
            &stores.groups.state(),
            &stores.bindings.state(),
            stores.secrets.snapshot(),
        );

        let mut state = self.state.lock().await;
        let resolved = config::desired_state_for_node(&objects, Some(&self.node));
        let mut desired = resolved.state;
        if let Some(d) = &self.discovery {
            desired.discovery_chap = Some(match config::discovery_chap(d, &objects) {
                Ok(chap) => {
                    if state.discovery_problem.take().is_some() {
                        tracing::info!("discovery CHAP credentials read; discovery open to them");
                    }
                    chap
                }
                Err((field, problem)) => {
                    let message = format!("{field}: {problem}");
                    if state.discovery_problem.as_ref() != Some(&message) {
                        tracing::warn!(problem = %message,
                            "discovery CHAP secret unusable: discovery sessions are refused until it is fixed");
                        state.discovery_problem = Some(message);
                    }
                    target_core::config::ChapConfig::default()
                }
            });
        }
        let mut lun_failures = BTreeMap::new();
        for e in config::check_backing_stores(&desired) {
            if let Some(t) = desired.targets.get_mut(&e.iqn) {
                t.luns.remove(&e.lun);
            }
            lun_failures.insert(
                (e.iqn.clone(), e.lun),
                LunFailure {
                    reason: condition_reason(&e.problem),
                    message: e.problem.to_string(),
                },
            );
        }

        let retry_opens = !state.open_failures.is_empty()
            && state.applied_at.is_none_or(|at| at.elapsed() >= OPEN_RETRY);
        if state.applied.as_ref() != Some(&desired) || retry_opens {
            let report = self.table.apply(&desired).await;
            report.log();
            state.open_failures = report
                .errors
                .iter()
                .flat_map(|(iqn, errs)| {
                    errs.iter().map(move |e| {
                        (
                            (iqn.clone(), e.lun),
                            LunFailure {
                                reason: match e.error {
                                    target_core::lun::BackendError::CloneUnsupported { .. } => {
                                        "CloneUnsupported"
                                    }
                                    _ => "LUNOpenFailed",
                                },
                                message: e.error.to_string(),
                            },
                        )
                    })
                })
                .collect();
            target_core::stats::global().retain(|iqn, lun| {
                desired
                    .targets
                    .get(iqn)
                    .is_some_and(|t| t.luns.contains_key(&lun))
            });
            state.applied = Some(desired.clone());
            state.applied_at = Some(Instant::now());
        }
        lun_failures.extend(state.open_failures.clone());

        // Who owns each served IQN, and the tid it had before a restart.
        let mut owners: BTreeMap<&str, &Target> = BTreeMap::new();
        for t in &targets {
            let ours = t.spec.node_name.as_deref() == Some(self.node.as_str())
                && t.metadata.deletion_timestamp.is_none();
            let name = t.metadata.name.as_deref().unwrap_or("");
            if ours && !resolved.failed_targets.contains(name) {
                // Oldest first (as resolved): keep the first owner.
                let older = owners.get(t.spec.iqn.as_str()).is_some_and(|o| {
                    (&o.metadata.creation_timestamp, &o.metadata.name)
                        <= (&t.metadata.creation_timestamp, &t.metadata.name)
                });
                if !older {
                    owners.insert(t.spec.iqn.as_str(), t);
                }
            }
        }
        state.tids.retain(|iqn| desired.targets.contains_key(iqn));
        let mut served = BTreeMap::new();
        for (iqn, tc) in &desired.targets {
            let Some(live) = self.table.target(iqn) else {
                continue;
            };
            let owner = owners.get(iqn.as_str());
            let hint = owner
                .and_then(|t| t.status.as_ref())
                .and_then(|s| s.observed_state.as_ref())
                .filter(|o| o.iqn.as_deref() == Some(iqn.as_str()))
                .and_then(|o| o.tid);
            let tid = state.tids.assign(iqn, hint);
            let accounts = tc
                .chap
                .incoming
                .iter()
                .chain(tc.chap.outgoing.as_ref())
                .map(|c| c.user.clone())
                .collect();
            served.insert(
                iqn.clone(),
                ServedTarget {
                    name: owner
                        .and_then(|t| t.metadata.name.clone())
                        .unwrap_or_default(),
                    tid,
                    luns: live.lun_numbers(),
                    sizes: live
                        .lun_numbers()
                        .into_iter()
                        .filter_map(|n| {
                            let lu = live.lun(n)?;
                            Some((n, lu.num_blocks() * u64::from(lu.block_size)))
                        })
                        .collect(),
                    acl: tc.acl.clone(),
                    accounts,
                },
            );
        }
        let binding_targets = objects
            .bindings
            .iter()
            .map(|b| {
                (
                    b.metadata.name_or_empty().to_owned(),
                    b.spec.target_ref.name.clone(),
                )
            })
            .collect();
        let view = Arc::new(NodeView {
            errors: resolved.errors,
            failed_targets: resolved.failed_targets,
            served,
            lun_failures,
            binding_targets,
        });
        state.view = view.clone();
        view
    }
}
