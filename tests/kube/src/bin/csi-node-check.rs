//! Runs in the initiator VM (`tests/tools/initiator-vm`, workload `csi`) beside
//! `ktgt-csi node`, with the controller on the host behind QEMU's forwarding: drives a volume's
//! whole life on a real Linux initiator (iscsiadm, the kernel's iscsi_tcp, mkfs, mount) and
//! checks what the node is left with after each step. Prints `ITEST PASS csi-<step>` lines;
//! exits 1 at the first failure (`ITEST FAIL csi-<step> ...`).
//!
//! Usage: `csi-node-check --node unix:///tmp/csi/node.sock --controller 10.0.2.101:10000
//! [--control 10.0.2.102:10000] [--chap FILE]`. With `--control`, the host restarts the target
//! on request (one line, `restart-target`, answered `restarted`) while a volume takes writes.
//! With `--chap`, a mutual-CHAP volume the host made is staged with its stage secrets.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};
use ktgt_csi::proto::controller_client::ControllerClient;
use ktgt_csi::proto::node_client::NodeClient;
use ktgt_csi::proto::{self, volume_usage::Unit};
use ktgt_kube_tests::csi::{block_cap, connect, create_with, mount_cap, mount_cap_fs};
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;
const ROOT: &str = "/tmp/csi/check";

struct Check {
    node: NodeClient<Channel>,
    ctl: ControllerClient<Channel>,
    node_id: String,
}

/// Deterministic bytes for file `seed` (xorshift), so a read-back is checked without keeping
/// the data.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sessions_to(iqn: &str) -> usize {
    std::fs::read_dir("/sys/class/iscsi_session")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("targetname"))
                        .is_ok_and(|t| t.trim() == iqn)
                })
                .count()
        })
        .unwrap_or(0)
}

fn is_mount_point(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split(' ').nth(4) == Some(&*path.to_string_lossy()))
    })
}

