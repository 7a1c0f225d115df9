//! ktgt's Kubernetes side: the `tgtd.unstable.cloud/v1alpha1` API types shared by the node
//! agent and the operator, the CRDs generated from them, and the operator that keeps every
//! InitiatorGroup's status true to the Node list.
//!
//! # Layout
//!
//! - [`api`]: the resources (`Target`, `InitiatorGroup`, `InitiatorGroupBinding`, and ktgt's
//!   `TargetSnapshot`), their
//!   specs and statuses, and the standalone-file forms in [`api::document`].
//! - [`crds`] and friends: what the `crdgen` binary prints into `deploy/crds/`.
//! - [`initiator_group`]: the operator's controller (status from Nodes) and its pure core.
//! - [`lease`]: leader election on a `coordination.k8s.io` Lease.
//! - [`quantity`]: Kubernetes quantities (`1Gi`) as byte counts, for the agent and the CSI driver.
//! - [`telemetry`]: `/healthz`, `/readyz` and `/metrics` for the operator and the node agent.
//! - [`watch`]: a watch backoff that grows while lists keep failing (kube's resets on `Init`).

pub mod api;
pub mod initiator_group;
pub mod lease;
pub mod quantity;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testing;
pub mod watch;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The CRDs of the API group, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        api::Target::crd(),
        api::InitiatorGroup::crd(),
        api::InitiatorGroupBinding::crd(),
        api::TargetSnapshot::crd(),
    ]
}

/// One CRD as a YAML document (without the leading `---`).
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(crd)
}

/// All CRDs as a YAML stream, each document introduced by `---`.
pub fn crd_yaml_stream(crds: &[CustomResourceDefinition]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&crd_yaml(crd)?);
    }
    Ok(out)
}

/// `<plural>.<group>.yaml`, the file name of a CRD in `deploy/crds/`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}
