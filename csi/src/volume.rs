//! A CSI volume as Kubernetes objects: its Target, and per attached node an InitiatorGroup
//! and an InitiatorGroupBinding. Pure: names, labels and specs; no API calls.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use ktgt_operator::api::{
    InitiatorGroup, InitiatorGroupBinding, InitiatorGroupBindingSpec, InitiatorGroupReference,
    InitiatorGroupSpec, Quantity, SecretReference, Target, TargetChap, TargetLun, TargetReference,
    TargetSpec,
};
use kube::api::ObjectMeta;
use sha2::{Digest, Sha256};

use crate::pools::Pool;

/// Label on every object the driver writes (value `true`).
pub const LABEL_MANAGED: &str = "csi.ktgt.io/managed";
/// Label: the pool a volume's Target is in.
pub const LABEL_POOL: &str = "csi.ktgt.io/pool";
/// Label on a binding or a CHAP Secret: the volume (Target name) it belongs to.
pub const LABEL_VOLUME: &str = "csi.ktgt.io/volume";
/// Annotation: the CSI volume name the Target was created for.
pub const ANNOTATION_NAME: &str = "csi.ktgt.io/name";
/// Annotation: the volume's size in bytes, as created.
pub const ANNOTATION_CAPACITY: &str = "csi.ktgt.io/capacity-bytes";
/// Annotation: the agent may delete the LUN's file when the Target is deleted (only under its
/// `--csi-volume-dir`).
pub const ANNOTATION_DELETE_BACKING: &str = "csi.ktgt.io/delete-backing-store";
/// Annotation on a group: the initiator name it holds.
pub const ANNOTATION_INITIATOR: &str = "csi.ktgt.io/initiator";
/// The IQN prefix of volume Targets.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.ktgt.csi";
/// The LUN number of a volume.
pub const LUN: i32 = 0;

fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    hex::encode(&digest[..10])
}

/// The Target name (and CSI volume id) for the CSI volume `name`.
pub fn target_name(name: &str) -> String {
    format!("csi-{}", short_hash(name))
}

/// The InitiatorGroup holding initiator `iqn`.
pub fn group_name(iqn: &str) -> String {
    format!("csi-node-{}", short_hash(iqn))
}

/// The binding opening volume `volume_id` to initiator `iqn`.
pub fn binding_name(volume_id: &str, iqn: &str) -> String {
    format!("{volume_id}-{}", &short_hash(iqn)[..12])
}

/// Whether `id` has the shape of a volume id this driver makes.
pub fn is_volume_id(id: &str) -> bool {
    id.strip_prefix("csi-")
        .is_some_and(|h| h.len() == 20 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The IQN of volume `volume_id`.
pub fn target_iqn(volume_id: &str) -> String {
    format!("{IQN_PREFIX}:{volume_id}")
}

/// A volume's CHAP: none, one-way (the initiator proves itself) or mutual (and the target
/// too). StorageClass parameter `chap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapMode {
    None,
    OneWay,
    Mutual,
}

impl ChapMode {
    pub fn parse(v: &str) -> Option<ChapMode> {
        match v {
            "none" => Some(ChapMode::None),
            "oneway" => Some(ChapMode::OneWay),
            "mutual" => Some(ChapMode::Mutual),
            _ => None,
        }
    }
}

/// The Secret with a volume's initiator account (and, for mutual CHAP, the target's account
/// under kubelet's `_in` keys): the node-stage secret of the volume's StorageClass,
/// `ktgt-chap-${pv.name}`.
pub fn chap_secret_name(csi_name: &str) -> String {
    format!("ktgt-chap-{csi_name}")
}

/// The Secret with the target's own account (mutual CHAP), for the Target's
/// `mutualSecretRef`.
pub fn chap_target_secret_name(csi_name: &str) -> String {
    format!("ktgt-chap-{csi_name}-target")
}

/// One CHAP account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user: String,
    pub secret: String,
}

/// The Secrets of a volume's CHAP accounts: the initiator's (the agent's keys `username` and
/// `password`, and kubelet's `node.session.auth.*` for the node service) and, when mutual,
/// the target's (the agent's keys; kubelet's `_in` keys in the first Secret).
pub fn chap_secrets(
    volume_id: &str,
    csi_name: &str,
    namespace: &str,
    initiator: &Account,
    target: Option<&Account>,
) -> Vec<Secret> {
    let secret = |name: String, data: BTreeMap<String, String>| Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some({
                let mut l = managed_labels();
                l.insert(LABEL_VOLUME.to_owned(), volume_id.to_owned());
                l
            }),
            ..ObjectMeta::default()
        },
        string_data: Some(data),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    let mut data = BTreeMap::from([
        ("username".to_owned(), initiator.user.clone()),
        ("password".to_owned(), initiator.secret.clone()),
        (
            "node.session.auth.username".to_owned(),
            initiator.user.clone(),
        ),
        (
            "node.session.auth.password".to_owned(),
            initiator.secret.clone(),
        ),
    ]);
    let mut out = Vec::new();
    if let Some(t) = target {
        data.insert("node.session.auth.username_in".to_owned(), t.user.clone());
        data.insert("node.session.auth.password_in".to_owned(), t.secret.clone());
        out.push(secret(
            chap_target_secret_name(csi_name),
            BTreeMap::from([
                ("username".to_owned(), t.user.clone()),
                ("password".to_owned(), t.secret.clone()),
            ]),
        ));
    }
    out.insert(0, secret(chap_secret_name(csi_name), data));
    out
}

