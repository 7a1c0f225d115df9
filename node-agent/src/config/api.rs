//! The objects of API group `tgtd.unstable.cloud/v1alpha1` (Target, InitiatorGroup,
//! InitiatorGroupBinding), field for field as tgtd-operator 0.1.2 serialises them, plus the
//! fields ktgt adds, and the parts of a core `v1` Secret that CHAP needs.
//!
//! Plain serde data: no validation happens here (see [`super::resolve`]). Specs and statuses
//! reject unknown fields so a typo is an error, not a silently ignored setting; `metadata`
//! ignores fields it does not know (`uid`, `resourceVersion`, `managedFields`, ...) so a file
//! dumped from a cluster loads.
//!
//! The split into `TargetSpec`/`TargetStatus` follows Kubernetes conventions so the cluster
//! mode can derive `kube::CustomResource` and `schemars::JsonSchema` on the specs.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// `apiVersion` of Target, InitiatorGroup and InitiatorGroupBinding.
pub const API_VERSION: &str = "tgtd.unstable.cloud/v1alpha1";
/// `apiVersion` of Secret.
pub const CORE_API_VERSION: &str = "v1";

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

// ---------------------------------------------------------------------------------------------
// Target

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

/// Desired state of a Target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
    pub iqn: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luns: Vec<TargetLun>,
    /// ktgt: CHAP authentication. Absent means no CHAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<TargetChap>,
}

/// One LUN of a Target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetLun {
    /// LUN number. ktgt allows 0..=16383 (tgtd reserves 0 for its controller LUN).
    pub lun: i32,
    /// Path of the backing file or block device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_store: Option<String>,
    /// Backing store type: `rdwr` (default), `aio`, or ktgt's `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    pub block_size: Option<u32>,
    /// ktgt: open with O_DIRECT (same as `bsOpts: bsoflags=direct`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
}

/// ktgt: CHAP settings of a Target. Credentials come from Secrets with keys `username` and
/// `password`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetChap {
    /// The account initiators authenticate as (one-way CHAP).
    pub secret_ref: SecretReference,
    /// The target's own account for mutual CHAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret_ref: Option<SecretReference>,
}

/// A reference to a Secret. `namespace` defaults to `default`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretReference {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Observed state of a Target, written by the cluster-mode reconciler.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<TargetCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_state: Option<TargetActual>,
}

/// A condition of a Target (`Ready`, `TargetFailed`, `LUNFailed` in tgtd-operator).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// RFC 3339 timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the node actually serves for a Target (tgtd-operator's `TargetActual`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetActual {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iqn: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luns: Vec<ObservedLun>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acls: Vec<String>,
}

/// A served LUN. Same JSON as [`TargetLun`]'s tgtd-operator fields, but every field is
/// optional: tgtd-operator omits `lun: 0` (its controller LUN).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObservedLun {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_store: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bs_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bs_opts: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// InitiatorGroup

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

/// Desired state of an InitiatorGroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorGroupSpec {
    /// Source addresses: an IP address, a CIDR block, or `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Labels of the initiator Nodes (cluster mode; ignored in standalone mode).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// How to derive an initiator name from a selected Node (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator_name_strategy: Option<InitiatorNameStrategy>,
    /// ktgt: static initiator names (IQN, EUI or NAA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub initiators: Vec<String>,
}

/// tgtd-operator's `InitiatorGroupInitiatorNameStrategy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorNameStrategy {
    #[serde(rename = "type", default)]
    pub type_: InitiatorNameStrategyType,
    /// Prefix for `NodeName`: the initiator name is `<prefix>:<node name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator_name_prefix: Option<String>,
    /// Node annotation holding the initiator name, for `Annotation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation_key: Option<String>,
}

/// Where an initiator name comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitiatorNameStrategyType {
    #[default]
    NodeName,
    Annotation,
}

/// Observed members of an InitiatorGroup, filled by the cluster controller from the Nodes
/// its selector matches. Honoured in standalone files too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorGroupStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub initiators: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// InitiatorGroupBinding

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

/// Desired state of an InitiatorGroupBinding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorGroupBindingSpec {
    pub target_ref: TargetReference,
    pub initiator_group_ref: InitiatorGroupReference,
}

/// Empty in tgtd-operator 0.1.2.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorGroupBindingStatus {}

/// A reference to a Target by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetReference {
    pub name: String,
}

/// A reference to an InitiatorGroup by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitiatorGroupReference {
    pub name: String,
}

// ---------------------------------------------------------------------------------------------
// Secret

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

// ---------------------------------------------------------------------------------------------
// Quantity

/// A Kubernetes quantity as written: `1Gi`, `500M`, `1e9`, or a plain integer of bytes.
/// YAML integers are accepted and kept as their decimal string. Parsed by
/// [`super::quantity::parse_bytes`].
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