/// Whether iscsiadm still has a node record of `iqn` (exit 21: none).
fn has_record(iqn: &str) -> anyhow::Result<bool> {
    let out = std::process::Command::new("iscsiadm")
        .args(["-m", "node", "-T", iqn])
        .output()
        .context("running iscsiadm")?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(21) => Ok(false),
        c => bail!(
            "iscsiadm -m node -T {iqn}: exit {c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

struct Volume {
    id: String,
    iqn: String,
    context: HashMap<String, String>,
    cap: proto::VolumeCapability,
    staging: PathBuf,
}

impl Check {
    async fn create(&mut self, name: &str, cap: proto::VolumeCapability) -> anyhow::Result<Volume> {
        self.create_sized(name, cap, 64 * MIB).await
    }

    async fn create_sized(
        &mut self,
        name: &str,
        cap: proto::VolumeCapability,
        bytes: i64,
    ) -> anyhow::Result<Volume> {
        let v = self
            .ctl
            .create_volume(create_with(name, bytes, cap.clone(), &[]))
            .await?
            .into_inner()
            .volume
            .context("CreateVolume returned no volume")?;
        let context = self
            .ctl
            .controller_publish_volume(proto::ControllerPublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: self.node_id.clone(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .publish_context;
        let iqn = context
            .get("iqn")
            .context("no iqn in the publish context")?
            .clone();
        Ok(Volume {
            staging: PathBuf::from(format!("{ROOT}/{}/stage", v.volume_id)),
            id: v.volume_id,
            iqn,
            context,
            cap,
        })
    }

    /// Publishes an existing volume (made on the host) to this node.
    async fn attach(&mut self, id: &str, cap: proto::VolumeCapability) -> anyhow::Result<Volume> {
        let context = self
            .ctl
            .controller_publish_volume(proto::ControllerPublishVolumeRequest {
                volume_id: id.to_owned(),
                node_id: self.node_id.clone(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .publish_context;
        let iqn = context
            .get("iqn")
            .context("no iqn in the publish context")?
            .clone();
        Ok(Volume {
            staging: PathBuf::from(format!("{ROOT}/{id}/stage")),
            id: id.to_owned(),
            iqn,
            context,
            cap,
        })
    }

    fn stage_req(&self, v: &Volume) -> proto::NodeStageVolumeRequest {
        proto::NodeStageVolumeRequest {
            volume_id: v.id.clone(),
            publish_context: v.context.clone(),
            staging_target_path: v.staging.to_string_lossy().into_owned(),
            volume_capability: Some(v.cap.clone()),
            ..Default::default()
        }
    }

    async fn stage(&mut self, v: &Volume) -> anyhow::Result<()> {
        let req = self.stage_req(v);
        self.node.node_stage_volume(req).await?;
        Ok(())
    }

    async fn publish(&mut self, v: &Volume, target: &Path, readonly: bool) -> anyhow::Result<()> {
        self.node
            .node_publish_volume(proto::NodePublishVolumeRequest {
                volume_id: v.id.clone(),
                publish_context: v.context.clone(),
                staging_target_path: v.staging.to_string_lossy().into_owned(),
                target_path: target.to_string_lossy().into_owned(),
                volume_capability: Some(v.cap.clone()),
                readonly,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn unpublish(&mut self, v: &Volume, target: &Path) -> anyhow::Result<()> {
        self.node
            .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                volume_id: v.id.clone(),
                target_path: target.to_string_lossy().into_owned(),
            })
            .await?;
        ensure!(
            !target.exists(),
            "{} remains after unpublish",
            target.display()
        );
        Ok(())
    }

    async fn unstage(&mut self, v: &Volume) -> anyhow::Result<()> {
        self.node
            .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                volume_id: v.id.clone(),
                staging_target_path: v.staging.to_string_lossy().into_owned(),
            })
            .await?;
        ensure!(!is_mount_point(&v.staging), "staging path still mounted");
        ensure!(sessions_to(&v.iqn) == 0, "a session to {} remains", v.iqn);
        ensure!(!has_record(&v.iqn)?, "a node record of {} remains", v.iqn);
        Ok(())
    }

    async fn stats(
        &mut self,
        v: &Volume,
        path: &Path,
    ) -> anyhow::Result<proto::NodeGetVolumeStatsResponse> {
        Ok(self
            .node
            .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
                volume_id: v.id.clone(),
                volume_path: path.to_string_lossy().into_owned(),
                staging_target_path: String::new(),
            })
            .await?
            .into_inner())
    }

    /// ControllerExpandVolume then NodeExpandVolume at `path`; returns the node's capacity.
    async fn expand(&mut self, v: &Volume, path: &Path, bytes: i64) -> anyhow::Result<i64> {
        let range = Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        });
        let r = self
            .ctl
            .controller_expand_volume(proto::ControllerExpandVolumeRequest {
                volume_id: v.id.clone(),
                capacity_range: range,
                volume_capability: Some(v.cap.clone()),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            r.capacity_bytes == bytes,
            "controller: {}",
            r.capacity_bytes
        );
        ensure!(r.node_expansion_required, "no node expansion asked");
        let n = self
            .node
            .node_expand_volume(proto::NodeExpandVolumeRequest {
                volume_id: v.id.clone(),
                volume_path: path.to_string_lossy().into_owned(),
                capacity_range: range,
                staging_target_path: v.staging.to_string_lossy().into_owned(),
                volume_capability: Some(v.cap.clone()),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(n.capacity_bytes)
    }

    async fn delete(&mut self, v: &Volume) -> anyhow::Result<()> {
        self.ctl
            .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
                volume_id: v.id.clone(),
                node_id: self.node_id.clone(),
                ..Default::default()
            })
            .await?;
        self.ctl
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: v.id.clone(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }
}

fn write_files(dir: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir.join("data"))?;
    let mut total = 0;
    for i in 0..16u64 {
        let data = pattern(i, (i as usize + 1) * 37_000);
        let mut f = std::fs::File::create(dir.join(format!("data/f{i}")))?;
        f.write_all(&data)?;
        f.sync_all()?;
        total += data.len() as u64;
    }
    Ok(total)
}

fn verify_files(dir: &Path) -> anyhow::Result<()> {
    for i in 0..16u64 {
        let got = std::fs::read(dir.join(format!("data/f{i}")))
            .with_context(|| format!("reading data/f{i}"))?;
        ensure!(
            got == pattern(i, (i as usize + 1) * 37_000),
            "data/f{i} differs"
        );
    }
    Ok(())
}

/// Writes 1 MiB with O_DIRECT at each offset (MiB) of the raw disk at `dev`, flushed.
fn write_raw(dev: &Path, offsets: &[u64]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix_o_direct())
        .open(dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    for &off in offsets {
        let buf = aligned(pattern(1000 + off, MIB as usize));
        f.seek(SeekFrom::Start(off * MIB as u64))?;
        f.write_all(buf.as_slice())?;
    }
    f.sync_all()?;
    Ok(())
}

fn verify_raw(dev: &Path, offsets: &[u64]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix_o_direct())
        .open(dev)?;
    for &off in offsets {
        let mut buf = aligned(vec![0; MIB as usize]);
        f.seek(SeekFrom::Start(off * MIB as u64))?;
        f.read_exact(buf.as_mut_slice())?;
        ensure!(
            buf.as_slice() == pattern(1000 + off, MIB as usize).as_slice(),
            "MiB {off} of the block volume differs"
        );
    }
    Ok(())
}

const fn nix_o_direct() -> i32 {
    0o40000 // O_DIRECT on x86_64 Linux
}

/// A buffer aligned to 4 KiB, as O_DIRECT needs.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn aligned(data: Vec<u8>) -> Aligned {
    let len = data.len();
    let mut storage = vec![0u8; len + 4096];
    let start = (4096 - (storage.as_ptr() as usize % 4096)) % 4096;
    storage[start..start + len].copy_from_slice(&data);
    Aligned {
        storage,
        start,
        len,
    }
}

async fn step<T>(
    name: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let t = Instant::now();
    match f.await {
        Ok(v) => {
            println!("ITEST PASS csi-{name} ({:.2}s)", t.elapsed().as_secs_f64());
            Ok(v)
        }
        Err(e) => {
            println!("ITEST FAIL csi-{name}: {e:#}");
            Err(e)
        }
    }
}

fn code_of(e: &anyhow::Error) -> Option<Code> {
    e.downcast_ref::<tonic::Status>().map(|s| s.code())
}

/// Writes 64 KiB files with fsync into `dir` until `stop`, counting them; the first error ends
/// it and is returned.
fn writer(
    dir: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut i = 0u64;
        while !stop.load(Ordering::Acquire) {
            let mut f = std::fs::File::create(dir.join(format!("w{i}")))
                .map_err(|e| format!("creating w{i}: {e}"))?;
            f.write_all(&pattern(5000 + i, 65536))
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("writing w{i}: {e}"))?;
            i += 1;
            count.store(i, Ordering::Release);
        }
        Ok(i)
    })
}

