use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::*;
use crate::api::{InitiatorNameStrategy, DEFAULT_INITIATOR_NAME_PREFIX};
use crate::testing::mock_client;

struct TestNode {
    name: &'static str,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn node(name: &'static str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> TestNode {
    let map = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    TestNode {
        name,
        labels: map(labels),
        annotations: map(annotations),
    }
}

fn views(nodes: &[TestNode]) -> Vec<NodeView<'_>> {
    nodes
        .iter()
        .map(|n| NodeView {
            name: n.name,
            labels: &n.labels,
            annotations: &n.annotations,
        })
        .collect()
}

fn annotation_strategy(key: &str) -> Option<InitiatorNameStrategy> {
    Some(InitiatorNameStrategy {
        type_: InitiatorNameStrategyType::Annotation,
        initiator_name_prefix: None,
        annotation_key: Some(key.to_owned()),
    })
}

// ---------------------------------------------------------------------------------------------
// compute_status

#[test]
fn node_name_strategy_uses_the_default_prefix_and_every_node() {
    let nodes = [node("b", &[], &[]), node("a", &[], &[])];
    let spec = InitiatorGroupSpec {
        addresses: vec!["192.168.1.0/24".into()],
        ..Default::default()
    };
    let m = compute_status(&spec, views(&nodes), DEFAULT_INITIATOR_NAME_PREFIX);
    assert_eq!(
        m.status.initiators,
        [
            "iqn.2020-06.cloud.unstable.tgtd:a",
            "iqn.2020-06.cloud.unstable.tgtd:b"
        ]
    );
    assert_eq!(m.status.addresses, ["192.168.1.0/24"]);
    assert!(m.skipped.is_empty());
}

#[test]
fn node_selector_matches_every_label_and_group_prefix_wins() {
    let nodes = [
        node("n1", &[("initiator-group", "group1")], &[]),
        node("n2", &[("initiator-group", "group2")], &[]),
        node("n3", &[("initiator-group", "group1"), ("zone", "b")], &[]),
        node("n4", &[], &[]),
    ];
    let spec = InitiatorGroupSpec {
        node_selector: [("initiator-group".to_owned(), "group1".to_owned())].into(),
        initiator_name_strategy: Some(InitiatorNameStrategy {
            initiator_name_prefix: Some("iqn.2020-06.cloud.unstable.tgtd.init".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let m = compute_status(&spec, views(&nodes), DEFAULT_INITIATOR_NAME_PREFIX);
    assert_eq!(
        m.status.initiators,
        [
            "iqn.2020-06.cloud.unstable.tgtd.init:n1",
            "iqn.2020-06.cloud.unstable.tgtd.init:n3"
        ]
    );
}

#[test]
fn annotation_strategy_skips_nodes_without_it_and_dedups() {
    let key = "initiator-iqn";
    let nodes = [
        node("n1", &[], &[(key, "iqn.1994-05.com.redhat:aaa")]),
        node("n2", &[], &[]),
        node("n3", &[], &[(key, " iqn.1994-05.com.redhat:aaa ")]),
        node("n4", &[], &[(key, "not a name")]),
    ];
    let spec = InitiatorGroupSpec {
        initiator_name_strategy: annotation_strategy(key),
        ..Default::default()
    };
    let m = compute_status(&spec, views(&nodes), DEFAULT_INITIATOR_NAME_PREFIX);
    assert_eq!(m.status.initiators, ["iqn.1994-05.com.redhat:aaa"]);
    assert_eq!(
        m.skipped,
        [
            Skipped::MissingAnnotation {
                node: "n2".into(),
                key: key.into()
            },
            Skipped::InvalidName {
                node: "n4".into(),
                name: "not a name".into()
            },
        ]
    );
}

#[test]
fn no_nodes_gives_empty_initiators_and_spec_addresses() {
    let spec = InitiatorGroupSpec {
        addresses: vec!["ALL".into()],
        initiators: vec!["iqn.2020-01.org.example:static".into()],
        ..Default::default()
    };
    let m = compute_status(&spec, [], DEFAULT_INITIATOR_NAME_PREFIX);
    // Static spec.initiators stay in the spec: the agent unions spec and status.
    assert!(m.status.initiators.is_empty());
    assert_eq!(m.status.addresses, ["ALL"]);
}

#[test]
fn helpers() {
    let sel: BTreeMap<String, String> = [("a".into(), "1".into()), ("b".into(), "2".into())].into();
    assert_eq!(label_selector(&sel), "a=1,b=2");
    assert_eq!(label_selector(&BTreeMap::new()), "");
    assert_eq!(
        describe_change(&["x".into(), "y".into()], &["y".into(), "z".into()]),
        "+z, -x"
    );
    assert_eq!(describe_change(&[], &[]), "addresses changed");
    assert_eq!(truncate("ééé", 3), "é…");
}

#[test]
fn backoff_is_per_object_exponential_capped_and_reset() {
    let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
    assert_eq!(b.fail("a"), Duration::from_secs(1));
    assert_eq!(b.fail("a"), Duration::from_secs(2));
    assert_eq!(b.fail("b"), Duration::from_secs(1));
    assert_eq!(b.fail("a"), Duration::from_secs(4));
    assert_eq!(b.fail("a"), Duration::from_secs(5));
    assert_eq!(b.fail("a"), Duration::from_secs(5));
    b.succeed("a");
    assert_eq!(b.fail("a"), Duration::from_secs(1));
}

fn meta(
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> PartialObjectMeta<Node> {
    let map = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
    };
    serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "labels": map(labels), "annotations": map(annotations)},
    }))
    .unwrap()
}

