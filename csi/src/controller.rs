//! The Identity and Controller services: CSI calls in, Kubernetes objects out (see the crate
//! docs for what a volume is).
//!
//! # Contract (CSI spec v1.12, "Controller Service RPC")
//! - Every call is idempotent: CreateVolume finds the Target its name maps to; publishing
//!   twice writes the same binding (server-side apply); deleting or unpublishing what is gone
//!   succeeds.
//! - Errors are the spec's codes with a message naming what was wrong: INVALID_ARGUMENT for a
//!   missing or unsupported field (an unknown StorageClass parameter by name), ALREADY_EXISTS
//!   for a name reused with another size, OUT_OF_RANGE for a capacity range no size fits,
//!   RESOURCE_EXHAUSTED when no pool has room, NOT_FOUND for an unknown volume or a node id
//!   that is no initiator name, ABORTED for a stale ListVolumes token, UNAVAILABLE when the API
//!   server cannot be reached. Nothing is half-created: CreateVolume writes the Target (after
//!   the volume's CHAP Secrets, when it has CHAP), and a clone whose copy fails is deleted
//!   again; CreateSnapshot writes one TargetSnapshot, deleted again when the copy cannot be
//!   made ([`crate::snapshot`]).
//! - RPCs whose capability is not advertised (GetSnapshot, volume modification, volume
//!   health) answer UNIMPLEMENTED, as the spec requires of them.

use std::collections::BTreeMap;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use ktgt_operator::api::{InitiatorGroup, InitiatorGroupBinding, Target, TargetSnapshot};

use crate::pools::{Pool, Pools};
use crate::proto::{self, controller_service_capability, volume_capability};
use crate::snapshot::{self, CloneState, Source};
use crate::volume::{self, ANNOTATION_INITIATOR, LABEL_MANAGED, LABEL_VOLUME};

/// Field manager of the driver's server-side applies.
pub const MANAGER: &str = "ktgt-csi";
/// Size of a volume whose request names none (CSI: "the Plugin MAY choose an implementation-
/// defined capacity range").
pub const DEFAULT_BYTES: u64 = 1 << 30;
/// Sizes are whole MiB (a multiple of every block size the LUN may have).
pub const GRANULE: u64 = 1 << 20;
/// How long CreateVolume waits for the agent to make a cloned volume's copy.
const CLONE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// How long CreateSnapshot waits for the agent to make the copy before answering "not ready".
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Poll period of those waits.
const POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// What a new volume is copied from.
struct CloneSource {
    file: String,
    pool: String,
    bytes: u64,
}

/// The iSCSI port of a pool whose portal is not given.
pub const ISCSI_PORT: u16 = 3260;

/// StorageClass parameters the driver understands (the provisioner's `csi.storage.k8s.io/`
/// ones are passed through and ignored).
pub const PARAMETERS: &[&str] = &["pool", "blockSize", "chap"];
/// Characters of generated CHAP secrets: 16 of them carry 95 bits, and every initiator takes
/// them (Microsoft's allows at most 16).
const SECRET_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const SECRET_LEN: usize = 16;

/// Both services, on one Kubernetes client.
#[derive(Clone)]
pub struct ControllerService {
    client: Client,
    pools: Pools,
    /// Portals by pool name, where a pool declares one.
    portals: BTreeMap<String, String>,
    /// Where volumes' CHAP Secrets are written.
    secret_namespace: String,
}

impl ControllerService {
    pub fn new(
        client: Client,
        pools: Pools,
        portals: BTreeMap<String, String>,
        secret_namespace: String,
    ) -> Self {
        ControllerService {
            client,
            pools,
            portals,
            secret_namespace,
        }
    }

    fn secrets(&self) -> Api<k8s_openapi::api::core::v1::Secret> {
        Api::namespaced(self.client.clone(), &self.secret_namespace)
    }

