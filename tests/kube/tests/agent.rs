//! `ktgt-agent kubernetes` (and, where groups come from Nodes, `ktgt-operator`) as processes
//! on a real kube-apiserver, each authenticated as its own ServiceAccount with the RBAC of
//! `deploy/` and nothing more; libiscsi's tools as the initiators.
//!
//! Each test runs its own agent for a node name of its own, so tests do not see each other's
//! Targets; every test ends by checking that the API server refused none of the agent's
//! requests (the audit log).

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event as TargetEvent;
use ktgt_kube_tests::agent::{
    assert_nothing_forbidden, skip_without_libiscsi, Agent, AGENT_USER, CLIENT, STRANGER,
};
use ktgt_kube_tests::{free_port, iscsi, ktgt_bin, unique, wait_for, ControlPlane, Proc};
use ktgt_operator::api::{Target, TargetCondition, TARGET_FINALIZER};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

fn operator(cp: &ControlPlane, test: &str) -> Proc {
    let kubeconfig = cp.service_account_kubeconfig("ktgt-system", "ktgt-operator");
    let mut cmd = Command::new(ktgt_bin("ktgt-operator"));
    cmd.env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--identity", test]);
    // SIGTERM when dropped: it releases the Lease for the next test's operator.
    Proc::spawn(
        cmd,
        &cp.scratch(&format!("{test}-operator")).join("operator.log"),
    )
    .graceful()
}

fn condition<'a>(t: &'a Target, type_: &str) -> Option<&'a TargetCondition> {
    t.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until Target `name` satisfies `pred`; returns it.
async fn wait_target(
    targets: &Api<Target>,
    agent: &Agent,
    name: &str,
    what: &str,
    pred: impl Fn(&Target) -> bool,
) -> Target {
    let pred = &pred;
    wait_for(
        &format!("Target {name}: {what}"),
        Duration::from_secs(30),
        || async move {
            let t = targets.get_opt(name).await.ok()??;
            pred(&t).then_some(t)
        },
        || format!("agent log:\n{}", agent.proc.log_tail(40)),
    )
    .await
}

fn ready(t: &Target) -> bool {
    condition(t, "Ready").is_some_and(|c| c.status == "True")
}

/// A Target of `node` with one memory LUN (0), as YAML.
fn memory_target(name: &str, node: &str, iqn: &str) -> String {
    format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata: {{name: {name}}}\n\
         spec:\n  nodeName: {node}\n  iqn: {iqn}\n  luns: [{{lun: 0, bsType: memory, size: 16Mi}}]\n"
    )
}

fn group(name: &str, initiators: &[&str]) -> String {
    format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroup\nmetadata: {{name: {name}}}\n\
         spec:\n  initiators: {}\n",
        serde_json::to_string(initiators).unwrap()
    )
}

fn binding(name: &str, target: &str, group: &str) -> String {
    format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroupBinding\nmetadata: {{name: {name}}}\n\
         spec:\n  targetRef: {{name: {target}}}\n  initiatorGroupRef: {{name: {group}}}\n"
    )
}

fn iqn(name: &str) -> String {
    format!("iqn.2026-11.io.ktgt.test:{name}")
}

/// The agent logged no failed reconcile (an API request it should not have made, or one the
/// server refused).
fn assert_no_failed_reconcile(agent: &Agent) {
    let log = agent.proc.log_text();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reconcile failed"))
        .collect();
    assert!(
        failed.is_empty(),
        "failed reconciles:\n{}",
        failed.join("\n")
    );
}

/// The Events (events.k8s.io/v1) about Target `name` with `reason`.
async fn events_of(cp: &ControlPlane, name: &str, reason: &str) -> Vec<TargetEvent> {
    let events: Api<TargetEvent> = Api::all(cp.client().await);
    let list = events.list(&Default::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("Target") && r.name.as_deref() == Some(name)
                })
        })
        .collect()
}

