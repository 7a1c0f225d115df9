//! The admin socket and `ktgt-agent ls`: what a node serves right now, and to whom.
//!
//! # Contract
//! - The running agent (either mode) listens on a unix socket, `--admin-socket` (default
//!   [`DEFAULT_SOCKET`]), created mode 0600 in a directory it creates mode 0700: only root (the
//!   agent's user) may connect. A stale socket file (nobody listening) is replaced; a socket
//!   another agent listens on is left alone, and this agent serves no admin socket (with a
//!   warning): `ls` then shows that agent. A path that is not a socket is never removed.
//! - One request per connection: the client writes one line (`ls`), the agent answers one JSON
//!   document ([`Tree`]) and closes. An unknown request is answered `{"error": "..."}`. A
//!   client that sends nothing within 5 s, or more than 64 bytes, is dropped.
//! - The tree holds targets with their LUNs, ACL entries and CHAP account *names*, and each
//!   session's identity, negotiated parameters, age and counters. Secrets never appear.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use target_core::config::AddressRule;
use target_core::portal::NetworkPortal;
use target_core::table::TargetTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Where the agent listens and `ls` connects unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ktgt/admin.sock";
/// Longest request line.
const MAX_REQUEST: usize = 64;
/// How long a client may take to send its request, and `ls` to get its answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Everything `ls` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    /// The target portal groups, by tag: every target is served on each.
    pub portal_groups: Vec<PortalGroupNode>,
    pub targets: Vec<TargetNode>,
}

/// One target portal group: its tag (TPGT, also its SCSI target port and ALUA target port
/// group) and the addresses listening in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortalGroupNode {
    pub tag: u16,
    pub portals: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetNode {
    pub iqn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub luns: Vec<LunNode>,
    /// Who may log in: one grant per bound InitiatorGroup, each judged on its own. None:
    /// nobody.
    pub acl: Vec<GrantNode>,
    /// CHAP: the account names initiators log in as, and the target's own (mutual).
    pub chap_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_mutual_account: Option<String>,
    pub sessions: Vec<SessionNode>,
}

