//! Cluster-mode tests: the node-wide sync and status computation on in-memory stores (with a
//! real [`TargetTable`]), and the reconciler against a mock API server that asserts every
//! call in order (controller-rs's `ApiServerVerifier`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::ByteString;
use ktgt_operator::api::{
    InitiatorGroup, InitiatorGroupBinding, InitiatorGroupBindingSpec, InitiatorGroupReference,
    InitiatorGroupSpec, InitiatorGroupStatus, SecretReference, Target, TargetChap, TargetLun,
    TargetReference, TargetSpec, TARGET_FINALIZER,
};
use ktgt_operator::telemetry::ReconcileMetrics;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::Client;
use target_core::table::{EndReason, SessionHandle, TargetTable};
use tokio_util::sync::CancellationToken;

use super::status::{target_status, NodeView};
use super::sync::{SecretStores, Stores, Syncer, Tids};
use super::*;

const NODE: &str = "node-a";
const NOW: &str = "2024-01-01T00:00:00Z";
const CLIENT_A: &str = "iqn.2024-01.test:client-a";
const CLIENT_B: &str = "iqn.2024-01.test:client-b";

// ---------------------------------------------------------------------------------------------
// Fixtures

fn time(second: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + second).unwrap())
}

fn memory_lun(lun: i32) -> TargetLun {
    TargetLun {
        lun,
        bs_type: Some("memory".to_owned()),
        size: Some("1Mi".into()),
        ..Default::default()
    }
}

fn target(name: &str, node: &str, iqn: &str, age: i64) -> Target {
    let mut t = Target::new(
        name,
        TargetSpec {
            node_name: Some(node.to_owned()),
            iqn: iqn.to_owned(),
            luns: vec![memory_lun(0)],
            chap: None,
        },
    );
    t.metadata.creation_timestamp = Some(time(age));
    t.metadata.generation = Some(1);
    t.metadata.resource_version = Some("1".to_owned());
    t
}

fn group(name: &str, initiators: &[&str], addresses: &[&str]) -> InitiatorGroup {
    InitiatorGroup::new(
        name,
        InitiatorGroupSpec {
            initiators: initiators.iter().map(|s| s.to_string()).collect(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    )
}

fn binding(name: &str, target: &str, group: &str) -> InitiatorGroupBinding {
    InitiatorGroupBinding::new(
        name,
        InitiatorGroupBindingSpec {
            target_ref: TargetReference {
                name: target.to_owned(),
            },
            initiator_group_ref: InitiatorGroupReference {
                name: group.to_owned(),
            },
        },
    )
}

fn chap_secret(ns: &str, name: &str, user: &str, password: &str) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_owned());
    s.metadata.namespace = Some(ns.to_owned());
    s.data = Some(BTreeMap::from([
        ("username".to_owned(), ByteString(user.as_bytes().to_vec())),
        (
            "password".to_owned(),
            ByteString(password.as_bytes().to_vec()),
        ),
    ]));
    s
}

/// A store whose writer the test keeps to change it.
fn store<K>(objects: Vec<K>) -> (reflector::Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (reader, writer)
}

/// In-memory API objects, a real table, and the syncer.
struct Node {
    stores: Stores,
    targets: Writer<Target>,
    groups: Writer<InitiatorGroup>,
    bindings: Writer<InitiatorGroupBinding>,
    secrets: Writer<Secret>,
    syncer: Syncer,
}

impl Node {
    fn new(
        targets: Vec<Target>,
        groups: Vec<InitiatorGroup>,
        bindings: Vec<InitiatorGroupBinding>,
        secrets: Vec<Secret>,
    ) -> Node {
        let (t, tw) = store(targets);
        let (g, gw) = store(groups);
        let (b, bw) = store(bindings);
        let (s, sw) = store(secrets);
        Node {
            stores: Stores {
                targets: t,
                groups: g,
                bindings: b,
                secrets: Arc::new(SecretStores::fixed(BTreeMap::from([(
                    "default".to_owned(),
                    s,
                )]))),
            },
            targets: tw,
            groups: gw,
            bindings: bw,
            secrets: sw,
            syncer: Syncer::new(NODE, TargetTable::new()),
        }
    }