    /// Writes the CHAP Secrets of a new volume, or finds those a retried CreateVolume wrote
    /// (their accounts are kept: the agent may serve them already).
    async fn ensure_chap_secrets(
        &self,
        id: &str,
        name: &str,
        mode: volume::ChapMode,
    ) -> Result<(), Status> {
        let account = |user: String| -> Result<volume::Account, Status> {
            Ok(volume::Account {
                user,
                secret: random_secret()?,
            })
        };
        let initiator = account(id.to_owned())?;
        let target = match mode {
            volume::ChapMode::Mutual => Some(account(format!("{id}-target"))?),
            _ => None,
        };
        for s in volume::chap_secrets(
            id,
            name,
            &self.secret_namespace,
            &initiator,
            target.as_ref(),
        ) {
            match self.secrets().create(&PostParams::default(), &s).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let existing = self
                        .secrets()
                        .get(&s.name_any())
                        .await
                        .map_err(api_status)?;
                    let ours = existing.labels().get(LABEL_VOLUME).is_some_and(|v| v == id);
                    if !ours {
                        return Err(Status::already_exists(format!(
                            "Secret {}/{} exists and is not volume {id}'s",
                            self.secret_namespace,
                            s.name_any()
                        )));
                    }
                }
                Err(e) => return Err(api_status(e)),
            }
        }
        Ok(())
    }

    fn targets(&self) -> Api<Target> {
        Api::all(self.client.clone())
    }

    fn bindings(&self) -> Api<InitiatorGroupBinding> {
        Api::all(self.client.clone())
    }

    fn groups(&self) -> Api<InitiatorGroup> {
        Api::all(self.client.clone())
    }

    /// Deletes volume `id`'s objects: access first, then the Target (the agent logs out
    /// whoever is still attached and, when the Target is gone, deletes its file), then its
    /// CHAP Secrets.
    async fn remove_volume(&self, id: &str) -> Result<(), Status> {
        let bindings = self
            .bindings()
            .list(&ListParams::default().labels(&format!("{LABEL_VOLUME}={id}")))
            .await
            .map_err(api_status)?;
        for b in bindings.items {
            delete_ignoring_absent(&self.bindings(), &b.name_any()).await?;
        }
        match self.targets().get_opt(id).await.map_err(api_status)? {
            Some(t) if volume::csi_name(&t).is_some() => {
                delete_ignoring_absent(&self.targets(), id).await?;
                info!(volume_id = %id, "volume deleted");
            }
            Some(_) => {
                return Err(Status::failed_precondition(format!(
                    "Target {id} was not made by this driver; not deleting it"
                )))
            }
            None => {}
        }
        // Its CHAP Secrets, found by label (also those of a CreateVolume that failed after
        // writing them).
        let secrets = self
            .secrets()
            .list(&ListParams::default().labels(&format!("{LABEL_VOLUME}={id}")))
            .await
            .map_err(api_status)?;
        for s in secrets.items {
            delete_ignoring_absent(&self.secrets(), &s.name_any()).await?;
        }
        Ok(())
    }

    fn snapshots(&self) -> Api<TargetSnapshot> {
        Api::all(self.client.clone())
    }

    /// The file, pool and size a new volume is copied from, or the CSI error for a source
    /// that cannot be used: NOT_FOUND when it does not exist (CSI v1.12, CreateVolume errors:
    /// "Source does not exist"), ABORTED while a snapshot is still being made.
    async fn clone_source(&self, source: &Source) -> Result<CloneSource, Status> {
        match source {
            Source::Volume(id) => {
                let t = self.volume(id).await?;
                let file = t
                    .spec
                    .luns
                    .iter()
                    .find(|l| l.lun == volume::LUN)
                    .and_then(|l| l.backing_store.clone())
                    .ok_or_else(|| Status::internal(format!("volume {id} has no LUN 0 file")))?;
                Ok(CloneSource {
                    file,
                    pool: volume::pool_of(&t).unwrap_or_default().to_owned(),
                    bytes: volume::capacity(&t).unwrap_or(0),
                })
            }
            Source::Snapshot(id) => {
                let s = self.snapshot(id).await?;
                if !snapshot::is_ready(&s) {
                    return Err(match snapshot::failure(&s) {
                        Some((reason, message)) => Status::failed_precondition(format!(
                            "snapshot {id} could not be made ({reason}): {message}"
                        )),
                        None => Status::aborted(format!("snapshot {id} is not ready yet; retry")),
                    });
                }
                Ok(CloneSource {
                    file: s.spec.path.clone(),
                    pool: s
                        .labels()
                        .get(volume::LABEL_POOL)
                        .cloned()
                        .unwrap_or_default(),
                    bytes: snapshot::size(&s).unwrap_or(0),
                })
            }
        }
    }

    /// Waits until the agent has made cloned volume `id`'s copy and serves it. A copy that
    /// cannot be made deletes the volume (nothing is left half-made) and answers
    /// FAILED_PRECONDITION when the filesystem cannot reflink, INTERNAL otherwise; a copy not
    /// made within [`CLONE_WAIT`] answers ABORTED (the CO retries, and finds the volume).
    async fn wait_for_clone(&self, id: &str) -> Result<Target, Status> {
        let deadline = tokio::time::Instant::now() + CLONE_WAIT;
        loop {
            let t = self.volume(id).await?;
            match snapshot::clone_state(&t) {
                CloneState::Served => return Ok(t),
                CloneState::Failed { reason, message } => {
                    self.remove_volume(id).await?;
                    warn!(volume_id = %id, %reason, %message, "the copy could not be made; volume deleted");
                    let text =
                        format!("the copy for volume {id} could not be made ({reason}): {message}");
                    return Err(if reason == "CloneUnsupported" {
                        Status::failed_precondition(text)
                    } else {
                        Status::internal(text)
                    });
                }
                CloneState::Pending if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::aborted(format!(
                        "volume {id}: the agent of node {} has not made the copy yet; retry",
                        t.spec.node_name.as_deref().unwrap_or("?")
                    )))
                }
                CloneState::Pending => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// A managed TargetSnapshot by id, or NOT_FOUND.
    async fn snapshot(&self, id: &str) -> Result<TargetSnapshot, Status> {
        if !snapshot::is_snapshot_id(id) {
            return Err(Status::not_found(format!(
                "snapshot {id:?} does not exist (not an id this driver makes)"
            )));
        }
        match self.snapshots().get_opt(id).await.map_err(api_status)? {
            Some(s) if s.metadata.deletion_timestamp.is_some() => {
                Err(Status::not_found(format!("snapshot {id} is being deleted")))
            }
            Some(s) if snapshot::csi_name(&s).is_some() => Ok(s),
            _ => Err(Status::not_found(format!("snapshot {id} does not exist"))),
        }
    }

    /// Waits up to [`SNAPSHOT_WAIT`] for the agent to make snapshot `id`'s copy. A copy the
    /// agent cannot make at all (the filesystem cannot reflink, a bad spec) deletes the
    /// object and answers FAILED_PRECONDITION; one still pending is returned not ready (the
    /// CO asks again: CSI v1.12, CreateSnapshot, "ready_to_use").
    async fn wait_for_snapshot(&self, id: &str) -> Result<TargetSnapshot, Status> {
        let deadline = tokio::time::Instant::now() + SNAPSHOT_WAIT;
        loop {
            let s = self.snapshot(id).await?;
            if snapshot::is_ready(&s) {
                return Ok(s);
            }
            if let Some((reason, message)) = snapshot::failure(&s) {
                if matches!(reason, "CloneUnsupported" | "InvalidSpec") {
                    let text = format!("snapshot {id} could not be made ({reason}): {message}");
                    delete_ignoring_absent(&self.snapshots(), id).await?;
                    warn!(snapshot_id = %id, %reason, %message, "snapshot could not be made; deleted");
                    return Err(Status::failed_precondition(text));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(s);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The driver's volume Targets.
    async fn volumes(&self) -> Result<Vec<Target>, Status> {
        let list = self
            .targets()
            .list(&ListParams::default().labels(&format!("{LABEL_MANAGED}=true")))
            .await
            .map_err(api_status)?;
        let mut items = list.items;
        items.sort_by_key(|t| t.name_any());
        Ok(items)
    }

    /// A managed volume Target by id, or NOT_FOUND.
    async fn volume(&self, id: &str) -> Result<Target, Status> {
        if !volume::is_volume_id(id) {
            return Err(Status::not_found(format!(
                "volume {id:?} does not exist (not an id this driver makes)"
            )));
        }
        match self.targets().get_opt(id).await.map_err(api_status)? {
            Some(t) if is_deleting(&t) => {
                Err(Status::not_found(format!("volume {id} is being deleted")))
            }
            Some(t) if volume::csi_name(&t).is_some() => Ok(t),
            _ => Err(Status::not_found(format!("volume {id} does not exist"))),
        }
    }

    /// Bytes of the pool not promised to its volumes.
    fn free_bytes(pool: &Pool, volumes: &[Target]) -> u64 {
        let used: u64 = volumes
            .iter()
            .filter(|t| volume::pool_of(t) == Some(pool.name.as_str()))
            .filter_map(volume::capacity)
            .sum();
        pool.capacity.saturating_sub(used)
    }

    /// The portal initiators reach `pool`'s node on: the pool's own, else the Node's first
    /// InternalIP (then ExternalIP) and port 3260.
    async fn portal(&self, pool: &str, node: &str) -> Result<String, Status> {
        if let Some(p) = self.portals.get(pool) {
            return Ok(p.clone());
        }
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let n = nodes
            .get_opt(node)
            .await
            .map_err(api_status)?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                "storage node {node} of pool {pool} has no Node object to take its address from"
            ))
            })?;
        let addresses = n.status.and_then(|s| s.addresses).unwrap_or_default();
        ["InternalIP", "ExternalIP"]
            .iter()
            .find_map(|kind| addresses.iter().find(|a| a.type_ == *kind))
            .map(|a| {
                if a.address.contains(':') {
                    format!("[{}]:{ISCSI_PORT}", a.address)
                } else {
                    format!("{}:{ISCSI_PORT}", a.address)
                }
            })
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "storage node {node} of pool {pool} reports no InternalIP or ExternalIP"
                ))
            })
    }

    fn volume_message(t: &Target) -> proto::Volume {
        let id = t.name_any();
        let mut context = std::collections::HashMap::new();
        context.insert("iqn".to_owned(), t.spec.iqn.clone());
        context.insert("lun".to_owned(), volume::LUN.to_string());
        if let Some(node) = &t.spec.node_name {
            context.insert("storageNode".to_owned(), node.clone());
        }
        if let Some(pool) = volume::pool_of(t) {
            context.insert("pool".to_owned(), pool.to_owned());
        }
        proto::Volume {
            capacity_bytes: volume::capacity(t).map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            volume_id: id,
            volume_context: context,
            // CSI v1.12, Volume.content_source: "If specified, indicates that the volume is
            // not empty and is pre-populated".
            content_source: Source::of(t).map(|s| s.message()),
            ..Default::default()
        }
    }

    /// The initiators a volume is published to.
    async fn published_to(&self, id: &str) -> Result<Vec<String>, Status> {
        let list = self
            .bindings()
            .list(&ListParams::default().labels(&format!("{LABEL_VOLUME}={id}")))
            .await
            .map_err(api_status)?;
        let mut nodes: Vec<String> = list
            .items
            .iter()
            .filter_map(|b| b.annotations().get(ANNOTATION_INITIATOR).cloned())
            .collect();
        nodes.sort();
        Ok(nodes)
    }
}

