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
use ktgt_kube_tests::csi::{channel, create, mount_cap, spawn_controller, Controller};
use ktgt_kube_tests::{iscsi, repo_root, unique, wait_for, ControlPlane};
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