/// One grant of a target's ACL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantNode {
    /// Where it comes from (`binding B, group G`); empty when the configuration names none.
    pub source: String,
    /// Initiator names it admits (empty: any name)...
    pub initiators: Vec<String>,
    /// ...from these addresses (empty: any address). Both empty: nobody.
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LunNode {
    pub lun: u16,
    pub size_bytes: u64,
    pub block_size: u32,
    /// The file or device, or `memory`.
    pub store: String,
    /// `io_uring`, `threadpool` or `memory`.
    pub engine: String,
    pub read_only: bool,
    /// Opened O_DIRECT (no page cache on the storage node).
    pub direct: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionNode {
    pub initiator: String,
    /// The ISID as 12 hex digits.
    pub isid: String,
    pub tsih: u16,
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal: Option<String>,
    /// The tag of the portal group the session logged in through.
    pub portal_group: u16,
    /// Seconds since the login completed.
    pub age_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_account: Option<String>,
    pub header_digest: bool,
    pub data_digest: bool,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_recv_data_segment_length: u32,
    pub max_send_data_segment_length: u32,
    pub commands_in_flight: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
}

/// The tree of what `table` serves now, on `portals`.
pub fn tree(table: &TargetTable, portals: &[NetworkPortal]) -> Tree {
    let now = SystemTime::now();
    let mut targets: Vec<TargetNode> = table
        .targets()
        .iter()
        .map(|t| {
            let state = t.state();
            let luns = state
                .luns
                .values()
                .map(|lu| LunNode {
                    lun: lu.lun,
                    size_bytes: lu.num_blocks() * u64::from(lu.block_size),
                    block_size: lu.block_size,
                    store: lu
                        .store
                        .path()
                        .map_or_else(|| "memory".to_owned(), |p| p.display().to_string()),
                    engine: lu.store.kind().to_owned(),
                    read_only: lu.read_only,
                    direct: state.lun_config(lu.lun).is_some_and(|c| c.direct),
                })
                .collect();
            let acl = state
                .acl
                .grants
                .iter()
                .map(|g| GrantNode {
                    source: g.source.clone(),
                    initiators: g.initiators.clone(),
                    addresses: g
                        .addresses
                        .iter()
                        .map(|a| match a {
                            AddressRule::All => "ALL".to_owned(),
                            AddressRule::Net(n) => n.to_string(),
                        })
                        .collect(),
                })
                .collect();
            let mut sessions: Vec<SessionNode> = t
                .sessions()
                .iter()
                .map(|s| SessionNode {
                    initiator: s.initiator.clone(),
                    isid: s.isid.iter().map(|b| format!("{b:02x}")).collect(),
                    tsih: s.tsih,
                    peer: s.peer.to_string(),
                    portal: s.info.portal.map(|p| p.to_string()),
                    portal_group: s.tpgt,
                    age_seconds: now.duration_since(s.info.since).map_or(0, |d| d.as_secs()),
                    chap_account: s.info.chap_user.clone(),
                    header_digest: s.info.header_digest,
                    data_digest: s.info.data_digest,
                    immediate_data: s.info.immediate_data,
                    initial_r2t: s.info.initial_r2t,
                    max_burst_length: s.info.max_burst_length,
                    first_burst_length: s.info.first_burst_length,
                    max_recv_data_segment_length: s.info.max_recv_data_segment_length,
                    max_send_data_segment_length: s.info.max_send_data_segment_length,
                    commands_in_flight: s.io.in_flight.load(Ordering::Relaxed),
                    reads: s.io.reads.load(Ordering::Relaxed),
                    read_bytes: s.io.read_bytes.load(Ordering::Relaxed),
                    writes: s.io.writes.load(Ordering::Relaxed),
                    write_bytes: s.io.write_bytes.load(Ordering::Relaxed),
                })
                .collect();
            sessions.sort_by(|a, b| (&a.initiator, &a.isid).cmp(&(&b.initiator, &b.isid)));
            TargetNode {
                iqn: t.iqn.clone(),
                alias: state.alias.clone(),
                luns,
                acl,
                chap_accounts: state.chap.incoming.iter().map(|c| c.user.clone()).collect(),
                chap_mutual_account: state.chap.outgoing.as_ref().map(|c| c.user.clone()),
                sessions,
            }
        })
        .collect();
    targets.sort_by(|a, b| a.iqn.cmp(&b.iqn));
    let mut portal_groups: Vec<PortalGroupNode> = Vec::new();
    for p in portals {
        match portal_groups.iter_mut().find(|g| g.tag == p.tpgt) {
            Some(g) => g.portals.push(p.addr.to_string()),
            None => portal_groups.push(PortalGroupNode {
                tag: p.tpgt,
                portals: vec![p.addr.to_string()],
            }),
        }
    }
    portal_groups.sort_by_key(|g| g.tag);
    Tree {
        portal_groups,
        targets,
    }
}

/// The tree as `ls` prints it: one line per node, indented.
pub fn render(tree: &Tree) -> String {
    let mut out = String::new();
    let mut line = |depth: usize, text: String| {
        out.push_str(&"  ".repeat(depth));
        out.push_str(&text);
        out.push('\n');
    };
    for g in &tree.portal_groups {
        line(
            0,
            format!("portal group {}: {}", g.tag, g.portals.join(", ")),
        );
    }
    if tree.targets.is_empty() {
        line(0, "no targets".to_owned());
    }
    for t in &tree.targets {
        line(
            0,
            format!(
                "target {}{} ({} session{})",
                t.iqn,
                t.alias
                    .as_ref()
                    .map(|a| format!(" ({a})"))
                    .unwrap_or_default(),
                t.sessions.len(),
                if t.sessions.len() == 1 { "" } else { "s" }
            ),
        );
        for l in &t.luns {
            line(
                1,
                format!(
                    "lun {}: {} bytes, {}-byte blocks, {} ({}){}{}",
                    l.lun,
                    l.size_bytes,
                    l.block_size,
                    l.store,
                    l.engine,
                    if l.read_only { ", read-only" } else { "" },
                    if l.direct { ", direct" } else { "" }
                ),
            );
        }
        if t.acl.is_empty() {
            line(1, "acl: nobody".to_owned());
        }
        for g in &t.acl {
            let who = match (g.initiators.is_empty(), g.addresses.is_empty()) {
                (true, true) => "nobody".to_owned(),
                (false, true) => format!("{} (any address)", g.initiators.join(", ")),
                (true, false) => format!("any initiator from {}", g.addresses.join(", ")),
                (false, false) => {
                    format!(
                        "{} from {}",
                        g.initiators.join(", "),
                        g.addresses.join(", ")
                    )
                }
            };
            let from = if g.source.is_empty() {
                String::new()
            } else {
                format!(" [{}]", g.source)
            };
            line(1, format!("acl: {who}{from}"));
        }
        if !t.chap_accounts.is_empty() {
            let mutual = t
                .chap_mutual_account
                .as_ref()
                .map(|m| format!("; mutual as {m}"))
                .unwrap_or_default();
            line(1, format!("chap: {}{mutual}", t.chap_accounts.join(", ")));
        }
        for s in &t.sessions {
            line(
                1,
                format!(
                    "session {} isid {} tsih {} from {}{} up {}s{}",
                    s.initiator,
                    s.isid,
                    s.tsih,
                    s.peer,
                    s.portal
                        .as_ref()
                        .map(|p| format!(" to {p},{}", s.portal_group))
                        .unwrap_or_default(),
                    s.age_seconds,
                    s.chap_account
                        .as_ref()
                        .map(|c| format!(", chap {c}"))
                        .unwrap_or_default(),
                ),
            );
            line(
                2,
                format!(
                    "digests header {} data {}; burst {}/{} (first/max); segments in {} out {}",
                    on_off(s.header_digest),
                    on_off(s.data_digest),
                    s.first_burst_length,
                    s.max_burst_length,
                    s.max_recv_data_segment_length,
                    s.max_send_data_segment_length
                ),
            );
            line(
                2,
                format!(
                    "in flight {}; reads {} ({} bytes); writes {} ({} bytes)",
                    s.commands_in_flight, s.reads, s.read_bytes, s.writes, s.write_bytes
                ),
            );
        }
    }
    out
}

fn on_off(b: bool) -> &'static str {
    if b {
        "CRC32C"
    } else {
        "none"
    }
}

