//! The objects of API group `tgtd.unstable.cloud/v1alpha1` (Target, InitiatorGroup,
//! InitiatorGroupBinding), field for field as tgtd-operator 0.1.2 serialises them, plus the
//! fields ktgt adds and ktgt's own kind, TargetSnapshot (a reflink copy of a LUN's file).
//!
//! # Two shapes of the same objects
//!
//! - [`Target`], [`InitiatorGroup`] and [`InitiatorGroupBinding`] are the cluster resources
//!   (`kube::CustomResource`, Kubernetes `ObjectMeta`). Their schemas, generated from these
//!   types by `crdgen`, are the CRDs in `deploy/crds/`.
//! - [`document`] holds the same objects as the standalone agent reads them from a YAML file:
//!   a small `ObjectMeta` and strict top-level fields, plus the core `v1` Secret that CHAP
//!   needs. `From` conversions turn a cluster resource into its document form so the agent's
//!   resolver works on either.
//!
//! Specs and statuses are shared by both. They are plain serde data; the schema carries the
//! checks the API server can do (IQN format, LUN range, enums, CEL rules across fields), and
//! the agent's resolver does all of them again plus the ones that need the node (paths,
//! secrets, duplicates). Specs and statuses reject unknown fields, so a typo in a file is an
//! error rather than a silently ignored setting (the API server prunes unknown fields before
//! they reach us).

// clippy reads the repeated `type_ = "string"` of the `printcolumn(...)` entries in
// `#[kube(...)]` as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::borrow::Cow;
use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize};

/// API group of Target, InitiatorGroup and InitiatorGroupBinding.
pub const API_GROUP: &str = "tgtd.unstable.cloud";
/// `apiVersion` of Target, InitiatorGroup and InitiatorGroupBinding.
pub const API_VERSION: &str = "tgtd.unstable.cloud/v1alpha1";
/// `apiVersion` of Secret.
pub const CORE_API_VERSION: &str = "v1";
/// Finalizer the node agent puts on a Target it serves, so that deleting the Target waits
/// until its sessions are gone and its LUNs closed.
pub const TARGET_FINALIZER: &str = "target.tgtd.unstable.cloud/cleanup";
/// Initiator name prefix of the `NodeName` strategy when the InitiatorGroup names none
/// (tgtd-operator's `--initiator-name-prefix` default).
pub const DEFAULT_INITIATOR_NAME_PREFIX: &str = "iqn.2020-06.cloud.unstable.tgtd";
/// Largest LUN number ktgt serves (flat space addressing, SAM-5 §4.7.7).
pub const MAX_LUN: i32 = 16383;

/// Condition types of a Target (tgtd-operator's names).
pub mod condition {
    /// The target is served with every LUN.
    pub const READY: &str = "Ready";
    /// The target could not be created on its node.
    pub const TARGET_FAILED: &str = "TargetFailed";
    /// At least one LUN could not be opened.
    pub const LUN_FAILED: &str = "LUNFailed";
}

/// iSCSI names the API server accepts: lowercase `iqn.yyyy-mm.authority[:unique]`,
/// `eui.` + 16 hex digits, `naa.` + 16 or 32 hex digits (RFC 3720 §3.2.6.3, RFC 3980).
/// ASCII only; the agent's check is the precise one and explains what is wrong.
pub const ISCSI_NAME_PATTERN: &str = r"^(iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[a-z0-9.:-]+)?|eui\.[0-9A-Fa-f]{16}|naa\.([0-9A-Fa-f]{16}|[0-9A-Fa-f]{32}))$";

/// A Kubernetes quantity (the pattern of `resource.Quantity`).
const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

// ---------------------------------------------------------------------------------------------
// Target