/// A volume with mutual CHAP, made on the host (`file`: its id and the Secret the controller
/// wrote, as kubelet would pass it): staged with its stage secrets it logs in and holds data;
/// a wrong initiator secret is PERMISSION_DENIED, a wrong target secret (mutual CHAP failing on
/// the initiator's side) FAILED_PRECONDITION, and neither leaves a session or record.
async fn chap_volume(c: &mut Check, file: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let j: serde_json::Value = serde_json::from_str(&text)?;
    let id = j["volume_id"].as_str().context("no volume_id")?;
    let secrets: HashMap<String, String> = serde_json::from_value(j["secrets"].clone())?;
    ensure!(
        secrets.contains_key("node.session.auth.password_in"),
        "not mutual: {:?}",
        secrets.keys()
    );
    let v = c.attach(id, mount_cap()).await?;
    let t = PathBuf::from(format!("{ROOT}/{id}/pod-1"));
    let stage = |secrets: HashMap<String, String>| {
        let mut r = c.stage_req(&v);
        r.secrets = secrets;
        r
    };
    let wrong = |key: &str| {
        let mut s = secrets.clone();
        s.insert(key.to_owned(), "WrongSecret0123456".to_owned());
        s
    };
    let (bad_initiator, bad_target, good) = (
        stage(wrong("node.session.auth.password")),
        stage(wrong("node.session.auth.password_in")),
        stage(secrets.clone()),
    );
    let e = c.node.node_stage_volume(bad_initiator).await.unwrap_err();
    ensure!(
        e.code() == Code::PermissionDenied,
        "a wrong initiator secret: {e:?}"
    );
    ensure!(
        sessions_to(&v.iqn) == 0 && !has_record(&v.iqn)?,
        "left a session or record"
    );
    let e = c.node.node_stage_volume(bad_target).await.unwrap_err();
    ensure!(
        matches!(e.code(), Code::FailedPrecondition | Code::PermissionDenied),
        "a wrong target secret: {e:?}"
    );
    ensure!(
        sessions_to(&v.iqn) == 0 && !has_record(&v.iqn)?,
        "left a session or record"
    );
    c.node.node_stage_volume(good).await?;
    c.publish(&v, &t, false).await?;
    write_files(&t)?;
    verify_files(&t)?;
    c.unpublish(&v, &t).await?;
    c.unstage(&v).await?;
    c.ctl
        .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
            volume_id: v.id.clone(),
            node_id: c.node_id.clone(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// A published volume takes writes while the host kills the target (SIGKILL) and starts it
/// again: no write fails, the filesystem stays read-write, and every file reads back.
async fn survives_target_restart(c: &mut Check, control: &str) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let v = c.create("check-restart", mount_cap()).await?;
    let t = PathBuf::from(format!("{ROOT}/{}/pod-1", v.id));
    c.stage(&v).await?;
    c.publish(&v, &t, false).await?;
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let w = writer(t.join("w"), stop.clone(), count.clone());
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut conn = tokio::net::TcpStream::connect(control).await?;
    conn.write_all(b"restart-target\n").await?;
    let mut reply = String::new();
    tokio::io::BufReader::new(&mut conn)
        .read_line(&mut reply)
        .await?;
    ensure!(reply.trim() == "restarted", "the host answered {reply:?}");
    // Writes go on after the target is back.
    let before = count.load(Ordering::Acquire);
    let t0 = Instant::now();
    while count.load(Ordering::Acquire) < before + 20 && !w.is_finished() {
        ensure!(
            t0.elapsed().as_secs() < 120,
            "writes did not resume after the restart"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Release);
    let n = w
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))?
        .map_err(|e| anyhow::anyhow!("a write failed across the restart: {e}"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*t.to_string_lossy()))
        .context("the volume is no longer mounted")?;
    ensure!(
        line.split(' ')
            .nth(5)
            .is_some_and(|o| o.split(',').any(|x| x == "rw")),
        "the filesystem went read-only: {line}"
    );
    for i in 0..n {
        let got = std::fs::read(t.join(format!("w/w{i}")))?;
        ensure!(
            got == pattern(5000 + i, 65536),
            "w{i} differs after the restart"
        );
    }
    println!("ITEST INFO csi-restart: {n} files written and read back across the restart");
    c.unpublish(&v, &t).await?;
    c.unstage(&v).await?;
    c.delete(&v).await
}

