//! `ktgt-operator` as a process on a real kube-apiserver, authenticated as its own
//! ServiceAccount with the RBAC of `deploy/` and nothing more: InitiatorGroup status follows
//! the Node list (both strategies; Nodes added, removed, relabelled, annotated), and two
//! replicas elect one leader that the other replaces when it dies.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use ktgt_kube_tests::agent::assert_nothing_forbidden;
use ktgt_kube_tests::{free_port, ktgt_bin, unique, wait_for, ControlPlane, Proc};
use ktgt_operator::api::InitiatorGroup;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

const OPERATOR_USER: &str = "system:serviceaccount:ktgt-system:ktgt-operator";
/// The Lease `deploy/rbac/operator.yaml` lets the operator use (RBAC names it).
const LEASE: &str = "ktgt-operator";

struct Operator {
    proc: Proc,
    metrics: u16,
}

fn start_operator(cp: &ControlPlane, name: &str, lease: &str) -> Operator {
    cp.install_deploy();
    let kubeconfig = cp.service_account_kubeconfig("ktgt-system", "ktgt-operator");
    let metrics = free_port();
    let dir = cp.scratch(name);
    let mut cmd = Command::new(ktgt_bin("ktgt-operator"));
    cmd.env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(["--lease-name", lease, "--lease-namespace", "ktgt-system"])
        .args(["--identity", name])
        .args(["--log-format", "json"]);
    Operator {
        proc: Proc::spawn(cmd, &dir.join("operator.log")),
        metrics,
    }
}

/// `ktgt_reconciles_total{controller="initiatorgroup"}` of one replica (0 when absent).
fn reconciles(port: u16) -> Option<u64> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "3"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter(|l| l.starts_with("ktgt_reconciles_total{controller=\"initiatorgroup\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

fn node(name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
    }))
    .unwrap()
}

