//! The Node service (and an Identity for it): what runs on every node that mounts volumes. It
//! logs this node's kernel initiator in to a volume's Target with open-iscsi's `iscsiadm`,
//! finds the disk in sysfs, formats it only when it is blank, mounts it, and undoes all of it.
//!
//! # Contract (CSI spec v1.12, "Node Service RPC")
//! - **NodeGetInfo**: `node_id` is this node's initiator name, read from
//!   `/etc/iscsi/initiatorname.iscsi` (what ControllerPublishVolume grants access to);
//!   `accessible_topology` is `topology.csi.ktgt.io/node=<node name>`. Without the file (no
//!   open-iscsi) it is FAILED_PRECONDITION saying so.
//! - **NodeStageVolume** (volume id, the publish context `iqn`/`lun`/`portal`/`readonly` that
//!   ControllerPublishVolume returned, a staging directory, the stage secrets): writes the
//!   node record for exactly that target and portal (no SendTargets discovery, which would
//!   leave records of every target the portal lists), sets the session settings below and the
//!   CHAP credentials from the secrets (kubelet's keys, `node.session.auth.username`,
//!   `.password`, `.username_in`, `.password_in`), logs in, and waits for the LUN's disk. A
//!   mount volume is then probed with `blkid -p`: a blank disk is formatted (`mkfs.ext4 -m0`,
//!   or `mkfs.xfs`); a disk that holds the requested filesystem is mounted as it is; any other
//!   signature (another filesystem, a partition table, LVM, RAID) is FAILED_PRECONDITION and
//!   the disk is left untouched. Without `blkid` nothing is formatted. Block volumes are only
//!   logged in. A failed stage logs out and deletes the record it made: nothing is left half
//!   done.
//! - **NodeUnstageVolume** unmounts the staging directory, logs out of every portal of the
//!   volume's target and deletes its node records: no session or record remains. It refuses
//!   (FAILED_PRECONDITION) while the disk is still mounted elsewhere (a publish not undone).
//! - **NodePublishVolume** bind-mounts the staged filesystem (or the disk, for a block volume,
//!   onto a file) at the target path, read-only when asked (for a block volume the disk is
//!   also set read-only, `blockdev --setro`: a read-only mount does not stop writes through a
//!   device node); **NodeUnpublishVolume** unmounts it and removes the target path.
//! - **NodeExpandVolume** rescans the disk (the target raised CAPACITY DATA HAS CHANGED when
//!   its LUN grew), waits for the requested size, and grows a mounted filesystem online
//!   (`resize2fs`, `xfs_growfs`); a block volume needs only the rescan.
//! - **NodeGetVolumeStats**: bytes and inodes of a mounted volume (statvfs), bytes of a block
//!   volume, and the volume's condition (abnormal while its session is in recovery or gone);
//!   NOT_FOUND when the path is not this volume's.
//! - Every call is idempotent (a repeated call finds its work done and succeeds) and one call
//!   per volume runs at a time: a second one meanwhile is ABORTED, as the spec recommends.
//!
//! # Session settings, chosen so a target restart does not fail I/O
//! `node.session.timeo.replacement_timeout` (default 300 s, `--replacement-timeout`): while a
//! connection is down the kernel queues I/O for this long before failing it, the failure that
//! makes filesystems remount read-only. open-iscsi's default is 120 s; an agent restart costs
//! about 3 s, a DaemonSet rollout that pulls an image can take minutes. NOP-Out every 5 s with
//! a 10 s timeout notices a dead connection quickly so the login retry starts early.
//! `node.startup=manual`: the node service, not the boot, decides which sessions exist.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::host::{self, Cmd, Contents, Disk, Mount, RunError};
use crate::proto::{self, node_service_capability, volume_capability};
use crate::volume;

/// The topology key NodeGetInfo reports, with the node's name as its value.
pub const TOPOLOGY_NODE: &str = "topology.csi.ktgt.io/node";

/// Stage-secret keys, as kubelet's in-tree iSCSI volumes and csi-driver-iscsi name them.
const SECRET_KEYS: &[&str] = &[
    "node.session.auth.username",
    "node.session.auth.password",
    "node.session.auth.username_in",
    "node.session.auth.password_in",
];
/// Keys accepted and not used: the node service logs in without SendTargets discovery.
const IGNORED_SECRET_PREFIX: &str = "discovery.sendtargets.auth.";

/// open-iscsi's exit statuses (`include/iscsi_err.h`) the node service tells apart.
mod iscsi_err {
    pub const TRANS: i32 = 4;
    pub const TRANS_TIMEOUT: i32 = 8;
    pub const SESS_EXISTS: i32 = 15;
    pub const ISCSID_COMM_ERR: i32 = 18;
    pub const FATAL_LOGIN: i32 = 19;
    pub const ISCSID_NOTCONN: i32 = 20;
    pub const NO_OBJS_FOUND: i32 = 21;
    pub const LOGIN_AUTH_FAILED: i32 = 24;
}

/// Where the node service looks and what it runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The Kubernetes node name (topology).
    pub node_name: String,
    /// open-iscsi's initiator name file.
    pub initiator_file: PathBuf,
    /// `/sys`.
    pub sysfs: PathBuf,
    /// `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
    /// The `iscsiadm` to run.
    pub iscsiadm: String,
    /// `node.session.timeo.replacement_timeout`, seconds.
    pub replacement_timeout: u32,
    /// How long to wait for a LUN's disk after login.
    pub device_wait: Duration,
}