/// The Target's `chap` for a volume's CHAP Secrets in `namespace`.
pub fn target_chap(csi_name: &str, namespace: &str, mode: ChapMode) -> Option<TargetChap> {
    let reference = |name: String| SecretReference {
        name,
        namespace: Some(namespace.to_owned()),
    };
    match mode {
        ChapMode::None => None,
        ChapMode::OneWay => Some(TargetChap {
            secret_ref: reference(chap_secret_name(csi_name)),
            mutual_secret_ref: None,
        }),
        ChapMode::Mutual => Some(TargetChap {
            secret_ref: reference(chap_secret_name(csi_name)),
            mutual_secret_ref: Some(reference(chap_target_secret_name(csi_name))),
        }),
    }
}

fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_MANAGED.to_owned(), "true".to_owned())])
}

/// The Target of a new volume.
pub fn target(name: &str, pool: &Pool, bytes: u64, block_size: Option<u32>) -> Target {
    let id = target_name(name);
    let mut labels = managed_labels();
    labels.insert(LABEL_POOL.to_owned(), pool.name.clone());
    let annotations = BTreeMap::from([
        (ANNOTATION_NAME.to_owned(), name.to_owned()),
        (ANNOTATION_CAPACITY.to_owned(), bytes.to_string()),
        (ANNOTATION_DELETE_BACKING.to_owned(), "true".to_owned()),
    ]);
    let spec = TargetSpec {
        node_name: Some(pool.node.clone()),
        iqn: target_iqn(&id),
        luns: vec![TargetLun {
            lun: LUN,
            backing_store: Some(format!("{}/{id}.img", pool.path)),
            size: Some(Quantity(bytes.to_string())),
            block_size,
            ..TargetLun::default()
        }],
        ..TargetSpec::default()
    };
    let mut t = Target::new(&id, spec);
    t.metadata = ObjectMeta {
        name: Some(id),
        labels: Some(labels),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    };
    t
}

/// The merge patch that grows volume Target `t` to `bytes`: LUN 0's size and the recorded
/// capacity (the agent grows the file and the LUN in place). `None` if `t` has no LUN 0.
pub fn resize_patch(t: &Target, bytes: u64) -> Option<serde_json::Value> {
    let mut luns = t.spec.luns.clone();
    let lun = luns.iter_mut().find(|l| l.lun == LUN)?;
    lun.size = Some(Quantity(bytes.to_string()));
    Some(serde_json::json!({
        "metadata": {"annotations": {ANNOTATION_CAPACITY: bytes.to_string()}},
        "spec": {"luns": luns},
    }))
}

/// The size a volume Target was created with (or grown to).
pub fn capacity(t: &Target) -> Option<u64> {
    t.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_CAPACITY)?
        .parse()
        .ok()
}

/// The CSI volume name a Target was created for.
pub fn csi_name(t: &Target) -> Option<&str> {
    t.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_NAME)
        .map(String::as_str)
}

/// The pool a volume Target is in.
pub fn pool_of(t: &Target) -> Option<&str> {
    t.metadata
        .labels
        .as_ref()?
        .get(LABEL_POOL)
        .map(String::as_str)
}

/// The group of one initiator.
pub fn group(iqn: &str) -> InitiatorGroup {
    let name = group_name(iqn);
    let mut g = InitiatorGroup::new(
        &name,
        InitiatorGroupSpec {
            initiators: vec![iqn.to_owned()],
            ..InitiatorGroupSpec::default()
        },
    );
    g.metadata.labels = Some(managed_labels());
    g.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_INITIATOR.to_owned(),
        iqn.to_owned(),
    )]));
    g
}

