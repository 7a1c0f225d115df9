//! What the node service reads and runs on its host: the initiator name, iSCSI sessions and
//! their disks in sysfs, the mount table, filesystem signatures (`blkid`), and the commands
//! (`iscsiadm`, `mkfs.*`, `mount`, `umount`). Parsing is pure and unit-tested here; running
//! the commands is tested with the real tools in the initiator VM (`docs/csi.md`).
//!
//! # Contract
//! - Every command runs with a deadline and is killed when its caller is dropped (a cancelled
//!   gRPC call leaves no child behind); its output is kept for the error message.
//! - A missing tool is its own error ([`RunError::Missing`]) so the caller can say which
//!   package to install.
//! - Nothing here logs or returns a CHAP secret: [`Cmd`] is given which arguments to hide.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How long a command may run (an iSCSI login retries for a while before it gives up).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// The initiator name in the contents of `/etc/iscsi/initiatorname.iscsi`
/// (`InitiatorName=iqn...`; `#` starts a comment).
pub fn parse_initiator_name(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("InitiatorName="))
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
}

/// A portal `HOST:PORT` (`[V6]:PORT` for IPv6) as the address and port sysfs reports for a
/// connection.
pub fn split_portal(portal: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = portal.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        portal.rsplit_once(':')?
    };
    let port = port.parse().ok()?;
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// One iSCSI session of the kernel initiator, from `/sys/class/iscsi_session`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// `sessionN`.
    pub name: String,
    /// The target's IQN.
    pub target: String,
    /// The portal its (first) connection dialled.
    pub address: String,
    pub port: u16,
    /// `LOGGED_IN`, `FAILED` (in recovery), `FREE`.
    pub state: String,
}

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The kernel initiator's sessions, as sysfs (`sysfs` is `/sys`) shows them.
pub fn sessions(sysfs: &Path) -> Vec<Session> {
    let Ok(dir) = std::fs::read_dir(sysfs.join("class/iscsi_session")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(sid) = name.strip_prefix("session") else {
            continue;
        };
        let s = entry.path();
        let Some(target) = read_trim(&s.join("targetname")) else {
            continue;
        };
        let conn = sysfs.join(format!("class/iscsi_connection/connection{sid}:0"));
        let address = read_trim(&conn.join("persistent_address"))
            .or_else(|| read_trim(&conn.join("address")))
            .unwrap_or_default();
        let port = read_trim(&conn.join("persistent_port"))
            .or_else(|| read_trim(&conn.join("port")))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let state = read_trim(&s.join("state")).unwrap_or_default();
        out.push(Session {
            name,
            target,
            address,
            port,
            state,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A disk the kernel made for a LUN of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `sdX`.
    pub name: String,
    /// Its device number.
    pub major: u32,
    pub minor: u32,
    /// Bytes.
    pub size: u64,
}

impl Disk {
    /// The device node.
    pub fn dev(&self) -> PathBuf {
        PathBuf::from(format!("/dev/{}", self.name))
    }
}

/// The block device of LUN `lun` of `session`, once the kernel's scan has made it:
/// `/sys/class/iscsi_session/sessionN/device/target*/H:C:T:LUN/block/sdX`.
pub fn disk(sysfs: &Path, session: &str, lun: u32) -> Option<Disk> {
    let dev = sysfs
        .join("class/iscsi_session")
        .join(session)
        .join("device");
    for target in std::fs::read_dir(&dev).ok()?.flatten() {
        if !target.file_name().to_string_lossy().starts_with("target") {
            continue;
        }
        for sdev in std::fs::read_dir(target.path()).ok()?.flatten() {
            let n = sdev.file_name().to_string_lossy().into_owned();
            if n.rsplit(':').next() != Some(&lun.to_string()) || n.split(':').count() != 4 {
                continue;
            }
            let Ok(blocks) = std::fs::read_dir(sdev.path().join("block")) else {
                continue;
            };
            // One block device per SCSI device.
            let b = blocks.flatten().next()?;
            let name = b.file_name().to_string_lossy().into_owned();
            let (major, minor) = read_trim(&b.path().join("dev"))
                .as_deref()
                .and_then(parse_dev)?;
            let sectors: u64 = read_trim(&b.path().join("size"))?.parse().ok()?;
            return Some(Disk {
                name,
                major,
                minor,
                size: sectors * 512,
            });
        }
    }
    None
}

/// `MAJOR:MINOR`.
pub fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Bytes of the block device `major:minor` (`/sys/dev/block/M:m/size` counts 512-byte sectors).
pub fn block_size_bytes(sysfs: &Path, major: u32, minor: u32) -> Option<u64> {
    let sectors: u64 = read_trim(&sysfs.join(format!("dev/block/{major}:{minor}/size")))?
        .parse()
        .ok()?;
    Some(sectors * 512)
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The device number of the mounted filesystem.
    pub major: u32,
    pub minor: u32,
    /// The path inside that filesystem that is mounted (`/` unless a bind of a subtree).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: String,
    pub fstype: String,
    pub source: String,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal {
            let digit = |k: usize| u32::from(b[i + k] - b'0');
            let v = digit(1) * 64 + digit(2) * 8 + digit(3);
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount table in the text of `/proc/self/mountinfo` (proc(5)): `ID PARENT MAJ:MIN ROOT
/// MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`. Lines it cannot read are
/// skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if f.len() < 6 || r.len() < 2 {
                return None;
            }
            let (major, minor) = parse_dev(f[2])?;
            Some(Mount {
                major,
                minor,
                root: unescape(f[3]),
                mount_point: PathBuf::from(unescape(f[4])),
                options: f[5].to_owned(),
                fstype: unescape(r[0]),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The mount table now (`mountinfo` is normally `/proc/self/mountinfo`).
pub fn mounts(mountinfo: &Path) -> std::io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(mountinfo)?))
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mount_at<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// What `blkid -p -o export` found on a device: a filesystem type, a partition table, or
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    Blank,
    Filesystem(String),
    PartitionTable(String),
    /// A signature of something else (`USAGE=raid`, `crypto`, ...).
    Other(String),
}

/// Reads `blkid -p -o export DEVICE`'s output (exit 0); exit 2 (nothing found) is
/// [`Contents::Blank`] and is decided by the caller.
pub fn parse_blkid(out: &str) -> Contents {
    let kv: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
    if let Some(pt) = kv.get("PTTYPE") {
        return Contents::PartitionTable((*pt).to_owned());
    }
    match (kv.get("TYPE"), kv.get("USAGE")) {
        (Some(t), None | Some(&"filesystem")) => Contents::Filesystem((*t).to_owned()),
        (Some(t), Some(u)) => Contents::Other(format!("{t} ({u})")),
        (None, Some(u)) => Contents::Other((*u).to_owned()),
        (None, None) if kv.is_empty() => Contents::Blank,
        (None, None) => Contents::Other(out.trim().replace('\n', " ")),
    }
}

/// A command to run, with the indices of arguments not to show in messages (secrets).
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    pub hidden: Vec<usize>,
}

impl Cmd {
    pub fn new(program: &str, args: &[&str]) -> Cmd {
        Cmd {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            hidden: Vec::new(),
        }
    }

    /// Appends an argument shown as `***` in messages.
    pub fn secret(mut self, arg: &str) -> Cmd {
        self.hidden.push(self.args.len());
        self.args.push(arg.to_owned());
        self
    }

    /// The command line as messages show it.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for (i, a) in self.args.iter().enumerate() {
            s.push(' ');
            s.push_str(if self.hidden.contains(&i) { "***" } else { a });
        }
        s
    }
}

