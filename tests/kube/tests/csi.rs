//! `ktgt-csi controller` as a process on a real kube-apiserver, authenticated as its own
//! ServiceAccount with `deploy/csi/controller-rbac.yaml`, beside `ktgt-agent kubernetes`;
//! driven over its unix socket by a gRPC client of the CSI spec's services, and checked with
//! libiscsi: a volume is a Target the agent serves, and publishing it to a node opens it to
//! that node's initiator name and to no other.

use std::time::Duration;

use ktgt_csi::proto;
use ktgt_csi::proto::controller_client::ControllerClient;
use ktgt_csi::proto::identity_client::IdentityClient;
use ktgt_kube_tests::agent::{
    assert_nothing_forbidden, skip_without_libiscsi, Agent, CLIENT, STRANGER,
};
use ktgt_kube_tests::csi::{
    channel, create, create_with, mount_cap, mount_cap_fs, source_snapshot, source_volume,
    spawn_controller, Controller,
};
use ktgt_kube_tests::{iscsi, qemu_io, repo_root, unique, wait_for, ControlPlane, ReflinkDir};
use ktgt_operator::api::Target;
use kube::Api;
use tonic::Code;

const CSI_USER: &str = "system:serviceaccount:ktgt-system:ktgt-csi-controller";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_targets_and_publishing_opens_them_to_one_node() {
    if skip_without_libiscsi("csi") {
        return;
    }
    let cp = ControlPlane::shared();
    cp.install_deploy();
    cp.apply_file(&repo_root().join("deploy/csi/controller-rbac.yaml"));
    // The agent deletes a deleted volume's file only under its --csi-volume-dir.
    let mut agent = Agent::start_with(cp, "csi", "ktgt-agent", &["--csi-volume-dir", "{dir}/pool"]);
    let Controller {
        proc: csi,
        socket,
        kubeconfig: _,
        pool_dir,
    } = spawn_controller(cp, &agent, "p1", "64Mi", None);
    let ch = channel(socket.clone()).await;
    let mut identity = IdentityClient::new(ch.clone());
    let mut ctl = ControllerClient::new(ch);
    let info = identity
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.ktgt.io");
    let probe = identity
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true), "{}", csi.log_tail(20));

    // CreateVolume: a Target the agent serves, its file created sparse at the size.
    let name = unique("pvc");
    let v = ctl
        .create_volume(create(&name, 16 << 20, &[("pool", "p1")]))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume: {e}\n{}", csi.log_tail(20)))
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 16 << 20);
    let id = v.volume_id.clone();
    let iqn = v.volume_context["iqn"].clone();
    let targets: Api<Target> = Api::all(cp.client().await);
    wait_for(
        "the volume's Target Ready",
        Duration::from_secs(30),
        || async {
            let t = targets.get_opt(&id).await.ok()??;
            t.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
        || agent.proc.log_tail(30),
    )
    .await;
    let file = pool_dir.join(format!("{id}.img"));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 16 << 20);
    // Idempotent by name; the same name with another size is ALREADY_EXISTS.
    let again = ctl
        .create_volume(create(&name, 16 << 20, &[("pool", "p1")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, id);
    let e = ctl
        .create_volume(create(&name, 32 << 20, &[("pool", "p1")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    // Bad input: each a precise status, nothing created.
    let e = ctl
        .create_volume(create(&unique("pvc"), 1 << 20, &[("replicas", "3")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("\"replicas\""), "{e}");
    let e = ctl
        .create_volume(create(&unique("pvc"), 1 << 20, &[("pool", "nowhere")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("nowhere"), "{e}");
    let e = ctl
        .create_volume(create(&unique("pvc"), 1 << 30, &[("pool", "p1")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    let (_, out, _) = cp.kubectl(&[
        "get",
        "targets",
        "-l",
        "csi.ktgt.io/managed=true",
        "-o",
        "name",
    ]);
    assert_eq!(out.lines().count(), 1, "something half-created: {out}");
    // This pool is on ext4, which cannot reflink: a snapshot or a clone is a precise
    // FAILED_PRECONDITION, never a silent data copy, and nothing of it is left.
    let e = ctl
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: unique("snap"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("CloneUnsupported") && e.message().contains("reflink"),
        "{e}"
    );
    let mut from_volume = create(&unique("pvc"), 16 << 20, &[("pool", "p1")]);
    from_volume.volume_content_source = Some(source_volume(&id));
    let e = ctl.create_volume(from_volume).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("reflink"), "{e}");
    wait_for(
        "the failed clone's Target and snapshot gone",
        Duration::from_secs(30),
        || async {
            let (_, t, _) = cp.kubectl(&[
                "get",
                "targets,targetsnapshots",
                "-l",
                "csi.ktgt.io/managed=true",
                "-o",
                "name",
            ]);
            (t.lines().count() == 1).then_some(())
        },
        || agent.proc.log_tail(30),
    )
    .await;
    let files: Vec<_> = std::fs::read_dir(&pool_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        files,
        vec![std::ffi::OsString::from(format!("{id}.img"))],
        "left behind"
    );

    // Not published: nobody logs in. Published to CLIENT: CLIENT only.
    assert!(!agent.can_log_in(CLIENT, &iqn));
    let publish = |node: &str| proto::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.to_owned(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    let ctx = ctl
        .controller_publish_volume(publish(CLIENT))
        .await
        .unwrap_or_else(|e| panic!("ControllerPublishVolume: {e}\n{}", csi.log_tail(20)))
        .into_inner()
        .publish_context;
    assert_eq!(ctx["iqn"], iqn);
    assert_eq!(ctx["lun"], "0");
    assert_eq!(ctx["portal"], agent.portal);
    agent
        .wait_login(CLIENT, &iqn, true, "the published node's initiator logs in")
        .await;
    assert!(
        !agent.can_log_in(STRANGER, &iqn),
        "another initiator logged in"
    );
    // Publishing again is idempotent; an unknown node is NOT_FOUND.
    ctl.controller_publish_volume(publish(CLIENT))
        .await
        .unwrap();
    let e = ctl
        .controller_publish_volume(publish("some-fake-node-id"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let mut unknown = publish(CLIENT);
    unknown.volume_id = "csi-00000000000000000000".into();
    assert_eq!(
        ctl.controller_publish_volume(unknown)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let got = ctl
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec![CLIENT.to_owned()]
    );

    // Unpublish while CLIENT reads: its session is logged out and the next login refused;
    // unpublishing again succeeds.
    let unpublish = proto::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: CLIENT.to_owned(),
        ..Default::default()
    };
    let mut ctl2 = ctl.clone();
    let request = unpublish.clone();
    agent
        .expect_revoked(
            CLIENT,
            &iqn,
            &agent.url(&iqn, 0),
            async move {
                ctl2.controller_unpublish_volume(request).await.unwrap();
            },
            "unpublish",
        )
        .await;
    ctl.controller_unpublish_volume(unpublish).await.unwrap();

    // ListVolumes pages; GetCapacity accounts; ValidateVolumeCapabilities.
    let second = ctl
        .create_volume(create(&unique("pvc"), 8 << 20, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let page1 = ctl
        .list_volumes(proto::ListVolumesRequest {
            max_entries: 1,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.entries.len(), 1);
    assert!(!page1.next_token.is_empty());
    let page2 = ctl
        .list_volumes(proto::ListVolumesRequest {
            max_entries: 1,
            starting_token: page1.next_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.entries.len(), 1);
    assert!(page2.next_token.is_empty());
    let mut ids: Vec<String> = page1
        .entries
        .iter()
        .chain(&page2.entries)
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    ids.sort();
    let mut want = vec![id.clone(), second.volume_id.clone()];
    want.sort();
    assert_eq!(ids, want);
    let e = ctl
        .list_volumes(proto::ListVolumesRequest {
            max_entries: 1,
            starting_token: "bogus".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let cap = ctl
        .get_capacity(proto::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, (64 - 16 - 8) << 20);
    let ok = ctl
        .validate_volume_capabilities(proto::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{}", ok.message);

    // ControllerExpandVolume: past the pool's room is RESOURCE_EXHAUSTED and changes nothing;
    // within it the agent grows the file in place; a smaller size keeps the volume's size.
    let expand = |bytes: i64| proto::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let e = ctl
        .controller_expand_volume(expand(1 << 30))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 16 << 20);
    let r = ctl
        .controller_expand_volume(expand(24 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 24 << 20);
    wait_for(
        "the volume's file grown to 24 MiB, and the Target's status saying so",
        Duration::from_secs(30),
        || async {
            let served = targets
                .get(&id)
                .await
                .ok()?
                .status?
                .observed_state?
                .luns
                .first()?
                .size
                .clone()?;
            (std::fs::metadata(&file).ok()?.len() == 24 << 20
                && served.0 == (24u64 << 20).to_string())
            .then_some(())
        },
        || agent.proc.log_tail(30),
    )
    .await;
    let r = ctl
        .controller_expand_volume(expand(8 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 24 << 20, "a volume never shrinks");
    let e = ctl
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: "csi-0000000000000000dead".into(),
            ..expand(32 << 20)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // DeleteVolume: the Target goes, and the agent deletes its file; deleting again is fine.
    for v in [&id, &second.volume_id] {
        ctl.delete_volume(proto::DeleteVolumeRequest {
            volume_id: v.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    wait_for(
        "the volume's Target and file gone",
        Duration::from_secs(30),
        || async { (targets.get_opt(&id).await.ok()?.is_none() && !file.exists()).then_some(()) },
        || agent.proc.log_tail(30),
    )
    .await;
    ctl.delete_volume(proto::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, out, _) = cp.kubectl(&[
        "get",
        "initiatorgroupbindings",
        "-l",
        "csi.ktgt.io/managed=true",
        "-o",
        "name",
    ]);
    assert!(out.trim().is_empty(), "bindings left behind: {out}");

    // A deleted volume whose Target still waits for the agent's finalizer (the agent is down)
    // is gone for the CO: not listed, NOT_FOUND, and its name is ABORTED until it is gone
    // (csi-sanity's ListVolumes spec caught the window once).
    let doomed_name = unique("pvc");
    let doomed = ctl
        .create_volume(create(&doomed_name, 8 << 20, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    wait_for(
        "the volume's Target served",
        Duration::from_secs(30),
        || async {
            targets
                .get_opt(&doomed)
                .await
                .ok()??
                .metadata
                .finalizers
                .map(|_| ())
        },
        || agent.proc.log_tail(20),
    )
    .await;
    agent.proc.kill();
    ctl.delete_volume(proto::DeleteVolumeRequest {
        volume_id: doomed.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let t = targets.get(&doomed).await.unwrap();
    assert!(
        t.metadata.deletion_timestamp.is_some(),
        "the finalizer holds it"
    );
    let listed = ctl
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .entries
            .iter()
            .all(|e| e.volume.as_ref().unwrap().volume_id != doomed),
        "a deleted volume is listed"
    );
    let e = ctl
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: doomed.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = ctl
        .create_volume(create(&doomed_name, 8 << 20, &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    agent.kill_and_restart();
    wait_for(
        "the deleted volume's Target gone once the agent is back",
        Duration::from_secs(30),
        || async { targets.get_opt(&doomed).await.ok()?.is_none().then_some(()) },
        || agent.proc.log_tail(20),
    )
    .await;

    // CHAP per volume: the controller writes the accounts into Secrets (the agent's keys and
    // kubelet's), the Target requires them, and DeleteVolume removes them.
    let e = ctl
        .create_volume(create(&unique("pvc"), 8 << 20, &[("chap", "yes")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("parameter chap"), "{e}");
    let chap_name = unique("pvc");
    let v = ctl
        .create_volume(create(&chap_name, 8 << 20, &[("chap", "oneway")]))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume with chap: {e}\n{}", csi.log_tail(20)))
        .into_inner()
        .volume
        .unwrap();
    let chap_iqn = v.volume_context["iqn"].clone();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(cp.client().await, "ktgt-system");
    let secret = secrets
        .get(&format!("ktgt-chap-{chap_name}"))
        .await
        .expect("the volume's CHAP Secret");
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    let (user, password) = (text("username"), text("password"));
    assert_eq!(text("node.session.auth.username"), user);
    assert_eq!(text("node.session.auth.password"), password);
    assert_eq!(password.len(), 16);
    assert!(
        !data.contains_key("node.session.auth.password_in"),
        "one-way only"
    );
    ctl.controller_publish_volume(proto::ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: CLIENT.into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    })
    .await
    .unwrap();
    let with_chap = format!("iscsi://{user}%{password}@{}/{chap_iqn}/0", agent.portal);
    wait_for(
        "a login with the volume's CHAP account",
        Duration::from_secs(30),
        || async {
            iscsi("iscsi-inq", &["-i", CLIENT, &with_chap])
                .0
                .then_some(())
        },
        || agent.proc.log_tail(20),
    )
    .await;
    assert!(
        !agent.can_log_in(CLIENT, &chap_iqn),
        "a login without CHAP was admitted"
    );
    let wrong = format!(
        "iscsi://{user}%WrongSecret0123@{}/{chap_iqn}/0",
        agent.portal
    );
    assert!(
        !iscsi("iscsi-inq", &["-i", CLIENT, &wrong]).0,
        "a wrong secret was admitted"
    );
    ctl.delete_volume(proto::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, left, _) = cp.kubectl(&[
        "get",
        "secrets",
        "-n",
        "ktgt-system",
        "-l",
        "csi.ktgt.io/managed=true",
        "-o",
        "name",
    ]);
    assert_eq!(left.trim(), "", "CHAP Secrets left behind");
    assert_nothing_forbidden(cp, CSI_USER);
    drop(csi);
}

/// Snapshots and clones on a pool that can reflink (XFS): a snapshot keeps the volume's data
/// as it was, a volume made from it or from another volume starts with the source's data
/// (read back with QEMU's iSCSI driver), deleting a snapshot leaves its clones intact, and
/// deleting everything leaves the pool empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_clones_are_reflink_copies() {
    if skip_without_libiscsi("csi-snapshots") {
        return;
    }
    let cp = ControlPlane::shared();
    cp.install_deploy();
    cp.apply_file(&repo_root().join("deploy/csi/controller-rbac.yaml"));
    let agent = Agent::start_with(
        cp,
        "csi-snap",
        "ktgt-agent",
        &["--csi-volume-dir", "{dir}/pool"],
    );
    let xfs = ReflinkDir::mount(&agent.dir.join("pool"), 512);
    let Controller {
        proc: csi,
        socket,
        kubeconfig: _,
        pool_dir,
    } = spawn_controller(cp, &agent, "x1", "1Gi", None);
    assert_eq!(pool_dir, xfs.dir);
    let mut ctl = ControllerClient::new(channel(socket).await);
    let caps = ctl
        .controller_get_capabilities(proto::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use proto::controller_service_capability::rpc::Type as Rpc;
    for want in [
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::CloneVolume,
    ] {
        assert!(
            caps.capabilities.iter().any(|c| matches!(&c.r#type,
                Some(proto::controller_service_capability::Type::Rpc(r)) if r.r#type == want as i32)),
            "{want:?} not advertised"
        );
    }
    let targets: Api<Target> = Api::all(cp.client().await);
    let served = |id: String| {
        let targets = targets.clone();
        async move {
            let t = targets.get_opt(&id).await.ok()??;
            t.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        }
    };
    // The closures below call through their own clone of the client.
    let base = ctl.clone();
    let make = |name: String, bytes: i64, source: Option<proto::VolumeContentSource>| {
        let mut ctl = base.clone();
        let mut req = create(&name, bytes, &[]);
        req.volume_content_source = source;
        async move {
            ctl.create_volume(req)
                .await
                .map(|r| r.into_inner().volume.unwrap())
        }
    };
    let publish = |id: String| {
        let mut ctl = base.clone();
        async move {
            ctl.controller_publish_volume(proto::ControllerPublishVolumeRequest {
                volume_id: id,
                node_id: CLIENT.to_owned(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .publish_context
        }
    };
    let io = |iqn: &str, cmds: &[&str]| {
        let (ok, out) = qemu_io(&agent.portal, iqn, 0, CLIENT, cmds);
        assert!(ok, "qemu-io {cmds:?} on {iqn}: {out}");
    };

    // A volume with 1 MiB of 0xa5 at its start.
    let a = make(unique("pvc"), 16 << 20, None).await.unwrap();
    wait_for(
        "volume A served",
        Duration::from_secs(30),
        || served(a.volume_id.clone()),
        || agent.proc.log_tail(30),
    )
    .await;
    let a_iqn = publish(a.volume_id.clone()).await["iqn"].clone();
    agent
        .wait_login(CLIENT, &a_iqn, true, "the published volume")
        .await;
    io(&a_iqn, &["write -P 0xa5 0 1M", "flush"]);

    // CreateSnapshot: ready at once (a reflink is instant), the copy beside the volume.
    let snap_name = unique("snapshot");
    let snap_req = |source: &str| proto::CreateSnapshotRequest {
        source_volume_id: source.to_owned(),
        name: snap_name.clone(),
        ..Default::default()
    };
    let snap = ctl
        .create_snapshot(snap_req(&a.volume_id))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateSnapshot: {e}\n{}\n{}",
                csi.log_tail(20),
                agent.proc.log_tail(20)
            )
        })
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use, "{snap:?}");
    assert_eq!(snap.size_bytes, 16 << 20);
    assert_eq!(snap.source_volume_id, a.volume_id);
    assert!(snap.creation_time.is_some_and(|t| t.seconds > 0));
    assert_eq!(
        std::fs::metadata(pool_dir.join(format!("{}.img", snap.snapshot_id)))
            .unwrap()
            .len(),
        16 << 20
    );
    // Idempotent; the same name of another volume is ALREADY_EXISTS.
    let again = ctl
        .create_snapshot(snap_req(&a.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    let other = make(unique("pvc"), 16 << 20, None).await.unwrap();
    let e = ctl
        .create_snapshot(snap_req(&other.volume_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let e = ctl
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: "csi-00000000000000000000".into(),
            name: unique("snapshot"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // The volume changes after the snapshot; the snapshot does not.
    io(&a_iqn, &["write -P 0x5a 0 1M", "flush"]);

    // ListSnapshots: by id, by source, paged.
    let snap2 = ctl
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: a.volume_id.clone(),
            name: unique("snapshot"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let list = |source: &str, id: &str, max: i32, token: &str| {
        let mut ctl = base.clone();
        let req = proto::ListSnapshotsRequest {
            max_entries: max,
            starting_token: token.to_owned(),
            source_volume_id: source.to_owned(),
            snapshot_id: id.to_owned(),
            ..Default::default()
        };
        async move { ctl.list_snapshots(req).await.map(|r| r.into_inner()) }
    };
    let ids = |r: &proto::ListSnapshotsResponse| -> Vec<String> {
        r.entries
            .iter()
            .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
            .collect()
    };
    let mut both = vec![snap.snapshot_id.clone(), snap2.snapshot_id.clone()];
    both.sort();
    assert_eq!(ids(&list(&a.volume_id, "", 0, "").await.unwrap()), both);
    assert_eq!(
        ids(&list("", &snap.snapshot_id, 0, "").await.unwrap()),
        vec![snap.snapshot_id.clone()]
    );
    assert!(list("", "snap-00000000000000000000", 0, "")
        .await
        .unwrap()
        .entries
        .is_empty());
    assert!(list(&other.volume_id, "", 0, "")
        .await
        .unwrap()
        .entries
        .is_empty());
    let first = list(&a.volume_id, "", 1, "").await.unwrap();
    assert_eq!(ids(&first), vec![both[0].clone()]);
    let second = list(&a.volume_id, "", 1, &first.next_token).await.unwrap();
    assert_eq!(ids(&second), vec![both[1].clone()]);
    assert!(second.next_token.is_empty());
    assert_eq!(
        list("", "", 0, "nonsense").await.unwrap_err().code(),
        Code::Aborted
    );

    // A volume from the snapshot, larger than it: the snapshot's data, zeros past its end.
    let b = make(
        unique("pvc"),
        32 << 20,
        Some(source_snapshot(&snap.snapshot_id)),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "CreateVolume from a snapshot: {e}\n{}",
            agent.proc.log_tail(20)
        )
    });
    assert_eq!(b.capacity_bytes, 32 << 20);
    assert_eq!(b.content_source, Some(source_snapshot(&snap.snapshot_id)));
    let b_iqn = publish(b.volume_id.clone()).await["iqn"].clone();
    agent
        .wait_login(CLIENT, &b_iqn, true, "the volume from a snapshot")
        .await;
    io(&b_iqn, &["read -P 0xa5 0 1M", "read -P 0 16M 16M"]);
    let (ok, out) = iscsi(
        "iscsi-readcapacity16",
        &["-i", CLIENT, &agent.url(&b_iqn, 0)],
    );
    assert!(
        ok && out.contains(&format!("Total size:{}", 32 << 20)),
        "{out}"
    );
    // A volume from volume A: A's data now.
    let c = make(unique("pvc"), 16 << 20, Some(source_volume(&a.volume_id)))
        .await
        .unwrap();
    assert_eq!(c.content_source, Some(source_volume(&a.volume_id)));
    let c_iqn = publish(c.volume_id.clone()).await["iqn"].clone();
    agent
        .wait_login(CLIENT, &c_iqn, true, "the volume from a volume")
        .await;
    io(&c_iqn, &["read -P 0x5a 0 1M"]);
    // Copies are independent: writing the clone leaves its source alone.
    io(&c_iqn, &["write -P 0x33 0 1M", "flush"]);
    io(&a_iqn, &["read -P 0x5a 0 1M"]);

    // Bad input, nothing created: a copy smaller than its source, an unknown source.
    let mut small = create(&unique("pvc"), 8 << 20, &[]);
    small.capacity_range = Some(proto::CapacityRange {
        required_bytes: 8 << 20,
        limit_bytes: 8 << 20,
    });
    small.volume_content_source = Some(source_snapshot(&snap.snapshot_id));
    assert_eq!(
        ctl.create_volume(small).await.unwrap_err().code(),
        Code::OutOfRange
    );
    let e = make(
        unique("pvc"),
        16 << 20,
        Some(source_snapshot("snap-00000000000000000000")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = make(
        unique("pvc"),
        16 << 20,
        Some(source_volume("csi-00000000000000000000")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // An xfs volume is made at least 300 MiB, the smallest filesystem mkfs.xfs makes, unless
    // the limit says otherwise.
    let x = base
        .clone()
        .create_volume(create_with(
            &unique("pvc"),
            16 << 20,
            mount_cap_fs("xfs"),
            &[],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(x.capacity_bytes, 300 << 20);
    let mut capped = create_with(&unique("pvc"), 16 << 20, mount_cap_fs("xfs"), &[]);
    capped.capacity_range = Some(proto::CapacityRange {
        required_bytes: 16 << 20,
        limit_bytes: 100 << 20,
    });
    let e = ctl.create_volume(capped).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert!(e.message().contains("mkfs.xfs"), "{e}");

    // Deleting the snapshot leaves the volume made from it whole.
    for s in [&snap.snapshot_id, &snap2.snapshot_id] {
        ctl.delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    ctl.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(list(&a.volume_id, "", 0, "")
        .await
        .unwrap()
        .entries
        .is_empty());
    io(&b_iqn, &["read -P 0xa5 0 1M"]);

    // Deleting everything leaves the pool empty.
    for v in [&a, &b, &c, &other, &x] {
        ctl.delete_volume(proto::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    wait_for(
        "every file of the pool deleted",
        Duration::from_secs(30),
        || async {
            let left: Vec<_> = std::fs::read_dir(&pool_dir)
                .ok()?
                .filter_map(|e| e.ok())
                .collect();
            left.is_empty().then_some(())
        },
        || {
            format!(
                "{:?}\n{}",
                std::fs::read_dir(&pool_dir).map(|d| d
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name())
                    .collect::<Vec<_>>()),
                agent.proc.log_tail(30)
            )
        },
    )
    .await;
    let (_, out, _) = cp.kubectl(&[
        "get",
        "targets,targetsnapshots",
        "-l",
        "csi.ktgt.io/managed=true",
        "-o",
        "name",
    ]);
    assert!(out.trim().is_empty(), "left behind: {out}");
    assert_nothing_forbidden(cp, CSI_USER);
    drop(csi);
    drop(agent);
}
