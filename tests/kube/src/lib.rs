//! The harness of the real-control-plane tests: a kube-apiserver + etcd (and optionally
//! kube-controller-manager) per test binary, started by `tests/kube/cluster.sh`, and the
//! processes and waits the tests need.
//!
//! # Contract
//! - [`ControlPlane::shared`] starts one control plane the first time a test of the binary asks
//!   for it and hands every test the same one; tests keep apart by names (Targets and Nodes
//!   are cluster-scoped) or namespaces. The control plane is stopped when the test binary
//!   exits, however it exits: `cluster.sh up --stdin` tears down when its standard input (a
//!   pipe from this process) closes.
//! - [`ControlPlane::client`] gives a fresh admin `kube::Client` bound to the caller's tokio
//!   runtime (each `#[tokio::test]` has its own).
//! - [`ControlPlane::service_account_kubeconfig`] mints a token for a ServiceAccount, so a ktgt
//!   binary runs with exactly the RBAC `deploy/` gives it.
//! - [`Proc`] runs a binary with its output in a log file and kills it when dropped.
//!
//! etcd is compacted every 3 seconds unless `KUBE_ETCD_COMPACTION_INTERVAL` says otherwise.
//!
//! Needs the binaries of `tests/kube/build.sh` (found by running it: instant once built) and
//! the ktgt binaries named by `KTGT_AGENT` and `KTGT_OPERATOR` (default: `target/debug/`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub mod agent;
pub mod csi;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// A running control plane (see the module docs).
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    /// `cluster.sh up --stdin`; closing its stdin stops the control plane.
    _up: Mutex<(Child, ChildStdin)>,
}

static SHARED: OnceLock<ControlPlane> = OnceLock::new();
static SHARED_KCM: OnceLock<ControlPlane> = OnceLock::new();