    async fn sync(&self) -> Arc<NodeView> {
        self.syncer.sync(&self.stores).await
    }

    fn table(&self) -> &Arc<TargetTable> {
        self.syncer.table()
    }

    fn admits(&self, iqn: &str, initiator: &str, addr: &str) -> bool {
        self.table()
            .target(iqn)
            .is_some_and(|t| t.admits(initiator, addr.parse().unwrap()))
    }

    /// The status a Target of the stores gets from `view`.
    fn status(&self, name: &str, view: &NodeView) -> ktgt_operator::api::TargetStatus {
        let t = self
            .stores
            .targets
            .state()
            .into_iter()
            .find(|t| t.metadata.name.as_deref() == Some(name))
            .expect("target in store");
        target_status(&t, view, NOW)
    }
}

fn condition<'a>(
    status: &'a ktgt_operator::api::TargetStatus,
    type_: &str,
) -> &'a ktgt_operator::api::TargetCondition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"))
}

/// Registers a fake logged-in session so revocation can be observed.
fn login(table: &TargetTable, iqn: &str, initiator: &str, peer: &str) -> Arc<SessionHandle> {
    let target = table.target(iqn).expect("target served");
    let handle = Arc::new(SessionHandle {
        id: table.allocate_session_id(),
        tsih: table.allocate_tsih(),
        initiator: initiator.to_owned(),
        isid: [0x80, 0, 0, 0, 0, 1],
        tpgt: 1,
        peer: peer.parse::<SocketAddr>().unwrap(),
        cancel: CancellationToken::new(),
        end_reason: Mutex::new(None),
        info: Default::default(),
        io: Default::default(),
        aborts: Default::default(),
    });
    table.register_session(&target, handle.clone());
    handle
}

const IQN1: &str = "iqn.2024-01.test:disk1";
const IQN2: &str = "iqn.2024-01.test:disk2";

// ---------------------------------------------------------------------------------------------
// tgtd-operator faults that must not carry over

/// tgtd-operator 0.1.2 applied every binding on the node to every Target.
#[tokio::test]
async fn a_binding_opens_only_its_own_target() {
    let node = Node::new(
        vec![target("t1", NODE, IQN1, 0), target("t2", NODE, IQN2, 1)],
        vec![group("ga", &[CLIENT_A], &[])],
        vec![binding("b1", "t1", "ga")],
        vec![],
    );
    let view = node.sync().await;
    assert!(node.admits(IQN1, CLIENT_A, "10.0.0.1"));
    assert!(
        !node.admits(IQN2, CLIENT_A, "10.0.0.1"),
        "t2 has no binding"
    );
    assert_eq!(
        view.served[IQN1].acl.initiators(),
        vec![CLIENT_A.to_owned()]
    );
    assert!(view.served[IQN2].acl.initiators().is_empty());
    let t2 = node.status("t2", &view);
    assert!(condition(&t2, "Ready")
        .message
        .as_deref()
        .unwrap()
        .contains("no InitiatorGroupBinding grants access"));
}

/// tgtd-operator: deleting a binding revoked nothing. Here the ACL shrinks at once and the
/// sessions the new ACL refuses are ended.
#[tokio::test]
async fn deleting_a_binding_revokes_access_and_ends_sessions() {
    let b = binding("b1", "t1", "ga");
    let mut node = Node::new(
        vec![target("t1", NODE, IQN1, 0)],
        vec![group("ga", &[CLIENT_A], &[])],
        vec![b.clone()],
        vec![],
    );
    node.sync().await;
    let session = login(node.table(), IQN1, CLIENT_A, "10.0.0.1:40000");
    node.bindings
        .apply_watcher_event(&watcher::Event::Delete(b));
    node.sync().await;
    assert!(!node.admits(IQN1, CLIENT_A, "10.0.0.1"));
    assert!(session.cancel.is_cancelled(), "refused session ended");
    assert_eq!(session.end_reason(), Some(EndReason::AccessRevoked));
}