#[test]
fn node_changes_ignore_status_only_updates() {
    use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
    let mut c = NodeChanges::default();
    assert!(!c.handle_event(Init));
    assert!(!c.handle_event(InitApply(meta("n1", &[("a", "1")], &[]))));
    assert!(c.handle_event(InitDone), "first list");
    // Same labels and annotations (a heartbeat): nothing to do.
    assert!(!c.handle_event(Apply(meta("n1", &[("a", "1")], &[]))));
    assert!(
        c.handle_event(Apply(meta("n1", &[("a", "2")], &[]))),
        "label"
    );
    assert!(
        c.handle_event(Apply(meta("n1", &[("a", "2")], &[("k", "v")]))),
        "annotation"
    );
    assert!(c.handle_event(Apply(meta("n2", &[], &[]))), "new node");
    assert!(c.handle_event(Delete(meta("n2", &[], &[]))), "deleted node");
    assert!(
        !c.handle_event(Delete(meta("n2", &[], &[]))),
        "already gone"
    );
    // A relist with the same Nodes changes nothing; one that lost a Node does.
    for (nodes, expected) in [(vec!["n1"], false), (vec![], true)] {
        c.handle_event(Init);
        for n in nodes {
            c.handle_event(InitApply(meta(n, &[("a", "2")], &[("k", "v")])));
        }
        assert_eq!(c.handle_event(InitDone), expected);
    }
}

// ---------------------------------------------------------------------------------------------
// Reconciler against a scripted API server

fn group(spec: InitiatorGroupSpec, status: Option<InitiatorGroupStatus>) -> Arc<InitiatorGroup> {
    let mut g = InitiatorGroup::new("g1", spec);
    g.metadata.resource_version = Some("10".into());
    g.metadata.uid = Some("uid-g1".into());
    g.status = status;
    Arc::new(g)
}

fn node_list(nodes: &[(&str, Value, Value)]) -> Value {
    let items: Vec<Value> = nodes
        .iter()
        .map(|(name, labels, annotations)| {
            json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": {"name": name, "labels": labels, "annotations": annotations},
            })
        })
        .collect();
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadataList",
        "metadata": {"resourceVersion": "100"},
        "items": items,
    })
}

#[tokio::test]
async fn reconcile_lists_nodes_patches_status_and_records_an_event() {
    let (client, mut server) = mock_client();
    let ctx = Arc::new(Context::new(client, DEFAULT_INITIATOR_NAME_PREFIX));
    let spec = InitiatorGroupSpec {
        addresses: vec!["10.0.0.0/8".into()],
        node_selector: [("role".to_owned(), "initiator".to_owned())].into(),
        ..Default::default()
    };
    let g = group(spec, None);
    let task = tokio::spawn(reconcile(g.clone(), ctx.clone()));

    let list = server.expect(Method::GET, "/api/v1/nodes?").await;
    assert!(
        list.uri.contains("labelSelector=role%3Dinitiator"),
        "{}",
        list.uri
    );
    list.ok(&node_list(&[(
        "n1",
        json!({"role": "initiator"}),
        json!({}),
    )]));

    let patch = server
        .expect(
            Method::PATCH,
            "/apis/tgtd.unstable.cloud/v1alpha1/initiatorgroups/g1/status",
        )
        .await;
    assert_eq!(
        patch.body,
        json!({"status": {
            "addresses": ["10.0.0.0/8"],
            "initiators": ["iqn.2020-06.cloud.unstable.tgtd:n1"],
        }})
    );
    patch.ok(&serde_json::to_value(&*g).unwrap());

    let event = server
        .expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/default/events",
        )
        .await;
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(event.body["reason"], "MembersChanged");
    assert_eq!(event.body["note"], "+iqn.2020-06.cloud.unstable.tgtd:n1");
    assert_eq!(event.body["regarding"]["kind"], "InitiatorGroup");
    assert_eq!(event.body["regarding"]["name"], "g1");
    event.echo();

    let action = task.await.unwrap().expect("reconcile succeeds");
    assert_eq!(action, Action::requeue(RESYNC));
    server.expect_silence().await;
}