/// How a command ended, when it ran.
#[derive(Debug)]
pub struct Output {
    /// The exit status (`None`: killed by a signal).
    pub code: Option<i32>,
    /// stdout then stderr, trimmed.
    pub text: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// The last lines of the output, for a message.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        lines[lines.len().saturating_sub(6)..].join("; ")
    }
}

/// A command that did not run to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0} is not installed (not found on PATH)")]
    Missing(String),
    #[error("{cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd}: no answer in {secs} s; killed")]
    Timeout { cmd: String, secs: u64 },
}

/// Runs `cmd` to completion (at most [`COMMAND_DEADLINE`]).
pub async fn run(cmd: &Cmd) -> Result<Output, RunError> {
    run_within(cmd, COMMAND_DEADLINE).await
}

/// Runs `cmd` to completion within `deadline`.
pub async fn run_within(cmd: &Cmd, deadline: Duration) -> Result<Output, RunError> {
    let child = tokio::process::Command::new(&cmd.program)
        .args(&cmd.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RunError::Missing(cmd.program.clone())
            } else {
                RunError::Spawn {
                    cmd: cmd.display(),
                    source: e,
                }
            }
        })?;
    let out = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .map_err(|_| RunError::Timeout {
            cmd: cmd.display(),
            secs: deadline.as_secs(),
        })?
        .map_err(|e| RunError::Spawn {
            cmd: cmd.display(),
            source: e,
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(err.trim());
    }
    Ok(Output {
        code: out.status.code(),
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initiator_names_are_read_past_comments() {
        let text = "## DO NOT EDIT\n#InitiatorName=iqn.old:x\nInitiatorName=iqn.1993-08.org.debian:01:abc\n";
        assert_eq!(
            parse_initiator_name(text).as_deref(),
            Some("iqn.1993-08.org.debian:01:abc")
        );
        assert_eq!(parse_initiator_name("# nothing\n"), None);
        assert_eq!(parse_initiator_name("InitiatorName=\n"), None);
    }

    #[test]
    fn portals_split_into_address_and_port() {
        assert_eq!(
            split_portal("10.0.2.100:3260"),
            Some(("10.0.2.100".into(), 3260))
        );
        assert_eq!(
            split_portal("[fd00::1]:3261"),
            Some(("fd00::1".into(), 3261))
        );
        assert_eq!(split_portal("host"), None);
        assert_eq!(split_portal(":3260"), None);
        assert_eq!(split_portal("h:99999"), None);
    }

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text = "\
22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
95 29 8:16 / /var/lib/kubelet/plugins/x/globalmount rw,relatime shared:50 - ext4 /dev/sdb rw
96 29 8:16 / /var/lib/kubelet/pods/p/volumes/a\\040b/mount ro,relatime shared:50 - ext4 /dev/sdb rw
97 29 0:5 /sdb /var/lib/kubelet/pods/p/volumeDevices/dev rw - devtmpfs udev rw
garbage line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 4);
        assert_eq!((m[1].major, m[1].minor), (8, 16));
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].source, "/dev/sdb");
        assert!(!m[1].read_only());
        assert_eq!(
            m[2].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/p/volumes/a b/mount")
        );
        assert!(m[2].read_only());
        assert_eq!(m[3].root, "/sdb");
        assert!(mount_at(&m, Path::new("/proc")).is_some());
        assert!(mount_at(&m, Path::new("/nope")).is_none());
    }

    #[test]
    fn blkid_output_says_what_a_device_holds() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/sdb\nUUID=1\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n"),
            Contents::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/sdb\nPTUUID=x\nPTTYPE=gpt\n"),
            Contents::PartitionTable("gpt".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/sdb\nTYPE=LVM2_member\nUSAGE=raid\n"),
            Contents::Other("LVM2_member (raid)".into())
        );
        assert_eq!(parse_blkid(""), Contents::Blank);
    }

    #[test]
    fn sessions_and_their_disks_are_found_in_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path();
        let w = |p: &str, v: &str| {
            let p = sys.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        w(
            "class/iscsi_session/session3/targetname",
            "iqn.2026-11.io.ktgt.csi:csi-1\n",
        );
        w("class/iscsi_session/session3/state", "LOGGED_IN\n");
        w(
            "class/iscsi_connection/connection3:0/persistent_address",
            "10.0.2.100\n",
        );
        w(
            "class/iscsi_connection/connection3:0/persistent_port",
            "3260\n",
        );
        w(
            "class/iscsi_session/session3/device/target2:0:0/2:0:0:0/block/sdb/dev",
            "8:16\n",
        );
        w(
            "class/iscsi_session/session3/device/target2:0:0/2:0:0:0/block/sdb/size",
            "131072\n",
        );
        w("dev/block/8:16/size", "131072\n");
        let s = sessions(sys);
        assert_eq!(
            s,
            vec![Session {
                name: "session3".into(),
                target: "iqn.2026-11.io.ktgt.csi:csi-1".into(),
                address: "10.0.2.100".into(),
                port: 3260,
                state: "LOGGED_IN".into(),
            }]
        );
        let d = disk(sys, "session3", 0).unwrap();
        assert_eq!(d.name, "sdb");
        assert_eq!((d.major, d.minor, d.size), (8, 16, 64 << 20));
        assert_eq!(d.dev(), PathBuf::from("/dev/sdb"));
        assert!(disk(sys, "session3", 1).is_none());
        assert_eq!(block_size_bytes(sys, 8, 16), Some(64 << 20));
    }

    #[test]
    fn secrets_do_not_show_in_command_lines() {
        let c = Cmd::new("iscsiadm", &["-m", "node", "-v"]).secret("hunter2hunter2");
        assert_eq!(c.display(), "iscsiadm -m node -v ***");
        assert_eq!(c.args.last().map(String::as_str), Some("hunter2hunter2"));
    }

    #[tokio::test]
    async fn commands_report_exit_status_output_and_absence() {
        let out = run(&Cmd::new("sh", &["-c", "echo out; echo err >&2; exit 3"]))
            .await
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.text, "out\nerr");
        match run(&Cmd::new("ktgt-no-such-tool", &[])).await {
            Err(RunError::Missing(p)) => assert_eq!(p, "ktgt-no-such-tool"),
            other => panic!("{other:?}"),
        }
        match run_within(&Cmd::new("sleep", &["5"]), Duration::from_millis(100)).await {
            Err(RunError::Timeout { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