/// Deleting the InitiatorGroup a binding names revokes too (the binding grants nothing).
#[tokio::test]
async fn deleting_a_group_revokes_access() {
    let g = group("ga", &[CLIENT_A], &[]);
    let mut node = Node::new(
        vec![target("t1", NODE, IQN1, 0)],
        vec![g.clone()],
        vec![binding("b1", "t1", "ga")],
        vec![],
    );
    node.sync().await;
    let session = login(node.table(), IQN1, CLIENT_A, "10.0.0.1:40000");
    node.groups.apply_watcher_event(&watcher::Event::Delete(g));
    let view = node.sync().await;
    assert!(!node.admits(IQN1, CLIENT_A, "10.0.0.1"));
    assert!(session.cancel.is_cancelled());
    // The broken binding is reported on the Target it was meant to open.
    let ready = condition(&node.status("t1", &view), "Ready").clone();
    assert!(
        ready
            .message
            .as_deref()
            .unwrap()
            .contains("InitiatorGroup \"ga\" not found"),
        "{ready:?}"
    );
}

/// A node leaving a group (the operator rewrites status.initiators) loses access at once; the
/// other members keep their sessions.
#[tokio::test]
async fn a_node_leaving_a_group_loses_access() {
    let mut g = group("ga", &[], &[]);
    g.status = Some(InitiatorGroupStatus {
        initiators: vec![CLIENT_A.to_owned(), CLIENT_B.to_owned()],
        addresses: vec![],
    });
    let mut node = Node::new(
        vec![target("t1", NODE, IQN1, 0)],
        vec![g.clone()],
        vec![binding("b1", "t1", "ga")],
        vec![],
    );
    node.sync().await;
    let a = login(node.table(), IQN1, CLIENT_A, "10.0.0.1:40000");
    let b = login(node.table(), IQN1, CLIENT_B, "10.0.0.2:40000");
    g.status = Some(InitiatorGroupStatus {
        initiators: vec![CLIENT_B.to_owned()],
        addresses: vec![],
    });
    node.groups.apply_watcher_event(&watcher::Event::Apply(g));
    node.sync().await;
    assert!(a.cancel.is_cancelled());
    assert!(!b.cancel.is_cancelled());
    assert!(node.admits(IQN1, CLIENT_B, "10.0.0.2"));
}

/// tgtd-operator never unbound a Target's old IQN. A changed IQN replaces the old one.
#[tokio::test]
async fn a_changed_iqn_leaves_no_stale_target() {
    let mut t = target("t1", NODE, IQN1, 0);
    let mut node = Node::new(
        vec![t.clone()],
        vec![group("ga", &[CLIENT_A], &[])],
        vec![binding("b1", "t1", "ga")],
        vec![],
    );
    node.sync().await;
    let session = login(node.table(), IQN1, CLIENT_A, "10.0.0.1:40000");
    t.spec.iqn = IQN2.to_owned();
    t.metadata.generation = Some(2);
    node.targets.apply_watcher_event(&watcher::Event::Apply(t));
    let view = node.sync().await;
    let iqns: Vec<String> = node
        .table()
        .targets()
        .iter()
        .map(|t| t.iqn.clone())
        .collect();
    assert_eq!(iqns, vec![IQN2.to_owned()]);
    assert!(session.cancel.is_cancelled());
    let status = node.status("t1", &view);
    assert_eq!(
        status.observed_state.as_ref().unwrap().iqn.as_deref(),
        Some(IQN2)
    );
    assert_eq!(status.observed_generation, Some(2));
}