/// Waits for at least one such Event.
async fn wait_event(
    cp: &ControlPlane,
    agent: &Agent,
    name: &str,
    reason: &str,
) -> Vec<TargetEvent> {
    wait_for(
        &format!("a {reason} Event on Target {name}"),
        Duration::from_secs(20),
        || async {
            let v = events_of(cp, name, reason).await;
            (!v.is_empty()).then_some(v)
        },
        || agent.proc.log_tail(30),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_initiator_logs_in_and_deleting_the_binding_or_group_logs_it_out() {
    if skip_without_libiscsi("bound_initiator") {
        return;
    }
    let cp = ControlPlane::shared();
    let agent = Agent::start(cp, "bound");
    let targets: Api<Target> = Api::all(cp.client().await);
    let (t, g, b) = (unique("disk"), unique("clients"), unique("bind"));
    let (t_iqn, unbound, unbound_iqn) = (iqn(&t), unique("unbound"), iqn(&unique("unbound")));
    let other_node = unique("other");
    cp.apply_yaml(&format!(
        "{}---\n{}---\n{}---\n{}---\n{}",
        memory_target(&t, &agent.node, &t_iqn),
        memory_target(&unbound, &agent.node, &unbound_iqn),
        memory_target(&unique("elsewhere"), &other_node, &iqn(&unique("x"))),
        group(&g, &[CLIENT]),
        binding(&b, &t, &g),
    ));

    let target = wait_target(&targets, &agent, &t, "Ready", ready).await;
    assert_eq!(
        target.metadata.finalizers.as_deref(),
        Some(&[TARGET_FINALIZER.to_owned()][..])
    );
    let status = target.status.clone().unwrap();
    let observed = status.observed_state.unwrap();
    assert_eq!(observed.iqn.as_deref(), Some(t_iqn.as_str()));
    assert_eq!(observed.acls, vec![CLIENT.to_owned()]);
    assert_eq!(observed.luns[0].lun, Some(0));
    assert_eq!(status.observed_generation, target.metadata.generation);

    // Discovery, login, refusal of a stranger and of a Target nobody is bound to.
    let (ok, out) = iscsi(
        "iscsi-ls",
        &["-i", CLIENT, "-s", &format!("iscsi://{}", agent.portal)],
    );
    assert!(ok && out.contains(&t_iqn), "iscsi-ls: {out}");
    assert!(
        agent.can_log_in(CLIENT, &t_iqn),
        "{}",
        agent.proc.log_tail(20)
    );
    assert!(!agent.can_log_in(STRANGER, &t_iqn), "a stranger logged in");
    assert!(
        !agent.can_log_in(CLIENT, &unbound_iqn),
        "logged in to a Target no binding opens"
    );
    let u = wait_target(&targets, &agent, &unbound, "status written", |t| {
        condition(t, "Ready").is_some()
    })
    .await;
    assert!(
        condition(&u, "Ready")
            .and_then(|c| c.message.as_deref())
            .is_some_and(|m| m.contains("no InitiatorGroupBinding grants access")),
        "{:?}",
        u.status
    );

    // `ktgt-agent ls` in Kubernetes mode: the Target's grant names its binding and group;
    // the Target nobody is bound to admits nobody.
    let tree = agent.ls();
    let of = |iqn: &str| {
        tree["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["iqn"] == iqn)
            .cloned()
            .unwrap_or_else(|| panic!("{iqn} not in ls: {tree:#}"))
    };
    let served = of(&t_iqn);
    assert_eq!(
        served["acl"][0]["source"],
        format!("binding {b}, group {g}")
    );
    assert_eq!(served["acl"][0]["initiators"], json!([CLIENT]));
    assert_eq!(of(&unbound_iqn)["acl"], json!([]));

    // The stranger's refusal is an Event on the Target.
    let stranger = wait_event(cp, &agent, &t, "LoginNotInACL").await;
    let note = stranger[0].note.clone().unwrap_or_default();
    assert!(note.contains(STRANGER), "{note}");

    // Deleting the binding logs the session out and refuses the next login.
    let url = agent.url(&t_iqn, 0);
    let delete = |kind: &'static str, name: String| async move {
        cp.kubectl(&["delete", kind, &name]);
    };
    agent
        .expect_revoked(
            CLIENT,
            &t_iqn,
            &url,
            delete("initiatorgroupbinding", b.clone()),
            "the binding is deleted",
        )
        .await;
    // The session that lost its access: an Event saying so.
    let revoked = wait_event(cp, &agent, &t, "SessionAccessRevoked").await;
    let note = revoked[0].note.clone().unwrap_or_default();
    assert!(
        note.contains(CLIENT) && note.contains("access_revoked"),
        "{note}"
    );
    wait_target(&targets, &agent, &t, "ACL emptied in status", |t| {
        t.status
            .as_ref()
            .and_then(|s| s.observed_state.as_ref())
            .is_some_and(|o| o.acls.is_empty())
    })
    .await;

    // Bound again, then the group is deleted: same outcome.
    cp.apply_yaml(&binding(&b, &t, &g));
    agent
        .wait_login(CLIENT, &t_iqn, true, "login admitted when bound again")
        .await;
    agent
        .expect_revoked(
            CLIENT,
            &t_iqn,
            &url,
            delete("initiatorgroup", g.clone()),
            "the group is deleted",
        )
        .await;
    assert_no_failed_reconcile(&agent);
    assert_nothing_forbidden(cp, AGENT_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relabelling_the_node_of_an_initiator_revokes_its_access() {
    if skip_without_libiscsi("relabel") {
        return;
    }
    let cp = ControlPlane::shared();
    let agent = Agent::start(cp, "relabel");
    let _operator = operator(cp, "relabel");
    let client = cp.client().await;
    let targets: Api<Target> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let initiator_node = unique("worker");
    let role = unique("role");
    let prefix = "iqn.2026-11.io.ktgt.nodes";
    let initiator = format!("{prefix}:{initiator_node}");
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": initiator_node, "labels": {"role": role}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let (t, g, b) = (unique("disk"), unique("workers"), unique("bind"));
    let t_iqn = iqn(&t);
    cp.apply_yaml(&format!(
        "{}---\napiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroup\nmetadata: {{name: {g}}}\n\
         spec:\n  nodeSelector: {{role: {role}}}\n  initiatorNameStrategy: {{type: NodeName, initiatorNamePrefix: {prefix}}}\n---\n{}",
        memory_target(&t, &agent.node, &t_iqn),
        binding(&b, &t, &g),
    ));
    wait_target(
        &targets,
        &agent,
        &t,
        "the Node's initiator in the ACL",
        |t| {
            t.status
                .as_ref()
                .and_then(|s| s.observed_state.as_ref())
                .is_some_and(|o| o.acls == vec![initiator.clone()])
        },
    )
    .await;
    assert!(agent.can_log_in(&initiator, &t_iqn));
    let relabel = async {
        nodes
            .patch(
                &initiator_node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"role": "elsewhere"}}})),
            )
            .await
            .unwrap();
    };
    agent
        .expect_revoked(
            &initiator,
            &t_iqn,
            &agent.url(&t_iqn, 0),
            relabel,
            "the Node is relabelled",
        )
        .await;
    let _ = nodes
        .delete(&initiator_node, &DeleteParams::default())
        .await;
    assert_nothing_forbidden(cp, AGENT_USER);
    assert_nothing_forbidden(cp, "system:serviceaccount:ktgt-system:ktgt-operator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chap_accounts_from_a_secret_and_deleting_the_secret_revokes() {
    if skip_without_libiscsi("chap") {
        return;
    }
    let cp = ControlPlane::shared();
    let agent = Agent::start(cp, "chap");
    let targets: Api<Target> = Api::all(cp.client().await);
    let (t, g, b, s) = (unique("disk"), unique("g"), unique("b"), unique("chap"));
    let t_iqn = iqn(&t);
    let (user, password) = ("tenant-a", "a-secret-of-16-b");
    cp.apply_yaml(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {s}, namespace: ktgt-system}}\n\
         stringData: {{username: {user}, password: {password}}}\n---\n\
         apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata: {{name: {t}}}\n\
         spec:\n  nodeName: {node}\n  iqn: {t_iqn}\n  chap: {{secretRef: {{name: {s}, namespace: ktgt-system}}}}\n\
         \x20 luns: [{{lun: 0, bsType: memory, size: 16Mi}}]\n---\n{}---\n{}",
        group(&g, &[CLIENT]),
        binding(&b, &t, &g),
        node = agent.node,
    ));
    let target = wait_target(&targets, &agent, &t, "Ready", ready).await;
    let observed = target.status.unwrap().observed_state.unwrap();
    assert_eq!(observed.accounts, vec![user.to_owned()]);
    let with = format!("iscsi://{user}%{password}@{}/{t_iqn}/0", agent.portal);
    let wrong = format!("iscsi://{user}%not-the-password@{}/{t_iqn}/0", agent.portal);
    let (ok, out) = iscsi("iscsi-inq", &["-i", CLIENT, &with]);
    assert!(ok, "CHAP login with the Secret's account failed: {out}");
    assert!(
        !iscsi("iscsi-inq", &["-i", CLIENT, &wrong]).0,
        "wrong secret admitted"
    );
    assert!(!agent.can_log_in(CLIENT, &t_iqn), "admitted without CHAP");
    assert!(
        !iscsi("iscsi-inq", &["-i", CLIENT, &wrong]).0,
        "wrong secret admitted"
    );
    // Three refusals counted by reason; one Event on the Target for them (rate-limited: one
    // per Target, reason and initiator a minute).
    let auth_failed = format!("ktgt_logins_total{{target=\"{t_iqn}\",result=\"auth_failed\"}} 3");
    assert!(
        agent.metrics_text().contains(&auth_failed),
        "{auth_failed} not in:\n{}",
        agent.metrics_text()
    );
    let refused = wait_event(cp, &agent, &t, "LoginAuthFailed").await;
    // Give a second (wrong) Event the time to appear, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused_now = events_of(cp, &t, "LoginAuthFailed").await;
    assert_eq!(refused_now.len(), 1, "{refused_now:#?}");
    let note = refused[0].note.clone().unwrap_or_default();
    assert!(note.contains(CLIENT), "{note}");
    assert!(
        refused_now[0].series.is_none() && refused_now[0].deprecated_count.unwrap_or(1) <= 1,
        "the retries were published: {refused_now:#?}"
    );
    assert_eq!(refused[0].type_.as_deref(), Some("Warning"));
    // The secret never shows in status, logs, metrics or Events.
    assert!(!agent.proc.log_text().contains(password));
    assert!(!agent.metrics_text().contains(password));
    assert!(!note.contains(password) && !note.contains("not-the-password"));

    let delete_secret = async {
        cp.kubectl(&["delete", "secret", "-n", "ktgt-system", &s]);
    };
    agent
        .expect_revoked(
            CLIENT,
            &t_iqn,
            &with,
            delete_secret,
            "the Secret is deleted",
        )
        .await;
    let failed = wait_target(
        &targets,
        &agent,
        &t,
        "TargetFailed ChapSecretMissing",
        |t| {
            condition(t, "TargetFailed").is_some_and(|c| {
                c.status == "True" && c.reason.as_deref() == Some("ChapSecretMissing")
            })
        },
    )
    .await;
    let message = condition(&failed, "Ready")
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains(&s),
        "the condition names the Secret: {message}"
    );
    assert!(!iscsi("iscsi-inq", &["-i", CLIENT, &with]).0);
    assert_nothing_forbidden(cp, AGENT_USER);
}