/// An iSCSI target and its LUNs, served by the node agent on `nodeName`.
#[derive(CustomResource, KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "tgtd.unstable.cloud",
    version = "v1alpha1",
    kind = "Target",
    doc = "An iSCSI target on one node (tgtd-operator compatible, with ktgt additions).",
    shortname = "tgt",
    status = "TargetStatus",
    derive = "PartialEq",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "IQN", type_ = "string", json_path = ".spec.iqn"),
    printcolumn(name = "LUNs", type_ = "string", json_path = ".spec.luns[*].lun"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = add_target_node_name_alias)]
#[x_kube(validation = Rule::new("!(has(self.nodeName) && has(self.targetNodeName))")
    .message("set nodeName or its alias targetNodeName, not both"))]
pub struct TargetSpec {
    /// Node that serves the target. tgtd-operator's README and samples write `nodeName`; its
    /// Go type tags the field `targetNodeName`, so that spelling is accepted too.
    #[serde(
        default,
        alias = "targetNodeName",
        skip_serializing_if = "Option::is_none"
    )]
    pub node_name: Option<String>,
    /// The target's iSCSI name (RFC 3720 §3.2.6).
    #[schemars(length(max = 223), regex(pattern = ISCSI_NAME_PATTERN))]
    pub iqn: String,
    /// The LUNs, each number at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["lun"]))]
    pub luns: Vec<TargetLun>,
    /// ktgt: CHAP authentication. Absent means no CHAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<TargetChap>,
}

/// The schema of `targetNodeName`, the alias serde accepts for `nodeName`. Without it the API
/// server would prune the field from tgtd-operator manifests that use it.
fn add_target_node_name_alias(schema: &mut Schema) {
    if let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        properties.insert(
            "targetNodeName".to_owned(),
            serde_json::json!({
                "description": "tgtd-operator's spelling of nodeName; give one of the two.",
                "type": "string",
                "nullable": true,
            }),
        );
    }
}

/// One LUN of a Target.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.bsType) && self.bsType == 'memory' ? has(self.size) && !has(self.backingStore) : has(self.backingStore)")
    .message("bsType memory needs size and no backingStore; rdwr and aio need backingStore"))]
pub struct TargetLun {
    /// LUN number. ktgt allows 0..=16383 (tgtd reserves 0 for its controller LUN).
    #[schemars(range(min = 0, max = 16383))]
    pub lun: i32,
    /// Path of the backing file or block device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_store: Option<String>,
    /// Backing store type: `rdwr` (default), `aio`, or ktgt's `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["rdwr", "aio", "memory"]))]
    pub bs_type: Option<String>,
    /// tgtd backing store options; ktgt understands `direct` and `bsoflags=direct`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bs_opts: Option<String>,
    /// ktgt: size (Kubernetes quantity such as `1Gi`, or bytes). A missing file is created
    /// sparse at this size; required for `bsType: memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// ktgt: refuse writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// ktgt: logical block size, 512 (default) or 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = [512, 4096]))]
    pub block_size: Option<u32>,
    /// ktgt: open with O_DIRECT (same as `bsOpts: bsoflags=direct`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
    /// ktgt: a missing backing file is created as a reflink copy of this file (on the same
    /// filesystem: XFS with reflink, or btrfs), grown to `size` when that is larger. Never a
    /// data copy: where the filesystem cannot reflink, the LUN fails with reason
    /// `CloneUnsupported`. Ignored once the file exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub clone_from: Option<String>,
}

/// ktgt: CHAP settings of a Target. Credentials come from Secrets with keys `username` and
/// `password`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetChap {
    /// The account initiators authenticate as (one-way CHAP).
    pub secret_ref: SecretReference,
    /// The target's own account for mutual CHAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret_ref: Option<SecretReference>,
}

/// A reference to a Secret. `namespace` defaults to `default`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretReference {
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Observed state of a Target, written by the node agent that serves it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
/// Status types accept fields they do not know: a newer agent may add some, and the
/// operator, the CSI driver and older agents must still read the object.
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// `Ready`, `TargetFailed` and `LUNFailed`, one entry per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<TargetCondition>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What the node actually serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_state: Option<TargetActual>,
}

