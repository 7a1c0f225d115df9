//! Configuration: tgtd-operator's API objects and how they become the target's
//! [`DesiredState`].
//!
//! Standalone mode reads a YAML file of the same objects the cluster mode watches (Target,
//! InitiatorGroup, InitiatorGroupBinding of `tgtd.unstable.cloud/v1alpha1`, and `v1` Secrets
//! for CHAP); see `docs/config.md` for the format.
//!
//! # Layout
//! - [`api`]: the serde types, field for field as tgtd-operator 0.1.2 plus ktgt's additions.
//! - [`desired_state`] / [`desired_state_for_node`]: the pure validation and access rule,
//!   shared with the cluster mode.
//! - [`check_backing_stores`]: the filesystem check, separate so the cluster mode can report
//!   it as a condition.
//! - [`parse_str`] / [`load_file`]: the standalone entry points; any error is fatal.

pub mod api;
mod backing;
mod error;
mod names;
mod parse;
mod resolve;

use std::path::Path;

use target_core::config::DesiredState;

pub use backing::{
    check_backing_stores, shared_backing_stores, BackingStoreError, SharedBackingStore,
};
pub use error::{ConfigError, ObjectError, ObjectKind, Problem};
pub use ktgt_operator::quantity::parse_bytes;
pub use names::{check_iscsi_name, MAX_NAME_BYTES};
pub use resolve::{
    desired_state, desired_state_for_node, discovery_chap, parse_address, DiscoveryChap, Objects,
    Resolved, DEFAULT_BLOCK_SIZE, DEFAULT_NAMESPACE, MAX_LUN, MIN_CHAP_SECRET_BYTES,
};

/// Reads and validates a standalone configuration file, including that every backing store
/// exists or can be created ([`check_backing_stores`]). All Targets are served, whatever their
/// `spec.nodeName`.
///
/// # Errors
/// Every problem found, each naming the document, object and field. Nothing is returned
/// half-configured.
pub fn load_file(path: &Path) -> Result<DesiredState, ConfigError> {
    load_file_with(path, None)
}

/// [`load_file`], with discovery CHAP read from the Secrets `discovery` names (in the same
/// file).
pub fn load_file_with(
    path: &Path,
    discovery: Option<&DiscoveryChap>,
) -> Result<DesiredState, ConfigError> {
    let yaml = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.to_owned(),
        cause,
    })?;
    let origin = path.display().to_string();
    let parsed = parse::parse_objects(&yaml, &origin)?;
    let state = resolve_standalone(&parsed, &origin, discovery)?;
    let problems = check_backing_stores(&state);
    if problems.is_empty() {
        return Ok(state);
    }
    let errors = problems
        .into_iter()
        .map(|p| backing_store_error(&parsed.objects, p))
        .collect();
    Err(ConfigError::Invalid {
        origin,
        errors: parsed.locate(errors),
    })
}

/// Parses and validates a standalone configuration from a string; `origin` names it in errors
/// (a path, `<stdin>`). Does not touch the filesystem: backing stores are not checked (see
/// [`check_backing_stores`]).
pub fn parse_str(yaml: &str, origin: &str) -> Result<DesiredState, ConfigError> {
    parse_str_with(yaml, origin, None)
}

/// [`parse_str`] with discovery CHAP (see [`load_file_with`]).
pub fn parse_str_with(
    yaml: &str,
    origin: &str,
    discovery: Option<&DiscoveryChap>,
) -> Result<DesiredState, ConfigError> {
    let parsed = parse::parse_objects(yaml, origin)?;
    resolve_standalone(&parsed, origin, discovery)
}

fn resolve_standalone(
    parsed: &parse::Parsed,
    origin: &str,
    discovery: Option<&DiscoveryChap>,
) -> Result<DesiredState, ConfigError> {
    warn_cluster_only_fields(&parsed.objects);
    let mut state = desired_state(&parsed.objects).map_err(|errors| ConfigError::Invalid {
        origin: origin.to_owned(),
        errors: parsed.locate(errors),
    })?;
    if let Some(d) = discovery {
        let chap = discovery_chap(d, &parsed.objects).map_err(|(field, problem)| {
            ConfigError::DiscoveryChap {
                origin: origin.to_owned(),
                field,
                problem,
            }
        })?;
        state.discovery_chap = Some(chap);
    }
    Ok(state)
}

/// Standalone mode has no Nodes to select: say so rather than silently ignoring the fields.
fn warn_cluster_only_fields(objects: &Objects) {
    for group in &objects.initiator_groups {
        let spec = &group.spec;
        if !spec.node_selector.is_empty() || spec.initiator_name_strategy.is_some() {
            tracing::warn!(
                initiator_group = group.metadata.name_or_empty(),
                "spec.nodeSelector and spec.initiatorNameStrategy are ignored without Kubernetes; \
                 list initiators in spec.initiators or status.initiators"
            );
        }
    }
}

/// Turns a backing store problem into an error on the Target and LUN that declared it.
fn backing_store_error(objects: &Objects, e: BackingStoreError) -> ObjectError {
    let found = objects.targets.iter().enumerate().find_map(|(index, t)| {
        (t.spec.iqn == e.iqn).then(|| {
            let lun = t
                .spec
                .luns
                .iter()
                .position(|l| i64::from(l.lun) == i64::from(e.lun));
            (index, t.metadata.name_or_empty(), lun)
        })
    });
    match found {
        Some((index, name, lun)) => {
            let field = match lun {
                Some(i) => format!("spec.luns[{i}].backingStore"),
                None => "spec.luns".to_owned(),
            };
            ObjectError::new(ObjectKind::Target, name, Some(index), field, e.problem)
        }
        // Unreachable for a state computed from `objects`; keep the IQN in the message.
        None => ObjectError::new(ObjectKind::Target, &e.iqn, None, "spec.luns", e.problem),
    }
}

#[cfg(test)]
mod tests;