/// Whether the Target is being deleted (it waits for the agent's finalizer).
fn is_deleting(t: &Target) -> bool {
    t.metadata.deletion_timestamp.is_some()
}

/// A Kubernetes API failure as a gRPC status.
fn api_status(e: kube::Error) -> Status {
    match &e {
        kube::Error::Api(s) if s.code == 403 => Status::permission_denied(format!(
            "the Kubernetes API refused the driver: {} (check the ktgt-csi RBAC)",
            s.message
        )),
        kube::Error::Api(s) if s.code == 409 => {
            Status::aborted(format!("a concurrent change: {}; retry", s.message))
        }
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => Status::invalid_argument(format!(
            "the Kubernetes API rejected the object: {}",
            s.message
        )),
        _ => Status::unavailable(format!("the Kubernetes API: {e}")),
    }
}

/// The access modes a volume of one LUN can serve: on one node at a time (every SINGLE_NODE_*
/// mode), or read-only on many.
pub(crate) fn check_capability(cap: &proto::VolumeCapability) -> Result<(), String> {
    use volume_capability::access_mode::Mode;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .ok_or("volume capability without access_mode")?;
    let block = match &cap.access_type {
        Some(volume_capability::AccessType::Block(_)) => true,
        Some(volume_capability::AccessType::Mount(m)) => {
            if !["", "ext4", "xfs"].contains(&m.fs_type.as_str()) {
                return Err(format!(
                    "fs_type {:?} is not supported; use ext4 or xfs",
                    m.fs_type
                ));
            }
            false
        }
        None => return Err("volume capability without access_type (block or mount)".into()),
    };
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => Ok(()),
        Mode::MultiNodeReaderOnly => Ok(()),
        Mode::MultiNodeMultiWriter if block => Ok(()),
        Mode::MultiNodeMultiWriter => Err(
            "MULTI_NODE_MULTI_WRITER needs a raw block volume (a filesystem mounted on two nodes corrupts)"
                .into(),
        ),
        Mode::MultiNodeSingleWriter => {
            Err("MULTI_NODE_SINGLE_WRITER is not supported".into())
        }
        Mode::Unknown => Err("access mode UNKNOWN".into()),
    }
}