/// A condition of a Target: `Ready`, `TargetFailed` or `LUNFailed` (see the `condition`
/// module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// RFC 3339 timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// One CamelCase word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// ktgt: the `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What the node actually serves for a Target (tgtd-operator's `TargetActual`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetActual {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iqn: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luns: Vec<ObservedLun>,
    /// CHAP account names bound to the target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<String>,
    /// Initiator names and addresses allowed to log in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acls: Vec<String>,
}

/// A served LUN. Same JSON as the tgtd-operator fields of a spec LUN, but every field is
/// optional: tgtd-operator omits `lun: 0` (its controller LUN).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedLun {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_store: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bs_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bs_opts: Option<String>,
    /// ktgt: bytes served now, which a larger `spec.luns[].size` grows live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
}

// ---------------------------------------------------------------------------------------------
// InitiatorGroup

/// A set of initiators, by name and/or source address. The operator fills `status` from the
/// Nodes that `nodeSelector` matches.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "tgtd.unstable.cloud",
    version = "v1alpha1",
    kind = "InitiatorGroup",
    doc = "A set of initiators: static names and addresses plus the Nodes a selector matches.",
    shortname = "ig",
    status = "InitiatorGroupStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Initiators",
        type_ = "string",
        json_path = ".status.initiators"
    ),
    printcolumn(name = "Addresses", type_ = "string", json_path = ".status.addresses"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorGroupSpec {
    /// Source addresses: an IP address, a CIDR block, or `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Labels of the initiator Nodes; every label must match. Empty selects every Node.
    /// Used by the operator only (the standalone agent has no Nodes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// How to derive an initiator name from a selected Node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator_name_strategy: Option<InitiatorNameStrategy>,
    /// ktgt: static initiator names (IQN, EUI or NAA), in addition to the selected Nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(max = 223), regex(pattern = ISCSI_NAME_PATTERN)))]
    pub initiators: Vec<String>,
}

/// tgtd-operator's `InitiatorGroupInitiatorNameStrategy`.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.type) || self.type != 'Annotation' || has(self.annotationKey)")
    .message("type Annotation needs annotationKey"))]
pub struct InitiatorNameStrategy {
    /// `NodeName` (default) or `Annotation`.
    #[serde(rename = "type", default)]
    pub type_: InitiatorNameStrategyType,
    /// Prefix for `NodeName`: the initiator name is `<prefix>:<node name>`. Defaults to the
    /// operator's `--initiator-name-prefix` (`iqn.2020-06.cloud.unstable.tgtd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator_name_prefix: Option<String>,
    /// Node annotation holding the initiator name, for `Annotation`. A Node without it is
    /// left out of the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation_key: Option<String>,
}

/// Where an initiator name comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum InitiatorNameStrategyType {
    /// `<initiatorNamePrefix>:<node name>`.
    #[default]
    NodeName,
    /// The value of the Node annotation `annotationKey`.
    Annotation,
}

/// Observed members of an InitiatorGroup, filled by the operator from the Nodes its selector
/// matches. Honoured in standalone files too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitiatorGroupStatus {
    /// Copy of `spec.addresses`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Initiator names of the selected Nodes, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub initiators: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// InitiatorGroupBinding

/// Grants the initiators of one InitiatorGroup access to one Target.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "tgtd.unstable.cloud",
    version = "v1alpha1",
    kind = "InitiatorGroupBinding",
    doc = "Grants the initiators of one InitiatorGroup access to one Target.",
    shortname = "igb",
    status = "InitiatorGroupBindingStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(
        name = "InitiatorGroup",
        type_ = "string",
        json_path = ".spec.initiatorGroupRef.name"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorGroupBindingSpec {
    pub target_ref: TargetReference,
    pub initiator_group_ref: InitiatorGroupReference,
}