impl ControlPlane {
    /// The test binary's control plane (etcd + kube-apiserver), started on first use.
    pub fn shared() -> &'static ControlPlane {
        SHARED.get_or_init(|| ControlPlane::start(false).expect("starting the control plane"))
    }

    /// The test binary's control plane with kube-controller-manager, started on first use.
    pub fn shared_with_controller_manager() -> &'static ControlPlane {
        SHARED_KCM.get_or_init(|| ControlPlane::start(true).expect("starting the control plane"))
    }

    /// Starts a control plane of its own in a fresh directory under `target/kube/run/`.
    pub fn start(with_kcm: bool) -> anyhow::Result<ControlPlane> {
        let root = repo_root();
        let run = root.join("target/kube/run");
        std::fs::create_dir_all(&run)?;
        let exe = std::env::current_exe()?;
        let stem = exe
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("test")
            .to_owned();
        let dir = run.join(format!("{stem}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new("bash");
        cmd.arg(root.join("tests/kube/cluster.sh"))
            .arg("up")
            .arg(&dir)
            .arg("--stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(dir.join("cluster.log")).context("creating cluster.log")?,
            );
        if with_kcm {
            cmd.arg("--kcm");
        }
        // etcd compacted every 3 s (5 min in real clusters): a client whose watch breaks for
        // longer gets `410 Gone` and must relist, which the tests want to happen.
        if std::env::var_os("KUBE_ETCD_COMPACTION_INTERVAL").is_none() {
            cmd.env("KUBE_ETCD_COMPACTION_INTERVAL", "3s");
        }
        let mut child = cmd.spawn().context("running tests/kube/cluster.sh")?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut ready = None;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(path) = line.strip_prefix("ready ") {
                ready = Some(PathBuf::from(path));
                break;
            }
        }
        if ready.is_none() {
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("cluster.log")).unwrap_or_default();
            bail!("the control plane did not start:\n{log}");
        }
        let env = std::fs::read_to_string(dir.join("ports.env"))?;
        let bin = env
            .lines()
            .find_map(|l| l.strip_prefix("BIN="))
            .context("ports.env has no BIN")?
            .into();
        Ok(ControlPlane {
            dir,
            bin,
            _up: Mutex::new((child, stdin)),
        })
    }

    /// The control plane's directory (logs, PKI, audit log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig (system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A directory for one test's files, fresh.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let d = self.dir.join("tests").join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a scratch directory");
        d
    }

    /// An admin client on the caller's runtime.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig()).await
    }

    /// Runs `kubectl` with the admin kubeconfig; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        self.kubectl_as(&self.kubeconfig(), args)
    }

    /// Runs `kubectl` with `kubeconfig`.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .expect("running kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kubectl apply -f -` of `yaml`; panics with kubectl's message on failure.
    pub fn apply_yaml(&self, yaml: &str) {
        let (ok, out, err) = self.kubectl_stdin(&["apply", "-f", "-"], yaml);
        assert!(ok, "kubectl apply failed: {out}{err}\n---\n{yaml}");
    }

    /// `kubectl apply -f FILE`; panics with kubectl's message on failure.
    pub fn apply_file(&self, path: &Path) {
        let (ok, out, err) = self.kubectl(&["apply", "-f", path.to_str().expect("utf-8 path")]);
        assert!(ok, "kubectl apply -f {} failed: {out}{err}", path.display());
    }

    /// `kubectl ARGS` with `input` on its standard input.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .expect("writing to kubectl");
        let out = child.wait_with_output().expect("kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Installs `deploy/` (CRDs, namespace, RBAC, workloads) once per control plane and waits
    /// until the CRDs are established.
    pub fn install_deploy(&self) {
        static DONE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if done.contains(&self.dir) {
            return;
        }
        let deploy = repo_root().join("deploy");
        let (ok, out, err) = self.kubectl(&["apply", "-k", deploy.to_str().unwrap()]);
        assert!(ok, "kubectl apply -k deploy/ failed: {out}{err}");
        let (ok, out, err) = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/targets.tgtd.unstable.cloud",
            "crd/initiatorgroups.tgtd.unstable.cloud",
            "crd/initiatorgroupbindings.tgtd.unstable.cloud",
            "crd/targetsnapshots.tgtd.unstable.cloud",
        ]);
        assert!(ok, "CRDs not established: {out}{err}");
        done.push(self.dir.clone());
    }

    /// Installs the snapshot CRDs (`snapshot.storage.k8s.io`, from the external-snapshotter
    /// module tests/kube/build-csi-tools.sh copies into `KTGT_SNAPSHOT_CRDS`) and waits until
    /// they are established. `false` when that variable is unset (a run without the CSI tools).
    pub fn install_snapshot_crds(&self) -> bool {
        let Some(dir) = std::env::var_os("KTGT_SNAPSHOT_CRDS") else {
            assert!(
                std::env::var_os("KTGT_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
                "KTGT_SNAPSHOT_CRDS is not set (tests/kube/run.sh sets it)"
            );
            return false;
        };
        let (ok, out, err) = self.kubectl(&["apply", "-f", &dir.to_string_lossy()]);
        assert!(ok, "applying the snapshot CRDs: {out}{err}");
        let (ok, out, err) = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
            "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
            "crd/volumesnapshots.snapshot.storage.k8s.io",
        ]);
        assert!(ok, "snapshot CRDs not established: {out}{err}");
        true
    }

    /// A kubeconfig that authenticates as ServiceAccount `ns/sa` (a TokenRequest token).
    pub fn service_account_kubeconfig(&self, ns: &str, sa: &str) -> PathBuf {
        let out = Command::new("bash")
            .arg(repo_root().join("tests/kube/cluster.sh"))
            .args(["token"])
            .arg(&self.dir)
            .args([ns, sa])
            .output()
            .expect("cluster.sh token");
        assert!(
            out.status.success(),
            "minting a token for {ns}/{sa}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    }

    /// Stops kube-apiserver and starts it again with the same flags and port.
    pub fn restart_apiserver(&self) {
        let out = Command::new("bash")
            .arg(repo_root().join("tests/kube/cluster.sh"))
            .arg("restart-apiserver")
            .arg(&self.dir)
            .output()
            .expect("cluster.sh restart-apiserver");
        assert!(
            out.status.success(),
            "restarting kube-apiserver: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every audit event so far (JSON lines of `audit.log`).
    pub fn audit_events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Audit events of requests made by `user` (such as
    /// `system:serviceaccount:ktgt-system:ktgt-agent`).
    pub fn requests_by(&self, user: &str) -> Vec<Value> {
        self.audit_events()
            .into_iter()
            .filter(|e| e["user"]["username"] == user)
            .collect()
    }
}

/// A kube client from a kubeconfig file, on the caller's runtime.
pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("reading the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(config).expect("kube client")
}

/// A binary under test, with its standard error (and output) in `log`; killed when dropped.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
    /// Stop with SIGTERM (10 s, then SIGKILL) when dropped, instead of SIGKILL.
    graceful: bool,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("opening the log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log: log.to_owned(),
            graceful: false,
        }
    }

    /// Stops with SIGTERM when dropped (an operator releases its Lease that way).
    pub fn graceful(mut self) -> Proc {
        self.graceful = true;
        self
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited (and its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit; SIGKILL after that.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(status)) = c.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.graceful {
            self.terminate(Duration::from_secs(10));
        }
        self.kill();
    }
}

/// The ktgt binary `name` (`ktgt-agent`, `ktgt-operator`, `ktgt-csi`): `$KTGT_AGENT`,
/// `$KTGT_OPERATOR`, `$KTGT_CSI`,
/// else `target/debug/<name>`.
pub fn ktgt_bin(name: &str) -> PathBuf {
    let var = match name {
        "ktgt-agent" => "KTGT_AGENT",
        "ktgt-operator" => "KTGT_OPERATOR",
        "ktgt-csi" => "KTGT_CSI",
        other => panic!("unknown ktgt binary {other}"),
    };
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug").join(name));
    assert!(
        path.is_file(),
        "{} not built (cargo build -p {name}, or set {var})",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `f` every 200 ms until it returns `Some`, or panics after `timeout` with `what` and
/// `context()` (a log tail, the object as it stands).
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut f: F,
    context: impl Fn() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a command is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a libiscsi tool with a 20 s limit; returns (success, stdout + stderr).
pub fn iscsi(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("20")
        .arg(tool)
        .args(args)
        .output()
        .expect("running a libiscsi tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A name unique to this test binary's run: `prefix-<pid>-<n>`, lower case, DNS-safe.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A loop-mounted XFS filesystem with reflink (`mkfs.xfs -m reflink=1`) at a directory: the
/// pool that CSI snapshots and clones need (the machines' own filesystem is ext4, which has
/// no reflink). Sparse image beside the directory; unmounted and removed when dropped.
pub struct ReflinkDir {
    pub dir: PathBuf,
    image: PathBuf,
}

impl ReflinkDir {
    /// Mounts a fresh XFS of `mib` MiB (at least 300: mkfs.xfs's floor) at `dir`. Needs root,
    /// a loop device and mkfs.xfs (tests/setup.sh installs xfsprogs).
    pub fn mount(dir: &Path, mib: u64) -> ReflinkDir {
        std::fs::create_dir_all(dir).expect("creating the mount point");
        let image = dir.with_extension("xfs.img");
        let file = std::fs::File::create(&image).expect("creating the XFS image");
        file.set_len(mib << 20).expect("sizing the XFS image");
        drop(file);
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("running a filesystem tool");
            assert!(
                out.status.success(),
                "{cmd:?}: {}{} (the reflink pool needs root, a loop device and xfsprogs: tests/setup.sh)",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1"])
            .arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(dir));
        ReflinkDir {
            dir: dir.to_path_buf(),
            image,
        }
    }
}

impl Drop for ReflinkDir {
    fn drop(&mut self) {
        // Lazy: a process still holding a file open (an agent being killed) must not keep
        // the image mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Runs `qemu-io` (QEMU's libiscsi driver: a client nobody here wrote) on the iSCSI LUN
/// `portal`/`iqn`/`lun` as initiator `initiator`, with one `-c` command each; returns
/// (success, output). qemu-io exits 0 even when a command fails, so success also means no
/// line of the output reports a failure ("Pattern verification failed", "failed:").
/// The private copy tests/setup.sh unpacks (with the iscsi block module) is used when there.
pub fn qemu_io(
    portal: &str,
    iqn: &str,
    lun: u16,
    initiator: &str,
    cmds: &[&str],
) -> (bool, String) {
    let private = repo_root().join("tests/tools/peer/.qemu");
    let mut cmd = if private.join("usr/bin/qemu-io").exists() {
        let mut c = Command::new(private.join("usr/bin/qemu-io"));
        c.env(
            "QEMU_MODULE_DIR",
            private.join("usr/lib/x86_64-linux-gnu/qemu"),
        );
        c
    } else {
        Command::new("qemu-io")
    };
    cmd.arg("--image-opts").arg(format!(
        "driver=iscsi,transport=tcp,portal={portal},target={iqn},lun={lun},initiator-name={initiator}"
    ));
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = Command::new("timeout")
        .arg("60")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .output()
        .expect("running qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text.contains("Pattern verification failed") || text.contains("failed:");
    (out.status.success() && !failed, text)
}