async fn group_initiators(groups: &Api<InitiatorGroup>, name: &str) -> Option<Vec<String>> {
    let g = groups.get_opt(name).await.ok()??;
    Some(g.status?.initiators)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiator_groups_follow_the_node_list() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let mut op = start_operator(cp, &unique("operator"), LEASE);
    let nodes: Api<Node> = Api::all(client.clone());
    let groups: Api<InitiatorGroup> = Api::all(client.clone());
    let role = unique("role");
    let key = format!("example.com/{}", unique("iqn"));
    let (n1, n2, n3) = (unique("node"), unique("node"), unique("node"));
    let by_name = unique("by-name");
    let by_annotation = unique("by-annotation");
    let prefix = "iqn.2020-06.cloud.unstable.test";

    let pp = PostParams::default();
    nodes
        .create(&pp, &node(&n1, json!({"role": role}), json!({})))
        .await
        .unwrap();
    nodes
        .create(
            &pp,
            &node(
                &n2,
                json!({"role": role}),
                json!({key.clone(): "iqn.1994-05.com.redhat:n2"}),
            ),
        )
        .await
        .unwrap();
    nodes
        .create(&pp, &node(&n3, json!({"role": "other"}), json!({})))
        .await
        .unwrap();
    let group = |name: &str, strategy: serde_json::Value| -> InitiatorGroup {
        serde_json::from_value(json!({
            "apiVersion": "tgtd.unstable.cloud/v1alpha1", "kind": "InitiatorGroup",
            "metadata": {"name": name},
            "spec": {"addresses": ["10.1.0.0/16"], "nodeSelector": {"role": role},
                     "initiatorNameStrategy": strategy},
        }))
        .unwrap()
    };
    groups
        .create(
            &pp,
            &group(
                &by_name,
                json!({"type": "NodeName", "initiatorNamePrefix": prefix}),
            ),
        )
        .await
        .unwrap();
    groups
        .create(
            &pp,
            &group(
                &by_annotation,
                json!({"type": "Annotation", "annotationKey": key}),
            ),
        )
        .await
        .unwrap();

    let expect = |name: String, want: Vec<String>| {
        let groups = groups.clone();
        let op_log = op.proc.log.clone();
        async move {
            let context = || {
                format!(
                    "operator log:\n{}",
                    std::fs::read_to_string(&op_log).unwrap_or_default()
                )
            };
            wait_for(
                &format!("InitiatorGroup {name} status.initiators == {want:?}"),
                Duration::from_secs(30),
                || {
                    let groups = groups.clone();
                    let name = name.clone();
                    let want = want.clone();
                    async move {
                        let got = group_initiators(&groups, &name).await?;
                        (got == want).then_some(())
                    }
                },
                context,
            )
            .await
        }
    };
    let mut want_name = vec![format!("{prefix}:{n1}"), format!("{prefix}:{n2}")];
    want_name.sort();
    expect(by_name.clone(), want_name).await;
    expect(
        by_annotation.clone(),
        vec!["iqn.1994-05.com.redhat:n2".into()],
    )
    .await;
    let g = groups.get(&by_name).await.unwrap();
    assert_eq!(g.status.unwrap().addresses, vec!["10.1.0.0/16"]);

    let merge = |v: serde_json::Value| Patch::Merge(v);
    let pp_patch = PatchParams::default();
    // Relabel n3 into the group, annotate n1.
    nodes
        .patch(
            &n3,
            &pp_patch,
            &merge(json!({"metadata": {"labels": {"role": role}}})),
        )
        .await
        .unwrap();
    nodes
        .patch(
            &n1,
            &pp_patch,
            &merge(
                json!({"metadata": {"annotations": {key.clone(): "iqn.1994-05.com.redhat:n1"}}}),
            ),
        )
        .await
        .unwrap();
    let mut want = vec![
        format!("{prefix}:{n1}"),
        format!("{prefix}:{n2}"),
        format!("{prefix}:{n3}"),
    ];
    want.sort();
    expect(by_name.clone(), want).await;
    expect(
        by_annotation.clone(),
        vec![
            "iqn.1994-05.com.redhat:n1".into(),
            "iqn.1994-05.com.redhat:n2".into(),
        ],
    )
    .await;

    // n2 leaves by label, n1 is deleted, a new Node joins.
    nodes
        .patch(
            &n2,
            &pp_patch,
            &merge(json!({"metadata": {"labels": {"role": null}}})),
        )
        .await
        .unwrap();
    nodes.delete(&n1, &DeleteParams::default()).await.unwrap();
    let n4 = unique("node");
    nodes
        .create(&pp, &node(&n4, json!({"role": role}), json!({})))
        .await
        .unwrap();
    let mut want = vec![format!("{prefix}:{n3}"), format!("{prefix}:{n4}")];
    want.sort();
    expect(by_name.clone(), want).await;
    expect(by_annotation.clone(), vec![]).await;

    assert_nothing_forbidden(cp, OPERATOR_USER);
    for n in [&n2, &n3, &n4] {
        let _ = nodes.delete(n, &DeleteParams::default()).await;
    }
    // `--log-format json`: every line the operator wrote is a JSON object.
    let log = op.proc.log_text();
    assert!(
        log.lines().count() > 1,
        "the operator logged nothing:\n{log}"
    );
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    // SIGTERM releases the Lease for the next test's replicas.
    let status = op.proc.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "operator exit: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_the_other_takes_over() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let lease_name = LEASE.to_owned();
    let (id_a, id_b) = (unique("replica-a"), unique("replica-b"));
    let mut a = start_operator(cp, &id_a, &lease_name);
    let mut b = start_operator(cp, &id_b, &lease_name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ktgt-system");
    let holder = || {
        let leases = leases.clone();
        let lease_name = lease_name.clone();
        async move {
            leases
                .get_opt(&lease_name)
                .await
                .ok()??
                .spec?
                .holder_identity
        }
    };
    let first = wait_for(
        "a Lease holder",
        Duration::from_secs(30),
        || async { holder().await.filter(|h| *h == id_a || *h == id_b) },
        || format!("a:\n{}\nb:\n{}", a.proc.log_tail(20), b.proc.log_tail(20)),
    )
    .await;
    assert!(first == id_a || first == id_b, "holder {first}");
    let (leader, follower, follower_id) = if first == id_a {
        (&mut a, &mut b, id_b.clone())
    } else {
        (&mut b, &mut a, id_a.clone())
    };

    // Give the leader work; only it reconciles.
    let groups: Api<InitiatorGroup> = Api::all(client.clone());
    let g1 = unique("lead-group");
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tgtd.unstable.cloud/v1alpha1", "kind": "InitiatorGroup",
                "metadata": {"name": g1}, "spec": {"nodeSelector": {"none": "none"}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let leader_metrics = leader.metrics;
    wait_for(
        "the leader to reconcile",
        Duration::from_secs(30),
        || async { reconciles(leader_metrics).filter(|n| *n > 0) },
        || leader.proc.log_tail(20),
    )
    .await;
    assert_eq!(
        reconciles(follower.metrics).unwrap_or(0),
        0,
        "the follower reconciled while the other replica led"
    );
    assert_eq!(holder().await.as_deref(), Some(first.as_str()));

    // Kill the leader (no release): the follower takes over within the lease duration (15 s)
    // plus a retry period.
    leader.proc.kill();
    let killed = std::time::Instant::now();
    let follower_metrics = follower.metrics;
    wait_for(
        "the follower to take the Lease",
        Duration::from_secs(30),
        || async { (holder().await.as_deref() == Some(follower_id.as_str())).then_some(()) },
        || follower.proc.log_tail(20),
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(20),
        "takeover took {took:?}, more than the 15 s lease and a retry"
    );
    wait_for(
        "the new leader to reconcile",
        Duration::from_secs(30),
        || async { reconciles(follower_metrics).filter(|n| *n > 0) },
        || follower.proc.log_tail(20),
    )
    .await;
    let _ = groups.delete(&g1, &DeleteParams::default()).await;
    assert_nothing_forbidden(cp, OPERATOR_USER);
}