/// Empty in tgtd-operator 0.1.2. Unknown fields are accepted here (not denied) so that the
/// schema stays a plain `type: object`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitiatorGroupBindingStatus {}

/// A reference to a Target by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetReference {
    #[schemars(length(min = 1))]
    pub name: String,
}

/// A reference to an InitiatorGroup by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorGroupReference {
    #[schemars(length(min = 1))]
    pub name: String,
}

// ---------------------------------------------------------------------------------------------
// TargetSnapshot (ktgt)

/// Finalizer of a TargetSnapshot: the agent of `spec.nodeName` removes it once the copy's
/// file is deleted (or kept, see [`TargetSnapshotSpec::path`]).
pub const SNAPSHOT_FINALIZER: &str = "snapshot.tgtd.unstable.cloud/cleanup";

/// ktgt: a point-in-time copy of one LUN of a Target, made by the agent of the Target's node
/// as a reflink copy of the LUN's file (no data is copied; see `docs/csi.md`). Not served: a
/// Target whose LUN has `cloneFrom: <path>` serves a writable copy of it.
#[derive(CustomResource, KubeSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "tgtd.unstable.cloud",
    version = "v1alpha1",
    kind = "TargetSnapshot",
    doc = "ktgt: a point-in-time reflink copy of one LUN of a Target, made on the Target's node.",
    shortname = "tgtsnap",
    status = "TargetSnapshotStatus",
    derive = "PartialEq",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "LUN", type_ = "integer", json_path = ".spec.lun"),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.readyToUse"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.size"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a TargetSnapshot's spec is immutable; delete it and create another"))]
pub struct TargetSnapshotSpec {
    /// The node whose agent makes (and deletes) the copy: the Target's `nodeName`.
    #[schemars(length(min = 1))]
    pub node_name: String,
    /// The Target whose LUN is copied.
    pub target_ref: TargetReference,
    /// The LUN copied.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16383))]
    pub lun: i32,
    /// Absolute path of the copy on that node, on the LUN file's filesystem; must not exist.
    /// Deleted with the object only when it lies under the agent's `--csi-volume-dir` and
    /// the object is annotated `csi.ktgt.io/delete-backing-store: "true"`.
    #[schemars(length(min = 2), regex(pattern = r"^/"))]
    pub path: String,
}

/// What the agent made. Unknown fields are accepted (a newer agent may add some).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetSnapshotStatus {
    /// The copy exists and a LUN may be cloned from it.
    #[serde(default)]
    pub ready_to_use: bool,
    /// Bytes of the copy (the LUN's size when it was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// When the copy was made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    /// `Ready`: `True` (reason `Created`), or `False` with why (`SourceNotFound`,
    /// `CloneUnsupported`, `CopyFailed`, `FileMissing`, `InvalidSpec`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<TargetCondition>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Quantity

