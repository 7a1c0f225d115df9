//! gRPC clients of the CSI spec's services (the messages from `ktgt-csi`), and the requests
//! the CSI tests send.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use ktgt_csi::proto::{self, volume_capability};
use tonic::transport::{Channel, Endpoint, Uri};

/// A channel to the CSI endpoint at unix socket `socket`, once it answers (10 s).
pub async fn channel(socket: PathBuf) -> Channel {
    for _ in 0..100 {
        if socket.exists() {
            let path = socket.clone();
            if let Ok(ch) = Endpoint::try_from("http://[::]:50051")
                .expect("a static URI")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
            {
                return ch;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the CSI endpoint {} never answered", socket.display());
}

/// A channel to `unix://PATH` or `HOST:PORT`.
pub async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        return Ok(channel(PathBuf::from(path)).await);
    }
    Ok(Endpoint::from_shared(format!("http://{endpoint}"))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

fn mode(m: volume_capability::access_mode::Mode) -> Option<volume_capability::AccessMode> {
    Some(volume_capability::AccessMode { mode: m as i32 })
}

/// SINGLE_NODE_WRITER on a filesystem of type `fs_type`.
pub fn mount_cap_fs(fs_type: &str) -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_mode: mode(volume_capability::access_mode::Mode::SingleNodeWriter),
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: fs_type.into(),
                ..Default::default()
            },
        )),
    }
}

/// SINGLE_NODE_WRITER on ext4.
pub fn mount_cap() -> proto::VolumeCapability {
    mount_cap_fs("ext4")
}

/// SINGLE_NODE_WRITER on the raw disk.
pub fn block_cap() -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_mode: mode(volume_capability::access_mode::Mode::SingleNodeWriter),
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
    }
}

/// CreateVolume of `name` at `bytes` with `cap` and StorageClass parameters `params`.
pub fn create_with(
    name: &str,
    bytes: i64,
    cap: proto::VolumeCapability,
    params: &[(&str, &str)],
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

/// CreateVolume of an ext4 volume.
pub fn create(name: &str, bytes: i64, params: &[(&str, &str)]) -> proto::CreateVolumeRequest {
    create_with(name, bytes, mount_cap(), params)
}

/// `ktgt-csi controller` run as ServiceAccount `ktgt-system/ktgt-csi-controller` beside
/// `agent`, with one pool `name` of `capacity` in `agent.dir/pool` on the agent's node,
/// reached at `portal` (the agent's own when `None`).
pub struct Controller {
    pub proc: crate::Proc,
    pub socket: PathBuf,
    pub kubeconfig: PathBuf,
    pub pool_dir: PathBuf,
}

pub fn spawn_controller(
    cp: &crate::ControlPlane,
    agent: &crate::agent::Agent,
    name: &str,
    capacity: &str,
    portal: Option<&str>,
) -> Controller {
    spawn_controller_with(cp, agent, name, capacity, portal, &[])
}

/// [`spawn_controller`] with more arguments (another `--pool`).
pub fn spawn_controller_with(
    cp: &crate::ControlPlane,
    agent: &crate::agent::Agent,
    name: &str,
    capacity: &str,
    portal: Option<&str>,
    extra: &[String],
) -> Controller {
    let pool_dir = agent.dir.join("pool");
    std::fs::create_dir_all(&pool_dir).expect("creating the pool directory");
    let socket = agent.dir.join("csi.sock");
    let kubeconfig = cp.service_account_kubeconfig("ktgt-system", "ktgt-csi-controller");
    let mut cmd = std::process::Command::new(crate::ktgt_bin("ktgt-csi"));
    cmd.env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .args([
            "controller",
            "--endpoint",
            &format!("unix://{}", socket.display()),
        ])
        .arg("--pool")
        .arg(format!(
            "name={name},node={},path={},capacity={capacity},portal={}",
            agent.node,
            pool_dir.display(),
            portal.unwrap_or(&agent.portal)
        ))
        .args(extra);
    let proc = crate::Proc::spawn(cmd, &agent.dir.join("csi.log"));
    Controller {
        proc,
        socket,
        kubeconfig,
        pool_dir,
    }
}

/// A CreateVolume content source: volume `id`.
pub fn source_volume(id: &str) -> proto::VolumeContentSource {
    proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Volume(
            proto::volume_content_source::VolumeSource {
                volume_id: id.to_owned(),
            },
        )),
    }
}

/// A CreateVolume content source: snapshot `id`.
pub fn source_snapshot(id: &str) -> proto::VolumeContentSource {
    proto::VolumeContentSource {
        r#type: Some(proto::volume_content_source::Type::Snapshot(
            proto::volume_content_source::SnapshotSource {
                snapshot_id: id.to_owned(),
            },
        )),
    }
}
