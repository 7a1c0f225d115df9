//! The whole dynamic-provisioning chain on a real control plane: kube-apiserver and
//! kube-controller-manager (PV binding, attach/detach), the upstream external-provisioner,
//! external-attacher, external-resizer and csi-snapshotter with snapshot-controller (built from
//! the module proxy by tests/kube/build-csi-tools.sh) in front of
//! `ktgt-csi controller`, and `ktgt-agent kubernetes` serving the volumes. There is no kubelet
//! or scheduler: the test writes what they would (a Node marked for controller-managed attach,
//! its CSINode with the driver's node id as node-driver-registrar would, a Pod's nodeName, a
//! WaitForFirstConsumer claim's selected node). Every component runs with the RBAC of
//! `deploy/csi/`, and the audit log must show none of their requests refused.

use std::process::Command;
use std::time::Duration;

use ktgt_kube_tests::agent::{
    assert_nothing_forbidden, skip_without_libiscsi, Agent, CLIENT, STRANGER,
};
use ktgt_kube_tests::csi::{spawn_controller_with, Controller};
use ktgt_kube_tests::{repo_root, unique, wait_for, ControlPlane, Proc, ReflinkDir};

const CSI_USER: &str = "system:serviceaccount:ktgt-system:ktgt-csi-controller";

