//! Scale benchmark on a real control plane (`bash tests/kube/scale.sh`; not a test).
//!
//! Writes `TARGETS` Targets with two LUNs each (sparse 1 MiB files) on one node, `NODES` Nodes, `GROUPS`
//! InitiatorGroups (NodeName strategy, each selecting the Nodes of one label value) and one
//! binding per group, then starts `ktgt-operator` and `ktgt-agent kubernetes` as their
//! ServiceAccounts and reports:
//! - time from the agent's start to every Target Ready, and from the operator's start to every
//!   group's status filled;
//! - peak and current resident memory of both;
//! - API requests each made (from the API server's audit log), by verb;
//! - after one binding is pointed at another group: the time until the new group's initiator
//!   can log in (libiscsi's `iscsi-inq`: the ACL is applied) and until the Target's status
//!   shows it, and how many status writes the agent made after it (it must rewrite only the
//!   one Target whose access changed).
//!
//! Sizes: `KTGT_SCALE_TARGETS`, `KTGT_SCALE_NODES`, `KTGT_SCALE_GROUPS` (default 500, 200, 20).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use ktgt_kube_tests::{free_port, iscsi, ktgt_bin, ControlPlane, Proc};
use ktgt_operator::api::{InitiatorGroup, Target};
use kube::api::ListParams;
use kube::Api;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (VmHWM, VmRSS) in MiB of `pid`.
fn memory(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn requests(cp: &ControlPlane, user: &str) -> BTreeMap<String, usize> {
    let mut by_verb = BTreeMap::new();
    for e in cp.requests_by(user) {
        let verb = e["verb"].as_str().unwrap_or("?").to_owned();
        *by_verb.entry(verb).or_insert(0) += 1;
    }
    by_verb
}

fn status_patches(cp: &ControlPlane, user: &str, target: Option<&str>) -> usize {
    cp.requests_by(user)
        .iter()
        .filter(|e| e["verb"] == "patch")
        .filter_map(|e| e["requestURI"].as_str())
        .filter(|u| u.contains("/targets/") && u.contains("/status"))
        .filter(|u| target.is_none_or(|t| u.contains(&format!("/targets/{t}/status"))))
        .count()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n_targets = env_usize("KTGT_SCALE_TARGETS", 500);
    let n_nodes = env_usize("KTGT_SCALE_NODES", 200);
    let n_groups = env_usize("KTGT_SCALE_GROUPS", 20).max(2);
    let cp = ControlPlane::start(false)?;
    cp.install_deploy();
    let files = cp.scratch("scale-luns");
    let node = "storage-0";
    let prefix = "iqn.2026-11.io.ktgt.scale";

    // The objects, written before either binary starts.
    let t0 = Instant::now();
    let mut yaml = String::new();
    for i in 0..n_nodes {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-{i}, labels: {{group: g{}}}}}\n",
            i % n_groups
        ));
    }
    for g in 0..n_groups {
        yaml.push_str(&format!(
            "---\napiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroup\nmetadata: {{name: group-{g}}}\n\
             spec:\n  nodeSelector: {{group: g{g}}}\n  initiatorNameStrategy: {{type: NodeName, initiatorNamePrefix: {prefix}}}\n"
        ));
        yaml.push_str(&format!(
            "---\napiVersion: tgtd.unstable.cloud/v1alpha1\nkind: InitiatorGroupBinding\nmetadata: {{name: binding-{g}}}\n\
             spec: {{targetRef: {{name: target-{g}}}, initiatorGroupRef: {{name: group-{g}}}}}\n"
        ));
    }
    for t in 0..n_targets {
        yaml.push_str(&format!(
            "---\napiVersion: tgtd.unstable.cloud/v1alpha1\nkind: Target\nmetadata: {{name: target-{t}}}\n\
             spec:\n  nodeName: {node}\n  iqn: {prefix}:target-{t}\n  luns:\n  - {{lun: 0, backingStore: {dir}/t{t}-0.img, size: 1Mi}}\n  - {{lun: 1, backingStore: {dir}/t{t}-1.img, size: 1Mi}}\n",
            dir = files.display()
        ));
    }
    let (ok, _, err) = cp.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &yaml);
    anyhow::ensure!(ok, "writing the objects: {err}");
    let written = t0.elapsed();

    let client = cp.client().await;
    let targets: Api<Target> = Api::all(client.clone());
    let groups: Api<InitiatorGroup> = Api::all(client.clone());
    let dir = cp.scratch("scale");

    let op_kc = cp.service_account_kubeconfig("ktgt-system", "ktgt-operator");
    let mut cmd = Command::new(ktgt_bin("ktgt-operator"));
    cmd.env("KUBECONFIG", &op_kc)
        .env("RUST_LOG", "warn")
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())]);
    let op_start = Instant::now();
    let operator = Proc::spawn(cmd, &dir.join("operator.log"));

    let agent_kc = cp.service_account_kubeconfig("ktgt-system", "ktgt-agent");
    let portal = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(ktgt_bin("ktgt-agent"));
    cmd.env("KUBECONFIG", &agent_kc)
        .env("RUST_LOG", "warn")
        .args(["kubernetes", "--node-name", node])
        .args(["--listen", &portal])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())]);
    let agent_start = Instant::now();
    let agent = Proc::spawn(cmd, &dir.join("agent.log"));

    // Every group filled (NodeName strategy: n_nodes / n_groups names each).
    let mut groups_filled = None;
    let mut all_ready = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while (groups_filled.is_none() || all_ready.is_none()) && Instant::now() < deadline {
        if groups_filled.is_none() {
            let list = groups.list(&ListParams::default()).await?;
            let filled = list
                .items
                .iter()
                .filter(|g| {
                    g.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("group-"))
                })
                .filter(|g| g.status.as_ref().is_some_and(|s| !s.initiators.is_empty()))
                .count();
            if filled == n_groups {
                groups_filled = Some(op_start.elapsed());
            }
        }
        if all_ready.is_none() {
            let list = targets.list(&ListParams::default()).await?;
            let ready = list
                .items
                .iter()
                .filter(|t| {
                    t.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
                })
                .count();
            if ready == n_targets {
                all_ready = Some(agent_start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_ready = all_ready.ok_or_else(|| {
        anyhow::anyhow!("Targets not all Ready in 600 s:\n{}", agent.log_tail(30))
    })?;
    let groups_filled = groups_filled.ok_or_else(|| anyhow::anyhow!("groups not filled"))?;
    // Bound Targets also carry their group's names (the agent saw the operator's status).
    let want = n_nodes / n_groups;
    loop {
        let t = targets.get("target-0").await?;
        let acls = t
            .status
            .and_then(|s| s.observed_state)
            .map(|o| o.acls.len())
            .unwrap_or(0);
        if acls >= want || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let agent_user = "system:serviceaccount:ktgt-system:ktgt-agent";
    let operator_user = "system:serviceaccount:ktgt-system:ktgt-operator";
    let agent_requests = requests(&cp, agent_user);
    let operator_requests = requests(&cp, operator_user);
    let patches_before = status_patches(&cp, agent_user, None);
    let (agent_hwm, agent_rss) = memory(agent.pid());
    let (op_hwm, op_rss) = memory(operator.pid());

    // One binding change: binding-0 now grants group-1 instead of group-0.
    let expected: Vec<String> = {
        let g = groups.get("group-1").await?;
        let mut v = g.status.map(|s| s.initiators).unwrap_or_default();
        v.sort();
        v
    };
    let newcomer = expected
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("group-1 has no initiators"))?;
    let url = format!("iscsi://{portal}/{prefix}:target-0/0");
    anyhow::ensure!(
        !iscsi("iscsi-inq", &["-i", &newcomer, &url]).0,
        "{newcomer} logged in before the change"
    );
    let change = Instant::now();
    let (ok, _, err) = cp.kubectl(&[
        "patch",
        "initiatorgroupbinding",
        "binding-0",
        "--type=merge",
        "-p",
        r#"{"spec":{"initiatorGroupRef":{"name":"group-1"}}}"#,
    ]);
    anyhow::ensure!(ok, "patching the binding: {err}");
    let login_admitted = loop {
        if iscsi("iscsi-inq", &["-i", &newcomer, &url]).0 {
            break change.elapsed();
        }
        anyhow::ensure!(
            change.elapsed() < Duration::from_secs(60),
            "{newcomer} not admitted 60 s after the change"
        );
    };
    let acl_applied = loop {
        let t = targets.get("target-0").await?;
        let mut acls = t
            .status
            .and_then(|s| s.observed_state)
            .map(|o| o.acls)
            .unwrap_or_default();
        acls.sort();
        if acls == expected {
            break change.elapsed();
        }
        anyhow::ensure!(
            change.elapsed() < Duration::from_secs(60),
            "the ACL change did not show in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let patches_after = status_patches(&cp, agent_user, None) - patches_before;
    let patches_target0 = status_patches(&cp, agent_user, Some("target-0"));

    println!("# kube-scale: {n_targets} Targets x 2 LUNs on one node, {n_nodes} Nodes, {n_groups} groups and bindings");
    println!(
        "objects written (kubectl apply --server-side): {:.1} s",
        written.as_secs_f64()
    );
    println!(
        "agent start -> every Target Ready: {:.1} s",
        all_ready.as_secs_f64()
    );
    println!(
        "operator start -> every group filled: {:.1} s",
        groups_filled.as_secs_f64()
    );
    println!("agent memory: peak {agent_hwm:.0} MiB, now {agent_rss:.0} MiB");
    println!("operator memory: peak {op_hwm:.0} MiB, now {op_rss:.0} MiB");
    println!("agent API requests until settled: {agent_requests:?}");
    println!("operator API requests until settled: {operator_requests:?}");
    println!(
        "one binding change -> the new initiator logs in: {:.2} s; ACL in status: {:.2} s",
        login_admitted.as_secs_f64(),
        acl_applied.as_secs_f64()
    );
    let refused: BTreeMap<u64, usize> = cp
        .requests_by(agent_user)
        .iter()
        .filter_map(|e| e["responseStatus"]["code"].as_u64())
        .filter(|c| *c >= 400)
        .fold(BTreeMap::new(), |mut m, c| {
            *m.entry(c).or_insert(0) += 1;
            m
        });
    println!("agent requests answered with an error, by code: {refused:?}");
    println!("agent status writes after the change: {patches_after} (target-0: {patches_target0} in all)");
    Ok(())
}
