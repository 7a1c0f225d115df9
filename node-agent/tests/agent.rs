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

/// `ktgt-agent standalone --config CONFIG ARGS...`, its log in `log`.
fn standalone(config: &std::path::Path, args: &[&str], log: &std::path::Path) -> Agent {
    Agent(
        Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
            .arg("standalone")
            .arg("--config")
            .arg(config)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start ktgt-agent"),
    )
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

/// `ktgt-agent ls` and `/metrics` against a running standalone agent: two initiators logged
/// in with libiscsi (one with CHAP) appear with their names, the CHAP account's name (never
/// its secret), and read counters that move while they read, in `ls` and as per-session
/// series; `--json` parses; refused logins (wrong CHAP, not in the ACL, unknown target) are
/// counted by reason; once the readers log out they are gone from both; `ls` with no agent
/// behind the socket, or as a user who may not open it, fails with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_shows_who_is_logged_in_and_what_they_do() {
    if !have("iscsi-perf") {
        eprintln!("SKIP ls_shows_who_is_logged_in_and_what_they_do: libiscsi-bin not installed");
        return;
    }
    const OPEN: &str = "iqn.2024-01.cloud.unstable.test:ls-open";
    const GUARDED: &str = "iqn.2024-01.cloud.unstable.test:ls-chap";
    const A: &str = "iqn.2024-01.cloud.unstable.test:reader-a";
    const B: &str = "iqn.2024-01.cloud.unstable.test:reader-b";
    const SECRET: &str = "s3cret-for-ls-test";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: {GV}\nkind: Target\nmetadata: {{name: open}}\nspec:\n  iqn: {OPEN}\n  \
             luns: [{{lun: 0, bsType: memory, size: 16Mi}}]\n---\n\
             apiVersion: {GV}\nkind: Target\nmetadata: {{name: guarded}}\nspec:\n  iqn: {GUARDED}\n  \
             luns: [{{lun: 0, bsType: memory, size: 16Mi}}]\n  chap: {{secretRef: {{name: alice}}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: alice, namespace: default}}\n\
             stringData: {{username: alice, password: {SECRET}}}\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroup\nmetadata: {{name: readers}}\n\
             spec: {{initiators: [{A}, {B}], addresses: [127.0.0.1]}}\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroupBinding\nmetadata: {{name: open}}\n\
             spec: {{targetRef: {{name: open}}, initiatorGroupRef: {{name: readers}}}}\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroupBinding\nmetadata: {{name: guarded}}\n\
             spec: {{targetRef: {{name: guarded}}, initiatorGroupRef: {{name: readers}}}}\n"
        ),
    )
    .unwrap();
    let socket = dir.path().join("run/admin.sock");
    let port = free_port();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log_path = dir.path().join("agent.log");
    let _agent = standalone(
        &config,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-addr",
            &metrics.to_string(),
            "--admin-socket",
            &socket.display().to_string(),
        ],
        &log_path,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ls = |json: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"));
        c.arg("ls").arg("--admin-socket").arg(&socket);
        if json {
            c.arg("--json");
        }
        let out = c.output().expect("run ktgt-agent ls");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    wait_for_or(
        "the admin socket",
        Duration::from_secs(20),
        || ls(false).0.then_some(()),
        log,
    )
    .await;
    let mode = std::fs::metadata(&socket).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let reader = |initiator: &str, url: String| {
        Agent(
            Command::new("iscsi-perf")
                .args(["-i", initiator, "-t", "60", &url])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start iscsi-perf"),
        )
    };
    let a = reader(A, format!("iscsi://127.0.0.1:{port}/{OPEN}/0"));
    let b = reader(
        B,
        format!("iscsi://alice%{SECRET}@127.0.0.1:{port}/{GUARDED}/0"),
    );
    let sessions = |tree: &Value| -> Vec<Value> {
        tree["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["sessions"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let tree = || -> Value {
        let (ok, out, err) = ls(true);
        assert!(ok, "ls --json: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ls --json is not JSON ({e}): {out}"))
    };
    let reads_of = |t: &Value, who: &str| {
        sessions(t)
            .iter()
            .find(|s| s["initiator"] == who)
            .and_then(|s| s["reads"].as_u64())
    };
    let first = wait_for_or(
        "both readers in ls, reading",
        Duration::from_secs(30),
        || {
            let t = tree();
            (reads_of(&t, A)? > 0 && reads_of(&t, B)? > 0).then_some(t)
        },
        log,
    )
    .await;
    assert_eq!(
        first["portal_groups"],
        json!([{"tag": 1, "portals": [format!("127.0.0.1:{port}")]}])
    );
    let targets = first["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2, "{first:#}");
    let guarded = targets.iter().find(|t| t["iqn"] == GUARDED).unwrap();
    assert_eq!(guarded["chap_accounts"], json!(["alice"]));
    let sb = &guarded["sessions"][0];
    assert_eq!(sb["initiator"], B);
    assert_eq!(sb["chap_account"], "alice");
    assert_eq!(sb["portal"], format!("127.0.0.1:{port}"));
    assert_eq!(sb["portal_group"], 1);
    assert!(
        sb["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{sb}"
    );
    assert_eq!(sb["isid"].as_str().unwrap().len(), 12, "{sb}");
    assert!(sb["max_burst_length"].as_u64().unwrap() > 0, "{sb}");
    let open = targets.iter().find(|t| t["iqn"] == OPEN).unwrap();
    assert_eq!(open["luns"][0]["size_bytes"], 16 << 20);
    assert_eq!(open["luns"][0]["store"], "memory");
    // Each ACL grant with the binding and group it comes from.
    assert_eq!(open["acl"][0]["source"], "binding open, group readers");
    assert_eq!(open["acl"][0]["initiators"], json!([A, B]));
    assert_eq!(open["acl"][0]["addresses"], json!(["127.0.0.1/32"]));
    assert!(open["sessions"][0]["chap_account"].is_null());
    // The counters move while they read.
    let before = reads_of(&first, A).unwrap();
    wait_for_or(
        "A's read count growing",
        Duration::from_secs(20),
        || (reads_of(&tree(), A)? > before).then_some(()),
        log,
    )
    .await;
    // The same sessions as series of /metrics, moving too; health and readiness.
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    let scrape = || http_get(metrics, "/metrics").1;
    let series = |text: &str, name: &str, has: &[&str]| -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .find(|l| has.iter().all(|h| l.contains(h)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let a_label = format!("initiator=\"{A}\"");
    let a_reads = |text: &str| series(text, "ktgt_session_ops_total", &[&a_label, "op=\"read\""]);
    let seen =
        a_reads(&scrape()).unwrap_or_else(|| panic!("no session series for A:\n{}", scrape()));
    wait_for_or(
        "A's read series growing",
        Duration::from_secs(20),
        || (a_reads(&scrape())? > seen).then_some(()),
        log,
    )
    .await;
    let text = scrape();
    assert!(
        series(
            &text,
            "ktgt_session_bytes_total",
            &[&format!("initiator=\"{B}\""), "op=\"read\""]
        )
        .is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert!(
        series(
            &text,
            "ktgt_logins_total",
            &[&format!("target=\"{GUARDED}\""), "result=\"success\""]
        ) == Some(1.0),
        "{text}"
    );
    // Refused logins, each counted under its reason (and never a secret in the log).
    let (ok, out) = iscsi(
        "iscsi-inq",
        &[
            "-i",
            A,
            &format!("iscsi://alice%wrong-secret-xx@127.0.0.1:{port}/{GUARDED}/0"),
        ],
    );
    assert!(!ok, "{out}");
    let (ok, out) = iscsi(
        "iscsi-inq",
        &[
            "-i",
            "iqn.2024-01.cloud.unstable.test:stranger",
            &format!("iscsi://127.0.0.1:{port}/{OPEN}/0"),
        ],
    );
    assert!(!ok, "{out}");
    let (ok, out) = iscsi(
        "iscsi-inq",
        &[
            "-i",
            A,
            &format!("iscsi://127.0.0.1:{port}/iqn.2024-01.cloud.unstable.test:no-such/0"),
        ],
    );
    assert!(!ok, "{out}");
    let text = scrape();
    for (target, result) in [
        (GUARDED, "auth_failed"),
        (OPEN, "not_in_acl"),
        ("", "unknown_target"),
    ] {
        assert_eq!(
            series(
                &text,
                "ktgt_logins_total",
                &[
                    &format!("target=\"{target}\""),
                    &format!("result=\"{result}\"")
                ]
            ),
            Some(1.0),
            "{result}:\n{text}"
        );
    }
    assert!(
        !text.contains("no-such"),
        "a peer's target name became a label:\n{text}"
    );
    assert!(!log().contains(SECRET) && !log().contains("wrong-secret-xx"));
    // The tree as text: every session, and never a secret.
    let (ok, text, _) = ls(false);
    assert!(ok);
    assert!(
        text.contains(&format!("target {OPEN} (1 session)")),
        "{text}"
    );
    assert!(text.contains(&format!("session {B} isid")), "{text}");
    assert!(text.contains("chap: alice"), "{text}");
    assert!(
        !text.contains(SECRET) && !tree().to_string().contains(SECRET),
        "{text}"
    );
    // Logged out (iscsi-perf logs out on SIGINT): gone from the tree and from /metrics.
    for r in [&a, &b] {
        let _ = Command::new("kill")
            .args(["-INT", &r.0.id().to_string()])
            .status();
    }
    wait_for_or(
        "no session left in ls",
        Duration::from_secs(20),
        || sessions(&tree()).is_empty().then_some(()),
        log,
    )
    .await;
    let text = scrape();
    assert!(!text.contains("ktgt_session_ops_total{"), "{text}");
    assert!(!text.contains("ktgt_session_commands_in_flight{"), "{text}");
    for target in [OPEN, GUARDED] {
        assert_eq!(
            series(
                &text,
                "ktgt_sessions_ended_total",
                &[&format!("target=\"{target}\""), "reason=\"logout\""]
            ),
            Some(1.0),
            "{text}"
        );
    }
    drop(a);
    drop(b);
    // A user who may not open the socket (nobody; only root can start it as another user):
    // told so, at once.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if root {
        use std::os::unix::process::CommandExt;
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
            .args(["ls", "--admin-socket"])
            .arg(&socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("permission denied"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    } else {
        eprintln!("not root: the permission case of ls is not checked");
    }
    // No agent behind a socket: a clear message and a failing status, at once.
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
        .args(["ls", "--admin-socket"])
        .arg(dir.path().join("nobody.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no ktgt-agent is listening"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Two portal groups (`--listen ADDR` and `--listen ADDR,2`) seen by libiscsi, a client we
/// did not write: discovery through either portal lists both with their tags, a session
/// through each serves the LU, INQUIRY reports TPGS 1 (implicit ALUA), VPD page 83h names the
/// target port of the portal used and carries the relative target port and target port group
/// designators, and `ls` shows the groups and which one each session came through. A tag of
/// 0 or an address given twice is refused naming the `--listen` value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_portal_groups_are_two_paths_to_each_lun() {
    if !have("iscsi-ls") || !have("iscsi-inq") || !have("iscsi-perf") {
        eprintln!("SKIP two_portal_groups_are_two_paths_to_each_lun: libiscsi-bin not installed");
        return;
    }
    const PG: &str = "iqn.2024-01.cloud.unstable.test:paths";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: {GV}\nkind: Target\nmetadata: {{name: paths}}\nspec:\n  iqn: {PG}\n  \
             luns: [{{lun: 0, bsType: memory, size: 16Mi}}]\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroup\nmetadata: {{name: hosts}}\n\
             spec: {{initiators: [{CLIENT}]}}\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroupBinding\nmetadata: {{name: paths}}\n\
             spec: {{targetRef: {{name: paths}}, initiatorGroupRef: {{name: hosts}}}}\n"
        ),
    )
    .unwrap();
    let socket = dir.path().join("admin.sock");
    let (p1, p2) = (free_port(), free_port());
    let log_path = dir.path().join("agent.log");
    let _agent = standalone(
        &config,
        &[
            "--listen",
            &format!("127.0.0.1:{p1}"),
            "--listen",
            &format!("127.0.0.2:{p2},2"),
            "--admin-socket",
            &socket.display().to_string(),
        ],
        &log_path,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ls = || -> Option<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
            .args(["ls", "--json", "--admin-socket"])
            .arg(&socket)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let tree = wait_for_or("the admin socket", Duration::from_secs(20), ls, log).await;
    assert_eq!(
        tree["portal_groups"],
        json!([
            {"tag": 1, "portals": [format!("127.0.0.1:{p1}")]},
            {"tag": 2, "portals": [format!("127.0.0.2:{p2}")]},
        ])
    );
    let want = [
        format!("Target:{PG} Portal:127.0.0.1:{p1},1"),
        format!("Target:{PG} Portal:127.0.0.2:{p2},2"),
    ];
    for portal in [format!("127.0.0.1:{p1}"), format!("127.0.0.2:{p2}")] {
        let (ok, out) = iscsi("iscsi-ls", &["-i", CLIENT, &format!("iscsi://{portal}")]);
        assert!(ok, "iscsi-ls via {portal}: {out}\n{}", log());
        let mut lines: Vec<&str> = out.lines().filter(|l| l.starts_with("Target:")).collect();
        lines.sort_unstable();
        assert_eq!(lines, want, "discovery via {portal}");
    }
    for (portal, tag) in [
        (format!("127.0.0.1:{p1}"), 1),
        (format!("127.0.0.2:{p2}"), 2),
    ] {
        let lun = format!("iscsi://{portal}/{PG}/0");
        let (ok, out) = iscsi("iscsi-inq", &["-i", CLIENT, &lun]);
        assert!(
            ok && out.contains("TPGS:1"),
            "standard INQUIRY via {portal}: {out}"
        );
        let (ok, out) = iscsi("iscsi-inq", &["-i", CLIENT, "-e", "1", "-c", "131", &lun]);
        assert!(ok, "VPD 83h via {portal}: {out}");
        for needle in [
            format!("[{PG},t,0x000{tag}]"),
            "(5) TARGET_PORT_GROUP".to_owned(),
            "(4) RELATIVE_TARGET_PORT".to_owned(),
        ] {
            assert!(
                out.contains(&needle),
                "VPD 83h via {portal} lacks {needle}: {out}"
            );
        }
    }
    // One reader through each path; ls shows each session's portal group.
    let reader = |url: String| {
        Agent(
            Command::new("iscsi-perf")
                .args(["-i", CLIENT, "-t", "30", &url])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start iscsi-perf"),
        )
    };
    let _a = reader(format!("iscsi://127.0.0.1:{p1}/{PG}/0"));
    let _b = reader(format!("iscsi://127.0.0.2:{p2}/{PG}/0"));
    let groups = wait_for_or(
        "a session through each portal group",
        Duration::from_secs(20),
        || {
            let t = ls()?;
            let mut g: Vec<u64> = t["targets"][0]["sessions"]
                .as_array()?
                .iter()
                .filter(|s| s["reads"].as_u64() > Some(0))
                .filter_map(|s| s["portal_group"].as_u64())
                .collect();
            g.sort_unstable();
            (g.len() == 2).then_some(g)
        },
        log,
    )
    .await;
    assert_eq!(groups, [1, 2]);

    // Bad --listen values, refused before anything starts.
    for (listen, needle) in [
        (vec!["127.0.0.1:0,0"], "SPC-4"),
        (vec!["127.0.0.1:0,x"], "from 1 to 65535"),
        (vec!["127.0.0.1:3999", "127.0.0.1:3999,2"], "given twice"),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"));
        c.args(["standalone", "--admin-socket", ""]);
        for l in &listen {
            c.args(["--listen", l]);
        }
        let out = c.output().expect("run ktgt-agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{listen:?} accepted");
        assert!(err.contains(needle), "{listen:?}: unhelpful error: {err}");
    }
}

/// `--discovery-chap-secret` with libiscsi's `iscsi-ls` (a discovery session): the right
/// account lists the target, a wrong secret or none is refused, and normal logins of a
/// target without CHAP are unaffected. A flag naming a Secret the file does not hold stops
/// the agent before it starts, naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_chap_from_a_flag_named_secret() {
    if !have("iscsi-ls") || !have("iscsi-inq") {
        eprintln!("SKIP discovery_chap_from_a_flag_named_secret: libiscsi-bin not installed");
        return;
    }
    const DT: &str = "iqn.2024-01.cloud.unstable.test:discovered";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: {GV}\nkind: Target\nmetadata: {{name: d}}\nspec:\n  iqn: {DT}\n  \
             luns: [{{lun: 0, bsType: memory, size: 16Mi}}]\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroup\nmetadata: {{name: hosts}}\n\
             spec: {{initiators: [{CLIENT}]}}\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroupBinding\nmetadata: {{name: d}}\n\
             spec: {{targetRef: {{name: d}}, initiatorGroupRef: {{name: hosts}}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: discovery, namespace: storage}}\n\
             type: kubernetes.io/iscsi-chap\nstringData:\n  \
             discovery.sendtargets.auth.username: finder\n  \
             discovery.sendtargets.auth.password: discovery-secret-1\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let log_path = dir.path().join("agent.log");
    let _agent = standalone(
        &config,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--discovery-chap-secret",
            "storage/discovery",
            "--admin-socket",
            "",
        ],
        &log_path,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let listed = wait_for_or(
        "discovery with the right account",
        Duration::from_secs(20),
        || {
            let (ok, out) = iscsi(
                "iscsi-ls",
                &[
                    "-i",
                    CLIENT,
                    &format!("iscsi://finder%discovery-secret-1@127.0.0.1:{port}"),
                ],
            );
            ok.then_some(out)
        },
        log,
    )
    .await;
    assert!(
        listed.contains(&format!("Target:{DT} Portal:127.0.0.1:{port},1")),
        "{listed}"
    );
    for url in [
        format!("iscsi://finder%not-the-secret-1@127.0.0.1:{port}"),
        format!("iscsi://127.0.0.1:{port}"),
    ] {
        let (ok, out) = iscsi("iscsi-ls", &["-i", CLIENT, &url]);
        assert!(!ok, "discovery as {url} succeeded: {out}");
        assert!(!out.contains(DT), "{url} learned the target name: {out}");
    }
    let (ok, out) = iscsi(
        "iscsi-inq",
        &["-i", CLIENT, &format!("iscsi://127.0.0.1:{port}/{DT}/0")],
    );
    assert!(ok, "a normal login without CHAP: {out}\n{}", log());

    let out = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
        .args([
            "standalone",
            "--admin-socket",
            "",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(&config)
        .args(["--discovery-chap-secret", "storage/missing"])
        .output()
        .expect("run ktgt-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--discovery-chap-secret: Secret storage/missing not found"),
        "{err}"
    );
}

/// `ktgt-agent check` prints what a file would serve in words (no Debug structs, no secret),
/// and warns about a target nobody may log in to and a file two LUNs share.
#[test]
fn check_describes_the_file_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.img");
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: {GV}\nkind: Target\nmetadata: {{name: a}}\nspec:\n  iqn: iqn.2024-01.test:a\n  \
             luns: [{{lun: 0, backingStore: {img}, size: 1Mi}}]\n  chap: {{secretRef: {{name: s}}}}\n---\n\
             apiVersion: {GV}\nkind: Target\nmetadata: {{name: b}}\nspec:\n  iqn: iqn.2024-01.test:b\n  \
             luns: [{{lun: 3, backingStore: {img}, size: 1Mi}}]\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\n\
             stringData: {{username: alice, password: never-printed-1}}\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroup\nmetadata: {{name: g}}\n\
             spec: {{initiators: [iqn.2024-01.test:h], addresses: [10.0.0.0/8]}}\n---\n\
             apiVersion: {GV}\nkind: InitiatorGroupBinding\nmetadata: {{name: bb}}\n\
             spec: {{targetRef: {{name: a}}, initiatorGroupRef: {{name: g}}}}\n",
            img = img.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ktgt-agent"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run ktgt-agent check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "target iqn.2024-01.test:a: 1 LUN(s)".to_owned(),
        "  acl: iqn.2024-01.test:h from 10.0.0.0/8 [binding bb, group g]".to_owned(),
        "  chap: alice".to_owned(),
        "warning: target iqn.2024-01.test:b admits nobody".to_owned(),
        format!(
            "warning: {} is the backing store of 2 LUNs (iqn.2024-01.test:a LUN 0, iqn.2024-01.test:b LUN 3)",
            img.display()
        ),
        "valid, 2 target(s)".to_owned(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in:\n{text}");
    }
    assert!(
        !text.contains("never-printed") && !text.contains("Grant {"),
        "{text}"
    );
}
