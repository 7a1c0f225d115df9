//! Snapshots and clones: a CSI snapshot is a TargetSnapshot (a reflink copy of the volume's
//! file, made by the agent of the volume's node), and a volume made from a snapshot or from
//! another volume is a Target whose LUN is created as a reflink copy (`cloneFrom`). Pure:
//! names, objects and their CSI messages; the RPCs are in [`crate::controller`].
//!
//! A copy shares the source's extents, so it is instant and takes no space until written;
//! it is only possible on the source's filesystem, so a snapshot and a clone live in the
//! source volume's pool. Where the pool's filesystem cannot reflink (ext4), the agent says
//! so (`CloneUnsupported`) and the RPC answers FAILED_PRECONDITION: no silent data copy.

use std::collections::BTreeMap;

use ktgt_operator::api::{Target, TargetLun};
use ktgt_operator::api::{TargetReference, TargetSnapshot, TargetSnapshotSpec};
use kube::api::ObjectMeta;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::proto;
use crate::volume::{
    self, ANNOTATION_CAPACITY, ANNOTATION_DELETE_BACKING, ANNOTATION_NAME, LABEL_MANAGED,
    LABEL_POOL,
};

/// Label on a TargetSnapshot: the volume (Target name) it is a copy of.
pub const LABEL_SOURCE_VOLUME: &str = "csi.ktgt.io/source-volume";
/// Annotation on a cloned volume's Target: `snapshot/<id>` or `volume/<id>`, its content
/// source (CreateVolume's answer carries it back).
pub const ANNOTATION_CONTENT_SOURCE: &str = "csi.ktgt.io/content-source";

/// The snapshot id (and TargetSnapshot name) for the CSI snapshot name `name`.
pub fn snapshot_id(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!("snap-{}", hex::encode(&digest[..10]))
}

/// Whether `id` has the shape of a snapshot id this driver makes.
pub fn is_snapshot_id(id: &str) -> bool {
    id.strip_prefix("snap-")
        .is_some_and(|h| h.len() == 20 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The directory of a volume's file: its pool's path.
fn dir_of(t: &Target) -> Option<&str> {
    let file = t.spec.luns.iter().find(|l| l.lun == volume::LUN)?;
    let path = file.backing_store.as_deref()?;
    path.rsplit_once('/').map(|(dir, _)| dir)
}

/// The TargetSnapshot of a new snapshot `name` of volume Target `source`: its copy goes
/// beside the volume's file (the same filesystem), `<pool dir>/<snapshot id>.img`.
pub fn snapshot(name: &str, source: &Target) -> Option<TargetSnapshot> {
    let id = snapshot_id(name);
    let dir = dir_of(source)?;
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_SOURCE_VOLUME.to_owned(), source.name_any()),
    ]);
    if let Some(pool) = volume::pool_of(source) {
        labels.insert(LABEL_POOL.to_owned(), pool.to_owned());
    }
    let mut annotations = BTreeMap::from([
        (ANNOTATION_NAME.to_owned(), name.to_owned()),
        (ANNOTATION_DELETE_BACKING.to_owned(), "true".to_owned()),
    ]);
    if let Some(bytes) = volume::capacity(source) {
        annotations.insert(ANNOTATION_CAPACITY.to_owned(), bytes.to_string());
    }
    let mut s = TargetSnapshot::new(
        &id,
        TargetSnapshotSpec {
            node_name: source.spec.node_name.clone()?,
            target_ref: TargetReference {
                name: source.name_any(),
            },
            lun: volume::LUN,
            path: format!("{dir}/{id}.img"),
        },
    );
    s.metadata = ObjectMeta {
        name: Some(id),
        labels: Some(labels),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    };
    Some(s)
}

/// The CSI snapshot name a TargetSnapshot was created for.
pub fn csi_name(s: &TargetSnapshot) -> Option<&str> {
    s.annotations().get(ANNOTATION_NAME).map(String::as_str)
}

/// The volume a snapshot is a copy of.
pub fn source_volume(s: &TargetSnapshot) -> &str {
    &s.spec.target_ref.name
}

/// Bytes of the copy: what the agent measured, else the source's size when it was asked.
pub fn size(s: &TargetSnapshot) -> Option<u64> {
    s.status
        .as_ref()
        .and_then(|st| st.size.as_ref())
        .and_then(|q| q.0.parse().ok())
        .or_else(|| s.annotations().get(ANNOTATION_CAPACITY)?.parse().ok())
}

/// Whether the agent made the copy.
pub fn is_ready(s: &TargetSnapshot) -> bool {
    s.status.as_ref().is_some_and(|st| st.ready_to_use)
}

/// Why the agent could not make the copy: (reason, message) of a `Ready: False` condition.
pub fn failure(s: &TargetSnapshot) -> Option<(&str, &str)> {
    let c = s
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "False")?;
    Some((
        c.reason.as_deref().unwrap_or(""),
        c.message.as_deref().unwrap_or(""),
    ))
}

/// The snapshot as CSI describes it. `creation_time`: when the agent made the copy, else
/// when the object was created (CSI requires one even before the snapshot is ready).
pub fn message(s: &TargetSnapshot) -> proto::Snapshot {
    let taken = s
        .status
        .as_ref()
        .and_then(|st| st.creation_time.as_deref())
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .or_else(|| s.metadata.creation_timestamp.as_ref().map(|t| t.0));
    proto::Snapshot {
        size_bytes: size(s).map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        snapshot_id: s.name_any(),
        source_volume_id: source_volume(s).to_owned(),
        creation_time: taken.map(|t| prost_types::Timestamp {
            seconds: t.as_second(),
            nanos: t.subsec_nanosecond(),
        }),
        ready_to_use: is_ready(s),
        group_snapshot_id: String::new(),
    }
}