impl NodeConfig {
    /// The defaults for a node named `node_name`.
    pub fn new(node_name: &str) -> NodeConfig {
        NodeConfig {
            node_name: node_name.to_owned(),
            initiator_file: PathBuf::from("/etc/iscsi/initiatorname.iscsi"),
            sysfs: PathBuf::from("/sys"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            iscsiadm: "iscsiadm".to_owned(),
            replacement_timeout: 300,
            device_wait: Duration::from_secs(30),
        }
    }
}

/// The Node and Identity services.
#[derive(Clone)]
pub struct NodeService {
    cfg: Arc<NodeConfig>,
    busy: Arc<Mutex<HashSet<String>>>,
}

/// One volume's operation in progress; dropping it lets the next one in.
struct Busy {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// What NodeStageVolume is asked to reach.
#[derive(Debug, Clone)]
struct Address {
    iqn: String,
    portal: String,
    host: String,
    port: u16,
    lun: u32,
}

/// A volume capability's kind.
enum Access {
    Block,
    Mount { fs_type: String, flags: Vec<String> },
}

/// The capability's kind, and whether it is reader-only and single-writer (SINGLE_NODE_SINGLE_WRITER).
fn access_of(cap: Option<&proto::VolumeCapability>) -> Result<(Access, bool, bool), Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability missing"))?;
    crate::controller::check_capability(cap).map_err(Status::invalid_argument)?;
    use volume_capability::access_mode::Mode;
    let mode = cap.access_mode.as_ref().map(|m| m.mode());
    let reader_only = matches!(
        mode,
        Some(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    );
    let single_writer = mode == Some(Mode::SingleNodeSingleWriter);
    let access = match &cap.access_type {
        Some(volume_capability::AccessType::Block(_)) => Access::Block,
        Some(volume_capability::AccessType::Mount(m)) => Access::Mount {
            fs_type: if m.fs_type.is_empty() {
                "ext4".to_owned()
            } else {
                m.fs_type.clone()
            },
            flags: m.mount_flags.clone(),
        },
        None => {
            return Err(Status::invalid_argument(
                "volume capability without access_type",
            ))
        }
    };
    Ok((access, reader_only, single_writer))
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} missing")))
    } else {
        Ok(value)
    }
}

/// The IQN of a volume id this driver makes, or NOT_FOUND.
fn iqn_of(volume_id: &str) -> Result<String, Status> {
    if volume::is_volume_id(volume_id) {
        Ok(volume::target_iqn(volume_id))
    } else {
        Err(Status::not_found(format!(
            "volume {volume_id:?} does not exist (not an id this driver makes)"
        )))
    }
}

/// The target, portal and LUN in a publish context, checked against the volume id.
fn address_of(volume_id: &str, ctx: &BTreeMap<String, String>) -> Result<Address, Status> {
    let iqn = iqn_of(volume_id)?;
    let get = |k: &str| {
        ctx.get(k).filter(|v| !v.is_empty()).ok_or_else(|| {
            Status::invalid_argument(format!(
                "publish_context has no {k:?} (it comes from ControllerPublishVolume)"
            ))
        })
    };
    if get("iqn")? != &iqn {
        return Err(Status::invalid_argument(format!(
            "publish_context iqn {:?} is not volume {volume_id}'s target {iqn}",
            get("iqn")?
        )));
    }
    let portal = get("portal")?.clone();
    let (host, port) = host::split_portal(&portal).ok_or_else(|| {
        Status::invalid_argument(format!(
            "publish_context portal {portal:?} is not HOST:PORT or [IPV6]:PORT"
        ))
    })?;
    let lun = get("lun")?
        .parse()
        .map_err(|_| Status::invalid_argument("publish_context lun is not a number"))?;
    Ok(Address {
        iqn,
        portal,
        host,
        port,
        lun,
    })
}

