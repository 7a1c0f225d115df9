//! A `ktgt-agent kubernetes` process for the tests, and what they ask of it: its sessions (from
//! `/metrics`), logins with libiscsi's tools, and readers that hold a session open.

use std::process::Command;
use std::time::Duration;

use crate::{free_port, have, iscsi, ktgt_bin, unique, wait_for, ControlPlane, Proc};

pub const AGENT_USER: &str = "system:serviceaccount:ktgt-system:ktgt-agent";
pub const CLIENT: &str = "iqn.2026-11.io.ktgt.test:client";
pub const STRANGER: &str = "iqn.2026-11.io.ktgt.test:stranger";

/// One agent process serving `node`.
pub struct Agent {
    pub proc: Proc,
    pub node: String,
    pub portal: String,
    pub metrics: u16,
    pub kubeconfig: std::path::PathBuf,
    pub dir: std::path::PathBuf,
    /// Arguments beyond the ones every test agent gets.
    pub extra: Vec<String>,
}

impl Agent {
    pub fn start(cp: &ControlPlane, test: &str) -> Agent {
        Agent::start_as(cp, test, "ktgt-agent")
    }

    /// An agent authenticated as ServiceAccount `ktgt-system/<sa>`.
    pub fn start_as(cp: &ControlPlane, test: &str, sa: &str) -> Agent {
        Agent::start_with(cp, test, sa, &[])
    }

    /// An agent with `extra` arguments; `extra` may name `{dir}`, the test's scratch
    /// directory (`--csi-volume-dir {dir}/pool`).
    pub fn start_with(cp: &ControlPlane, test: &str, sa: &str, extra: &[&str]) -> Agent {
        cp.install_deploy();
        let kubeconfig = cp.service_account_kubeconfig("ktgt-system", sa);
        let dir = cp.scratch(test);
        let node = unique("node");
        let portal = format!("127.0.0.1:{}", free_port());
        let metrics = free_port();
        let extra: Vec<String> = extra
            .iter()
            .map(|a| a.replace("{dir}", &dir.display().to_string()))
            .collect();
        let proc = spawn_agent(&kubeconfig, &node, &portal, metrics, &dir, &extra);
        Agent {
            proc,
            node,
            portal,
            metrics,
            kubeconfig,
            dir,
            extra,
        }
    }

    /// Kills the agent (SIGKILL: no cleanup at all) and starts it again, same ports.
    pub fn kill_and_restart(&mut self) {
        self.proc.kill();
        self.proc = spawn_agent(
            &self.kubeconfig,
            &self.node,
            &self.portal,
            self.metrics,
            &self.dir,
            &self.extra,
        );
    }

