//! The CSI node service on a real Linux initiator: `ktgt-csi node` runs in the initiator VM
//! (`tests/tools/initiator-vm`, workload `csi`: open-iscsi's iscsid and iscsiadm, the kernel's
//! iscsi_tcp, mkfs.ext4, blkid, mount), `ktgt-csi controller` and `ktgt-agent kubernetes` run
//! here on the real control plane, and the guest reaches the controller's socket and the
//! agent's portal through QEMU's forwarding. In the guest, `csi-node-check` drives volumes
//! through their whole life (stage, publish, write, unstage, stage again and read back, a
//! refused login, the target killed and restarted under a volume taking writes, bad
//! requests), then the upstream csi-sanity runs against both services:
//! every spec must pass, and the skipped ones are listed with their reasons.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ktgt_csi::proto::{self, controller_client::ControllerClient};
use ktgt_kube_tests::agent::{assert_nothing_forbidden, Agent};
use ktgt_kube_tests::csi::{channel, create, spawn_controller, Controller};
use ktgt_kube_tests::{ktgt_bin, repo_root, wait_for, ControlPlane, ReflinkDir};

const CSI_USER: &str = "system:serviceaccount:ktgt-system:ktgt-csi-controller";
const GUEST_INITIATOR: &str = "iqn.2004-10.org.example:csi-node";