/// The CHAP settings of the stage secrets, as (node setting, value); unknown keys are
/// INVALID_ARGUMENT naming the key (never the value).
fn chap_settings(secrets: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, Status> {
    for k in secrets.keys() {
        if !SECRET_KEYS.contains(&k.as_str()) && !k.starts_with(IGNORED_SECRET_PREFIX) {
            return Err(Status::invalid_argument(format!(
                "stage secret key {k:?} is not one of {}",
                SECRET_KEYS.join(", ")
            )));
        }
    }
    let get = |k: &str| secrets.get(k).filter(|v| !v.is_empty());
    let mut out = Vec::new();
    match (
        get("node.session.auth.username"),
        get("node.session.auth.password"),
    ) {
        (Some(u), Some(p)) => {
            out.push(("node.session.auth.authmethod".to_owned(), "CHAP".to_owned()));
            out.push(("node.session.auth.username".to_owned(), u.clone()));
            out.push(("node.session.auth.password".to_owned(), p.clone()));
        }
        (None, None) => {
            out.push(("node.session.auth.authmethod".to_owned(), "None".to_owned()));
        }
        _ => {
            return Err(Status::invalid_argument(
                "stage secrets: node.session.auth.username and .password go together",
            ))
        }
    }
    match (
        get("node.session.auth.username_in"),
        get("node.session.auth.password_in"),
    ) {
        (Some(u), Some(p)) if out.len() > 1 => {
            out.push(("node.session.auth.username_in".to_owned(), u.clone()));
            out.push(("node.session.auth.password_in".to_owned(), p.clone()));
        }
        (None, None) => {}
        _ => {
            return Err(Status::invalid_argument(
                "stage secrets: mutual CHAP needs node.session.auth.username_in and .password_in, \
                 and one-way CHAP (username, password) beside them",
            ))
        }
    }
    Ok(out)
}

/// A command that did not run, as a status.
fn run_status(e: RunError) -> Status {
    match e {
        RunError::Missing(p) if p.ends_with("iscsiadm") => Status::failed_precondition(format!(
            "{p} is not installed: this node needs open-iscsi (iscsiadm and a running iscsid)"
        )),
        RunError::Missing(p) => Status::failed_precondition(format!("{p} is not installed")),
        RunError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
        RunError::Spawn { .. } => Status::internal(e.to_string()),
    }
}

/// Runs `cmd`; a non-zero exit is INTERNAL naming the command line and its last output.
async fn run_checked(cmd: &Cmd) -> Result<host::Output, Status> {
    let out = host::run(cmd).await.map_err(run_status)?;
    if !out.ok() {
        return Err(Status::internal(format!(
            "{} failed: {}",
            cmd.display(),
            out.tail()
        )));
    }
    Ok(out)
}

/// A login that failed, as a status.
fn login_status(code: Option<i32>, addr: &Address, tail: &str) -> Status {
    let what = format!("login to {} at {}", addr.iqn, addr.portal);
    match code {
        Some(iscsi_err::LOGIN_AUTH_FAILED) => Status::permission_denied(format!(
            "{what}: the target refused this initiator (wrong CHAP credentials, or the volume is \
             not published to this node): {tail}"
        )),
        Some(iscsi_err::FATAL_LOGIN) => Status::failed_precondition(format!(
            "{what}: the target refused the login for good (unknown target, or this initiator \
             is not allowed): {tail}"
        )),
        Some(iscsi_err::ISCSID_NOTCONN | iscsi_err::ISCSID_COMM_ERR) => Status::unavailable(
            format!("{what}: iscsid is not running on this node: {tail}"),
        ),
        Some(iscsi_err::TRANS | iscsi_err::TRANS_TIMEOUT) => {
            Status::unavailable(format!("{what}: the portal cannot be reached: {tail}"))
        }
        _ => Status::internal(format!("{what} failed (exit {code:?}): {tail}")),
    }
}

fn io_status(what: &str, path: &Path, e: std::io::Error) -> Status {
    Status::internal(format!("{what} {}: {e}", path.display()))
}

impl NodeService {
    pub fn new(cfg: NodeConfig) -> NodeService {
        NodeService {
            cfg: Arc::new(cfg),
            busy: Arc::default(),
        }
    }

    /// Claims `id` for one operation, or ABORTED while another runs.
    fn claim(&self, id: &str) -> Result<Busy, Status> {
        let mut set = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(id.to_owned()) {
            return Err(Status::aborted(format!(
                "an operation on volume {id} is in progress"
            )));
        }
        Ok(Busy {
            set: self.busy.clone(),
            id: id.to_owned(),
        })
    }

    fn initiator_name(&self) -> Result<String, Status> {
        let f = &self.cfg.initiator_file;
        let text = std::fs::read_to_string(f).map_err(|e| {
            Status::failed_precondition(format!(
                "cannot read this node's initiator name from {} ({e}): is open-iscsi installed?",
                f.display()
            ))
        })?;
        host::parse_initiator_name(&text).ok_or_else(|| {
            Status::failed_precondition(format!("{} has no InitiatorName= line", f.display()))
        })
    }

    fn mounts(&self) -> Result<Vec<Mount>, Status> {
        host::mounts(&self.cfg.mountinfo).map_err(|e| io_status("reading", &self.cfg.mountinfo, e))
    }

    /// This node's sessions to `iqn` (at `addr`'s portal only, when given).
    fn sessions(&self, iqn: &str, addr: Option<&Address>) -> Vec<host::Session> {
        host::sessions(&self.cfg.sysfs)
            .into_iter()
            .filter(|s| s.target == iqn)
            .filter(|s| addr.is_none_or(|a| s.address == a.host && s.port == a.port))
            .collect()
    }

    /// The volume's disk, if a session to its target has one (LUN 0).
    fn disk_of(&self, iqn: &str) -> Option<Disk> {
        self.sessions(iqn, None)
            .iter()
            .find_map(|s| host::disk(&self.cfg.sysfs, &s.name, volume::LUN as u32))
    }

    async fn iscsiadm(&self, cmd: Cmd) -> Result<host::Output, Status> {
        host::run(&cmd).await.map_err(run_status)
    }

    fn node_cmd(&self, addr: &Address, rest: &[&str]) -> Cmd {
        let mut args = vec!["-m", "node", "-T", &addr.iqn, "-p", &addr.portal];
        args.extend_from_slice(rest);
        Cmd::new(&self.cfg.iscsiadm, &args)
    }

    /// Makes (or finds) the node record of `addr` and writes its settings. Returns whether it
    /// made the record.
    async fn node_record(&self, addr: &Address, chap: &[(String, String)]) -> Result<bool, Status> {
        let show = self.iscsiadm(self.node_cmd(addr, &[])).await?;
        let made = match show.code {
            Some(0) => false,
            Some(iscsi_err::NO_OBJS_FOUND) => {
                let out = self.iscsiadm(self.node_cmd(addr, &["-o", "new"])).await?;
                if !out.ok() {
                    return Err(Status::internal(format!(
                        "iscsiadm could not write the node record of {} at {}: {}",
                        addr.iqn,
                        addr.portal,
                        out.tail()
                    )));
                }
                true
            }
            _ => {
                return Err(Status::internal(format!(
                    "iscsiadm could not read the node records: {}",
                    show.tail()
                )))
            }
        };
        let timeout = self.cfg.replacement_timeout.to_string();
        let mut settings: Vec<(String, String, bool)> = vec![
            ("node.startup".into(), "manual".into(), false),
            (
                "node.session.timeo.replacement_timeout".into(),
                timeout,
                false,
            ),
            (
                "node.conn[0].timeo.noop_out_interval".into(),
                "5".into(),
                false,
            ),
            (
                "node.conn[0].timeo.noop_out_timeout".into(),
                "10".into(),
                false,
            ),
            (
                "node.session.initial_login_retry_max".into(),
                "4".into(),
                false,
            ),
        ];
        settings.extend(
            chap.iter()
                .map(|(k, v)| (k.clone(), v.clone(), k.contains("password"))),
        );
        for (name, value, secret) in settings {
            let cmd = self.node_cmd(addr, &["-o", "update", "-n", &name, "-v"]);
            let cmd = if secret {
                cmd.secret(&value)
            } else {
                let mut c = cmd;
                c.args.push(value);
                c
            };
            let out = self.iscsiadm(cmd).await?;
            if !out.ok() {
                if made {
                    self.delete_records(&addr.iqn).await;
                }
                return Err(Status::internal(format!(
                    "iscsiadm could not set {name} on the node record of {}: {}",
                    addr.iqn,
                    out.tail()
                )));
            }
        }
        Ok(made)
    }

    /// Logs out of every session to `iqn`; a target with none is fine.
    async fn logout(&self, iqn: &str) -> Result<(), Status> {
        if self.sessions(iqn, None).is_empty() {
            return Ok(());
        }
        let out = self
            .iscsiadm(Cmd::new(
                &self.cfg.iscsiadm,
                &["-m", "node", "-T", iqn, "-u"],
            ))
            .await?;
        match out.code {
            Some(0) | Some(iscsi_err::NO_OBJS_FOUND) => {}
            _ => {
                return Err(Status::internal(format!(
                    "logging out of {iqn}: {}",
                    out.tail()
                )))
            }
        }
        if !self.sessions(iqn, None).is_empty() {
            return Err(Status::internal(format!(
                "logged out of {iqn}, and a session remains"
            )));
        }
        Ok(())
    }

    /// Deletes every node record of `iqn` (best effort: logged, not returned).
    async fn delete_records(&self, iqn: &str) {
        let cmd = Cmd::new(
            &self.cfg.iscsiadm,
            &["-m", "node", "-T", iqn, "-o", "delete"],
        );
        match host::run(&cmd).await {
            Ok(o) if o.ok() || o.code == Some(iscsi_err::NO_OBJS_FOUND) => {}
            Ok(o) => warn!(iqn, output = %o.tail(), "deleting the node records failed"),
            Err(e) => warn!(iqn, error = %e, "deleting the node records failed"),
        }
    }

    /// Logs in to `addr` (unless a session is there) and waits for the LUN's disk.
    async fn attach(&self, addr: &Address, chap: &[(String, String)]) -> Result<Disk, Status> {
        let made = self.node_record(addr, chap).await?;
        let fresh = self.sessions(&addr.iqn, Some(addr)).is_empty();
        if fresh {
            let out = self.iscsiadm(self.node_cmd(addr, &["--login"])).await?;
            if !out.ok() && out.code != Some(iscsi_err::SESS_EXISTS) {
                if made {
                    self.delete_records(&addr.iqn).await;
                }
                return Err(login_status(out.code, addr, &out.tail()));
            }
            info!(iqn = %addr.iqn, portal = %addr.portal, "logged in");
        }
        let deadline = tokio::time::Instant::now() + self.cfg.device_wait;
        loop {
            if let Some(s) = self.sessions(&addr.iqn, Some(addr)).first() {
                if let Some(d) = host::disk(&self.cfg.sysfs, &s.name, addr.lun) {
                    if d.dev().exists() {
                        return Ok(d);
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if fresh {
            let _ = self.logout(&addr.iqn).await;
            if made {
                self.delete_records(&addr.iqn).await;
            }
        }
        Err(Status::unavailable(format!(
            "logged in to {} at {}, and LUN {} gave no disk within {} s",
            addr.iqn,
            addr.portal,
            addr.lun,
            self.cfg.device_wait.as_secs()
        )))
    }

    /// What the disk holds, by `blkid -p` (a low-level probe of every known signature).
    async fn contents(&self, disk: &Disk) -> Result<Contents, Status> {
        let dev = disk.dev();
        let dev = dev.to_string_lossy();
        let out = host::run(&Cmd::new("blkid", &["-p", "-o", "export", &dev]))
            .await
            .map_err(|e| match e {
                RunError::Missing(_) => Status::failed_precondition(
                    "blkid (util-linux) is not installed: not formatting a disk whose contents \
                     cannot be checked",
                ),
                e => run_status(e),
            })?;
        match out.code {
            Some(0) => Ok(host::parse_blkid(&out.text)),
            Some(2) => Ok(Contents::Blank),
            _ => Err(Status::internal(format!(
                "blkid -p {dev} failed: {}",
                out.tail()
            ))),
        }
    }

    async fn mkfs(&self, fs_type: &str, disk: &Disk) -> Result<(), Status> {
        let dev = disk.dev();
        let dev = dev.to_string_lossy();
        if fs_type == "xfs" && disk.size < crate::XFS_MIN_BYTES {
            return Err(Status::failed_precondition(format!(
                "{dev} has {} bytes; mkfs.xfs makes no filesystem under 300 MiB (use ext4, or a larger volume: the controller makes new xfs volumes at least that big)",
                disk.size
            )));
        }
        let cmd = match fs_type {
            // -m0: no blocks reserved for root on a volume that belongs to one application.
            "ext4" => Cmd::new("mkfs.ext4", &["-F", "-m0", "-q", &dev]),
            _ => Cmd::new("mkfs.xfs", &["-q", &dev]),
        };
        run_checked(&cmd).await?;
        info!(disk = %dev, fs_type, "formatted a blank disk");
        Ok(())
    }

    async fn mount(&self, args: &[&str]) -> Result<(), Status> {
        let cmd = Cmd::new("mount", args);
        run_checked(&cmd).await?;
        Ok(())
    }

    /// Unmounts `path` while it is a mount point.
    async fn unmount(&self, path: &Path) -> Result<(), Status> {
        while host::mount_at(&self.mounts()?, path).is_some() {
            let cmd = Cmd::new("umount", &[&path.to_string_lossy()]);
            let out = host::run(&cmd).await.map_err(run_status)?;
            if !out.ok() {
                return Err(Status::failed_precondition(format!(
                    "{} failed: {}",
                    cmd.display(),
                    out.tail()
                )));
            }
        }
        Ok(())
    }

    /// Stages a mount volume: the disk's filesystem (made if blank) mounted at `staging`.
    async fn stage_mount(
        &self,
        disk: &Disk,
        staging: &Path,
        fs_type: &str,
        flags: &[String],
        read_only: bool,
    ) -> Result<(), Status> {
        let mounts = self.mounts()?;
        if let Some(m) = host::mount_at(&mounts, staging) {
            if (m.major, m.minor) == (disk.major, disk.minor) {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} is already a mount of {} (not this volume's disk {})",
                staging.display(),
                m.source,
                disk.dev().display()
            )));
        }
        std::fs::create_dir_all(staging).map_err(|e| io_status("creating", staging, e))?;
        match self.contents(disk).await? {
            Contents::Blank if read_only => {
                return Err(Status::failed_precondition(format!(
                    "{} is blank and the volume is read-only: nothing to mount",
                    disk.dev().display()
                )))
            }
            Contents::Blank => self.mkfs(fs_type, disk).await?,
            Contents::Filesystem(t) if t == fs_type => {}
            other => {
                let what = match other {
                    Contents::Filesystem(t) => format!("a {t} filesystem"),
                    Contents::PartitionTable(t) => format!("a {t} partition table"),
                    Contents::Other(t) => format!("a {t} signature"),
                    Contents::Blank => unreachable!("handled above"),
                };
                return Err(Status::failed_precondition(format!(
                    "{} holds {what} and the volume asks for {fs_type}: not formatting over it",
                    disk.dev().display()
                )));
            }
        }
        let mut opts: Vec<String> = flags.to_vec();
        if read_only {
            opts.push("ro".to_owned());
        }
        let dev = disk.dev();
        let dev = dev.to_string_lossy();
        let staging_s = staging.to_string_lossy();
        let opts = opts.join(",");
        let mut args = vec!["-t", fs_type];
        if !opts.is_empty() {
            args.extend(["-o", &opts]);
        }
        args.extend([&*dev, &*staging_s]);
        self.mount(&args).await
    }

    /// Bind-mounts `source` at `target`, read-only when asked.
    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), Status> {
        let (s, t) = (source.to_string_lossy(), target.to_string_lossy());
        self.mount(&["-o", "bind", &s, &t]).await?;
        if read_only {
            if let Err(e) = self.mount(&["-o", "remount,bind,ro", &t]).await {
                let _ = self.unmount(target).await;
                return Err(e);
            }
        }
        Ok(())
    }
}

/// `st_rdev` of a device node (or a file a device node is bind-mounted on).
fn rdev_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    if !m.file_type().is_block_device() {
        return None;
    }
    let rdev = m.rdev();
    Some((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

#[tonic::async_trait]
impl proto::identity_server::Identity for NodeService {
    async fn get_plugin_info(
        &self,
        _: Request<proto::GetPluginInfoRequest>,
    ) -> Result<Response<proto::GetPluginInfoResponse>, Status> {
        Ok(Response::new(crate::plugin_info()))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<proto::GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(crate::plugin_capabilities()))
    }

    async fn probe(
        &self,
        _: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        // Ready when this node has an initiator name to report.
        let ready = match self.initiator_name() {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e.message(), "probe: not ready");
                false
            }
        };
        Ok(Response::new(proto::ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl proto::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<proto::NodeStageVolumeRequest>,
    ) -> Result<Response<proto::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        let (access, reader_only, _) = access_of(req.volume_capability.as_ref())?;
        let ctx: BTreeMap<String, String> = req.publish_context.into_iter().collect();
        let addr = address_of(id, &ctx)?;
        let chap = chap_settings(&req.secrets.into_iter().collect())?;
        // Published read-only (ControllerPublishVolume's readonly), or a reader-only mode.
        let read_only = reader_only || ctx.get("readonly").is_some_and(|v| v == "true");
        let _busy = self.claim(id)?;
        let fresh = self.sessions(&addr.iqn, Some(&addr)).is_empty();
        let disk = self.attach(&addr, &chap).await?;
        if let Access::Mount { fs_type, flags } = &access {
            if let Err(e) = self
                .stage_mount(&disk, &staging, fs_type, flags, read_only)
                .await
            {
                if fresh {
                    let _ = self.logout(&addr.iqn).await;
                    self.delete_records(&addr.iqn).await;
                }
                return Err(e);
            }
        }
        info!(volume = id, disk = %disk.dev().display(), staging = %staging.display(), "staged");
        Ok(Response::new(proto::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<proto::NodeUnstageVolumeRequest>,
    ) -> Result<Response<proto::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        let iqn = iqn_of(id)?;
        let _busy = self.claim(id)?;
        self.unmount(&staging).await?;
        if let Some(disk) = self.disk_of(&iqn) {
            let mounts = self.mounts()?;
            let dev = (disk.major, disk.minor);
            if let Some(m) = mounts.iter().find(|m| (m.major, m.minor) == dev) {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is still mounted at {}: unpublish it first",
                    m.mount_point.display()
                )));
            }
            if let Some(m) = mounts
                .iter()
                .find(|m| m.fstype == "devtmpfs" && rdev_of(&m.mount_point) == Some(dev))
            {
                return Err(Status::failed_precondition(format!(
                    "block volume {id} is still published at {}: unpublish it first",
                    m.mount_point.display()
                )));
            }
            // Whatever was written to the raw disk reaches the target before the logout.
            match std::fs::File::open(disk.dev()) {
                Ok(f) => f
                    .sync_all()
                    .map_err(|e| io_status("flushing", &disk.dev(), e))?,
                Err(e) => warn!(disk = %disk.dev().display(), error = %e, "cannot open to flush"),
            }
        }
        self.logout(&iqn).await?;
        self.delete_records(&iqn).await;
        info!(volume = id, "unstaged");
        Ok(Response::new(proto::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let target = PathBuf::from(required(&req.target_path, "target_path")?);
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        let (access, reader_only, single_writer) = access_of(req.volume_capability.as_ref())?;
        let iqn = iqn_of(id)?;
        let read_only = req.readonly || reader_only;
        let _busy = self.claim(id)?;
        let disk = self.disk_of(&iqn).ok_or_else(|| {
            Status::failed_precondition(format!("volume {id} is not staged on this node"))
        })?;
        let mounts = self.mounts()?;
        // CSI v1.12, NodePublishVolume: for SINGLE_NODE_SINGLE_WRITER "the SP SHALL fail with
        // FAILED_PRECONDITION if the volume is already published at a different target path".
        if single_writer {
            let dev = (disk.major, disk.minor);
            let elsewhere = mounts.iter().find(|m| {
                m.mount_point != target
                    && m.mount_point != staging
                    && ((m.major, m.minor) == dev
                        || (m.fstype == "devtmpfs" && rdev_of(&m.mount_point) == Some(dev)))
            });
            if let Some(m) = elsewhere {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                    m.mount_point.display()
                )));
            }
        }
        match access {
            Access::Mount { .. } => {
                let staged = host::mount_at(&mounts, &staging)
                    .filter(|m| (m.major, m.minor) == (disk.major, disk.minor))
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "volume {id} is not staged at {}",
                            staging.display()
                        ))
                    })?;
                if let Some(m) = host::mount_at(&mounts, &target) {
                    if (m.major, m.minor) == (staged.major, staged.minor)
                        && m.read_only() == read_only
                    {
                        return Ok(Response::new(proto::NodePublishVolumeResponse {}));
                    }
                    return Err(Status::already_exists(format!(
                        "{} is already a mount of another volume or with other options",
                        target.display()
                    )));
                }
                std::fs::create_dir_all(&target).map_err(|e| io_status("creating", &target, e))?;
                self.bind(&staging, &target, read_only).await?;
            }
            Access::Block => {
                let dev = (disk.major, disk.minor);
                if host::mount_at(&mounts, &target).is_some() {
                    if rdev_of(&target) == Some(dev) {
                        return Ok(Response::new(proto::NodePublishVolumeResponse {}));
                    }
                    return Err(Status::already_exists(format!(
                        "{} is already a mount of something else",
                        target.display()
                    )));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| io_status("creating", parent, e))?;
                }
                if !target.exists() {
                    std::fs::File::create(&target)
                        .map_err(|e| io_status("creating", &target, e))?;
                }
                // A read-only mount does not stop writes through a device node on it: the
                // disk itself is made read-only (BLKROSET) for a read-only publish.
                let dev_s = disk.dev().to_string_lossy().into_owned();
                let flag = if read_only { "--setro" } else { "--setrw" };
                let cmd = Cmd::new("blockdev", &[flag, &dev_s]);
                run_checked(&cmd).await?;
                self.bind(&disk.dev(), &target, read_only).await?;
            }
        }
        info!(volume = id, target = %target.display(), read_only, "published");
        Ok(Response::new(proto::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<proto::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let target = PathBuf::from(required(&req.target_path, "target_path")?);
        let _busy = self.claim(id)?;
        self.unmount(&target).await?;
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {
                std::fs::remove_dir(&target).map_err(|e| io_status("removing", &target, e))?
            }
            Ok(_) => {
                std::fs::remove_file(&target).map_err(|e| io_status("removing", &target, e))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_status("inspecting", &target, e)),
        }
        info!(volume = id, target = %target.display(), "unpublished");
        Ok(Response::new(proto::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<proto::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
        use proto::volume_usage::Unit;
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
        let iqn = iqn_of(id)?;
        let not_here = || {
            Status::not_found(format!(
                "{} is not a path of volume {id} on this node",
                path.display()
            ))
        };
        let disk = self.disk_of(&iqn).ok_or_else(not_here)?;
        let dev = (disk.major, disk.minor);
        let mounts = self.mounts()?;
        let m = host::mount_at(&mounts, &path).ok_or_else(not_here)?;
        let usage = if (m.major, m.minor) == dev {
            let st = nix::sys::statvfs::statvfs(&path)
                .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
            let frag = st.fragment_size() as i64;
            let bytes = |blocks: u64| (blocks as i64).saturating_mul(frag);
            vec![
                proto::VolumeUsage {
                    total: bytes(st.blocks() as u64),
                    available: bytes(st.blocks_available() as u64),
                    used: bytes((st.blocks() - st.blocks_free()) as u64),
                    unit: Unit::Bytes as i32,
                },
                proto::VolumeUsage {
                    total: st.files() as i64,
                    available: st.files_available() as i64,
                    used: (st.files() - st.files_free()) as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        } else if rdev_of(&path) == Some(dev) {
            let total = host::block_size_bytes(&self.cfg.sysfs, dev.0, dev.1).unwrap_or(disk.size);
            vec![proto::VolumeUsage {
                total: total as i64,
                available: 0,
                used: 0,
                unit: Unit::Bytes as i32,
            }]
        } else {
            return Err(not_here());
        };
        let sessions = self.sessions(&iqn, None);
        let condition = match sessions.iter().find(|s| s.state == "LOGGED_IN") {
            Some(_) => proto::VolumeCondition {
                abnormal: false,
                message: "session logged in".to_owned(),
            },
            None => proto::VolumeCondition {
                abnormal: true,
                message: format!(
                    "the iSCSI session to {iqn} is {} (I/O is queued while it recovers)",
                    sessions
                        .first()
                        .map_or("gone".to_owned(), |s| s.state.to_lowercase())
                ),
            },
        };
        Ok(Response::new(proto::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<proto::NodeExpandVolumeRequest>,
    ) -> Result<Response<proto::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
        let iqn = iqn_of(id)?;
        if let Some(cap) = &req.volume_capability {
            crate::controller::check_capability(cap).map_err(Status::invalid_argument)?;
        }
        let want = req
            .capacity_range
            .as_ref()
            .map_or(0, |r| r.required_bytes.max(0) as u64);
        let _busy = self.claim(id)?;
        let not_here = || {
            Status::not_found(format!(
                "{} is not a path of volume {id} on this node",
                path.display()
            ))
        };
        let disk = self.disk_of(&iqn).ok_or_else(not_here)?;
        let dev = (disk.major, disk.minor);
        // The target reported CAPACITY DATA HAS CHANGED; the kernel reads the new capacity
        // when the SCSI device is rescanned.
        let rescan = self
            .cfg
            .sysfs
            .join("class/block")
            .join(&disk.name)
            .join("device/rescan");
        std::fs::write(&rescan, "1").map_err(|e| io_status("writing", &rescan, e))?;
        let deadline = tokio::time::Instant::now() + self.cfg.device_wait;
        let size = loop {
            let size = host::block_size_bytes(&self.cfg.sysfs, dev.0, dev.1).unwrap_or(disk.size);
            if size >= want {
                break size;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "{} is {size} bytes after a rescan, {want} asked: has the volume grown \
                     (ControllerExpandVolume)?",
                    disk.dev().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mounts = self.mounts()?;
        match host::mount_at(&mounts, &path) {
            Some(m) if (m.major, m.minor) == dev => {
                let dev_s = disk.dev().to_string_lossy().into_owned();
                let path_s = path.to_string_lossy().into_owned();
                // Both grow a mounted filesystem online.
                let cmd = match m.fstype.as_str() {
                    "ext4" | "ext3" | "ext2" => Cmd::new("resize2fs", &[&dev_s]),
                    "xfs" => Cmd::new("xfs_growfs", &[&path_s]),
                    other => {
                        return Err(Status::failed_precondition(format!(
                            "cannot grow a {other} filesystem (ext4 and xfs can be grown)"
                        )))
                    }
                };
                run_checked(&cmd).await?;
                info!(volume = id, bytes = size, fs = %m.fstype, "filesystem grown");
            }
            Some(m) if m.fstype == "devtmpfs" && rdev_of(&path) == Some(dev) => {
                info!(volume = id, bytes = size, "block volume grown");
            }
            _ => return Err(not_here()),
        }
        Ok(Response::new(proto::NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::{rpc::Type, Rpc, Type as T};
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| proto::NodeServiceCapability {
            r#type: Some(T::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(proto::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<proto::NodeGetInfoRequest>,
    ) -> Result<Response<proto::NodeGetInfoResponse>, Status> {
        Ok(Response::new(proto::NodeGetInfoResponse {
            node_id: self.initiator_name()?,
            max_volumes_per_node: 0,
            accessible_topology: Some(proto::Topology {
                segments: [(TOPOLOGY_NODE.to_owned(), self.cfg.node_name.clone())].into(),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "csi-0123456789abcdef0123";

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_publish_context_must_name_the_volumes_own_target() {
        let iqn = volume::target_iqn(ID);
        let a = address_of(
            ID,
            &ctx(&[("iqn", &iqn), ("portal", "10.0.2.100:3260"), ("lun", "0")]),
        )
        .unwrap();
        assert_eq!((a.host.as_str(), a.port, a.lun), ("10.0.2.100", 3260, 0));
        let e = address_of(
            ID,
            &ctx(&[("iqn", "iqn.x:y"), ("portal", "h:1"), ("lun", "0")]),
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("is not volume"), "{}", e.message());
        let e = address_of(ID, &ctx(&[("iqn", &iqn), ("lun", "0")])).unwrap_err();
        assert!(e.message().contains("\"portal\""), "{}", e.message());
        let e = address_of("pvc-1", &ctx(&[])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    }

    #[test]
    fn chap_secrets_use_kubelets_keys_and_are_checked() {
        let none = chap_settings(&BTreeMap::new()).unwrap();
        assert_eq!(
            none,
            vec![("node.session.auth.authmethod".into(), "None".into())]
        );
        let one = chap_settings(&ctx(&[
            ("node.session.auth.username", "u"),
            ("node.session.auth.password", "p4ssw0rdp4ss"),
            ("discovery.sendtargets.auth.username", "ignored"),
        ]))
        .unwrap();
        assert_eq!(one.len(), 3);
        assert_eq!(one[0].1, "CHAP");
        let e = chap_settings(&ctx(&[("password", "x")])).unwrap_err();
        assert!(e.message().contains("\"password\""), "{}", e.message());
        assert!(!e.message().contains("x\""));
        let e = chap_settings(&ctx(&[("node.session.auth.username", "u")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = chap_settings(&ctx(&[
            ("node.session.auth.username_in", "t"),
            ("node.session.auth.password_in", "q"),
        ]))
        .unwrap_err();
        assert!(e.message().contains("mutual"), "{}", e.message());
    }

    #[test]
    fn login_failures_map_to_codes_a_caller_can_act_on() {
        let a = Address {
            iqn: "iqn.x:y".into(),
            portal: "h:1".into(),
            host: "h".into(),
            port: 1,
            lun: 0,
        };
        assert_eq!(
            login_status(Some(24), &a, "").code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            login_status(Some(19), &a, "").code(),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            login_status(Some(8), &a, "").code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            login_status(Some(20), &a, "").code(),
            tonic::Code::Unavailable
        );
        assert_eq!(login_status(None, &a, "").code(), tonic::Code::Internal);
    }

    #[tokio::test]
    async fn a_disk_too_small_for_xfs_is_refused_before_mkfs_runs() {
        let svc = NodeService::new(NodeConfig::new("worker-1"));
        let disk = Disk {
            name: "sdz".into(),
            major: 8,
            minor: 400,
            size: crate::XFS_MIN_BYTES - (1 << 20),
        };
        // No /dev/sdz here: reaching mkfs.xfs would fail otherwise (INTERNAL).
        let e = svc.mkfs("xfs", &disk).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("300 MiB"), "{e}");
    }

    #[tokio::test]
    async fn node_info_needs_an_initiator_name() {
        use proto::node_server::Node;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = NodeConfig::new("worker-1");
        cfg.initiator_file = dir.path().join("initiatorname.iscsi");
        let svc = NodeService::new(cfg.clone());
        let e = svc
            .node_get_info(Request::new(proto::NodeGetInfoRequest {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("open-iscsi"), "{}", e.message());
        std::fs::write(
            &cfg.initiator_file,
            "InitiatorName=iqn.2004-10.org.example:n1\n",
        )
        .unwrap();
        let info = svc
            .node_get_info(Request::new(proto::NodeGetInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, "iqn.2004-10.org.example:n1");
        assert_eq!(
            info.accessible_topology
                .unwrap()
                .segments
                .get(TOPOLOGY_NODE)
                .map(String::as_str),
            Some("worker-1")
        );
    }

    #[test]
    fn one_operation_per_volume_at_a_time() {
        let svc = NodeService::new(NodeConfig::new("n"));
        let a = svc.claim(ID).unwrap();
        assert_eq!(svc.claim(ID).err().unwrap().code(), tonic::Code::Aborted);
        assert!(svc.claim("csi-other").is_ok());
        drop(a);
        assert!(svc.claim(ID).is_ok());
    }
}