/// The listening admin socket.
pub struct AdminServer {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminServer {
    /// Binds `path` (see the module docs). `Ok(None)`: another agent listens there.
    pub async fn bind(path: &Path) -> io::Result<Option<AdminServer>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).await.is_ok() {
                    return Ok(None);
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; not replacing it",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Some(AdminServer {
            listener,
            path: path.to_path_buf(),
        }))
    }

    /// Answers requests until `shutdown`, then removes the socket.
    pub async fn serve(
        self,
        table: Arc<TargetTable>,
        portals: Vec<NetworkPortal>,
        shutdown: CancellationToken,
    ) {
        info!(path = %self.path.display(), "admin socket: ktgt-agent ls --admin-socket {}", self.path.display());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let table = table.clone();
                        let portals = portals.clone();
                        tokio::spawn(async move {
                            if let Err(e) = answer(stream, &table, &portals).await {
                                debug!(error = %e, "admin request failed");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "admin socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(
    mut stream: UnixStream,
    table: &TargetTable,
    portals: &[NetworkPortal],
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(MAX_REQUEST);
    let request = tokio::time::timeout(TIMEOUT, async {
        let mut byte = [0u8; 1];
        while buf.len() < MAX_REQUEST {
            if stream.read(&mut byte).await? == 0 || byte[0] == b'\n' {
                break;
            }
            buf.push(byte[0]);
        }
        io::Result::Ok(())
    })
    .await;
    if !matches!(request, Ok(Ok(()))) || buf.len() >= MAX_REQUEST {
        return Ok(());
    }
    let body = match String::from_utf8_lossy(&buf).trim() {
        "ls" => serde_json::to_vec_pretty(&tree(table, portals)).map_err(io::Error::other)?,
        other => serde_json::to_vec(&serde_json::json!({
            "error": format!("unknown request {other:?}; the requests are: ls")
        }))
        .map_err(io::Error::other)?,
    };
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// `ktgt-agent ls`: asks the agent at `path` and returns the tree, or an error that says
/// what to do.
pub async fn fetch(path: &Path) -> anyhow::Result<Tree> {
    use anyhow::Context as _;
    let mut stream = match tokio::time::timeout(TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let hint = match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    "no ktgt-agent is listening there (is it running? its --admin-socket?)"
                }
                io::ErrorKind::PermissionDenied => {
                    "permission denied: the admin socket is root-only (run as root)"
                }
                _ => "cannot connect",
            };
            anyhow::bail!("{}: {hint}: {e}", path.display());
        }
        Err(_) => anyhow::bail!("{}: no answer to connect within 5 s", path.display()),
    };
    let mut body = Vec::new();
    tokio::time::timeout(TIMEOUT, async {
        stream.write_all(b"ls\n").await?;
        stream.read_to_end(&mut body).await
    })
    .await
    .map_err(|_| anyhow::anyhow!("{}: no answer within 5 s", path.display()))?
    .with_context(|| format!("{}: reading the answer", path.display()))?;
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(&body) {
        if let Some(e) = m.get("error") {
            anyhow::bail!("the agent refused the request: {e}");
        }
    }
    serde_json::from_slice(&body)
        .with_context(|| format!("{}: the answer is not an ls tree", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_renders_every_node_and_no_secret() {
        let tree = Tree {
            portal_groups: vec![PortalGroupNode {
                tag: 1,
                portals: vec!["127.0.0.1:3260".into()],
            }],
            targets: vec![TargetNode {
                iqn: "iqn.2026-12.io.ktgt:t".into(),
                alias: None,
                luns: vec![LunNode {
                    lun: 1,
                    size_bytes: 1 << 20,
                    block_size: 512,
                    store: "memory".into(),
                    engine: "memory".into(),
                    read_only: true,
                    direct: false,
                }],
                acl: vec![GrantNode {
                    source: "binding b, group g".into(),
                    initiators: vec!["iqn.2026-12.io.ktgt:c".into()],
                    addresses: vec!["ALL".into()],
                }],
                chap_accounts: vec!["alice".into()],
                chap_mutual_account: Some("target".into()),
                sessions: vec![],
            }],
        };
        let text = render(&tree);
        assert!(
            text.contains("target iqn.2026-12.io.ktgt:t (0 sessions)"),
            "{text}"
        );
        assert!(
            text.contains("lun 1: 1048576 bytes, 512-byte blocks, memory (memory), read-only"),
            "{text}"
        );
        assert!(
            text.contains("acl: iqn.2026-12.io.ktgt:c from ALL [binding b, group g]"),
            "{text}"
        );
        assert!(text.contains("chap: alice; mutual as target"), "{text}");
        assert!(
            text.starts_with("portal group 1: 127.0.0.1:3260\n"),
            "{text}"
        );
        let json = serde_json::to_string(&tree).unwrap();
        assert_eq!(serde_json::from_str::<Tree>(&json).unwrap(), tree);
    }

    #[tokio::test]
    async fn a_live_socket_is_left_alone_a_stale_one_replaced_and_a_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.sock");
        let first = AdminServer::bind(&path).await.unwrap().expect("bound");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            AdminServer::bind(&path).await.unwrap().is_none(),
            "a live socket was taken"
        );
        drop(first);
        // The file stays after the listener is gone: stale, replaced.
        assert!(path.exists());
        assert!(AdminServer::bind(&path).await.unwrap().is_some());
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(AdminServer::bind(&file).await.is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[tokio::test]
    async fn ls_without_an_agent_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let e = fetch(&dir.path().join("none.sock")).await.unwrap_err();
        assert!(e.to_string().contains("no ktgt-agent is listening"), "{e}");
    }
}