    pub fn metrics_text(&self) -> String {
        let out = Command::new("curl")
            .args(["-fsS", "--max-time", "3"])
            .arg(format!("http://127.0.0.1:{}/metrics", self.metrics))
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            _ => String::new(),
        }
    }

    /// `ktgt_sessions{target=iqn}`; `None` while the metrics endpoint does not answer.
    pub fn sessions(&self, iqn: &str) -> Option<u64> {
        let text = self.metrics_text();
        if text.is_empty() {
            return None;
        }
        let prefix = format!("ktgt_sessions{{target=\"{iqn}\"}} ");
        Some(
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0),
        )
    }

    pub fn url(&self, iqn: &str, lun: u16) -> String {
        format!("iscsi://{}/{iqn}/{lun}", self.portal)
    }

    /// `iscsi-inq` as `initiator`; whether the login and INQUIRY succeeded.
    /// `ktgt-agent ls --json` against this agent's admin socket.
    pub fn ls(&self) -> serde_json::Value {
        let out = Command::new(ktgt_bin("ktgt-agent"))
            .args(["ls", "--json", "--admin-socket"])
            .arg(self.dir.join("admin.sock"))
            .output()
            .expect("run ktgt-agent ls");
        assert!(
            out.status.success(),
            "ktgt-agent ls: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ls --json is JSON")
    }

    pub fn can_log_in(&self, initiator: &str, iqn: &str) -> bool {
        iscsi("iscsi-inq", &["-i", initiator, &self.url(iqn, 0)]).0
    }

    /// A logged-in reader: iscsi-perf for up to 60 s.
    pub fn reader(&self, initiator: &str, url: &str) -> Proc {
        let mut cmd = Command::new("iscsi-perf");
        cmd.args(["-i", initiator, "-t", "60", url]);
        Proc::spawn(cmd, &self.dir.join(format!("reader-{}.log", unique("r"))))
    }

    pub async fn wait_sessions(&self, iqn: &str, n: u64, what: &str) {
        wait_for(
            what,
            Duration::from_secs(20),
            || async { (self.sessions(iqn) == Some(n)).then_some(()) },
            || {
                format!(
                    "sessions: {:?}\nagent log:\n{}",
                    self.sessions(iqn),
                    self.proc.log_tail(30)
                )
            },
        )
        .await
    }

    /// Holds a session of `initiator` open on `url` (a LUN of `iqn`), runs `revoke`, and
    /// checks what revocation means: the session is logged out at once and the next login
    /// through `url` is refused.
    pub async fn expect_revoked(
        &self,
        initiator: &str,
        iqn: &str,
        url: &str,
        revoke: impl std::future::Future<Output = ()>,
        what: &str,
    ) {
        let reader = self.reader(initiator, url);
        self.wait_sessions(iqn, 1, &format!("the session before {what}"))
            .await;
        revoke.await;
        self.wait_sessions(iqn, 0, &format!("the session logged out after {what}"))
            .await;
        drop(reader);
        wait_for(
            &format!("login refused after {what}"),
            Duration::from_secs(20),
            || async { (!iscsi("iscsi-inq", &["-i", initiator, url]).0).then_some(()) },
            || format!("agent log:\n{}", self.proc.log_tail(30)),
        )
        .await
    }

    pub async fn wait_login(&self, initiator: &str, iqn: &str, admitted: bool, what: &str) {
        wait_for(
            what,
            Duration::from_secs(20),
            || async { (self.can_log_in(initiator, iqn) == admitted).then_some(()) },
            || format!("agent log:\n{}", self.proc.log_tail(30)),
        )
        .await
    }
}

fn spawn_agent(
    kubeconfig: &std::path::Path,
    node: &str,
    portal: &str,
    metrics: u16,
    dir: &std::path::Path,
    extra: &[String],
) -> Proc {
    let mut cmd = Command::new(ktgt_bin("ktgt-agent"));
    cmd.env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .args(["kubernetes", "--node-name", node, "--listen", portal])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(["--conn-threads", "1"])
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .args(extra);
    Proc::spawn(cmd, &dir.join("agent.log"))
}

/// No request of `user` was refused by RBAC (but those of the test that reaches into a
/// namespace the agent may not read on purpose, `tenant-*`).
pub fn assert_nothing_forbidden(cp: &ControlPlane, user: &str) {
    let forbidden: Vec<String> = cp
        .requests_by(user)
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .filter(|e| {
            !e["requestURI"]
                .as_str()
                .is_some_and(|u| u.contains("/namespaces/tenant-"))
        })
        .map(|e| format!("{} {}", e["verb"], e["requestURI"]))
        .collect();
    assert!(forbidden.is_empty(), "{user} was refused: {forbidden:#?}");
}

/// Whether to skip a test that needs libiscsi's tools: only outside tests/kube/run.sh, which
/// sets KTGT_REQUIRE_TOOLS=1 (there a missing tool fails the test).
pub fn skip_without_libiscsi(test: &str) -> bool {
    if have("iscsi-inq") && have("iscsi-perf") && have("iscsi-ls") {
        return false;
    }
    assert!(
        std::env::var_os("KTGT_REQUIRE_TOOLS").is_none(),
        "{test}: libiscsi-bin is not installed (tests/setup.sh installs it)"
    );
    eprintln!("SKIP {test}: libiscsi-bin is not installed (tests/setup.sh installs it)");
    true
}