fn check_capabilities(caps: &[proto::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities missing"));
    }
    for cap in caps {
        check_capability(cap).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

/// The size to create for `range` (CSI CapacityRange: required_bytes is the floor,
/// limit_bytes the ceiling, 0 meaning unset), in whole MiB.
pub fn size_for(range: Option<&proto::CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: required_bytes and limit_bytes must not be negative",
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(Status::out_of_range(format!(
            "capacity_range: required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let want = if required == 0 {
        if limit != 0 {
            limit.min(DEFAULT_BYTES)
        } else {
            DEFAULT_BYTES
        }
    } else {
        required
    };
    let rounded = want.div_ceil(GRANULE).saturating_mul(GRANULE);
    if limit != 0 && rounded > limit {
        // Round down instead when the limit allows a whole MiB at or above the floor.
        let down = limit / GRANULE * GRANULE;
        if down >= required && down > 0 {
            return Ok(down);
        }
        return Err(Status::out_of_range(format!(
            "capacity_range: no size in whole MiB lies between {required} and {limit} bytes"
        )));
    }
    Ok(rounded)
}

/// A CHAP secret from the operating system's random source, each character uniform over
/// [`SECRET_CHARS`] (bytes at or above the largest multiple of its length are drawn again).
fn random_secret() -> Result<String, Status> {
    let n = SECRET_CHARS.len();
    let limit = 256 - 256 % n;
    let mut out = String::with_capacity(SECRET_LEN);
    while out.len() < SECRET_LEN {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| Status::internal(format!("no random bytes for a CHAP secret: {e}")))?;
        for b in bytes.iter().map(|b| *b as usize).filter(|b| *b < limit) {
            if out.len() < SECRET_LEN {
                out.push(SECRET_CHARS[b % n] as char);
            }
        }
    }
    Ok(out)
}

/// Whether `s` has the shape of an iSCSI initiator name (RFC 3720 §3.2.6: iqn., eui., naa.).
fn is_initiator_name(s: &str) -> bool {
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b));
    let hex = |h: &str, lens: &[usize]| {
        lens.contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit())
    };
    s.len() <= 223
        && ((s.starts_with("iqn.") && s.len() > 12 && ok_chars)
            || s.strip_prefix("eui.").is_some_and(|h| hex(h, &[16]))
            || s.strip_prefix("naa.").is_some_and(|h| hex(h, &[16, 32])))
}