/// A Kubernetes quantity as written: `1Gi`, `500M`, `1e9`, or a plain integer of bytes.
/// YAML integers are accepted and kept as their decimal string. The node agent parses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Quantity;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a quantity such as \"1Gi\" or an integer number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                // YAML reads `1e9` as a float; keep integral values, reject the rest.
                if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e19 {
                    Ok(Quantity(format!("{v:.0}")))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl From<&str> for Quantity {
    fn from(s: &str) -> Self {
        Quantity(s.to_owned())
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }

    fn inline_schema() -> bool {
        true
    }

    /// An integer or a string in quantity syntax. Kubernetes writes `anyOf: [{type: integer},
    /// {type: string}]` beside the flag; kube's structural rewrite would empty those branches,
    /// and the flag alone means the same to the API server.
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "pattern": QUANTITY_PATTERN,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Document (standalone file) forms

/// The objects as the standalone agent reads them from a YAML file.
///
/// Same specs and statuses as the cluster resources; the envelope differs: `apiVersion` and
/// `kind` are plain fields checked by the loader, unknown top-level fields are errors, and
/// `metadata` keeps only what the agent reads (so a file dumped from a cluster, with `uid`,
/// `managedFields` and the like, still loads).
pub mod document {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{
        InitiatorGroupBindingSpec, InitiatorGroupBindingStatus, InitiatorGroupSpec,
        InitiatorGroupStatus, TargetSpec, TargetStatus, API_VERSION,
    };

    /// The part of Kubernetes `ObjectMeta` the agent reads. Other fields are ignored.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ObjectMeta {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// Only meaningful for Secrets (Targets and groups are cluster-scoped).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub namespace: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub labels: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub annotations: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub generation: Option<i64>,
    }

    impl ObjectMeta {
        /// The name, or `""` when missing (reported by validation).
        pub fn name_or_empty(&self) -> &str {
            self.name.as_deref().unwrap_or("")
        }
    }

    impl From<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> for ObjectMeta {
        fn from(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
            ObjectMeta {
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                labels: meta.labels.clone().unwrap_or_default(),
                annotations: meta.annotations.clone().unwrap_or_default(),
                generation: meta.generation,
            }
        }
    }

    /// An iSCSI target and its LUNs.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Target {
        pub api_version: String,
        pub kind: String,
        #[serde(default)]
        pub metadata: ObjectMeta,
        pub spec: TargetSpec,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub status: Option<TargetStatus>,
    }

    /// A set of initiators, by name and/or source address.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct InitiatorGroup {
        pub api_version: String,
        pub kind: String,
        #[serde(default)]
        pub metadata: ObjectMeta,
        #[serde(default)]
        pub spec: InitiatorGroupSpec,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub status: Option<InitiatorGroupStatus>,
    }

    /// Grants the initiators of one InitiatorGroup access to one Target.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct InitiatorGroupBinding {
        pub api_version: String,
        pub kind: String,
        #[serde(default)]
        pub metadata: ObjectMeta,
        pub spec: InitiatorGroupBindingSpec,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub status: Option<InitiatorGroupBindingStatus>,
    }

    /// A core `v1` Secret. CHAP reads the keys `username` and `password` from `stringData`
    /// (plain text) or `data` (base64); `stringData` wins, as in Kubernetes.
    #[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Secret {
        pub api_version: String,
        pub kind: String,
        #[serde(default)]
        pub metadata: ObjectMeta,
        #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
        pub type_: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub data: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub string_data: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub immutable: Option<bool>,
    }

    impl std::fmt::Debug for Secret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            // Values are credentials: show which keys exist, never their contents.
            f.debug_struct("Secret")
                .field("metadata", &self.metadata)
                .field("type_", &self.type_)
                .field("data", &self.data.keys().collect::<Vec<_>>())
                .field("string_data", &self.string_data.keys().collect::<Vec<_>>())
                .finish_non_exhaustive()
        }
    }

    impl From<&super::Target> for Target {
        fn from(t: &super::Target) -> Self {
            Target {
                api_version: API_VERSION.to_owned(),
                kind: "Target".to_owned(),
                metadata: (&t.metadata).into(),
                spec: t.spec.clone(),
                status: t.status.clone(),
            }
        }
    }

    impl From<&super::InitiatorGroup> for InitiatorGroup {
        fn from(g: &super::InitiatorGroup) -> Self {
            InitiatorGroup {
                api_version: API_VERSION.to_owned(),
                kind: "InitiatorGroup".to_owned(),
                metadata: (&g.metadata).into(),
                spec: g.spec.clone(),
                status: g.status.clone(),
            }
        }
    }

    impl From<&super::InitiatorGroupBinding> for InitiatorGroupBinding {
        fn from(b: &super::InitiatorGroupBinding) -> Self {
            InitiatorGroupBinding {
                api_version: API_VERSION.to_owned(),
                kind: "InitiatorGroupBinding".to_owned(),
                metadata: (&b.metadata).into(),
                spec: b.spec.clone(),
                status: b.status.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests;