async fn run(
    node_ep: &str,
    ctl_ep: &str,
    control: Option<&str>,
    chap: Option<&str>,
) -> anyhow::Result<()> {
    let node = NodeClient::new(connect(node_ep).await?);
    let ctl = ControllerClient::new(connect(ctl_ep).await?);
    let mut c = Check {
        node,
        ctl,
        node_id: String::new(),
    };
    c.node_id = step("node-info", async {
        let info = c
            .node
            .clone()
            .node_get_info(proto::NodeGetInfoRequest {})
            .await?;
        let id = info.into_inner().node_id;
        let want = std::fs::read_to_string("/etc/iscsi/initiatorname.iscsi")?;
        ensure!(
            want.contains(&id),
            "node id {id} is not this node's initiator name"
        );
        Ok(id)
    })
    .await?;

    // A filesystem volume: stage formats it, the data survives unstage and a new stage.
    let v = step("fs-create-publish", c.create("check-fs", mount_cap())).await?;
    let t1 = PathBuf::from(format!("{ROOT}/{}/pod-1", v.id));
    step("fs-stage-twice", async {
        c.stage(&v).await?;
        c.stage(&v).await?;
        ensure!(is_mount_point(&v.staging), "staging path not mounted");
        ensure!(sessions_to(&v.iqn) == 1, "not exactly one session");
        Ok(())
    })
    .await?;
    step("fs-publish-twice", async {
        c.publish(&v, &t1, false).await?;
        c.publish(&v, &t1, false).await?;
        Ok(())
    })
    .await?;
    let written = step("fs-write", async { write_files(&t1) }).await?;
    step("fs-stats", async {
        let s = c.stats(&v, &t1).await?;
        let bytes = s
            .usage
            .iter()
            .find(|u| u.unit == Unit::Bytes as i32)
            .context("no byte usage")?;
        ensure!(
            bytes.total > 50 * MIB && bytes.total <= 64 * MIB,
            "total {}",
            bytes.total
        );
        ensure!(
            bytes.used as u64 >= written,
            "used {} < written {written}",
            bytes.used
        );
        ensure!(
            s.usage.iter().any(|u| u.unit == Unit::Inodes as i32),
            "no inode usage"
        );
        let cond = s.volume_condition.context("no volume condition")?;
        ensure!(!cond.abnormal, "abnormal: {}", cond.message);
        let e = c.stats(&v, Path::new("/tmp")).await.unwrap_err();
        ensure!(code_of(&e) == Some(Code::NotFound), "stats of /tmp: {e:#}");
        Ok(())
    })
    .await?;
    step("fs-expand-online", async {
        let got = c.expand(&v, &t1, 96 * MIB).await?;
        ensure!(got == 96 * MIB, "node capacity {got}");
        let s = c.stats(&v, &t1).await?;
        let total = s
            .usage
            .iter()
            .find(|u| u.unit == Unit::Bytes as i32)
            .map_or(0, |u| u.total);
        ensure!(total > 80 * MIB, "the filesystem did not grow: {total}");
        verify_files(&t1)?;
        write_files(&t1.join("after-growth"))?;
        Ok(())
    })
    .await?;
    step("fs-unstage-while-published-refused", async {
        let e = c.unstage(&v).await.unwrap_err();
        ensure!(code_of(&e) == Some(Code::FailedPrecondition), "{e:#}");
        ensure!(sessions_to(&v.iqn) == 1, "the session went away");
        Ok(())
    })
    .await?;
    step("fs-unpublish-unstage", async {
        c.unpublish(&v, &t1).await?;
        c.unpublish(&v, &t1).await?;
        c.unstage(&v).await?;
        c.unstage(&v).await?;
        Ok(())
    })
    .await?;
    let t2 = PathBuf::from(format!("{ROOT}/{}/pod-2", v.id));
    step("fs-stage-again-read-back", async {
        c.stage(&v).await?;
        c.publish(&v, &t2, true).await?;
        verify_files(&t2)?;
        let e = std::fs::File::create(t2.join("new")).unwrap_err();
        ensure!(
            e.raw_os_error() == Some(30),
            "a read-only publish took a write: {e}"
        );
        c.unpublish(&v, &t2).await?;
        c.unstage(&v).await?;
        Ok(())
    })
    .await?;
    step("fs-other-filesystem-refused", async {
        let mut xfs = Volume {
            cap: mount_cap_fs("xfs"),
            staging: v.staging.clone(),
            id: v.id.clone(),
            iqn: v.iqn.clone(),
            context: v.context.clone(),
        };
        let e = c.stage(&xfs).await.unwrap_err();
        ensure!(code_of(&e) == Some(Code::FailedPrecondition), "{e:#}");
        ensure!(format!("{e:#}").contains("ext4"), "{e:#}");
        ensure!(
            sessions_to(&v.iqn) == 0 && !has_record(&v.iqn)?,
            "the failed stage left a session or record"
        );
        xfs.cap = mount_cap();
        c.stage(&xfs).await?;
        c.publish(&xfs, &t1, false).await?;
        verify_files(&t1)?;
        c.unpublish(&xfs, &t1).await?;
        c.unstage(&xfs).await?;
        Ok(())
    })
    .await?;
    step("fs-delete", c.delete(&v)).await?;

    // An xfs volume (mkfs.xfs wants 300 MiB at least): formatted when blank, grown online
    // with xfs_growfs, and not formatted again.
    let x = step(
        "xfs-create-publish",
        c.create_sized("check-xfs", mount_cap_fs("xfs"), 320 * MIB),
    )
    .await?;
    let tx = PathBuf::from(format!("{ROOT}/{}/pod-1", x.id));
    step("xfs-stage-write-expand", async {
        c.stage(&x).await?;
        let fs = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(&*x.staging.to_string_lossy()))
            .and_then(|l| {
                l.split(" - ")
                    .nth(1)
                    .map(|r| r.split(' ').next().unwrap_or("").to_owned())
            })
            .context("the staging path is not mounted")?;
        ensure!(fs == "xfs", "staged as {fs}");
        c.publish(&x, &tx, false).await?;
        write_files(&tx)?;
        let total = |s: proto::NodeGetVolumeStatsResponse| {
            s.usage
                .iter()
                .find(|u| u.unit == Unit::Bytes as i32)
                .map_or(0, |u| u.total)
        };
        let before = total(c.stats(&x, &tx).await?);
        let got = c.expand(&x, &tx, 352 * MIB).await?;
        ensure!(got == 352 * MIB, "node capacity {got}");
        let after = total(c.stats(&x, &tx).await?);
        // The internal log keeps its size: the data section grows by the 32 MiB added.
        ensure!(
            after >= before + 31 * MIB,
            "xfs did not grow: {before} -> {after}"
        );
        verify_files(&tx)?;
        c.unpublish(&x, &tx).await?;
        c.unstage(&x).await?;
        c.stage(&x).await?;
        c.publish(&x, &tx, true).await?;
        verify_files(&tx)?;
        c.unpublish(&x, &tx).await?;
        c.unstage(&x).await?;
        Ok(())
    })
    .await?;
    step("xfs-delete", c.delete(&x)).await?;

    // A raw block volume: published as a device file; the blocks survive a new stage.
    let b = step("block-create-publish", c.create("check-block", block_cap())).await?;
    let dev = PathBuf::from(format!("{ROOT}/{}/pod-1/dev", b.id));
    let offsets = [0, 31, 63];
    step("block-stage-publish-write", async {
        c.stage(&b).await?;
        c.publish(&b, &dev, false).await?;
        c.publish(&b, &dev, false).await?;
        write_raw(&dev, &offsets)?;
        let s = c.stats(&b, &dev).await?;
        ensure!(
            s.usage.first().map(|u| u.total) == Some(64 * MIB),
            "{:?}",
            s.usage
        );
        c.unpublish(&b, &dev).await?;
        c.unstage(&b).await?;
        Ok(())
    })
    .await?;
    step("block-stage-again-read-back", async {
        c.stage(&b).await?;
        c.publish(&b, &dev, true).await?;
        verify_raw(&dev, &offsets)?;
        // Linux opens a read-only disk for writing and refuses the write (EPERM).
        let refused = std::fs::OpenOptions::new()
            .write(true)
            .open(&dev)
            .and_then(|mut f| f.write_all(&[0u8; 4096]).and_then(|()| f.sync_all()));
        ensure!(refused.is_err(), "a read-only block publish took a write");
        verify_raw(&dev, &offsets)?;
        c.unpublish(&b, &dev).await?;
        c.unstage(&b).await?;
        Ok(())
    })
    .await?;
    step("block-expand-online", async {
        c.stage(&b).await?;
        c.publish(&b, &dev, false).await?;
        let got = c.expand(&b, &dev, 96 * MIB).await?;
        ensure!(got == 96 * MIB, "node capacity {got}");
        verify_raw(&dev, &offsets)?;
        write_raw(&dev, &[95])?;
        verify_raw(&dev, &[95])?;
        let s = c.stats(&b, &dev).await?;
        ensure!(
            s.usage.first().map(|u| u.total) == Some(96 * MIB),
            "{:?}",
            s.usage
        );
        c.unpublish(&b, &dev).await?;
        c.unstage(&b).await?;
        Ok(())
    })
    .await?;
    step("block-delete", c.delete(&b)).await?;

    // Not published to this node: the agent refuses the login and nothing is left behind.
    step("unpublished-stage-refused", async {
        let v = c.create("check-unpublished", mount_cap()).await?;
        c.ctl
            .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
                volume_id: v.id.clone(),
                node_id: c.node_id.clone(),
                ..Default::default()
            })
            .await?;
        let e = c.stage(&v).await.unwrap_err();
        ensure!(code_of(&e) == Some(Code::PermissionDenied), "{e:#}");
        ensure!(
            sessions_to(&v.iqn) == 0 && !has_record(&v.iqn)?,
            "left a session or record"
        );
        ensure!(!is_mount_point(&v.staging), "left a mount");
        c.delete(&v).await
    })
    .await?;

    if let Some(control) = control {
        step(
            "fs-survives-target-restart",
            survives_target_restart(&mut c, control),
        )
        .await?;
    }

    if let Some(file) = chap {
        step("chap-mutual-stage-secrets", chap_volume(&mut c, file)).await?;
    }

    step("bad-requests", async {
        let e = c
            .node
            .node_stage_volume(proto::NodeStageVolumeRequest {
                volume_id: "csi-0123456789abcdef0123".into(),
                staging_target_path: format!("{ROOT}/bad"),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        ensure!(
            e.code() == Code::InvalidArgument && e.message().contains("publish_context"),
            "{e:?}"
        );
        let mut ctx = HashMap::new();
        ctx.insert(
            "iqn".to_owned(),
            "iqn.2026-11.io.ktgt.csi:csi-0123456789abcdef0123".to_owned(),
        );
        ctx.insert("portal".to_owned(), "10.0.2.100:3260".to_owned());
        ctx.insert("lun".to_owned(), "0".to_owned());
        let mut secrets = HashMap::new();
        secrets.insert("password".to_owned(), "s3cr3t-value".to_owned());
        let e = c
            .node
            .node_stage_volume(proto::NodeStageVolumeRequest {
                volume_id: "csi-0123456789abcdef0123".into(),
                publish_context: ctx,
                staging_target_path: format!("{ROOT}/bad"),
                volume_capability: Some(mount_cap()),
                secrets,
                ..Default::default()
            })
            .await
            .unwrap_err();
        ensure!(
            e.code() == Code::InvalidArgument && !e.message().contains("s3cr3t"),
            "{e:?}"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(node), Some(ctl)) = (arg("--node"), arg("--controller")) else {
        eprintln!("usage: csi-node-check --node unix://PATH --controller HOST:PORT");
        std::process::exit(2);
    };
    let (control, chap) = (arg("--control"), arg("--chap"));
    if let Err(e) = run(&node, &ctl, control.as_deref(), chap.as_deref()).await {
        eprintln!("csi-node-check: {e:#}");
        std::process::exit(1);
    }
}