#[tonic::async_trait]
impl proto::identity_server::Identity for ControllerService {
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
        // Ready when the API server answers a list of our Targets.
        let ready = match self.targets().list(&ListParams::default().limit(1)).await {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "probe: the Kubernetes API does not answer");
                false
            }
        };
        Ok(Response::new(proto::ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl proto::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name missing"));
        }
        check_capabilities(&req.volume_capabilities)?;
        let source = match &req.volume_content_source {
            None => None,
            Some(s) => Some(Source::from_request(s).ok_or_else(|| {
                Status::invalid_argument(
                    "volume_content_source names neither a snapshot nor a volume",
                )
            })?),
        };
        let mut pool_name: Option<&str> = None;
        let mut block_size = None;
        let mut chap = volume::ChapMode::None;
        for (k, v) in &req.parameters {
            match k.as_str() {
                "pool" => pool_name = Some(v.as_str()),
                "chap" => {
                    chap = volume::ChapMode::parse(v).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "parameter chap: {v:?}; use none, oneway or mutual"
                        ))
                    })?
                }
                "blockSize" => {
                    block_size = Some(match v.as_str() {
                        "512" => 512,
                        "4096" => 4096,
                        _ => {
                            return Err(Status::invalid_argument(format!(
                                "parameter blockSize: {v:?}; use 512 or 4096"
                            )))
                        }
                    })
                }
                k if k.starts_with("csi.storage.k8s.io/") => {}
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown parameter {other:?}; the parameters are {}",
                        PARAMETERS.join(", ")
                    )))
                }
            }
        }
        let mut bytes = size_for(req.capacity_range.as_ref())?;
        let id = volume::target_name(&req.name);
        // An xfs volume is at least what mkfs.xfs formats (CSI v1.12, CapacityRange: the
        // plugin may make a volume larger than required_bytes, up to limit_bytes).
        let wants_xfs = req.volume_capabilities.iter().any(|c| {
            matches!(&c.access_type, Some(volume_capability::AccessType::Mount(m)) if m.fs_type == "xfs")
        });
        if wants_xfs && bytes < crate::XFS_MIN_BYTES {
            let limit = req
                .capacity_range
                .as_ref()
                .map_or(0, |r| r.limit_bytes.max(0) as u64);
            if limit != 0 && limit < crate::XFS_MIN_BYTES {
                return Err(Status::out_of_range(format!(
                    "capacity_range: limit_bytes {limit} is below 300 MiB, the smallest filesystem mkfs.xfs makes"
                )));
            }
            bytes = crate::XFS_MIN_BYTES;
        }
        // A copy is made on its source's filesystem: the source's pool, at least its size.
        let clone = match &source {
            None => None,
            Some(src) => {
                let c = self.clone_source(src).await?;
                if let Some(p) = pool_name.filter(|p| *p != c.pool) {
                    return Err(Status::invalid_argument(format!(
                        "parameter pool: {p:?}, but the source is in pool {:?}, and a copy is made on its source's filesystem",
                        c.pool
                    )));
                }
                let floor = c.bytes.div_ceil(GRANULE).saturating_mul(GRANULE);
                let limit = req
                    .capacity_range
                    .as_ref()
                    .map_or(0, |r| r.limit_bytes.max(0) as u64);
                if req.capacity_range.is_none() || bytes < floor {
                    bytes = floor;
                }
                if limit != 0 && bytes > limit {
                    return Err(Status::out_of_range(format!(
                        "capacity_range: the source has {} bytes, more than limit_bytes {limit}; a copy cannot be smaller than its source",
                        c.bytes
                    )));
                }
                Some(c)
            }
        };

        // Idempotent: the name maps to one Target.
        if let Some(existing) = self.targets().get_opt(&id).await.map_err(api_status)? {
            if is_deleting(&existing) {
                return Err(Status::aborted(format!(
                    "volume {:?} is still being deleted; retry",
                    req.name
                )));
            }
            return match (volume::csi_name(&existing), volume::capacity(&existing)) {
                (Some(n), Some(have)) if n == req.name => {
                    let fits = req.capacity_range.as_ref().is_none_or(|r| {
                        (r.required_bytes as u64) <= have
                            && (r.limit_bytes == 0 || have <= r.limit_bytes as u64)
                    });
                    if !fits {
                        return Err(Status::already_exists(format!(
                            "volume {:?} exists with {have} bytes, which the requested capacity range does not allow",
                            req.name
                        )));
                    }
                    if Source::of(&existing) != source {
                        return Err(Status::already_exists(format!(
                            "volume {:?} exists with another content source",
                            req.name
                        )));
                    }
                    let t = match source {
                        Some(_) => self.wait_for_clone(&id).await?,
                        None => existing,
                    };
                    Ok(Response::new(proto::CreateVolumeResponse {
                        volume: Some(Self::volume_message(&t)),
                    }))
                }
                _ => Err(Status::already_exists(format!(
                    "Target {id} exists and is not the volume {:?}",
                    req.name
                ))),
            };
        }

        let volumes = self.volumes().await?;
        let pool_name = clone.as_ref().map(|c| c.pool.as_str()).or(pool_name);
        let pool = match pool_name {
            Some(p) => {
                let pool = self.pools.get(p).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "parameter pool: no pool {p:?} (pools: {})",
                        self.pools
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                let free = Self::free_bytes(pool, &volumes);
                if free < bytes {
                    return Err(Status::resource_exhausted(format!(
                        "pool {p} has {free} bytes free, {bytes} asked"
                    )));
                }
                pool
            }
            // A pool on the first preferred storage node that has room (CSI v1.12,
            // TopologyRequirement: "the SP SHOULD attempt to make the provisioned volume
            // available using the preferred topologies in order from first to last"), else
            // the pool with the most room: every node reaches every pool, so `requisite`
            // never rules a pool out.
            None => {
                let roomiest = |on: Option<&str>| {
                    self.pools
                        .iter()
                        .filter(|p| on.is_none_or(|n| p.node == n))
                        .map(|p| (Self::free_bytes(p, &volumes), p))
                        .filter(|(free, _)| *free >= bytes)
                        .max_by_key(|(free, _)| *free)
                        .map(|(_, p)| p)
                };
                preferred_nodes(req.accessibility_requirements.as_ref())
                    .iter()
                    .find_map(|n| roomiest(Some(n)))
                    .or_else(|| roomiest(None))
                    .ok_or_else(|| {
                        Status::resource_exhausted(format!("no pool has {bytes} bytes free"))
                    })?
            }
        };

        let mut target = volume::target(&req.name, pool, bytes, block_size);
        if let (Some(src), Some(c)) = (&source, &clone) {
            snapshot::clone_into(&mut target, src, &c.file);
        }
        if chap != volume::ChapMode::None {
            // The Secrets first: the agent serves the Target only with its accounts.
            self.ensure_chap_secrets(&id, &req.name, chap).await?;
            target.spec.chap = volume::target_chap(&req.name, &self.secret_namespace, chap);
        }
        match self.targets().create(&PostParams::default(), &target).await {
            Ok(t) => {
                info!(volume = %req.name, volume_id = %id, pool = %pool.name, bytes,
                    source = ?source, "volume created");
                let t = match source {
                    Some(_) => self.wait_for_clone(&id).await?,
                    None => t,
                };
                Ok(Response::new(proto::CreateVolumeResponse {
                    volume: Some(Self::volume_message(&t)),
                }))
            }
            // A concurrent CreateVolume of the same name won: the caller retries and finds it.
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Status::aborted(format!(
                "volume {:?} is being created by a concurrent call; retry",
                req.name
            ))),
            Err(e) => Err(api_status(e)),
        }
    }

    async fn delete_volume(
        &self,
        request: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id missing"));
        }
        if !volume::is_volume_id(&id) {
            // Never made by this driver: nothing to delete (CSI: deleting an absent volume
            // succeeds).
            return Ok(Response::new(proto::DeleteVolumeResponse {}));
        }
        self.remove_volume(&id).await?;
        Ok(Response::new(proto::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<proto::ControllerPublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id missing"));
        }
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id missing"));
        }
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability missing"))?;
        check_capability(cap).map_err(Status::invalid_argument)?;
        let target = self.volume(&req.volume_id).await?;
        if !is_initiator_name(&req.node_id) {
            return Err(Status::not_found(format!(
                "node {:?} does not exist: node ids of this driver are the nodes' iSCSI initiator names",
                req.node_id
            )));
        }
        let pp = PatchParams::apply(MANAGER).force();
        let group = volume::group(&req.node_id);
        self.groups()
            .patch(
                &volume::group_name(&req.node_id),
                &pp,
                &Patch::Apply(&group),
            )
            .await
            .map_err(api_status)?;
        let binding = volume::binding(&req.volume_id, &req.node_id);
        self.bindings()
            .patch(
                &volume::binding_name(&req.volume_id, &req.node_id),
                &pp,
                &Patch::Apply(&binding),
            )
            .await
            .map_err(api_status)?;
        let pool = volume::pool_of(&target).unwrap_or_default().to_owned();
        let node = target.spec.node_name.clone().unwrap_or_default();
        let portal = self.portal(&pool, &node).await?;
        info!(volume_id = %req.volume_id, node = %req.node_id, "volume published");
        let context = [
            ("iqn".to_owned(), target.spec.iqn.clone()),
            ("lun".to_owned(), volume::LUN.to_string()),
            ("portal".to_owned(), portal),
            ("readonly".to_owned(), req.readonly.to_string()),
        ]
        .into_iter()
        .collect();
        Ok(Response::new(proto::ControllerPublishVolumeResponse {
            publish_context: context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<proto::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id missing"));
        }
        if !volume::is_volume_id(&req.volume_id) {
            return Ok(Response::new(proto::ControllerUnpublishVolumeResponse {}));
        }
        if req.node_id.is_empty() {
            // CSI: "If the node ID is not set, the SP MUST unpublish the volume from all nodes".
            let list = self
                .bindings()
                .list(&ListParams::default().labels(&format!("{LABEL_VOLUME}={}", req.volume_id)))
                .await
                .map_err(api_status)?;
            for b in list.items {
                delete_ignoring_absent(&self.bindings(), &b.name_any()).await?;
            }
        } else {
            delete_ignoring_absent(
                &self.bindings(),
                &volume::binding_name(&req.volume_id, &req.node_id),
            )
            .await?;
        }
        info!(volume_id = %req.volume_id, node = %req.node_id, "volume unpublished");
        Ok(Response::new(proto::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<proto::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id missing"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities missing"));
        }
        self.volume(&req.volume_id).await?;
        for k in req.parameters.keys() {
            if !PARAMETERS.contains(&k.as_str()) && !k.starts_with("csi.storage.k8s.io/") {
                return Ok(Response::new(proto::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: format!("unknown parameter {k:?}"),
                }));
            }
        }
        for cap in &req.volume_capabilities {
            if let Err(why) = check_capability(cap) {
                return Ok(Response::new(proto::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                }));
            }
        }
        Ok(Response::new(proto::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(proto::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: Default::default(),
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        // A volume being deleted (its Target waits for the agent's finalizer) is gone for
        // the CO: DeleteVolume has succeeded.
        let volumes: Vec<Target> = self
            .volumes()
            .await?
            .into_iter()
            .filter(|t| !is_deleting(t))
            .collect();
        let (range, next_token) = page(volumes.len(), &req.starting_token, req.max_entries)?;
        let page = &volumes[range];
        let mut entries = Vec::with_capacity(page.len());
        for t in page {
            let published = self.published_to(&t.name_any()).await?;
            entries.push(proto::list_volumes_response::Entry {
                volume: Some(Self::volume_message(t)),
                status: Some(proto::list_volumes_response::VolumeStatus {
                    published_node_ids: published,
                    volume_condition: None,
                }),
            });
        }
        Ok(Response::new(proto::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        for cap in &req.volume_capabilities {
            if check_capability(cap).is_err() {
                // CSI: capacity for capabilities the plugin cannot provide is 0.
                return Ok(Response::new(proto::GetCapacityResponse::default()));
            }
        }
        let volumes = self.volumes().await?;
        let mut pools: Vec<&Pool> = self.pools.iter().collect();
        if let Some(p) = req.parameters.get("pool") {
            pools.retain(|pool| pool.name == *p);
        }
        let free: u64 = pools.iter().map(|p| Self::free_bytes(p, &volumes)).sum();
        let largest: u64 = pools
            .iter()
            .map(|p| Self::free_bytes(p, &volumes))
            .max()
            .unwrap_or(0);
        Ok(Response::new(proto::GetCapacityResponse {
            available_capacity: i64::try_from(free).unwrap_or(i64::MAX),
            maximum_volume_size: Some(i64::try_from(largest).unwrap_or(i64::MAX)),
            minimum_volume_size: Some(GRANULE as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::{rpc, Rpc, Type};
        let caps = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::PublishUnpublishVolume,
            rpc::Type::ListVolumes,
            rpc::Type::ListVolumesPublishedNodes,
            rpc::Type::GetCapacity,
            rpc::Type::GetVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
        ]
        .into_iter()
        .map(|t| proto::ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(proto::ControllerGetCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<proto::ControllerGetVolumeRequest>,
    ) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id missing"));
        }
        let t = self.volume(&id).await?;
        let published = self.published_to(&id).await?;
        Ok(Response::new(proto::ControllerGetVolumeResponse {
            volume: Some(Self::volume_message(&t)),
            status: Some(proto::controller_get_volume_response::VolumeStatus {
                published_node_ids: published,
                volume_condition: None,
            }),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name missing"));
        }
        if req.source_volume_id.is_empty() {
            return Err(Status::invalid_argument("source_volume_id missing"));
        }
        if let Some(k) = req
            .parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(Status::invalid_argument(format!(
                "unknown parameter {k:?}; snapshots take none"
            )));
        }
        let id = snapshot::snapshot_id(&req.name);
        if let Some(existing) = self.snapshots().get_opt(&id).await.map_err(api_status)? {
            if existing.metadata.deletion_timestamp.is_some() {
                return Err(Status::aborted(format!(
                    "snapshot {:?} is still being deleted; retry",
                    req.name
                )));
            }
            // CSI v1.12, CreateSnapshot errors: "Snapshot already exists but is incompatible
            // ... with the specified volume_id": ALREADY_EXISTS.
            if snapshot::csi_name(&existing) != Some(req.name.as_str())
                || snapshot::source_volume(&existing) != req.source_volume_id
            {
                return Err(Status::already_exists(format!(
                    "snapshot {:?} exists and is a copy of volume {}, not of {}",
                    req.name,
                    snapshot::source_volume(&existing),
                    req.source_volume_id
                )));
            }
        } else {
            let source = self.volume(&req.source_volume_id).await?;
            let object = snapshot::snapshot(&req.name, &source).ok_or_else(|| {
                Status::internal(format!(
                    "volume {} has no node or no LUN 0 file",
                    req.source_volume_id
                ))
            })?;
            match self
                .snapshots()
                .create(&PostParams::default(), &object)
                .await
            {
                Ok(_) => {
                    info!(snapshot = %req.name, snapshot_id = %id, volume_id = %req.source_volume_id, "snapshot asked for")
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    return Err(Status::aborted(format!(
                        "snapshot {:?} is being created by a concurrent call; retry",
                        req.name
                    )))
                }
                Err(e) => return Err(api_status(e)),
            }
        }
        let s = self.wait_for_snapshot(&id).await?;
        Ok(Response::new(proto::CreateSnapshotResponse {
            snapshot: Some(snapshot::message(&s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id missing"));
        }
        // CSI v1.12, DeleteSnapshot: "If a snapshot corresponding to the specified
        // snapshot_id does not exist ... the Plugin MUST reply 0 OK". A copy is independent
        // of the volumes cloned from it (their extents are their own), so it is never in use.
        if snapshot::is_snapshot_id(&id) {
            match self.snapshots().get_opt(&id).await.map_err(api_status)? {
                Some(s) if snapshot::csi_name(&s).is_some() => {
                    delete_ignoring_absent(&self.snapshots(), &id).await?;
                    info!(snapshot_id = %id, "snapshot deleted");
                }
                Some(_) => {
                    return Err(Status::failed_precondition(format!(
                        "TargetSnapshot {id} was not made by this driver; not deleting it"
                    )))
                }
                None => {}
            }
        }
        Ok(Response::new(proto::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let list = self
            .snapshots()
            .list(&ListParams::default().labels(&format!("{LABEL_MANAGED}=true")))
            .await
            .map_err(api_status)?;
        // A snapshot being deleted is gone for the CO, as a volume is.
        let mut items: Vec<TargetSnapshot> = list
            .items
            .into_iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter(|s| req.snapshot_id.is_empty() || s.name_any() == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty()
                    || snapshot::source_volume(s) == req.source_volume_id
            })
            .collect();
        items.sort_by_key(|s| s.name_any());
        let (range, next_token) = page(items.len(), &req.starting_token, req.max_entries)?;
        Ok(Response::new(proto::ListSnapshotsResponse {
            entries: items[range]
                .iter()
                .map(|s| proto::list_snapshots_response::Entry {
                    snapshot: Some(snapshot::message(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        _: Request<proto::GetSnapshotRequest>,
    ) -> Result<Response<proto::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented(
            "snapshots are not supported (no GET_SNAPSHOT capability)",
        ))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id missing"));
        }
        if req.capacity_range.is_none() {
            return Err(Status::invalid_argument("capacity_range missing"));
        }
        if let Some(cap) = &req.volume_capability {
            check_capability(cap).map_err(Status::invalid_argument)?;
        }
        let t = self.volume(&req.volume_id).await?;
        let have = volume::capacity(&t)
            .ok_or_else(|| Status::internal(format!("volume {} records no size", req.volume_id)))?;
        let want = size_for(req.capacity_range.as_ref())?;
        // CSI v1.12, ControllerExpandVolume: a volume already at or above the requested size
        // succeeds with its size (idempotent; a LUN never shrinks).
        if want > have {
            let pool_name = volume::pool_of(&t).unwrap_or_default();
            if let Some(pool) = self.pools.get(pool_name) {
                let free = Self::free_bytes(pool, &self.volumes().await?);
                if free < want - have {
                    return Err(Status::resource_exhausted(format!(
                        "pool {pool_name} has {free} bytes free, growing {} from {have} to {want} bytes needs {}",
                        req.volume_id,
                        want - have
                    )));
                }
            }
            let patch = volume::resize_patch(&t, want).ok_or_else(|| {
                Status::internal(format!("volume {} has no LUN 0", req.volume_id))
            })?;
            self.targets()
                .patch(
                    &req.volume_id,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(api_status)?;
            info!(volume_id = %req.volume_id, from = have, to = want, "volume expanded");
        }
        Ok(Response::new(proto::ControllerExpandVolumeResponse {
            capacity_bytes: want.max(have) as i64,
            // The node rescans the disk (and grows a filesystem) once the LUN has grown.
            node_expansion_required: true,
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "volume modification is not supported (no MODIFY_VOLUME capability)",
        ))
    }
}

/// The storage nodes a CreateVolume prefers, in order: the `topology.csi.ktgt.io/node` values
/// of its preferred topologies (the provisioner puts the node a WaitForFirstConsumer claim's
/// Pod was scheduled to first).
fn preferred_nodes(req: Option<&proto::TopologyRequirement>) -> Vec<String> {
    req.map(|r| {
        r.preferred
            .iter()
            .filter_map(|t| t.segments.get(crate::node::TOPOLOGY_NODE).cloned())
            .collect()
    })
    .unwrap_or_default()
}

/// The slice of a sorted list of `len` entries that a List call with `token` and
/// `max_entries` returns, and the token of the next page (empty at the end). The token is the
/// index of the next entry. CSI v1.12, ListVolumes / ListSnapshots errors: "Invalid
/// starting_token: 10 ABORTED".
fn page(
    len: usize,
    token: &str,
    max_entries: i32,
) -> Result<(std::ops::Range<usize>, String), Status> {
    let start = if token.is_empty() {
        0
    } else {
        match token.parse::<usize>() {
            Ok(n) if n <= len => n,
            _ => {
                return Err(Status::aborted(format!(
                    "starting_token {token:?} is not one this driver returned (or the list shrank past it)"
                )))
            }
        }
    };
    if max_entries < 0 {
        return Err(Status::invalid_argument("max_entries must not be negative"));
    }
    let max = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let end = start.saturating_add(max).min(len);
    let next = if end < len {
        end.to_string()
    } else {
        String::new()
    };
    Ok((start..end, next))
}

async fn delete_ignoring_absent<K>(api: &Api<K>, name: &str) -> Result<(), Status>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(api_status(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volume_capability::access_mode::Mode;

    fn cap(mode: Mode, block: bool, fs: &str) -> proto::VolumeCapability {
        proto::VolumeCapability {
            access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                volume_capability::AccessType::Block(Default::default())
            } else {
                volume_capability::AccessType::Mount(volume_capability::MountVolume {
                    fs_type: fs.to_owned(),
                    ..Default::default()
                })
            }),
        }
    }

    #[test]
    fn chap_secrets_are_random_and_of_the_safe_characters() {
        let a = random_secret().unwrap();
        let b = random_secret().unwrap();
        assert_eq!(a.len(), SECRET_LEN);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| SECRET_CHARS.contains(&c)), "{a}");
    }

    #[test]
    fn sizes_follow_the_capacity_range() {
        let r = |required: i64, limit: i64| proto::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        assert_eq!(size_for(None).unwrap(), DEFAULT_BYTES);
        assert_eq!(size_for(Some(&r(1, 0))).unwrap(), GRANULE);
        assert_eq!(size_for(Some(&r(10 << 20, 0))).unwrap(), 10 << 20);
        assert_eq!(size_for(Some(&r(0, 5 << 20))).unwrap(), 5 << 20);
        assert_eq!(size_for(Some(&r((1 << 20) + 1, 3 << 20))).unwrap(), 2 << 20);
        assert_eq!(size_for(Some(&r(0, 4 << 30))).unwrap(), DEFAULT_BYTES);
        assert_eq!(
            size_for(Some(&r(10, 5))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(Some(&r(100, 200))).unwrap_err().code(),
            tonic::Code::OutOfRange,
            "no whole MiB between 100 and 200 bytes"
        );
        assert_eq!(
            size_for(Some(&r(-1, 0))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn capabilities_one_node_at_a_time_or_read_only() {
        assert!(check_capability(&cap(Mode::SingleNodeWriter, false, "ext4")).is_ok());
        assert!(check_capability(&cap(Mode::SingleNodeWriter, false, "")).is_ok());
        assert!(check_capability(&cap(Mode::SingleNodeMultiWriter, true, "")).is_ok());
        assert!(check_capability(&cap(Mode::MultiNodeReaderOnly, false, "xfs")).is_ok());
        assert!(check_capability(&cap(Mode::MultiNodeMultiWriter, true, "")).is_ok());
        let e = check_capability(&cap(Mode::MultiNodeMultiWriter, false, "ext4")).unwrap_err();
        assert!(e.contains("raw block"), "{e}");
        let e = check_capability(&cap(Mode::SingleNodeWriter, false, "btrfs")).unwrap_err();
        assert!(e.contains("btrfs"), "{e}");
        assert!(check_capability(&proto::VolumeCapability::default()).is_err());
    }

    #[test]
    fn preferred_storage_nodes_come_in_order() {
        let topo = |node: &str| proto::Topology {
            segments: [(crate::node::TOPOLOGY_NODE.to_owned(), node.to_owned())]
                .into_iter()
                .collect(),
        };
        let req = proto::TopologyRequirement {
            requisite: vec![topo("a"), topo("b"), topo("c")],
            preferred: vec![
                topo("b"),
                proto::Topology {
                    segments: [("zone".to_owned(), "z1".to_owned())].into_iter().collect(),
                },
                topo("a"),
            ],
        };
        assert_eq!(preferred_nodes(Some(&req)), vec!["b", "a"]);
        assert!(preferred_nodes(None).is_empty());
    }

    #[test]
    fn pages_end_with_an_empty_token_and_bad_tokens_are_aborted() {
        assert_eq!(page(5, "", 2).unwrap(), (0..2, "2".to_owned()));
        assert_eq!(page(5, "4", 2).unwrap(), (4..5, String::new()));
        assert_eq!(page(5, "", 0).unwrap(), (0..5, String::new()));
        assert_eq!(page(0, "", 0).unwrap(), (0..0, String::new()));
        assert_eq!(page(5, "6", 1).unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(page(5, "x", 1).unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(
            page(5, "", -1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn node_ids_are_initiator_names() {
        assert!(is_initiator_name("iqn.1994-05.com.redhat:abc123"));
        assert!(is_initiator_name("eui.0123456789abcdef"));
        assert!(!is_initiator_name("some-fake-node-id"));
        assert!(!is_initiator_name("iqn.X"));
        assert!(!is_initiator_name("IQN.1994-05.COM.REDHAT:ABC"));
    }
}