/// The binding that opens `volume_id` to `iqn`.
pub fn binding(volume_id: &str, iqn: &str) -> InitiatorGroupBinding {
    let name = binding_name(volume_id, iqn);
    let mut b = InitiatorGroupBinding::new(
        &name,
        InitiatorGroupBindingSpec {
            target_ref: TargetReference {
                name: volume_id.to_owned(),
            },
            initiator_group_ref: InitiatorGroupReference {
                name: group_name(iqn),
            },
        },
    );
    let mut labels = managed_labels();
    labels.insert(LABEL_VOLUME.to_owned(), volume_id.to_owned());
    b.metadata.labels = Some(labels);
    b.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_INITIATOR.to_owned(),
        iqn.to_owned(),
    )]));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool::parse("name=fast,node=storage-1,path=/var/lib/ktgt/csi/fast,capacity=10Gi").unwrap()
    }

    #[test]
    fn names_are_stable_and_valid_object_names() {
        let id = target_name("pvc-0b1c2d3e-aaaa-bbbb-cccc-0123456789ab");
        assert_eq!(id, target_name("pvc-0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"));
        assert_ne!(id, target_name("pvc-other"));
        assert!(is_volume_id(&id), "{id}");
        assert_eq!(id.len(), 24);
        assert!(!is_volume_id("csi-xyz"));
        assert!(!is_volume_id("pvc-1"));
        let b = binding_name(&id, "iqn.1994-05.com.redhat:abc");
        assert!(b.len() <= 63, "{b}");
        assert!(group_name("iqn.1994-05.com.redhat:abc").len() <= 63);
    }

    #[test]
    fn a_volume_target_has_one_lun_in_its_pool() {
        let t = target("pvc-1", &pool(), 1 << 30, Some(4096));
        let id = target_name("pvc-1");
        assert_eq!(t.metadata.name.as_deref(), Some(id.as_str()));
        assert_eq!(t.spec.node_name.as_deref(), Some("storage-1"));
        assert_eq!(t.spec.iqn, format!("iqn.2026-11.io.ktgt.csi:{id}"));
        assert_eq!(t.spec.luns.len(), 1);
        let lun = &t.spec.luns[0];
        assert_eq!(lun.lun, 0);
        assert_eq!(
            lun.backing_store.as_deref(),
            Some(format!("/var/lib/ktgt/csi/fast/{id}.img").as_str())
        );
        assert_eq!(lun.size, Some(Quantity("1073741824".into())));
        assert_eq!(capacity(&t), Some(1 << 30));
        assert_eq!(csi_name(&t), Some("pvc-1"));
        assert_eq!(pool_of(&t), Some("fast"));
        // The IQN passes the CRD's pattern.
        let re = regex_lite(&t.spec.iqn);
        assert!(re, "{}", t.spec.iqn);
    }

    /// The parts of the CRD's IQN pattern a volume IQN exercises.
    fn regex_lite(iqn: &str) -> bool {
        let Some(rest) = iqn.strip_prefix("iqn.2026-11.io.ktgt.csi:") else {
            return false;
        };
        rest.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b))
    }

    #[test]
    fn a_resize_patch_changes_only_the_size() {
        let t = target("pvc-1", &pool(), 1 << 30, Some(4096));
        let p = resize_patch(&t, 2 << 30).unwrap();
        assert_eq!(
            p["metadata"]["annotations"][ANNOTATION_CAPACITY],
            "2147483648"
        );
        let lun = &p["spec"]["luns"][0];
        assert_eq!(lun["size"], "2147483648");
        assert_eq!(lun["blockSize"], 4096);
        assert_eq!(
            lun["backingStore"],
            t.spec.luns[0].backing_store.clone().unwrap()
        );
    }

    #[test]
    fn chap_secrets_carry_the_agents_and_kubelets_keys() {
        let i = Account {
            user: "csi-1".into(),
            secret: "aaaaaaaaaaaaaaaa".into(),
        };
        let t = Account {
            user: "csi-1-target".into(),
            secret: "bbbbbbbbbbbbbbbb".into(),
        };
        let s = chap_secrets("csi-1", "pvc-1", "ktgt-system", &i, Some(&t));
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].metadata.name.as_deref(), Some("ktgt-chap-pvc-1"));
        let d = s[0].string_data.as_ref().unwrap();
        assert_eq!(d["username"], "csi-1");
        assert_eq!(d["node.session.auth.password"], "aaaaaaaaaaaaaaaa");
        assert_eq!(d["node.session.auth.username_in"], "csi-1-target");
        assert_eq!(
            s[1].metadata.name.as_deref(),
            Some("ktgt-chap-pvc-1-target")
        );
        assert_eq!(
            s[1].string_data.as_ref().unwrap()["password"],
            "bbbbbbbbbbbbbbbb"
        );
        let c = target_chap("pvc-1", "ktgt-system", ChapMode::Mutual).unwrap();
        assert_eq!(c.secret_ref.name, "ktgt-chap-pvc-1");
        assert_eq!(c.mutual_secret_ref.unwrap().name, "ktgt-chap-pvc-1-target");
        assert!(target_chap("pvc-1", "ns", ChapMode::None).is_none());
        assert_eq!(chap_secrets("csi-1", "pvc-1", "ns", &i, None).len(), 1);
    }

    #[test]
    fn bindings_name_their_volume_and_group() {
        let b = binding("csi-0123456789abcdef0123", "iqn.1994-05.com.redhat:n1");
        assert_eq!(b.spec.target_ref.name, "csi-0123456789abcdef0123");
        assert_eq!(
            b.spec.initiator_group_ref.name,
            group_name("iqn.1994-05.com.redhat:n1")
        );
        assert_eq!(
            b.metadata
                .labels
                .unwrap()
                .get(LABEL_VOLUME)
                .map(String::as_str),
            Some("csi-0123456789abcdef0123")
        );
        let g = group("iqn.1994-05.com.redhat:n1");
        assert_eq!(g.spec.initiators, vec!["iqn.1994-05.com.redhat:n1"]);
    }
}