/// tgtd-operator's deletion hung while initiators were logged in. Cleanup's sync removes a
/// deleting Target from the table, ending its sessions, without waiting for them.
#[tokio::test]
async fn a_deleting_target_is_removed_without_waiting_for_initiators() {
    let mut t = target("t1", NODE, IQN1, 0);
    let mut node = Node::new(
        vec![t.clone()],
        vec![group("ga", &[CLIENT_A], &[])],
        vec![binding("b1", "t1", "ga")],
        vec![],
    );
    node.sync().await;
    let session = login(node.table(), IQN1, CLIENT_A, "10.0.0.1:40000");
    t.metadata.deletion_timestamp = Some(time(100));
    node.targets.apply_watcher_event(&watcher::Event::Apply(t));
    let view = tokio::time::timeout(std::time::Duration::from_secs(5), node.sync())
        .await
        .expect("sync does not wait for initiators");
    assert!(node.table().target(IQN1).is_none());
    assert!(view.served.is_empty());
    assert_eq!(session.end_reason(), Some(EndReason::TargetRemoved));
}

// ---------------------------------------------------------------------------------------------
// Node selection, restart, tids

#[tokio::test]
async fn targets_of_other_nodes_are_not_served() {
    let node = Node::new(
        vec![target("t1", NODE, IQN1, 0), target("t2", "node-b", IQN2, 1)],
        vec![group("ga", &[CLIENT_A], &[])],
        vec![binding("b1", "t2", "ga")],
        vec![],
    );
    let view = node.sync().await;
    assert!(node.table().target(IQN2).is_none());
    assert!(!view.served.contains_key(IQN2));
    assert!(view.errors.is_empty(), "{:?}", view.errors);
}

#[tokio::test]
async fn a_restart_rebuilds_the_same_table_and_tids() {
    let objects = (
        vec![target("t1", NODE, IQN1, 0), target("t2", NODE, IQN2, 1)],
        vec![group("ga", &[CLIENT_A], &["10.0.0.0/8"])],
        vec![binding("b1", "t1", "ga"), binding("b2", "t2", "ga")],
    );
    let first = Node::new(
        objects.0.clone(),
        objects.1.clone(),
        objects.2.clone(),
        vec![],
    );
    let view = first.sync().await;
    // The statuses the first agent wrote, then a new agent with a new table.
    let mut targets = objects.0.clone();
    for t in &mut targets {
        let name = t.metadata.name.clone().unwrap();
        t.status = Some(first.status(&name, &view));
    }
    // Reverse the tids the first run gave so the hint is what decides.
    assert_eq!(view.served[IQN1].tid, 1);
    assert_eq!(view.served[IQN2].tid, 2);
    targets[0]
        .status
        .as_mut()
        .unwrap()
        .observed_state
        .as_mut()
        .unwrap()
        .tid = Some(7);
    let second = Node::new(targets, objects.1, objects.2, vec![]);
    let view2 = second.sync().await;
    assert_eq!(
        view2.served[IQN1].tid, 7,
        "tid from the status survives a restart"
    );
    assert_eq!(view2.served[IQN2].tid, 2);
    for iqn in [IQN1, IQN2] {
        assert_eq!(
            first.table().target(iqn).unwrap().state().acl,
            second.table().target(iqn).unwrap().state().acl
        );
        assert_eq!(view.served[iqn].luns, view2.served[iqn].luns);
    }
}

#[test]
fn tids_are_small_stable_and_reused() {
    let mut tids = Tids::default();
    assert_eq!(tids.assign("a", None), 1);
    assert_eq!(tids.assign("b", Some(1)), 2, "hint taken: lowest free");
    assert_eq!(tids.assign("a", None), 1, "stable");
    assert_eq!(tids.assign("c", Some(9)), 9, "free hint used");
    tids.retain(|iqn| iqn != "a");
    assert_eq!(tids.assign("d", None), 1, "freed number reused");
}