fn require_tools() -> bool {
    std::env::var_os("KTGT_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

/// A stripped copy of `bin` in `dir` (the guest holds its files in memory).
fn stripped(bin: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(bin.file_name().unwrap());
    let st = Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .expect("running strip (binutils)");
    assert!(st.success(), "strip {}", bin.display());
    out
}

/// One junit test case: (name, status, message).
fn test_cases(xml: &str) -> Vec<(String, String, String)> {
    let attr = |tag: &str, name: &str| -> String {
        let key = format!(" {name}=\"");
        tag.find(&key)
            .map(|i| {
                let rest = &tag[i + key.len()..];
                rest[..rest.find('"').unwrap_or(rest.len())].to_owned()
            })
            .unwrap_or_default()
    };
    let unxml = |s: String| {
        s.replace("&#34;", "\"")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    xml.split("<testcase ")
        .skip(1)
        .map(|case| {
            let case = format!(
                " {}",
                &case[..case.find("</testcase>").unwrap_or(case.len())]
            );
            let head = &case[..case.find('>').unwrap_or(case.len())];
            let message = ["<skipped ", "<failure ", "<error "]
                .iter()
                .find_map(|t| case.find(t).map(|j| attr(&case[j..], "message")))
                .unwrap_or_default();
            (
                unxml(attr(head, "name")),
                attr(head, "status"),
                unxml(message),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_service_stages_and_publishes_on_a_real_initiator_and_passes_csi_sanity() {
    let vm = repo_root().join("tests/tools/initiator-vm");
    if !vm.join("out/initramfs.cpio.gz").exists() {
        assert!(
            !require_tools(),
            "the initiator VM is not built (tests/setup.sh builds it)"
        );
        eprintln!("csi_node: skipped, the initiator VM is not built");
        return;
    }
    let sanity = std::env::var_os("KTGT_CSI_SANITY").map(PathBuf::from);
    if sanity.is_none() {
        assert!(
            !require_tools(),
            "KTGT_CSI_SANITY is not set (tests/kube/run.sh builds csi-sanity)"
        );
        eprintln!("csi_node: csi-sanity not built; running csi-node-check only");
    }
    let cp = ControlPlane::shared();
    cp.install_deploy();
    cp.apply_file(&repo_root().join("deploy/csi/controller-rbac.yaml"));
    let mut agent = Agent::start_with(
        cp,
        "csi-node",
        "ktgt-agent",
        &["--csi-volume-dir", "{dir}/pool"],
    );
    // The pool on XFS, so csi-sanity's snapshot and clone specs run (reflink copies); sparse,
    // as the volumes in it are.
    let _xfs = ReflinkDir::mount(&agent.dir.join("pool"), 4096);
    let Controller {
        proc: csi,
        socket,
        kubeconfig: _,
        pool_dir,
    } = spawn_controller(cp, &agent, "vm", "4Gi", Some("10.0.2.100:3260"));
    wait_for(
        "the controller's socket",
        Duration::from_secs(20),
        || async { socket.exists().then_some(()) },
        || csi.log_tail(20),
    )
    .await;

    // A volume with mutual CHAP, made here; the guest stages it with the Secret the controller
    // wrote (what kubelet would hand the node service as its stage secret).
    let mut ctl = ControllerClient::new(channel(socket.clone()).await);
    let chap_id = ctl
        .create_volume(create("check-chap", 64 << 20, &[("chap", "mutual")]))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume with chap: {e}\n{}", csi.log_tail(20)))
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let secret: k8s_openapi::api::core::v1::Secret =
        kube::Api::namespaced(cp.client().await, "ktgt-system")
            .get("ktgt-chap-check-chap")
            .await
            .expect("the volume's CHAP Secret");
    let secrets: std::collections::BTreeMap<String, String> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("node.session.auth."))
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect();
    assert_eq!(secrets.len(), 4, "{:?}", secrets.keys());
    let chap_file = agent.dir.join("chap-volume.json");
    std::fs::write(
        &chap_file,
        serde_json::json!({"volume_id": chap_id, "secrets": secrets}).to_string(),
    )
    .unwrap();

    let bins = agent.dir.join("guest-bin");
    std::fs::create_dir_all(&bins).unwrap();
    let node_bin = stripped(&ktgt_bin("ktgt-csi"), &bins);
    let check_bin = stripped(Path::new(env!("CARGO_BIN_EXE_csi-node-check")), &bins);
    let log = agent.dir.join("vm.log");
    let mut run = Command::new(vm.join("run.sh"));
    run.args(["--portal", &agent.portal, "--workload", "csi"])
        .args(["--initiator", GUEST_INITIATOR])
        .arg("--controller-socket")
        .arg(&socket)
        .arg("--file")
        .arg(format!("{}:/opt/ktgt/ktgt-csi", node_bin.display()))
        .arg("--file")
        .arg(format!("{}:/opt/ktgt/csi-node-check", check_bin.display()))
        .arg("--file")
        .arg(format!(
            "{}:/opt/ktgt/chap-volume.json",
            chap_file.display()
        ))
        .args(["--memory", "1024", "--timeout", "1200", "--log"])
        .arg(&log);
    if let Some(s) = &sanity {
        run.arg("--file")
            .arg(format!("{}:/opt/ktgt/csi-sanity", s.display()));
    }
    // The guest asks for the target to be restarted (SIGKILL, started again) while a volume
    // takes writes.
    let control = agent.dir.join("control.sock");
    let listener = tokio::net::UnixListener::bind(&control).unwrap();
    run.arg("--control-socket").arg(&control);
    let mut vm = tokio::task::spawn_blocking(move || run.output().expect("running initiator-vm"));
    let mut restarts = 0;
    let out = loop {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        tokio::select! {
            done = &mut vm => break done.unwrap(),
            conn = listener.accept() => {
                let (mut conn, _) = conn.unwrap();
                let mut line = String::new();
                let _ = tokio::io::BufReader::new(&mut conn).read_line(&mut line).await;
                let reply: &[u8] = if line.trim() == "restart-target" {
                    // At once: QEMU's user network accepts the guest's connection even while
                    // nothing listens behind it and then closes it, where a real network
                    // refuses the SYN; Linux 6.1's iscsi_tcp, given such a connection during
                    // recovery, never binds another (ENOTCONN until replacement_timeout).
                    agent.kill_and_restart();
                    restarts += 1;
                    b"restarted\n"
                } else {
                    b"unknown request\n"
                };
                let _ = conn.write_all(reply).await;
            }
        }
    };
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let itest: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("ITEST") && !l.starts_with("ITEST XML "))
        .collect();
    let xml: String = console
        .lines()
        .filter_map(|l| l.strip_prefix("ITEST XML "))
        .collect::<Vec<_>>()
        .join("\n");
    let cases = test_cases(&xml);
    for (name, status, message) in &cases {
        if status != "passed" {
            eprintln!("csi-sanity {status}: {name}: {message}");
        }
    }
    assert!(
        out.status.success(),
        "the guest failed:\n{}\n{}{}\ncontroller:\n{}\nagent:\n{}",
        itest.join("\n"),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        csi.log_tail(30),
        agent.proc.log_tail(30)
    );
    for step in [
        "csi-fs-stage-twice",
        "csi-fs-expand-online",
        "csi-xfs-stage-write-expand",
        "csi-block-expand-online",
        "csi-fs-stage-again-read-back",
        "csi-fs-other-filesystem-refused",
        "csi-block-stage-again-read-back",
        "csi-unpublished-stage-refused",
        "csi-fs-survives-target-restart",
        "csi-chap-mutual-stage-secrets",
        "csi-bad-requests",
    ] {
        assert!(
            itest
                .iter()
                .any(|l| l.starts_with(&format!("ITEST PASS {step} "))),
            "{step} did not pass:\n{}",
            itest.join("\n")
        );
    }
    assert_eq!(
        restarts, 1,
        "the guest asked for {restarts} target restarts"
    );
    if sanity.is_some() {
        let passed = cases.iter().filter(|c| c.1 == "passed").count();
        let failed: Vec<_> = cases
            .iter()
            .filter(|c| c.1 == "failed" || c.1 == "panicked" || c.1 == "timedout")
            .collect();
        eprintln!(
            "csi-sanity: {passed} passed, {} failed, {} skipped",
            failed.len(),
            cases.iter().filter(|c| c.1 == "skipped").count()
        );
        assert!(passed > 0, "csi-sanity ran nothing:\n{}", itest.join("\n"));
        assert!(failed.is_empty(), "csi-sanity failures: {failed:#?}");
    }

    ctl.delete_volume(proto::DeleteVolumeRequest {
        volume_id: chap_id,
        ..Default::default()
    })
    .await
    .unwrap();
    // Everything the guest made is gone: no volume Target, binding, CHAP Secret or file.
    let (_, secrets, _) = cp.kubectl(&[
        "get",
        "secrets",
        "-n",
        "ktgt-system",
        "-l",
        "csi.ktgt.io/managed=true",
        "-o",
        "name",
    ]);
    assert_eq!(secrets.trim(), "", "CHAP Secrets left behind");
    let (_, targets, _) = cp.kubectl(&[
        "get",
        "targets,targetsnapshots,initiatorgroupbindings",
        "-l",
        "csi.ktgt.io/managed=true",
        "-o",
        "name",
    ]);
    assert_eq!(targets.trim(), "", "left behind");
    wait_for(
        "the pool's files deleted",
        Duration::from_secs(30),
        || async {
            let n = std::fs::read_dir(&pool_dir).map(|d| d.count()).unwrap_or(0);
            (n == 0).then_some(())
        },
        || agent.proc.log_tail(20),
    )
    .await;
    assert_nothing_forbidden(cp, CSI_USER);
}

#[test]
fn junit_cases_are_read() {
    let xml = r#"<testsuite><testcase name="[It] Node Service should work" classname="x" status="passed" time="1"></testcase>
<testcase name="[It] Snapshots &#34;a&#34;" classname="x" status="skipped" time="0"><skipped message="skipped - Controller does not have the CREATE_DELETE_SNAPSHOT capability"></skipped></testcase></testsuite>"#;
    let c = test_cases(xml);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].1, "passed");
    assert_eq!(c[1].0, "[It] Snapshots \"a\"");
    assert!(c[1].2.contains("CREATE_DELETE_SNAPSHOT"));
}