#[tokio::test]
async fn reconcile_with_an_up_to_date_status_writes_nothing() {
    let (client, mut server) = mock_client();
    let ctx = Arc::new(Context::new(client, DEFAULT_INITIATOR_NAME_PREFIX));
    let status = InitiatorGroupStatus {
        addresses: vec![],
        initiators: vec!["iqn.2020-06.cloud.unstable.tgtd:n1".into()],
    };
    let g = group(InitiatorGroupSpec::default(), Some(status));
    let task = tokio::spawn(reconcile(g, ctx));
    server
        .expect(Method::GET, "/api/v1/nodes")
        .await
        .ok(&node_list(&[("n1", json!({}), json!({}))]));
    task.await.unwrap().expect("reconcile succeeds");
    server.expect_silence().await;
}

#[tokio::test]
async fn a_removed_node_empties_the_list_and_a_missing_annotation_warns_once() {
    let (client, mut server) = mock_client();
    let ctx = Arc::new(Context::new(client, DEFAULT_INITIATOR_NAME_PREFIX));
    let spec = InitiatorGroupSpec {
        initiator_name_strategy: annotation_strategy("iscsi/initiator"),
        ..Default::default()
    };
    let status = InitiatorGroupStatus {
        addresses: vec![],
        initiators: vec!["iqn.2020-01.org.example:gone".into()],
    };
    let g = group(spec, Some(status));

    let task = tokio::spawn(reconcile(g.clone(), ctx.clone()));
    server
        .expect(Method::GET, "/api/v1/nodes")
        .await
        .ok(&node_list(&[("n2", json!({}), json!({}))]));
    let patch = server
        .expect(Method::PATCH, "/apis/tgtd.unstable.cloud")
        .await;
    // Empty lists are sent, not omitted: a merge patch would keep the stale name otherwise.
    assert_eq!(
        patch.body,
        json!({"status": {"addresses": [], "initiators": []}})
    );
    patch.ok(&serde_json::to_value(&*g).unwrap());
    let normal = server.expect(Method::POST, "/apis/events.k8s.io").await;
    assert_eq!(normal.body["note"], "-iqn.2020-01.org.example:gone");
    normal.echo();
    let warning = server.expect(Method::POST, "/apis/events.k8s.io").await;
    assert_eq!(warning.body["type"], "Warning");
    assert_eq!(warning.body["reason"], "NodeSkipped");
    assert_eq!(
        warning.body["note"],
        "left out: Node n2 has no annotation iscsi/initiator"
    );
    warning.echo();
    task.await.unwrap().expect("reconcile succeeds");

    // Same Nodes again, status now current: no status write, no repeated Warning.
    let mut updated = (*g).clone();
    updated.status = Some(InitiatorGroupStatus::default());
    let task = tokio::spawn(reconcile(Arc::new(updated), ctx));
    server
        .expect(Method::GET, "/api/v1/nodes")
        .await
        .ok(&node_list(&[("n2", json!({}), json!({}))]));
    task.await.unwrap().expect("reconcile succeeds");
    server.expect_silence().await;
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off_per_object() {
    let (client, mut server) = mock_client();
    let ctx = Arc::new(Context::new(client, DEFAULT_INITIATOR_NAME_PREFIX));
    let g = group(InitiatorGroupSpec::default(), None);

    let task = tokio::spawn(reconcile(g.clone(), ctx.clone()));
    server
        .expect(Method::GET, "/api/v1/nodes")
        .await
        .fail(500, "InternalError");
    let err = task.await.unwrap().expect_err("list fails");
    assert_eq!(err.metric_label(), "ListNodes");
    assert_eq!(
        error_policy(g.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(g.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );

    // A status write conflict is an error too, and a later success resets the backoff.
    let task = tokio::spawn(reconcile(g.clone(), ctx.clone()));
    server
        .expect(Method::GET, "/api/v1/nodes")
        .await
        .ok(&node_list(&[("n1", json!({}), json!({}))]));
    server
        .expect(Method::PATCH, "/apis/tgtd.unstable.cloud")
        .await
        .reply(
            StatusCode::NOT_FOUND,
            &json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "not found", "reason": "NotFound", "code": 404,
            }),
        );
    let err = task.await.unwrap().expect_err("patch fails");
    assert_eq!(err.metric_label(), "PatchStatus");

    let mut current = (*g).clone();
    current.status = Some(InitiatorGroupStatus {
        addresses: vec![],
        initiators: vec!["iqn.2020-06.cloud.unstable.tgtd:n1".into()],
    });
    let task = tokio::spawn(reconcile(Arc::new(current), ctx.clone()));
    server
        .expect(Method::GET, "/api/v1/nodes")
        .await
        .ok(&node_list(&[("n1", json!({}), json!({}))]));
    task.await.unwrap().expect("reconcile succeeds");
    assert_eq!(
        error_policy(g, &err, ctx),
        Action::requeue(Duration::from_secs(1))
    );
}

#[tokio::test]
async fn deleting_groups_are_left_alone() {
    let (client, mut server) = mock_client();
    let ctx = Arc::new(Context::new(client, DEFAULT_INITIATOR_NAME_PREFIX));
    let mut g = (*group(InitiatorGroupSpec::default(), None)).clone();
    g.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    let action = reconcile(Arc::new(g), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    server.expect_silence().await;
}