// ---------------------------------------------------------------------------------------------
// Status

#[tokio::test]
async fn duplicate_iqn_names_the_owner() {
    let node = Node::new(
        vec![
            target("first", NODE, IQN1, 0),
            target("second", NODE, IQN1, 5),
        ],
        vec![],
        vec![],
        vec![],
    );
    let view = node.sync().await;
    let first = node.status("first", &view);
    let second = node.status("second", &view);
    assert_eq!(condition(&first, "Ready").status, "True");
    let failed = condition(&second, "TargetFailed");
    assert_eq!(failed.status, "True");
    assert_eq!(failed.reason.as_deref(), Some("DuplicateIQN"));
    assert_eq!(
        failed.message.as_deref(),
        Some("IQN iqn.2024-01.test:disk1 already served by Target first on this node")
    );
    assert_eq!(condition(&second, "Ready").status, "False");
    assert!(second.observed_state.is_none());
}

#[tokio::test]
async fn missing_backing_store_fails_the_lun_not_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let mut t = target("t1", NODE, IQN1, 0);
    t.spec.luns.push(TargetLun {
        lun: 1,
        backing_store: Some(missing.display().to_string()),
        ..Default::default()
    });
    let node = Node::new(vec![t], vec![], vec![], vec![]);
    let view = node.sync().await;
    let status = node.status("t1", &view);
    let lun = condition(&status, "LUNFailed");
    assert_eq!(lun.status, "True");
    assert_eq!(lun.reason.as_deref(), Some("BackingStoreNotFound"));
    assert!(
        lun.message
            .as_deref()
            .unwrap()
            .starts_with("LUN 1: backing store"),
        "{lun:?}"
    );
    assert_eq!(condition(&status, "Ready").status, "False");
    assert_eq!(
        condition(&status, "Ready").reason.as_deref(),
        Some("BackingStoreNotFound")
    );
    assert_eq!(condition(&status, "TargetFailed").status, "False");
    let observed = status.observed_state.unwrap();
    assert_eq!(observed.luns.len(), 1, "LUN 0 is served");
    assert_eq!(observed.luns[0].lun, Some(0));
}

#[tokio::test]
async fn invalid_spec_and_lun_conflict_have_their_reasons() {
    let mut t = target("t1", NODE, IQN1, 0);
    t.spec.luns.push(memory_lun(0));
    let mut bad = target("t2", NODE, "not-an-iqn", 1);
    bad.spec.luns.clear();
    let node = Node::new(vec![t, bad], vec![], vec![], vec![]);
    let view = node.sync().await;
    let conflict = node.status("t1", &view);
    assert_eq!(
        condition(&conflict, "TargetFailed").reason.as_deref(),
        Some("LUNConflict")
    );
    assert!(condition(&conflict, "TargetFailed")
        .message
        .as_deref()
        .unwrap()
        .contains("spec.luns[1].lun: duplicate LUN 0"));
    let invalid = node.status("t2", &view);
    assert_eq!(
        condition(&invalid, "TargetFailed").reason.as_deref(),
        Some("InvalidSpec")
    );
    assert!(condition(&invalid, "Ready")
        .message
        .as_deref()
        .unwrap()
        .starts_with("spec.iqn: \"not-an-iqn\" is not a valid iSCSI name"));
}

#[tokio::test]
async fn chap_secret_missing_then_served_with_account_names_only() {
    let mut t = target("t1", NODE, IQN1, 0);
    t.spec.chap = Some(TargetChap {
        secret_ref: SecretReference {
            name: "chap".to_owned(),
            namespace: None,
        },
        mutual_secret_ref: None,
    });
    let mut node = Node::new(vec![t], vec![], vec![], vec![]);
    let view = node.sync().await;
    let status = node.status("t1", &view);
    assert_eq!(
        condition(&status, "TargetFailed").reason.as_deref(),
        Some("ChapSecretMissing")
    );
    assert!(node.table().target(IQN1).is_none());

    let password = "a-long-enough-secret";
    node.secrets
        .apply_watcher_event(&watcher::Event::Apply(chap_secret(
            "default", "chap", "alice", password,
        )));
    let view = node.sync().await;
    let status = node.status("t1", &view);
    assert_eq!(condition(&status, "Ready").status, "True");
    let observed = status.observed_state.clone().unwrap();
    assert_eq!(observed.accounts, vec!["alice".to_owned()]);
    let json = serde_json::to_string(&status).unwrap();
    assert!(!json.contains(password), "status never carries a secret");
}