/// What a new volume is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

impl Source {
    /// From CreateVolume's `volume_content_source`; `None` when it names nothing.
    pub fn from_request(s: &proto::VolumeContentSource) -> Option<Source> {
        use proto::volume_content_source::Type;
        match s.r#type.as_ref()? {
            Type::Snapshot(s) => Some(Source::Snapshot(s.snapshot_id.clone())),
            Type::Volume(v) => Some(Source::Volume(v.volume_id.clone())),
        }
    }

    /// The annotation value ([`ANNOTATION_CONTENT_SOURCE`]).
    pub fn annotation(&self) -> String {
        match self {
            Source::Snapshot(id) => format!("snapshot/{id}"),
            Source::Volume(id) => format!("volume/{id}"),
        }
    }

    /// The content source a volume Target records, if it was made from one.
    pub fn of(t: &Target) -> Option<Source> {
        let v = t.annotations().get(ANNOTATION_CONTENT_SOURCE)?;
        match v.split_once('/')? {
            ("snapshot", id) => Some(Source::Snapshot(id.to_owned())),
            ("volume", id) => Some(Source::Volume(id.to_owned())),
            _ => None,
        }
    }

    pub fn message(&self) -> proto::VolumeContentSource {
        use proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
        proto::VolumeContentSource {
            r#type: Some(match self {
                Source::Snapshot(id) => Type::Snapshot(SnapshotSource {
                    snapshot_id: id.clone(),
                }),
                Source::Volume(id) => Type::Volume(VolumeSource {
                    volume_id: id.clone(),
                }),
            }),
        }
    }
}

/// Makes volume Target `t` a copy of `file` (its LUN is created as a reflink of it) and
/// records where it came from.
pub fn clone_into(t: &mut Target, source: &Source, file: &str) {
    if let Some(lun) = t.spec.luns.iter_mut().find(|l| l.lun == volume::LUN) {
        *lun = TargetLun {
            clone_from: Some(file.to_owned()),
            ..lun.clone()
        };
    }
    t.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_CONTENT_SOURCE.to_owned(), source.annotation());
}

/// Where the agent stands with a cloned volume's LUN: served, failed (reason, message), or
/// not looked at yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneState {
    Served,
    Failed { reason: String, message: String },
    Pending,
}

/// The clone state from a volume Target's status.
pub fn clone_state(t: &Target) -> CloneState {
    let Some(status) = &t.status else {
        return CloneState::Pending;
    };
    let served = status
        .observed_state
        .as_ref()
        .is_some_and(|o| o.luns.iter().any(|l| l.lun == Some(volume::LUN)));
    if served {
        return CloneState::Served;
    }
    let failed = status
        .conditions
        .iter()
        .find(|c| (c.type_ == "LUNFailed" || c.type_ == "TargetFailed") && c.status == "True");
    match failed {
        Some(c) => CloneState::Failed {
            reason: c.reason.clone().unwrap_or_default(),
            message: c.message.clone().unwrap_or_default(),
        },
        None => CloneState::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pools::Pool;

    fn volume() -> Target {
        let pool =
            Pool::parse("name=fast,node=storage-1,path=/var/lib/ktgt/csi/fast,capacity=10Gi")
                .unwrap();
        volume::target("pvc-1", &pool, 1 << 30, None)
    }

    #[test]
    fn a_snapshot_lives_beside_its_volume_on_the_volumes_node() {
        let v = volume();
        let s = snapshot("snapshot-1", &v).unwrap();
        let id = snapshot_id("snapshot-1");
        assert!(is_snapshot_id(&id), "{id}");
        assert!(!is_snapshot_id(&v.name_any()));
        assert_eq!(s.name_any(), id);
        assert_eq!(s.spec.node_name, "storage-1");
        assert_eq!(s.spec.target_ref.name, v.name_any());
        assert_eq!(s.spec.path, format!("/var/lib/ktgt/csi/fast/{id}.img"));
        assert_eq!(s.labels()[LABEL_POOL], "fast");
        assert_eq!(s.labels()[LABEL_SOURCE_VOLUME], v.name_any());
        assert_eq!(csi_name(&s), Some("snapshot-1"));
        assert_eq!(size(&s), Some(1 << 30));
        assert!(!is_ready(&s));
        let m = message(&s);
        assert_eq!(
            (
                m.snapshot_id.as_str(),
                m.source_volume_id.as_str(),
                m.size_bytes
            ),
            (id.as_str(), v.name_any().as_str(), 1 << 30)
        );
    }

    #[test]
    fn a_clone_records_its_source_and_copies_the_file() {
        let mut v = volume();
        let src = Source::Snapshot(snapshot_id("s"));
        clone_into(&mut v, &src, "/var/lib/ktgt/csi/fast/x.img");
        assert_eq!(
            v.spec.luns[0].clone_from.as_deref(),
            Some("/var/lib/ktgt/csi/fast/x.img")
        );
        assert_eq!(Source::of(&v), Some(src.clone()));
        assert_eq!(Source::from_request(&src.message()), Some(src));
        assert_eq!(Source::of(&volume()), None);
        assert_eq!(clone_state(&v), CloneState::Pending);
    }
}
