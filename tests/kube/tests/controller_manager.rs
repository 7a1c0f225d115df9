//! kube-controller-manager beside the API server (the control plane the CSI tests need: PV
//! binding and attach/detach live there): its controllers act on `deploy/`'s workloads.
//! There is no kubelet or scheduler, so Pods stay Pending; what is checked is what the
//! controllers write.

use std::time::Duration;

use ktgt_kube_tests::{unique, wait_for, ControlPlane};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_run_deploy_workloads_on_a_labelled_storage_node() {
    let cp = ControlPlane::shared_with_controller_manager();
    cp.install_deploy();
    let kcm_log = || {
        let text = std::fs::read_to_string(cp.dir().join("kube-controller-manager.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    // The Deployment gets a ReplicaSet and its two operator Pods.
    wait_for(
        "two ktgt-operator Pods from the Deployment",
        Duration::from_secs(60),
        || async {
            let (ok, out, _) = cp.kubectl(&[
                "get",
                "pods",
                "-n",
                "ktgt-system",
                "-l",
                "app.kubernetes.io/name=ktgt-operator",
                "-o",
                "name",
            ]);
            (ok && out.lines().count() == 2).then_some(())
        },
        kcm_log,
    )
    .await;
    // The DaemonSet makes one agent Pod for a Node labelled as storage, and none for others;
    // it pins the Pod to its Node with a node affinity on metadata.name (the scheduler, absent
    // here, would bind it).
    let storage = unique("storage");
    let plain = unique("plain");
    cp.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {storage}\n  labels: {{tgtd.unstable.cloud/storage: \"\"}}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: {plain}}}\n"
    ));
    let pod_node = wait_for(
        "an agent Pod for the storage Node",
        Duration::from_secs(60),
        || async {
            let (ok, out, _) = cp.kubectl(&[
                "get", "pods", "-n", "ktgt-system", "-l", "app.kubernetes.io/name=ktgt-agent",
                "-o",
                "jsonpath={.items[*].spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[*].matchFields[*].values[*]}",
            ]);
            (ok && !out.trim().is_empty()).then(|| out.trim().to_owned())
        },
        kcm_log,
    )
    .await;
    assert_eq!(pod_node, storage, "agent Pods on the wrong Nodes");
    // The ServiceAccount token controller and the root CA publisher ran too.
    let (ok, out, err) = cp.kubectl(&["get", "configmap", "kube-root-ca.crt", "-n", "ktgt-system"]);
    assert!(ok, "kube-root-ca.crt not published: {out}{err}");
}