#[tokio::test]
async fn observed_state_lists_acls_and_an_unchanged_status_is_equal() {
    let mut t = target("t1", NODE, IQN1, 0);
    let node = Node::new(
        vec![t.clone()],
        vec![
            group("ga", &[CLIENT_A], &["10.1.2.3/8"]),
            group("gb", &[CLIENT_B], &["ALL"]),
        ],
        vec![binding("b1", "t1", "ga"), binding("b2", "t1", "gb")],
        vec![],
    );
    let view = node.sync().await;
    let status = target_status(&t, &view, NOW);
    let observed = status.observed_state.clone().unwrap();
    assert_eq!(observed.tid, Some(1));
    assert_eq!(observed.iqn.as_deref(), Some(IQN1));
    assert_eq!(
        observed.acls,
        vec![CLIENT_A, CLIENT_B, "ALL", "10.0.0.0/8"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    );
    assert_eq!(observed.luns[0].bs_type.as_deref(), Some("memory"));
    for c in &status.conditions {
        assert_eq!(c.last_transition_time.as_deref(), Some(NOW));
        assert_eq!(c.observed_generation, Some(1));
    }
    // Recomputed later from the same state: equal, so no patch.
    t.status = Some(status.clone());
    let again = target_status(&t, &*node.sync().await, "2030-01-01T00:00:00Z");
    assert_eq!(again, status);
}

// ---------------------------------------------------------------------------------------------
// Reconciler against a mock API server

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Asserts the API calls a reconcile makes, in order, and answers them.
struct ApiServerVerifier(Handle);

impl ApiServerVerifier {
    /// Expects the next request; returns its body as JSON and answers `reply` (status 200).
    async fn expect(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        reply: serde_json::Value,
    ) -> serde_json::Value {
        let (request, send) =
            tokio::time::timeout(std::time::Duration::from_secs(5), self.0.next_request())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
                .expect("service not called");
        assert_eq!(request.method().as_str(), method, "{}", request.uri());
        assert_eq!(request.uri().path(), path);
        if let Some(ct) = content_type {
            assert_eq!(
                request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok()),
                Some(ct)
            );
        }
        let body = request.into_body().collect_bytes().await.unwrap();
        let json = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        };
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        json
    }

    /// Nothing more is called.
    async fn expect_no_more(mut self) {
        let next =
            tokio::time::timeout(std::time::Duration::from_millis(200), self.0.next_request())
                .await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
    }
}

const TARGETS: &str = "/apis/tgtd.unstable.cloud/v1alpha1/targets";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const JSON_PATCH: &str = "application/json-patch+json";

fn mock_context(node: &Node) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut registry = ktgt_operator::telemetry::registry();
    let ctx = Context::new(
        client,
        node.stores.clone(),
        Syncer::new(NODE, node.table().clone()),
        ReconcileMetrics::register(&mut registry),
        Some("test".to_owned()),
    )
    .with_clock(|| NOW.to_owned());
    (Arc::new(ctx), ApiServerVerifier(handle))
}

fn event_reply() -> serde_json::Value {
    serde_json::json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "e", "namespace": "default"}, "eventTime": NOW})
}

