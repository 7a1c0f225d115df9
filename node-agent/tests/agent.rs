//! Integration tests of the `ktgt-agent` binary (one test binary per crate; support code in
//! `support/`).
//!
//! `kubernetes_mode_end_to_end` runs the real `ktgt-agent kubernetes` against a scripted
//! in-process API server and logs in with libiscsi's tools (`iscsi-ls`, `iscsi-inq`; skipped
//! with a message when they are not installed). The CLI tests check that bad flags are
//! refused by name.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use serde_json::{json, Value};

const GV: &str = "tgtd.unstable.cloud/v1alpha1";
const NODE: &str = "node-a";
const IQN: &str = "iqn.2024-01.cloud.unstable.test:e2e-disk";
const CLIENT: &str = "iqn.2024-01.cloud.unstable.test:e2e-client";
const FINALIZER: &str = "target.tgtd.unstable.cloud/cleanup";

/// A child process (the agent, an initiator) killed if the test fails half-way.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `GET path` over HTTP/1.1; returns (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// Runs a libiscsi tool with a time limit; returns (success, stdout + stderr).
fn iscsi(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("20")
        .arg(tool)
        .args(args)
        .output()
        .expect("run libiscsi tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_or(what, timeout, f, String::new).await
}

/// As [`wait_for`], with `context()` (such as the agent's log) in the panic message.
async fn wait_for_or<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready_condition(target: &Value) -> Option<&Value> {
    target["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_end_to_end() {
    if !have("iscsi-ls") || !have("iscsi-inq") {
        eprintln!(
            "SKIP kubernetes_mode_end_to_end: libiscsi-bin (iscsi-ls, iscsi-inq) not installed"
        );
        return;
    }
    let api = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let portal: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = dir.path().join("agent.log");
    let spawn_agent = || {
        Agent(
            Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
                .args(["kubernetes", "--node-name", NODE])
                .args(["--listen", &portal.to_string()])
                .args(["--metrics-addr", &metrics.to_string()])
                .env("KUBECONFIG", &kubeconfig)
                .env("RUST_LOG", "info,kube=warn")
                .stdout(Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log_path)
                        .unwrap(),
                )
                .spawn()
                .expect("start ktgt-agent"),
        )
    };
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut agent = spawn_agent();

    // Objects: a Target on this node, one on another node, a group and a binding.
    api.create(
        GV,
        "targets",
        "",
        json!({"metadata": {"name": "disk"}, "spec": {
            "nodeName": NODE, "iqn": IQN,
            "luns": [{"lun": 0, "bsType": "memory", "size": "16Mi"}]}}),
    );
    api.create(
        GV,
        "targets",
        "",
        json!({"metadata": {"name": "elsewhere"}, "spec": {
            "nodeName": "node-b", "iqn": "iqn.2024-01.cloud.unstable.test:other",
            "luns": [{"lun": 0, "bsType": "memory", "size": "1Mi"}]}}),
    );
    api.create(
        GV,
        "initiatorgroups",
        "",
        json!({"metadata": {"name": "clients"}, "spec": {"initiators": [CLIENT]}}),
    );
    api.create(
        GV,
        "initiatorgroupbindings",
        "",
        json!({"metadata": {"name": "clients-disk"}, "spec": {
            "targetRef": {"name": "disk"}, "initiatorGroupRef": {"name": "clients"}}}),
    );

    // The agent adds its finalizer and reports Ready with the observed state.
    let target = wait_for_or(
        "Target disk Ready",
        Duration::from_secs(30),
        || {
            let t = api.get(GV, "targets", "", "disk")?;
            (ready_condition(&t)?["status"] == "True").then_some(t)
        },
        || {
            format!(
                "{:#?}\nagent log:\n{}",
                api.get(GV, "targets", "", "disk"),
                log()
            )
        },
    )
    .await;
    assert_eq!(
        target["metadata"]["finalizers"],
        json!([FINALIZER]),
        "{}",
        log()
    );
    let observed = &target["status"]["observedState"];
    assert_eq!(observed["iqn"], IQN);
    assert_eq!(observed["tid"], 1);
    assert_eq!(observed["acls"], json!([CLIENT]));
    assert_eq!(observed["luns"][0]["lun"], 0);
    assert_eq!(target["status"]["observedGeneration"], 1);
    let other = api.get(GV, "targets", "", "elsewhere").unwrap();
    assert!(
        other.get("status").is_none(),
        "another node's Target is never patched"
    );
    assert!(other["metadata"].get("finalizers").is_none());
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.starts_with("PATCH") && r.contains("/targets/elsewhere")),
        "{:?}",
        api.requests()
    );
    // The Event follows the status patch.
    wait_for(
        "a Served Event on the Target",
        Duration::from_secs(10),
        || {
            api.list("events.k8s.io/v1", "events", "default")
                .iter()
                .any(|e| e["reason"] == "Served" && e["regarding"]["name"] == "disk")
                .then_some(())
        },
    )
    .await;

    // Health, readiness, metrics.
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    wait_for_or(
        "/readyz 200",
        Duration::from_secs(10),
        || (http_get(metrics, "/readyz").0 == 200).then_some(()),
        || format!("{:?}\n{}", http_get(metrics, "/readyz"), log()),
    )
    .await;

    // A bound initiator logs in and sees the LUN; one that is not bound is refused.
    let url = format!("iscsi://{portal}");
    let (ok, out) = iscsi("iscsi-ls", &["-i", CLIENT, "-s", &url]);
    assert!(
        ok && out.contains(IQN) && out.contains("Lun:0"),
        "iscsi-ls: {out}\n{}",
        log()
    );
    let lun_url = format!("iscsi://{portal}/{IQN}/0");
    let (ok, out) = iscsi("iscsi-inq", &["-i", CLIENT, &lun_url]);
    assert!(ok, "iscsi-inq as the bound initiator: {out}");
    let (ok, _) = iscsi(
        "iscsi-inq",
        &["-i", "iqn.2024-01.cloud.unstable.test:stranger", &lun_url],
    );
    assert!(!ok, "an initiator no binding names is refused");

    // Some READs for the per-LUN counters (iscsi-perf reads sequentially until -t seconds).
    let (_, perf) = iscsi("iscsi-perf", &["-i", CLIENT, "-t", "1", &lun_url]);
    let (_, text) = http_get(metrics, "/metrics");
    assert!(
        text.contains(r#"ktgt_reconciles_total{controller="target"}"#),
        "{text}"
    );
    assert!(text.contains("ktgt_targets 1"), "{text}");
    assert!(
        text.contains(&format!(r#"ktgt_sessions{{target="{IQN}"}}"#)),
        "{text}"
    );
    let reads = format!(r#"ktgt_lun_ops_total{{target="{IQN}",lun="0",op="read"}} "#);
    let read_ops: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&reads))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(read_ops > 0, "no READ counted; iscsi-perf: {perf}\n{text}");
    assert!(text.contains("ktgt_lun_latency_seconds_bucket"), "{text}");

    // Deleting the binding revokes access at once: a logged-in initiator (iscsi-perf reading
    // for 60 s) is logged out and refused when it logs back in.
    let reader = Agent(
        Command::new("iscsi-perf")
            .args(["-i", CLIENT, "-t", "60", &lun_url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iscsi-perf"),
    );
    wait_for("the reader's session", Duration::from_secs(10), || {
        let (_, text) = http_get(metrics, "/metrics");
        text.contains(&format!(r#"ktgt_sessions{{target="{IQN}"}} 1"#))
            .then_some(())
    })
    .await;
    api.delete(GV, "initiatorgroupbindings", "", "clients-disk");
    // The session ends at once; libiscsi then keeps trying to log back in and is refused.
    wait_for_or(
        "the logged-in reader to be logged out",
        Duration::from_secs(10),
        || {
            let (_, text) = http_get(metrics, "/metrics");
            text.contains(&format!(r#"ktgt_sessions{{target="{IQN}"}} 0"#))
                .then_some(())
        },
        log,
    )
    .await;
    drop(reader);
    wait_for(
        "login refused after the binding is deleted",
        Duration::from_secs(15),
        || {
            let (ok, _) = iscsi("iscsi-inq", &["-i", CLIENT, &lun_url]);
            (!ok).then_some(())
        },
    )
    .await;
    let target = wait_for("ACL emptied in status", Duration::from_secs(15), || {
        let t = api.get(GV, "targets", "", "disk")?;
        t["status"]["observedState"]
            .get("acls")
            .is_none()
            .then_some(t)
    })
    .await;
    assert!(ready_condition(&target).unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("no InitiatorGroupBinding grants access"));

    // A restart rebuilds the same table from the API alone: bind again, restart, log in.
    api.create(
        GV,
        "initiatorgroupbindings",
        "",
        json!({"metadata": {"name": "clients-disk-2"}, "spec": {
            "targetRef": {"name": "disk"}, "initiatorGroupRef": {"name": "clients"}}}),
    );
    wait_for(
        "login admitted after binding again",
        Duration::from_secs(15),
        || {
            iscsi("iscsi-inq", &["-i", CLIENT, &lun_url])
                .0
                .then_some(())
        },
    )
    .await;
    // SIGTERM: graceful stop.
    let _ = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status();
    let status = wait_for("agent exit on SIGTERM", Duration::from_secs(15), || {
        agent.0.try_wait().ok().flatten()
    })
    .await;
    assert!(status.success(), "agent exit: {status:?}\n{}", log());
    drop(agent);
    agent = spawn_agent();
    wait_for(
        "login admitted after a restart",
        Duration::from_secs(30),
        || {
            iscsi("iscsi-inq", &["-i", CLIENT, &lun_url])
                .0
                .then_some(())
        },
    )
    .await;
    let t = api.get(GV, "targets", "", "disk").unwrap();
    assert_eq!(
        t["status"]["observedState"]["tid"], 1,
        "tid stable across restarts"
    );

    // Deleting the Target: cleanup logs initiators out and releases the finalizer.
    api.delete(GV, "targets", "", "disk");
    wait_for(
        "Target deleted (finalizer released)",
        Duration::from_secs(15),
        || api.get(GV, "targets", "", "disk").is_none().then_some(()),
    )
    .await;
    let (ok, out) = iscsi("iscsi-ls", &["-i", CLIENT, "-s", &url]);
    assert!(
        !out.contains(IQN),
        "removed target still discovered ({ok}): {out}"
    );
    let events = api.list("events.k8s.io/v1", "events", "default");
    assert!(
        events.iter().any(|e| e["reason"] == "Removed"),
        "{events:?}"
    );
    drop(agent);
}

/// Out-of-range tuning flags are refused before anything starts, naming the flag.
#[test]
fn cli_refuses_out_of_range_polling_and_thread_counts() {
    for (flag, value) in [("--busy-poll-us", "5000"), ("--conn-threads", "5000")] {
        let out = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
            .args(["standalone", "--listen", "127.0.0.1:0", flag, value])
            .output()
            .expect("run ktgt-agent");
        assert!(!out.status.success(), "{flag} {value} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag) && err.contains("not in"),
            "{flag}: unhelpful error: {err}"
        );
    }
    // An unknown affinity mode names the flag and the modes there are.
    let out = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
        .args([
            "standalone",
            "--listen",
            "127.0.0.1:0",
            "--conn-affinity",
            "spread",
        ])
        .output()
        .expect("run ktgt-agent");
    assert!(!out.status.success(), "--conn-affinity spread accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--conn-affinity") && err.contains("follow") && err.contains("pinned"),
        "unhelpful error: {err}"
    );
}