/// kubelet's `kubernetes.io/iscsi-chap` Secret, as csi-driver-iscsi and in-tree iSCSI volumes
/// write it, works unchanged: `node.session.auth.*` for the Target's CHAP and, with
/// `--discovery-chap-secret`, `discovery.sendtargets.auth.*` for discovery sessions. Until
/// that Secret exists, discovery fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_chap_secrets_for_sessions_and_discovery() {
    if skip_without_libiscsi("kubelet-chap") {
        return;
    }
    let cp = ControlPlane::shared();
    let s = unique("iscsi-chap");
    let secret_arg = format!("ktgt-system/{s}");
    let agent = Agent::start_with(
        cp,
        "kubelet-chap",
        "ktgt-agent",
        &["--discovery-chap-secret", &secret_arg],
    );
    let targets: Api<Target> = Api::all(cp.client().await);
    let (t, g, b) = (unique("disk"), unique("g"), unique("b"));
    let t_iqn = iqn(&t);
    cp.apply_yaml(&format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata: {{name: {t}}}\n\
         spec:\n  nodeName: {node}\n  iqn: {t_iqn}\n  chap: {{secretRef: {{name: {s}, namespace: ktgt-system}}}}\n\
         \x20 luns: [{{lun: 0, bsType: memory, size: 16Mi}}]\n---\n{}---\n{}",
        group(&g, &[CLIENT]),
        binding(&b, &t, &g),
        node = agent.node,
    ));
    let discover = |creds: &str| {
        iscsi(
            "iscsi-ls",
            &["-i", CLIENT, &format!("iscsi://{creds}{}", agent.portal)],
        )
    };
    // No Secret yet: the Target is not served and discovery refuses everyone.
    wait_target(&targets, &agent, &t, "ChapSecretMissing", |t| {
        condition(t, "TargetFailed")
            .is_some_and(|c| c.reason.as_deref() == Some("ChapSecretMissing"))
    })
    .await;
    assert!(
        !discover("finder%discovery-pass-1@").0,
        "discovery open without its Secret"
    );

    cp.apply_yaml(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {s}, namespace: ktgt-system}}\n\
         type: kubernetes.io/iscsi-chap\nstringData:\n  \
         node.session.auth.username: host-a\n  node.session.auth.password: session-pass-16b\n  \
         discovery.sendtargets.auth.username: finder\n  \
         discovery.sendtargets.auth.password: discovery-pass-1\n"
    ));
    let target = wait_target(&targets, &agent, &t, "Ready", ready).await;
    let observed = target.status.unwrap().observed_state.unwrap();
    assert_eq!(observed.accounts, vec!["host-a".to_owned()]);
    let listed = wait_for(
        "discovery with the Secret's account",
        Duration::from_secs(20),
        || async {
            let (ok, out) = discover("finder%discovery-pass-1@");
            ok.then_some(out)
        },
        || agent.proc.log_tail(30),
    )
    .await;
    assert!(
        listed.contains(&format!("Target:{t_iqn} Portal:{},1", agent.portal)),
        "{listed}"
    );
    assert!(
        !discover("finder%wrong-password-1@").0,
        "wrong discovery secret admitted"
    );
    assert!(!discover("").0, "discovery without CHAP admitted");
    let (ok, out) = iscsi(
        "iscsi-inq",
        &[
            "-i",
            CLIENT,
            &format!("iscsi://host-a%session-pass-16b@{}/{t_iqn}/0", agent.portal),
        ],
    );
    assert!(ok, "session CHAP from node.session.auth.*: {out}");
    assert!(!agent.can_log_in(CLIENT, &t_iqn), "admitted without CHAP");
    assert_nothing_forbidden(cp, AGENT_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_name_what_to_fix() {
    let cp = ControlPlane::shared();
    let agent = Agent::start(cp, "conditions");
    let targets: Api<Target> = Api::all(cp.client().await);
    let missing = unique("missing");
    let store = agent.dir.join("absent").join("disk.img");
    cp.apply_yaml(&format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata: {{name: {missing}}}\n\
         spec:\n  nodeName: {node}\n  iqn: {iqn}\n  luns:\n  - {{lun: 0, bsType: memory, size: 1Mi}}\n  - {{lun: 1, backingStore: {store}}}\n",
        node = agent.node,
        iqn = iqn(&missing),
        store = store.display(),
    ));
    let t = wait_target(
        &targets,
        &agent,
        &missing,
        "LUNFailed BackingStoreNotFound",
        |t| {
            condition(t, "LUNFailed").is_some_and(|c| {
                c.status == "True" && c.reason.as_deref() == Some("BackingStoreNotFound")
            })
        },
    )
    .await;
    let ready_c = condition(&t, "Ready").unwrap();
    assert_eq!(ready_c.status, "False");
    assert!(
        ready_c
            .message
            .as_deref()
            .is_some_and(|m| m.contains(&store.display().to_string())),
        "the message names the path: {ready_c:?}"
    );
    // The LUN that can be served is: LUN 0 in observedState.
    let observed = t.status.unwrap().observed_state.unwrap();
    assert_eq!(
        observed.luns.iter().map(|l| l.lun).collect::<Vec<_>>(),
        vec![Some(0)]
    );
    // The file appears: the Target heals on the next sync (a change to the Target triggers
    // one at once; the periodic recheck would too).
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    std::fs::File::create(&store)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    cp.kubectl(&["annotate", "target", &missing, "poke=1"]);
    wait_target(
        &targets,
        &agent,
        &missing,
        "Ready once the file exists",
        ready,
    )
    .await;

    // Two Targets with one IQN on one node: the first keeps it, the second says why not.
    let (first, second) = (unique("first"), unique("second"));
    let shared_iqn = iqn(&unique("shared"));
    cp.apply_yaml(&memory_target(&first, &agent.node, &shared_iqn));
    wait_target(&targets, &agent, &first, "Ready", ready).await;
    cp.apply_yaml(&memory_target(&second, &agent.node, &shared_iqn));
    let dup = wait_target(
        &targets,
        &agent,
        &second,
        "TargetFailed DuplicateIQN",
        |t| {
            condition(t, "TargetFailed")
                .is_some_and(|c| c.status == "True" && c.reason.as_deref() == Some("DuplicateIQN"))
        },
    )
    .await;
    let message = condition(&dup, "TargetFailed")
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains(&first), "names the holder: {message}");
    let still = targets.get(&first).await.unwrap();
    assert!(
        ready(&still),
        "the first Target keeps its IQN: {:?}",
        still.status
    );

    // Duplicate LUN numbers never reach the agent: the API server refuses them (list-map
    // key `lun`), see deploy.rs. A LUN whose size is not a block multiple is the conflict
    // a user can still write: InvalidSpec names the field.
    let odd = unique("odd");
    cp.apply_yaml(&format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata: {{name: {odd}}}\n\
         spec:\n  nodeName: {node}\n  iqn: {iqn}\n  luns: [{{lun: 0, bsType: memory, size: \"1000\", blockSize: 4096}}]\n",
        node = agent.node,
        iqn = iqn(&odd),
    ));
    let bad = wait_target(&targets, &agent, &odd, "TargetFailed InvalidSpec", |t| {
        condition(t, "TargetFailed")
            .is_some_and(|c| c.status == "True" && c.reason.as_deref() == Some("InvalidSpec"))
    })
    .await;
    let message = condition(&bad, "Ready")
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("spec.luns[0]"),
        "names the field: {message}"
    );
    assert_nothing_forbidden(cp, AGENT_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_target_with_an_initiator_logged_in_completes() {
    if skip_without_libiscsi("delete") {
        return;
    }
    let cp = ControlPlane::shared();
    let agent = Agent::start(cp, "delete");
    let targets: Api<Target> = Api::all(cp.client().await);
    let (t, g, b) = (unique("disk"), unique("g"), unique("b"));
    let t_iqn = iqn(&t);
    let file = agent.dir.join("disk.img");
    cp.apply_yaml(&format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata: {{name: {t}}}\n\
         spec:\n  nodeName: {node}\n  iqn: {t_iqn}\n  luns: [{{lun: 0, backingStore: {file}, size: 8Mi}}]\n---\n{}---\n{}",
        group(&g, &[CLIENT]),
        binding(&b, &t, &g),
        node = agent.node,
        file = file.display(),
    ));
    wait_target(&targets, &agent, &t, "Ready", ready).await;
    let reader = agent.reader(CLIENT, &agent.url(&t_iqn, 0));
    agent.wait_sessions(&t_iqn, 1, "the reader's session").await;
    let started = Instant::now();
    let (ok, _, err) = cp.kubectl(&["delete", "target", &t, "--timeout=30s"]);
    assert!(
        ok,
        "kubectl delete target: {err}\n{}",
        agent.proc.log_tail(30)
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "deletion waited for the initiator: {:?}",
        started.elapsed()
    );
    assert!(targets.get_opt(&t).await.unwrap().is_none());
    agent.wait_sessions(&t_iqn, 0, "the session ended").await;
    drop(reader);
    let (_, out) = iscsi(
        "iscsi-ls",
        &["-i", CLIENT, "-s", &format!("iscsi://{}", agent.portal)],
    );
    assert!(
        !out.contains(&t_iqn),
        "the removed target is still discovered: {out}"
    );
    assert!(!agent.can_log_in(CLIENT, &t_iqn));
    assert_no_failed_reconcile(&agent);
    assert_nothing_forbidden(cp, AGENT_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_rebuilds_the_same_table_from_the_api() {
    if skip_without_libiscsi("restart") {
        return;
    }
    let cp = ControlPlane::shared();
    let mut agent = Agent::start(cp, "restart");
    let targets: Api<Target> = Api::all(cp.client().await);
    let (t1, t2, g, b1, b2) = (
        unique("a"),
        unique("b"),
        unique("g"),
        unique("b1"),
        unique("b2"),
    );
    cp.apply_yaml(&format!(
        "{}---\n{}---\n{}---\n{}---\n{}",
        memory_target(&t1, &agent.node, &iqn(&t1)),
        memory_target(&t2, &agent.node, &iqn(&t2)),
        group(&g, &[CLIENT]),
        binding(&b1, &t1, &g),
        binding(&b2, &t2, &g),
    ));
    // Ready with the binding's ACL: a Target can be Ready (serving nobody) before the agent
    // has seen its binding, and that status is not the settled one to compare with.
    let settled = |t: &Target| {
        ready(t)
            && t.status
                .as_ref()
                .and_then(|s| s.observed_state.as_ref())
                .is_some_and(|o| o.acls == [CLIENT.to_owned()])
    };
    let before1 = wait_target(&targets, &agent, &t1, "Ready with its ACL", settled).await;
    let before2 = wait_target(&targets, &agent, &t2, "Ready with its ACL", settled).await;
    assert!(agent.can_log_in(CLIENT, &iqn(&t1)));
    agent.kill_and_restart();
    agent
        .wait_login(CLIENT, &iqn(&t1), true, "login after the restart")
        .await;
    assert!(agent.can_log_in(CLIENT, &iqn(&t2)));
    assert!(!agent.can_log_in(STRANGER, &iqn(&t1)));
    // Same tids, same observed state, and no status rewrite for an unchanged Target.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after1 = targets.get(&t1).await.unwrap();
    let after2 = targets.get(&t2).await.unwrap();
    assert_eq!(after1.status, before1.status, "status of {t1} changed");
    assert_eq!(after2.status, before2.status, "status of {t2} changed");
    assert_no_failed_reconcile(&agent);
    assert_nothing_forbidden(cp, AGENT_USER);
}

/// Watches whose resourceVersion the API server no longer has get `410 Gone`: the agent is
/// frozen (SIGSTOP) while its objects change, the API server restarts (so its watch cache
/// starts after the agent's last resourceVersion), and the agent is let go: it must relist
/// and converge, deletions included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_api_server_restart_and_expired_watches_the_agent_converges() {
    if skip_without_libiscsi("watch-expiry") {
        return;
    }
    let cp = ControlPlane::shared();
    let agent = Agent::start(cp, "expiry");
    let operator = operator(cp, "expiry");
    let targets: Api<Target> = Api::all(cp.client().await);
    let (kept, gone, added, g, b_kept, b_gone) = (
        unique("kept"),
        unique("gone"),
        unique("added"),
        unique("g"),
        unique("bk"),
        unique("bg"),
    );
    cp.apply_yaml(&format!(
        "{}---\n{}---\n{}---\n{}---\n{}",
        memory_target(&kept, &agent.node, &iqn(&kept)),
        memory_target(&gone, &agent.node, &iqn(&gone)),
        group(&g, &[CLIENT]),
        binding(&b_kept, &kept, &g),
        binding(&b_gone, &gone, &g),
    ));
    wait_target(&targets, &agent, &kept, "Ready", ready).await;
    wait_target(&targets, &agent, &gone, "Ready", ready).await;
    assert!(agent.can_log_in(CLIENT, &iqn(&gone)));

    // Freeze the agent; change things behind its back.
    let stop = |sig: &str| {
        Command::new("kill")
            .args([sig, &agent.proc.pid().to_string()])
            .status()
            .unwrap();
    };
    stop("-STOP");
    cp.kubectl(&["delete", "initiatorgroupbinding", &b_gone]);
    cp.apply_yaml(&format!(
        "{}---\n{}",
        memory_target(&added, &agent.node, &iqn(&added)),
        binding(&unique("ba"), &added, &g),
    ));
    for i in 0..20 {
        cp.kubectl(&[
            "create",
            "configmap",
            &unique(&format!("churn{i}")),
            "-n",
            "default",
        ]);
    }
    // Let etcd's compaction (every 3 s here) pass the agent's resourceVersions.
    tokio::time::sleep(Duration::from_secs(8)).await;
    cp.restart_apiserver();
    stop("-CONT");

    let context = || format!("agent log:\n{}", agent.proc.log_tail(40));
    wait_for(
        "the agent to converge after the restart",
        Duration::from_secs(60),
        || async {
            (agent.can_log_in(CLIENT, &iqn(&added)) && !agent.can_log_in(CLIENT, &iqn(&gone)))
                .then_some(())
        },
        context,
    )
    .await;
    wait_target(&targets, &agent, &added, "Ready", ready).await;
    assert!(agent.can_log_in(CLIENT, &iqn(&kept)));
    let log = agent.proc.log_text();
    assert!(
        log.contains("too old resource version") && log.contains("Expired"),
        "the agent's watches were never told they expired (the test did not test expiry):\n{}",
        agent.proc.log_tail(40)
    );
    // Nothing served twice or left behind: discovery lists exactly the Targets that exist.
    let (_, out) = iscsi(
        "iscsi-ls",
        &["-i", CLIENT, "-s", &format!("iscsi://{}", agent.portal)],
    );
    let listed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Target:"))
        .map(|t| t.split_whitespace().next().unwrap_or(""))
        .collect();
    let mut want = vec![iqn(&kept), iqn(&added)];
    want.sort();
    let mut got: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    got.sort();
    got.dedup();
    assert_eq!(got, want, "discovery after the restart:\n{out}");
    assert_eq!(listed.len(), 2, "a Target listed twice:\n{out}");
    // The operator recovered too. One whose Lease renewals failed for its renew deadline
    // (10 s) while the API server was down exits ("leadership lost"), so that no replica acts
    // on a Lease it may have lost; its Deployment's kubelet restarts it, as the test does here.
    let mut operator = operator;
    if operator.exited().is_some() {
        assert!(
            operator.log_text().contains("leadership lost"),
            "the operator exited for another reason:\n{}",
            operator.log_tail(30)
        );
        operator = self::operator(cp, "expiry-restarted");
    }
    // A Node that joins a group after the restart is in its status.
    let client = cp.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let groups: Api<ktgt_operator::api::InitiatorGroup> = Api::all(client);
    let (role, late_node, late_group) = (unique("role"), unique("late"), unique("late-group"));
    cp.apply_yaml(&format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroup\nmetadata: {{name: {late_group}}}\n\
         spec:\n  nodeSelector: {{role: {role}}}\n  initiatorNameStrategy: {{type: NodeName, initiatorNamePrefix: iqn.2026-11.io.ktgt.nodes}}\n"
    ));
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": late_node, "labels": {"role": role}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let want_member = format!("iqn.2026-11.io.ktgt.nodes:{late_node}");
    wait_for(
        "the operator to fill a group after the API server restart",
        Duration::from_secs(30),
        || async {
            let g = groups.get_opt(&late_group).await.ok()??;
            (g.status?.initiators == vec![want_member.clone()]).then_some(())
        },
        || format!("operator log:\n{}", operator.log_tail(30)),
    )
    .await;
    let _ = nodes.delete(&late_node, &DeleteParams::default()).await;
    drop(operator);
    assert_no_failed_reconcile(&agent);
    assert_nothing_forbidden(cp, AGENT_USER);
}

/// Secrets in a namespace the agent may not read: a clear log line and condition, retried with
/// backoff, not a crash loop or a hot loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_namespace_is_a_condition_and_a_backed_off_retry() {
    let cp = ControlPlane::shared();
    let mut agent = Agent::start(cp, "forbidden");
    let targets: Api<Target> = Api::all(cp.client().await);
    let t = unique("tenant-disk");
    let ns = unique("tenant");
    cp.apply_yaml(&format!(
        "apiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata: {{name: {t}}}\n\
         spec:\n  nodeName: {node}\n  iqn: {iqn}\n  chap: {{secretRef: {{name: chap, namespace: {ns}}}}}\n\
         \x20 luns: [{{lun: 0, bsType: memory, size: 1Mi}}]\n",
        node = agent.node,
        iqn = iqn(&t),
    ));
    let failed = wait_target(
        &targets,
        &agent,
        &t,
        "TargetFailed ChapSecretMissing",
        |t| {
            condition(t, "TargetFailed").is_some_and(|c| {
                c.status == "True" && c.reason.as_deref() == Some("ChapSecretMissing")
            })
        },
    )
    .await;
    assert!(
        condition(&failed, "Ready")
            .and_then(|c| c.message.as_deref())
            .is_some_and(|m| m.contains(&ns)),
        "{:?}",
        failed.status
    );
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        agent.proc.exited().is_none(),
        "the agent exited:\n{}",
        agent.proc.log_tail(30)
    );
    let log = agent.proc.log_text();
    assert!(
        log.contains("watching Secrets failed") && log.contains(&ns) && log.contains("forbidden"),
        "no clear log line naming the namespace and the refusal:\n{}",
        agent.proc.log_tail(30)
    );
    let attempts = cp
        .requests_by(AGENT_USER)
        .iter()
        .filter(|e| {
            e["responseStatus"]["code"] == 403
                && e["requestURI"]
                    .as_str()
                    .is_some_and(|u| u.contains(&format!("/namespaces/{ns}/secrets")))
        })
        .count();
    let secs = started.elapsed().as_secs() + 10;
    assert!(
        attempts >= 2 && attempts as u64 <= secs / 2,
        "{attempts} refused Secret requests in about {secs} s: not backed off"
    );
    agent.proc.kill();
}