#[tokio::test]
async fn reconcile_adds_finalizer_then_serves_patches_status_and_publishes_event() {
    let t = target("t1", NODE, IQN1, 0);
    let node = Node::new(
        vec![t.clone()],
        vec![group("ga", &[CLIENT_A], &[])],
        vec![binding("b1", "t1", "ga")],
        vec![],
    );
    let (ctx, mut api) = mock_context(&node);

    // 1. No finalizer yet: the only call adds it.
    let task = tokio::spawn(reconcile(Arc::new(t.clone()), ctx.clone()));
    let mut with_finalizer = t.clone();
    with_finalizer.metadata.finalizers = Some(vec![TARGET_FINALIZER.to_owned()]);
    let patch = api
        .expect(
            "PATCH",
            &format!("{TARGETS}/t1"),
            Some(JSON_PATCH),
            serde_json::to_value(&with_finalizer).unwrap(),
        )
        .await;
    assert_eq!(patch[1]["op"], "add");
    assert_eq!(patch[1]["value"][0], TARGET_FINALIZER);
    task.await.unwrap().unwrap();
    assert!(
        node.table().target(IQN1).is_none(),
        "not served before the finalizer"
    );

    // 2. Apply: status patched (whole /status), then a Served Event.
    let task = tokio::spawn(reconcile(Arc::new(with_finalizer.clone()), ctx.clone()));
    let patch = api
        .expect(
            "PATCH",
            &format!("{TARGETS}/t1/status"),
            Some(JSON_PATCH),
            serde_json::to_value(&with_finalizer).unwrap(),
        )
        .await;
    assert_eq!(patch[0]["op"], "add");
    assert_eq!(patch[0]["path"], "/status");
    let status: ktgt_operator::api::TargetStatus =
        serde_json::from_value(patch[0]["value"].clone()).unwrap();
    assert_eq!(condition(&status, "Ready").status, "True");
    assert_eq!(status.observed_generation, Some(1));
    let event = api.expect("POST", EVENTS, None, event_reply()).await;
    assert_eq!(event["reason"], "Served");
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["regarding"]["name"], "t1");
    assert_eq!(event["reportingController"], "ktgt-agent");
    task.await.unwrap().unwrap();
    assert!(node.admits(IQN1, CLIENT_A, "10.0.0.1"));
    assert_eq!(ctx.metrics.reconciles(reconcile::CONTROLLER), 2);

    // 3. Reconciling the patched object again changes nothing: no call at all.
    let mut served = with_finalizer.clone();
    served.status = Some(status);
    reconcile(Arc::new(served), ctx.clone()).await.unwrap();
    api.expect_no_more().await;
}

#[tokio::test]
async fn cleanup_removes_the_target_then_releases_the_finalizer() {
    let mut t = target("t1", NODE, IQN1, 0);
    t.metadata.finalizers = Some(vec![TARGET_FINALIZER.to_owned()]);
    let mut node = Node::new(
        vec![t.clone()],
        vec![group("ga", &[CLIENT_A], &[])],
        vec![binding("b1", "t1", "ga")],
        vec![],
    );
    let (ctx, mut api) = mock_context(&node);
    ctx.sync().await;
    let session = login(node.table(), IQN1, CLIENT_A, "10.0.0.1:40000");

    let mut deleting = t.clone();
    deleting.metadata.deletion_timestamp = Some(time(50));
    // The store sees the deletion too (the watch delivered it).
    node.targets
        .apply_watcher_event(&watcher::Event::Apply(deleting.clone()));

    let task = tokio::spawn(reconcile(Arc::new(deleting.clone()), ctx.clone()));
    let event = api.expect("POST", EVENTS, None, event_reply()).await;
    assert_eq!(event["reason"], "Removed");
    assert_eq!(
        event["note"],
        "stopped serving iqn.2024-01.test:disk1; 1 session(s) logged out"
    );
    let patch = api
        .expect(
            "PATCH",
            &format!("{TARGETS}/t1"),
            Some(JSON_PATCH),
            serde_json::to_value(&deleting).unwrap(),
        )
        .await;
    assert_eq!(patch[0]["op"], "test");
    assert_eq!(patch[0]["path"], "/metadata/finalizers/0");
    assert_eq!(patch[1]["op"], "remove");
    task.await.unwrap().unwrap();
    assert!(node.table().target(IQN1).is_none());
    assert!(
        session.cancel.is_cancelled(),
        "the initiator was logged out"
    );
    api.expect_no_more().await;
}