fn sidecar(env: &str) -> Option<std::path::PathBuf> {
    let p = std::env::var_os(env).map(std::path::PathBuf::from);
    if p.is_none() {
        assert!(
            std::env::var_os("KTGT_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
            "{env} is not set (tests/kube/run.sh builds the sidecars)"
        );
    }
    p
}

fn jsonpath(cp: &ControlPlane, args: &[&str], path: &str) -> String {
    let jp = format!("jsonpath={path}");
    let mut a = args.to_vec();
    a.extend(["-o", &jp]);
    let (_, out, _) = cp.kubectl(&a);
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_becomes_a_target_that_a_pod_attaches_to_its_node_only() {
    if skip_without_libiscsi("csi_chain") {
        return;
    }
    let (Some(provisioner), Some(attacher), Some(resizer)) = (
        sidecar("KTGT_CSI_PROVISIONER"),
        sidecar("KTGT_CSI_ATTACHER"),
        sidecar("KTGT_CSI_RESIZER"),
    ) else {
        eprintln!("csi_chain: skipped, the sidecars are not built");
        return;
    };
    let cp = ControlPlane::shared_with_controller_manager();
    cp.install_deploy();
    for f in [
        "csidriver.yaml",
        "controller-rbac.yaml",
        "sidecar-rbac.yaml",
    ] {
        cp.apply_file(&repo_root().join("deploy/csi").join(f));
    }
    let agent = Agent::start_with(
        cp,
        "csi-chain",
        "ktgt-agent",
        &["--csi-volume-dir", "{dir}/pool"],
    );
    // The pool on XFS: snapshots and clones are reflink copies.
    let _xfs = ReflinkDir::mount(&agent.dir.join("pool"), 1024);
    // A second pool, on the worker node (no agent serves it: the test only looks at where a
    // WaitForFirstConsumer claim's volume is made).
    let worker = unique("worker");
    let near = format!(
        "name=near,node={worker},path={}/near,capacity=256Mi,portal=127.0.0.1:9",
        agent.dir.display()
    );
    let Controller {
        proc: csi,
        socket,
        kubeconfig,
        pool_dir,
    } = spawn_controller_with(cp, &agent, "chain", "1Gi", None, &["--pool".into(), near]);
    wait_for(
        "the controller's socket",
        Duration::from_secs(20),
        || async { socket.exists().then_some(()) },
        || csi.log_tail(20),
    )
    .await;
    // The sidecars as deploy/csi/controller.yaml runs them (leader election included).
    let address = format!("--csi-address={}", socket.display());
    let kc = format!("--kubeconfig={}", kubeconfig.display());
    let common = [
        kc.as_str(),
        address.as_str(),
        "--timeout=60s",
        "--leader-election",
        "--leader-election-namespace=ktgt-system",
    ];
    // CSIStorageCapacity objects as deploy/csi/controller.yaml asks for them, without an
    // owner (no Pod here) and refreshed every 2 s.
    let mut p = Command::new(&provisioner);
    p.args(common)
        .arg("--extra-create-metadata")
        .args([
            "--enable-capacity",
            "--capacity-ownerref-level=-1",
            "--capacity-poll-interval=2s",
        ])
        .env("NAMESPACE", "ktgt-system");
    let provisioner = Proc::spawn(p, &agent.dir.join("provisioner.log"));
    let mut a = Command::new(&attacher);
    a.args(common);
    let attacher = Proc::spawn(a, &agent.dir.join("attacher.log"));
    let mut r = Command::new(&resizer);
    r.args(common);
    let resizer = Proc::spawn(r, &agent.dir.join("resizer.log"));
    let logs = || {
        format!(
            "provisioner:\n{}\nattacher:\n{}\nresizer:\n{}\ncontroller:\n{}\nagent:\n{}\nkcm:\n{}",
            provisioner.log_tail(15),
            attacher.log_tail(15),
            resizer.log_tail(15),
            csi.log_tail(15),
            agent.proc.log_tail(15),
            std::fs::read_to_string(cp.dir().join("kube-controller-manager.log"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        )
    };

    // Two nodes that mount, as kubelet and node-driver-registrar would register them: each
    // Node marked for controller-managed attach/detach, each CSINode naming the initiator
    // name that NodeGetInfo reports there.
    let ns = unique("csi-chain");
    let other = unique("other");
    let sc = unique("ktgt");
    let wffc = unique("ktgt-wffc");
    let mut objects = String::new();
    for (node, iqn) in [(&worker, CLIENT), (&other, STRANGER)] {
        objects.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels:\n    \
             topology.csi.ktgt.io/node: {node}\n  annotations:\n    \
             volumes.kubernetes.io/controller-managed-attach-detach: \"true\"\n---\n\
             apiVersion: storage.k8s.io/v1\nkind: CSINode\nmetadata:\n  name: {node}\nspec:\n  drivers:\n  \
             - name: csi.ktgt.io\n    nodeID: {iqn}\n    topologyKeys: [topology.csi.ktgt.io/node]\n---\n"
        ));
    }
    objects.push_str(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n\
         apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: {sc}\nprovisioner: csi.ktgt.io\n\
         parameters: {{pool: chain, csi.storage.k8s.io/fstype: ext4}}\nreclaimPolicy: Delete\nvolumeBindingMode: Immediate\n\
         allowVolumeExpansion: true\n---\n\
         apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: {wffc}\nprovisioner: csi.ktgt.io\n\
         reclaimPolicy: Delete\nvolumeBindingMode: WaitForFirstConsumer\n---\n"
    ));
    for (name, class) in [("data", &sc), ("late", &wffc)] {
        objects.push_str(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
             spec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: {class}\n  resources:\n    requests:\n      storage: 16Mi\n---\n"
        ));
    }
    cp.apply_yaml(&objects);

    // Immediate: the claim is bound to a PV whose volume is a Target the agent serves.
    let pvc = |name: &str, path: &str| jsonpath(cp, &["get", "pvc", name, "-n", &ns], path);
    wait_for(
        "the Immediate claim Bound",
        Duration::from_secs(90),
        || async { (pvc("data", "{.status.phase}") == "Bound").then_some(()) },
        logs,
    )
    .await;
    let pv = pvc("data", "{.spec.volumeName}");
    let handle = jsonpath(cp, &["get", "pv", &pv], "{.spec.csi.volumeHandle}");
    let iqn = jsonpath(cp, &["get", "target", &handle], "{.spec.iqn}");
    assert!(
        iqn.starts_with("iqn.2026-11.io.ktgt.csi:"),
        "{iqn}\n{}",
        logs()
    );
    assert_eq!(
        jsonpath(cp, &["get", "pv", &pv], "{.spec.capacity.storage}"),
        "16Mi"
    );
    let file = pool_dir.join(format!("{handle}.img"));
    wait_for(
        "the volume's file",
        Duration::from_secs(30),
        || async { (std::fs::metadata(&file).ok()?.len() == 16 << 20).then_some(()) },
        logs,
    )
    .await;
    // Not attached anywhere yet: nobody logs in.
    assert!(!agent.can_log_in(CLIENT, &iqn));

    // A Pod on the worker: the attach/detach controller writes a VolumeAttachment, the
    // attacher publishes, and the worker's initiator, and no other, logs in.
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n  namespace: {ns}\nspec:\n  nodeName: {worker}\n  \
         automountServiceAccountToken: false\n  containers:\n  - name: app\n    image: busybox\n    \
         volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes:\n  - name: data\n    \
         persistentVolumeClaim: {{claimName: data}}\n"
    );
    // The namespace's default ServiceAccount comes from the controller manager; until then
    // admission refuses the Pod.
    wait_for(
        "the Pod admitted",
        Duration::from_secs(60),
        || async {
            cp.kubectl_stdin(&["apply", "-f", "-"], &pod)
                .0
                .then_some(())
        },
        logs,
    )
    .await;
    let attached = || {
        jsonpath(
            cp,
            &["get", "volumeattachments"],
            &format!("{{.items[?(@.spec.source.persistentVolumeName==\"{pv}\")].status.attached}}"),
        )
    };
    wait_for(
        "the VolumeAttachment attached",
        Duration::from_secs(90),
        || async { (attached() == "true").then_some(()) },
        logs,
    )
    .await;
    let va_node = jsonpath(
        cp,
        &["get", "volumeattachments"],
        &format!("{{.items[?(@.spec.source.persistentVolumeName==\"{pv}\")].spec.nodeName}}"),
    );
    assert_eq!(va_node, worker);
    agent
        .wait_login(CLIENT, &iqn, true, "the worker's initiator logs in")
        .await;
    assert!(
        !agent.can_log_in(STRANGER, &iqn),
        "another node's initiator logged in"
    );

    // The Pod goes: the volume is detached and the worker's session logged out.
    let url = agent.url(&iqn, 0);
    agent
        .expect_revoked(
            CLIENT,
            &iqn,
            &url,
            async {
                let (ok, out, err) = cp.kubectl(&[
                    "delete",
                    "pod",
                    "app",
                    "-n",
                    &ns,
                    "--grace-period=0",
                    "--force",
                ]);
                assert!(ok, "{out}{err}");
            },
            "the Pod deleted",
        )
        .await;
    wait_for(
        "the VolumeAttachment gone",
        Duration::from_secs(60),
        || async { attached().is_empty().then_some(()) },
        logs,
    )
    .await;

    // A larger claim: the resizer expands the volume, the agent grows the LUN and its file
    // in place; the claim waits for the node's filesystem resize (kubelet's part).
    let (ok, out, err) = cp.kubectl(&[
        "patch",
        "pvc",
        "data",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"resources":{"requests":{"storage":"32Mi"}}}}"#,
    ]);
    assert!(ok, "{out}{err}");
    wait_for(
        "the PV, the Target's LUN and its file at 32Mi",
        Duration::from_secs(90),
        || async {
            let pv_size = jsonpath(cp, &["get", "pv", &pv], "{.spec.capacity.storage}");
            let lun = jsonpath(cp, &["get", "target", &handle], "{.spec.luns[0].size}");
            let file_len = std::fs::metadata(&file).ok()?.len();
            (pv_size == "32Mi" && lun == (32u64 << 20).to_string() && file_len == 32 << 20)
                .then_some(())
        },
        logs,
    )
    .await;
    wait_for(
        "the claim waiting for the node's filesystem resize",
        Duration::from_secs(60),
        || async {
            (pvc("data", "{.status.conditions[*].type}").contains("FileSystemResizePending"))
                .then_some(())
        },
        logs,
    )
    .await;

    // WaitForFirstConsumer: nothing is made until a node is chosen (the scheduler's
    // annotation), then the claim binds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pvc("late", "{.status.phase}"), "Pending");
    assert_eq!(pvc("late", "{.spec.volumeName}"), "");
    let (ok, out, err) = cp.kubectl(&[
        "annotate",
        "pvc",
        "late",
        "-n",
        &ns,
        &format!("volume.kubernetes.io/selected-node={worker}"),
    ]);
    assert!(ok, "{out}{err}");
    wait_for(
        "the WaitForFirstConsumer claim Bound once a node is selected",
        Duration::from_secs(90),
        || async { (pvc("late", "{.status.phase}") == "Bound").then_some(()) },
        logs,
    )
    .await;
    let late_handle = jsonpath(
        cp,
        &["get", "pv", &pvc("late", "{.spec.volumeName}")],
        "{.spec.csi.volumeHandle}",
    );
    // Its volume is in the pool of the node its Pod goes to (the preferred topology).
    assert_eq!(
        jsonpath(cp, &["get", "target", &late_handle], "{.spec.nodeName}"),
        worker,
        "{}",
        logs()
    );
    assert_eq!(
        jsonpath(
            cp,
            &["get", "target", &late_handle],
            "{.metadata.labels.csi\\.ktgt\\.io/pool}"
        ),
        "near"
    );
    // The provisioner publishes what GetCapacity says for the WaitForFirstConsumer class, one
    // object per node (every node reaches every pool, so each carries the free bytes of all).
    let capacities = || {
        jsonpath(
            cp,
            &["get", "csistoragecapacities", "-n", "ktgt-system"],
            &format!(
                "{{range .items[?(@.storageClassName==\"{wffc}\")]}}{{.nodeTopology.matchLabels.topology\\.csi\\.ktgt\\.io/node}}={{.capacity}}/{{.maximumVolumeSize}} {{end}}"
            ),
        )
    };
    wait_for(
        "CSIStorageCapacity objects for both nodes",
        Duration::from_secs(60),
        || async {
            let c = capacities();
            (c.contains(&format!("{worker}=")) && c.contains(&format!("{other}="))).then_some(c)
        },
        logs,
    )
    .await;
    let c = capacities();
    for entry in c.split_whitespace() {
        let (_, sizes) = entry.split_once('=').unwrap();
        let (cap, max) = sizes.split_once('/').unwrap();
        assert!(!cap.is_empty() && cap != "0" && !max.is_empty(), "{c}");
    }

    // Snapshots (when the snapshot CRDs and external-snapshotter are built): a VolumeSnapshot
    // of the claim becomes a TargetSnapshot, a reflink copy on the storage node; a claim from
    // it, and a claim from the claim, become Targets cloned from their source.
    let snapshot_tools = (
        sidecar("KTGT_CSI_SNAPSHOTTER"),
        sidecar("KTGT_SNAPSHOT_CONTROLLER"),
    );
    let mut snapshot_procs = Vec::new();
    if let (Some(snapshotter), Some(snapshot_controller)) = snapshot_tools {
        assert!(cp.install_snapshot_crds());
        // snapshot-controller is the cluster's (its own RBAC upstream); the admin runs it.
        let mut c = Command::new(&snapshot_controller);
        c.arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
            .arg("--leader-election=false");
        snapshot_procs.push(Proc::spawn(c, &agent.dir.join("snapshot-controller.log")));
        let mut c = Command::new(&snapshotter);
        c.args(common);
        snapshot_procs.push(Proc::spawn(c, &agent.dir.join("snapshotter.log")));
        let snap_logs = || {
            format!(
                "snapshot-controller:\n{}\nsnapshotter:\n{}\n{}",
                snapshot_procs[0].log_tail(15),
                snapshot_procs[1].log_tail(15),
                logs()
            )
        };
        let class = unique("ktgt-snap");
        cp.apply_yaml(&format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata:\n  name: {class}\n\
             driver: csi.ktgt.io\ndeletionPolicy: Delete\n---\n\
             apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata:\n  name: snap\n  namespace: {ns}\n\
             spec:\n  volumeSnapshotClassName: {class}\n  source:\n    persistentVolumeClaimName: data\n"
        ));
        let vs = |path: &str| jsonpath(cp, &["get", "volumesnapshot", "snap", "-n", &ns], path);
        wait_for(
            "the VolumeSnapshot ready to use",
            Duration::from_secs(90),
            || async { (vs("{.status.readyToUse}") == "true").then_some(()) },
            snap_logs,
        )
        .await;
        assert_eq!(vs("{.status.restoreSize}"), "32Mi");
        let content = vs("{.status.boundVolumeSnapshotContentName}");
        let snap_handle = jsonpath(
            cp,
            &["get", "volumesnapshotcontent", &content],
            "{.status.snapshotHandle}",
        );
        let snap_file = pool_dir.join(format!("{snap_handle}.img"));
        assert_eq!(
            jsonpath(cp, &["get", "targetsnapshot", &snap_handle], "{.spec.path}"),
            snap_file.display().to_string()
        );
        assert_eq!(std::fs::metadata(&snap_file).unwrap().len(), 32 << 20);
        for (name, kind, api_group) in [
            (
                "restored",
                "VolumeSnapshot",
                "\n    apiGroup: snapshot.storage.k8s.io",
            ),
            ("copy", "PersistentVolumeClaim", ""),
        ] {
            let source = if kind == "VolumeSnapshot" {
                "snap"
            } else {
                "data"
            };
            cp.apply_yaml(&format!(
                "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
                 spec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: {sc}\n  dataSource:\n    \
                 kind: {kind}\n    name: {source}{api_group}\n  resources:\n    requests:\n      storage: 32Mi\n"
            ));
            wait_for(
                &format!("the claim from a {kind} Bound"),
                Duration::from_secs(90),
                || async { (pvc(name, "{.status.phase}") == "Bound").then_some(()) },
                snap_logs,
            )
            .await;
            let h = jsonpath(
                cp,
                &["get", "pv", &pvc(name, "{.spec.volumeName}")],
                "{.spec.csi.volumeHandle}",
            );
            let from = jsonpath(cp, &["get", "target", &h], "{.spec.luns[0].cloneFrom}");
            let want = if kind == "VolumeSnapshot" {
                snap_file.clone()
            } else {
                file.clone()
            };
            assert_eq!(from, want.display().to_string(), "{}", snap_logs());
            wait_for(
                "the clone's file",
                Duration::from_secs(30),
                || async {
                    (std::fs::metadata(pool_dir.join(format!("{h}.img")))
                        .ok()?
                        .len()
                        == 32 << 20)
                        .then_some(())
                },
                snap_logs,
            )
            .await;
        }
        // Deleting the VolumeSnapshot deletes the copy (deletionPolicy Delete).
        let (ok, out, err) = cp.kubectl(&["delete", "volumesnapshot", "snap", "-n", &ns]);
        assert!(ok, "{out}{err}");
        wait_for(
            "the TargetSnapshot and its file gone",
            Duration::from_secs(60),
            || async {
                (!cp.kubectl(&["get", "targetsnapshot", &snap_handle]).0 && !snap_file.exists())
                    .then_some(())
            },
            snap_logs,
        )
        .await;
    }

    // Deleting the claims deletes the PVs, the Targets and their files.
    let (ok, out, err) = cp.kubectl(&["delete", "pvc", "--all", "-n", &ns, "--wait=false"]);
    assert!(ok, "{out}{err}");
    wait_for(
        "the PVs, Targets and files gone",
        Duration::from_secs(90),
        || async {
            let (_, pvs, _) = cp.kubectl(&["get", "pv", "-o", "name"]);
            let gone = |h: &str| {
                !cp.kubectl(&["get", "target", h]).0 && !pool_dir.join(format!("{h}.img")).exists()
            };
            (!pvs.contains(&pv) && gone(&handle) && gone(&late_handle)).then_some(())
        },
        logs,
    )
    .await;
    wait_for(
        "nothing left in the pool",
        Duration::from_secs(60),
        || async {
            let (_, t, _) = cp.kubectl(&[
                "get",
                "targets,targetsnapshots",
                "-l",
                "csi.ktgt.io/managed=true",
                "-o",
                "name",
            ]);
            let files = std::fs::read_dir(&pool_dir).ok()?.count();
            (t.trim().is_empty() && files == 0).then_some(())
        },
        logs,
    )
    .await;
    assert_nothing_forbidden(cp, CSI_USER);
}
