//! ktgt's CSI driver, `csi.ktgt.io`: dynamic provisioning where every volume is an ordinary
//! Target of the `tgtd.unstable.cloud/v1alpha1` API, served by the node agent that already
//! serves hand-written Targets.
//!
//! # Layout
//! - [`proto`]: the CSI spec's messages and services (`proto/csi.proto`, CSI v1.12.0).
//! - [`pools`]: where volumes are made: `--pool name=…,node=…,path=…,capacity=…`.
//! - [`volume`]: the mapping between a CSI volume and its Target (names, labels, the spec).
//! - [`snapshot`]: snapshots (TargetSnapshots: reflink copies) and volumes cloned from them.
//! - [`controller`]: the Identity and Controller services on top of the Kubernetes API.
//! - [`node`]: the Identity and Node services: iscsiadm login, mkfs, mount on each node.
//! - [`host`]: what the node service reads (sysfs, mountinfo, blkid) and runs.
//! - [`endpoint`]: serving on `unix://PATH`, the CSI convention.
//!
//! # What a volume is
//! CreateVolume writes a Target named after the CSI volume name (`csi-` and 20 hex digits of
//! its SHA-256, so a retried CreateVolume finds the same object) on the pool's node, with one
//! LUN (0) on a file of the pool's directory that the agent creates sparse at the volume's
//! size. ControllerPublishVolume grants one node's initiator, and only it, access: an
//! InitiatorGroup per initiator name and an InitiatorGroupBinding per (volume, node);
//! ControllerUnpublishVolume deletes the binding, and the agent logs that initiator's sessions
//! out at once.

pub mod controller;
pub mod endpoint;
pub mod host;
pub mod node;
pub mod pools;
pub mod snapshot;
pub mod volume;

/// The CSI spec's generated messages and services (package `csi.v1`).
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// The smallest xfs volume: mkfs.xfs refuses less ("Filesystem must be larger than 300MB",
/// xfsprogs 6.1; 300 MiB exactly is accepted). CreateVolume makes xfs volumes at least this
/// big, and NodeStageVolume refuses to format a smaller disk with FAILED_PRECONDITION.
pub const XFS_MIN_BYTES: u64 = 300 << 20;

/// The driver's name, as StorageClasses and CSIDriver objects name it.
pub const DRIVER_NAME: &str = "csi.ktgt.io";

/// GetPluginInfo's answer, the same from both services.
pub fn plugin_info() -> proto::GetPluginInfoResponse {
    proto::GetPluginInfoResponse {
        name: DRIVER_NAME.to_owned(),
        vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
        manifest: Default::default(),
    }
}

/// GetPluginCapabilities' answer, the same from both services. CSI v1.12, GetPluginCapabilities:
/// "All instances of the same version of a Plugin SHALL return the same set of capabilities,
/// regardless of both: (a) where instances are deployed on the cluster as well as; (b) which
/// RPCs an instance is serving."
pub fn plugin_capabilities() -> proto::GetPluginCapabilitiesResponse {
    use proto::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
    proto::GetPluginCapabilitiesResponse {
        capabilities: vec![
            proto::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            },
            // Topology: NodeGetInfo names the node, and CreateVolume prefers a pool on the
            // first preferred node (data next to its Pod). Volumes are reachable from every
            // node, so CreateVolume returns no accessible_topology ("the CO MAY assume the
            // volume is equally accessible from all nodes in the cluster").
            proto::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::VolumeAccessibilityConstraints as i32,
                })),
            },
            // LUNs grow live, under a mounted filesystem and a running session.
            proto::PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ],
    }
}