/// Cleanup tolerates Apply never having run (nothing served, no status).
#[tokio::test]
async fn cleanup_without_apply_releases_the_finalizer() {
    let mut t = target("t1", NODE, IQN1, 0);
    t.metadata.finalizers = Some(vec![TARGET_FINALIZER.to_owned()]);
    t.metadata.deletion_timestamp = Some(time(50));
    let node = Node::new(vec![t.clone()], vec![], vec![], vec![]);
    let (ctx, mut api) = mock_context(&node);
    let task = tokio::spawn(reconcile(Arc::new(t.clone()), ctx));
    let event = api.expect("POST", EVENTS, None, event_reply()).await;
    assert_eq!(event["reason"], "Removed");
    api.expect(
        "PATCH",
        &format!("{TARGETS}/t1"),
        Some(JSON_PATCH),
        serde_json::to_value(&t).unwrap(),
    )
    .await;
    task.await.unwrap().unwrap();
    api.expect_no_more().await;
}

#[tokio::test]
async fn targets_of_other_nodes_get_no_api_call() {
    let mut t = target("t2", "node-b", IQN2, 0);
    t.metadata.finalizers = Some(vec![TARGET_FINALIZER.to_owned()]);
    let node = Node::new(vec![t.clone()], vec![], vec![], vec![]);
    let (ctx, api) = mock_context(&node);
    reconcile(Arc::new(t.clone()), ctx.clone()).await.unwrap();
    t.metadata.deletion_timestamp = Some(time(1));
    reconcile(Arc::new(t), ctx).await.unwrap();
    api.expect_no_more().await;
}

#[tokio::test]
async fn a_failed_target_gets_a_warning_event_and_a_retry() {
    let mut t = target("t1", NODE, "bad", 0);
    t.metadata.finalizers = Some(vec![TARGET_FINALIZER.to_owned()]);
    let node = Node::new(vec![t.clone()], vec![], vec![], vec![]);
    let (ctx, mut api) = mock_context(&node);
    let task = tokio::spawn(reconcile(Arc::new(t.clone()), ctx));
    let patch = api
        .expect(
            "PATCH",
            &format!("{TARGETS}/t1/status"),
            Some(JSON_PATCH),
            serde_json::to_value(&t).unwrap(),
        )
        .await;
    assert_eq!(
        patch[0]["value"]["conditions"][1]["type"], "TargetFailed",
        "{patch}"
    );
    let event = api.expect("POST", EVENTS, None, event_reply()).await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidSpec");
    let action = task.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(30))
    );
}

#[tokio::test]
async fn a_failed_status_patch_is_counted_by_reason() {
    let mut t = target("t1", NODE, IQN1, 0);
    t.metadata.finalizers = Some(vec![TARGET_FINALIZER.to_owned()]);
    let node = Node::new(vec![t.clone()], vec![], vec![], vec![]);
    let (ctx, mut api) = mock_context(&node);
    let task = tokio::spawn(reconcile(Arc::new(t), ctx.clone()));
    let (_request, send) = api.0.next_request().await.unwrap();
    send.send_response(
        Response::builder()
            .status(500)
            .body(Body::from(
                serde_json::to_vec(&serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "boom", "reason": "InternalError", "code": 500}))
                .unwrap(),
            ))
            .unwrap(),
    );
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "PatchStatus");
    assert_eq!(ctx.metrics.errors(reconcile::CONTROLLER, "PatchStatus"), 1);
}
