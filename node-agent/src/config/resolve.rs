//! From API objects to the target's [`DesiredState`]: validation and the access rule.
//!
//! Pure: no filesystem, no clock, no Kubernetes client, so the standalone loader and the
//! cluster reconciler share it.
//!
//! # Access rule
//!
//! A Target's ACL is the union of the initiator names (`spec.initiators` + `status.initiators`)
//! and the addresses (`spec.addresses` + `status.addresses`) of the InitiatorGroups bound to
//! *that* Target by an InitiatorGroupBinding. A Target without bindings has an empty ACL and
//! admits nobody. (tgtd-operator 0.1.2 applied every binding on the node to every Target.)
//!
//! # Errors are per object
//!
//! [`desired_state_for_node`] returns the Targets it could build along with the errors of the
//! others, so one broken Target does not take the node's other Targets down in cluster mode.
//! A Target is left out (and listed in [`Resolved::failed_targets`]) when its own spec is
//! invalid, its CHAP Secrets are missing or invalid, its IQN is taken, or an InitiatorGroup
//! bound to it is invalid: serving an ACL built from part of the intent could admit more than
//! intended. A binding whose Target or InitiatorGroup does not exist is reported against the
//! binding and grants nothing: deleting a group revokes its access.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ipnet::IpNet;
use target_core::config::{
    Acl, AddressRule, Backing, ChapConfig, ChapCredentials, DesiredState, Grant, LunConfig,
    TargetConfig,
};

use super::api::{
    InitiatorGroup, InitiatorGroupBinding, ObjectMeta, Secret, SecretReference, Target, TargetChap,
    TargetLun,
};
use super::error::{ObjectError, ObjectKind, Problem};
use super::names::check_iscsi_name;
use ktgt_operator::quantity::parse_bytes;

/// Highest LUN ktgt serves: SAM flat space addressing has 14 bits.
pub const MAX_LUN: i32 = 16383;
/// Default logical block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 512;
/// RFC 7143 §12.1.3: CHAP secrets of at least 96 bits.
pub const MIN_CHAP_SECRET_BYTES: usize = 12;
/// Namespace of a Secret (or a reference to one) that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The API objects the desired state is computed from: a parsed file, or the contents of the
/// cluster-mode reflector stores. Order matters only for ties: when two Targets claim the same
/// IQN, the first keeps it (cluster callers pass objects oldest first).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    pub targets: Vec<Target>,
    pub initiator_groups: Vec<InitiatorGroup>,
    pub bindings: Vec<InitiatorGroupBinding>,
    pub secrets: Vec<Secret>,
}

/// The outcome of [`desired_state_for_node`]: what can be served, and what is wrong.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    /// The valid selected Targets, keyed by IQN.
    pub state: DesiredState,
    /// Every problem found, in a stable order.
    pub errors: Vec<ObjectError>,
    /// Names of selected Targets left out of `state` because of an error in `errors`.
    pub failed_targets: BTreeSet<String>,
}

impl Resolved {
    /// All or nothing, for the standalone mode: "nothing starts half-configured".
    pub fn into_result(self) -> Result<DesiredState, Vec<ObjectError>> {
        if self.errors.is_empty() {
            Ok(self.state)
        } else {
            Err(self.errors)
        }
    }
}

/// The desired state of every Target in `objects`, whatever its `spec.nodeName` (the
/// standalone mode). Any error fails the whole computation.
pub fn desired_state(objects: &Objects) -> Result<DesiredState, Vec<ObjectError>> {
    desired_state_for_node(objects, None).into_result()
}

/// The desired state of the Targets whose `spec.nodeName` is `node` (all Targets for `None`),
/// with per-object errors. See the module docs for which errors leave a Target out.
pub fn desired_state_for_node(objects: &Objects, node: Option<&str>) -> Resolved {
    let mut errors = Vec::new();

    let targets = unique_names(
        ObjectKind::Target,
        objects.targets.iter().map(|t| &t.metadata),
        &mut errors,
    );
    let groups_by_name = unique_names(
        ObjectKind::InitiatorGroup,
        objects.initiator_groups.iter().map(|g| &g.metadata),
        &mut errors,
    );
    let bindings = unique_names(
        ObjectKind::InitiatorGroupBinding,
        objects.bindings.iter().map(|b| &b.metadata),
        &mut errors,
    );
    let secrets = index_secrets(&objects.secrets, &mut errors);

    // Every group is checked, bound or not, so mistakes show before they matter.
    let mut groups: BTreeMap<&str, Option<GroupAcl>> = BTreeMap::new();
    for (&name, &index) in &groups_by_name {
        let group = &objects.initiator_groups[index];
        let acl = match group_acl(group, index) {
            Ok(acl) => Some(acl),
            Err(errs) => {
                errors.extend(errs);
                None
            }
        };
        groups.insert(name, acl);
    }

    // Target name -> [(binding name, group name)], only where both ends exist.
    let mut bound: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for (&name, &index) in &bindings {
        let spec = &objects.bindings[index].spec;
        let err = |field: &str, problem| {
            ObjectError::new(
                ObjectKind::InitiatorGroupBinding,
                name,
                Some(index),
                field,
                problem,
            )
        };
        let target = spec.target_ref.name.as_str();
        let group = spec.initiator_group_ref.name.as_str();
        let mut ok = true;
        if target.is_empty() {
            errors.push(err("spec.targetRef.name", Problem::MissingName));
            ok = false;
        } else if !targets.contains_key(target) {
            errors.push(err(
                "spec.targetRef.name",
                Problem::MissingReference {
                    kind: ObjectKind::Target,
                    name: target.to_owned(),
                },
            ));
            ok = false;
        }
        if group.is_empty() {
            errors.push(err("spec.initiatorGroupRef.name", Problem::MissingName));
            ok = false;
        } else if !groups.contains_key(group) {
            errors.push(err(
                "spec.initiatorGroupRef.name",
                Problem::MissingReference {
                    kind: ObjectKind::InitiatorGroup,
                    name: group.to_owned(),
                },
            ));
            ok = false;
        }
        if ok {
            bound.entry(target).or_default().push((name, group));
        }
    }

    let mut state = DesiredState::default();
    let mut failed_targets = BTreeSet::new();
    // IQN -> name of the Target that holds it.
    let mut iqn_owners: BTreeMap<String, &str> = BTreeMap::new();
    // Input order, so that the first Target claiming an IQN keeps it.
    let mut selected: Vec<(&str, usize)> = targets.iter().map(|(&n, &i)| (n, i)).collect();
    selected.sort_by_key(|&(_, i)| i);
    for (name, index) in selected {
        let target = &objects.targets[index];
        if let Some(node) = node {
            if target.spec.node_name.as_deref() != Some(node) {
                continue;
            }
        }
        let mut target_errors = Vec::new();
        let err = |field: &str, problem| {
            ObjectError::new(ObjectKind::Target, name, Some(index), field, problem)
        };
        let config = target_config(target, &secrets, &err, &mut target_errors);

        // The first Target to claim an IQN keeps it even while it is itself invalid, so that a
        // later duplicate never takes over a name initiators already use. iSCSI names are
        // case-insensitive (eui./naa. hex digits may be written in either case).
        let iqn_key = target.spec.iqn.to_lowercase();
        match iqn_owners.get(iqn_key.as_str()) {
            Some(other) => target_errors.push(err(
                "spec.iqn",
                Problem::DuplicateIqn {
                    iqn: target.spec.iqn.clone(),
                    other: (*other).to_owned(),
                },
            )),
            None => {
                iqn_owners.insert(iqn_key, name);
            }
        }

        // One grant per binding, judged on its own (see `target_core::config::Acl`).
        let mut acl = Acl::default();
        for &(binding, group) in bound.get(name).map(Vec::as_slice).unwrap_or_default() {
            match groups.get(group) {
                Some(Some(group_acl)) => acl.grants.push(group_acl.grant(binding, group)),
                _ => target_errors.push(err(
                    "",
                    Problem::InvalidBoundGroup {
                        group: group.to_owned(),
                        binding: binding.to_owned(),
                    },
                )),
            }
        }

        match config {
            Some(mut config) if target_errors.is_empty() => {
                config.acl = acl;
                state.targets.insert(config.iqn.clone(), config);
            }
            _ => {
                errors.extend(target_errors);
                failed_targets.insert(name.to_owned());
            }
        }
    }

    sort_errors(&mut errors);
    Resolved {
        state,
        errors,
        failed_targets,
    }
}

/// Stable order: by kind, then position, then field.
fn sort_errors(errors: &mut [ObjectError]) {
    errors.sort_by(|a, b| {
        (&a.kind, a.index, &a.name, &a.field).cmp(&(&b.kind, b.index, &b.name, &b.field))
    });
}

/// Name -> index of the first object with that name. Reports missing and duplicate names.
fn unique_names<'a>(
    kind: ObjectKind,
    metas: impl Iterator<Item = &'a ObjectMeta>,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<&'a str, usize> {
    let mut names = BTreeMap::new();
    for (index, meta) in metas.enumerate() {
        let name = meta.name_or_empty();
        if name.is_empty() {
            errors.push(ObjectError::new(
                kind.clone(),
                name,
                Some(index),
                "metadata.name",
                Problem::MissingName,
            ));
        } else if names.contains_key(name) {
            errors.push(ObjectError::new(
                kind.clone(),
                name,
                Some(index),
                "metadata.name",
                Problem::DuplicateName(kind.clone()),
            ));
        } else {
            names.insert(name, index);
        }
    }
    names
}

type SecretIndex<'a> = BTreeMap<(&'a str, &'a str), &'a Secret>;

fn index_secrets<'a>(secrets: &'a [Secret], errors: &mut Vec<ObjectError>) -> SecretIndex<'a> {
    let mut index = BTreeMap::new();
    for (i, secret) in secrets.iter().enumerate() {
        let name = secret.metadata.name_or_empty();
        let namespace = secret
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE);
        let err =
            |problem| ObjectError::new(ObjectKind::Secret, name, Some(i), "metadata.name", problem);
        if name.is_empty() {
            errors.push(err(Problem::MissingName));
        } else if index.insert((namespace, name), secret).is_some() {
            errors.push(err(Problem::DuplicateName(ObjectKind::Secret)));
        }
    }
    index
}

// ---------------------------------------------------------------------------------------------
// Targets

/// Builds a Target's config without its ACL; `None` when any field is invalid.
fn target_config(
    target: &Target,
    secrets: &SecretIndex<'_>,
    err: &dyn Fn(&str, Problem) -> ObjectError,
    errors: &mut Vec<ObjectError>,
) -> Option<TargetConfig> {
    let before = errors.len();
    let spec = &target.spec;
    if let Err(reason) = check_iscsi_name(&spec.iqn) {
        errors.push(err(
            "spec.iqn",
            Problem::InvalidIscsiName {
                value: spec.iqn.clone(),
                reason,
            },
        ));
    }

    let mut luns = BTreeMap::new();
    for (i, lun) in spec.luns.iter().enumerate() {
        let field = |f: &str| format!("spec.luns[{i}].{f}");
        let mut lun_err = |f: &str, problem| errors.push(err(&field(f), problem));
        let Some(config) = lun_config(lun, &mut lun_err) else {
            continue;
        };
        if luns.insert(config.lun, config).is_some() {
            errors.push(err(&field("lun"), Problem::DuplicateLun(lun.lun)));
        }
    }

    let chap = match &spec.chap {
        None => ChapConfig::default(),
        Some(chap) => match chap_config(chap, secrets) {
            Ok(chap) => chap,
            Err((field, problem)) => {
                errors.push(err(&field, problem));
                ChapConfig::default()
            }
        },
    };

    (errors.len() == before).then(|| TargetConfig {
        iqn: spec.iqn.clone(),
        alias: None,
        luns,
        acl: Acl::default(),
        chap,
    })
}

/// What a LUN's `bsType` selects.
enum StoreKind {
    File,
    Memory,
}

/// Validates one LUN; reports through `err(field, problem)` with the field relative to the LUN.
fn lun_config(lun: &TargetLun, err: &mut dyn FnMut(&str, Problem)) -> Option<LunConfig> {
    let mut ok = true;
    let mut fail = |field: &str, problem| {
        ok = false;
        err(field, problem)
    };

    let number = match u16::try_from(lun.lun) {
        Ok(n) if lun.lun <= MAX_LUN => n,
        _ => {
            fail("lun", Problem::LunOutOfRange(lun.lun));
            0
        }
    };

    let bs_type = lun.bs_type.as_deref().unwrap_or("rdwr");
    let kind = match bs_type {
        // tgtd's synchronous and Linux-AIO file stores both map to ktgt's file backend, which
        // picks io_uring or a thread pool by itself.
        "rdwr" | "aio" => Some(StoreKind::File),
        "memory" => Some(StoreKind::Memory),
        other => {
            fail("bsType", Problem::UnknownBsType(other.to_owned()));
            None
        }
    };

    let block_size = lun.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    if block_size != 512 && block_size != 4096 {
        fail("blockSize", Problem::InvalidBlockSize(block_size));
    }

    let size = match &lun.size {
        None => None,
        Some(q) => match parse_bytes(&q.0) {
            Ok(size) if size % u64::from(block_size) == 0 => Some(size),
            Ok(size) => {
                fail("size", Problem::SizeNotBlockMultiple { size, block_size });
                None
            }
            Err(reason) => {
                fail(
                    "size",
                    Problem::InvalidSize {
                        value: q.0.clone(),
                        reason,
                    },
                );
                None
            }
        },
    };

    let mut direct = lun.direct.unwrap_or(false);
    for opt in lun.bs_opts.as_deref().unwrap_or("").split(';') {
        match opt.trim() {
            "" => {}
            // tgtd passes open flags as `--bsoflags direct`; accept both spellings here.
            "direct" | "bsoflags=direct" => direct = true,
            other => fail("bsOpts", Problem::UnsupportedBsOpt(other.to_owned())),
        }
    }

    let path = lun.backing_store.as_deref().filter(|p| !p.is_empty());
    let backing = match kind {
        Some(StoreKind::File) => match path {
            None => {
                fail(
                    "backingStore",
                    Problem::MissingBackingStore {
                        bs_type: bs_type.to_owned(),
                    },
                );
                None
            }
            Some(p) if !Path::new(p).is_absolute() => {
                fail(
                    "backingStore",
                    Problem::BackingStoreUnusable {
                        path: PathBuf::from(p),
                        reason: "not an absolute path".to_owned(),
                    },
                );
                None
            }
            Some(p) => Some(Backing::Path(PathBuf::from(p))),
        },
        Some(StoreKind::Memory) => {
            if path.is_some() {
                fail("backingStore", Problem::MemoryWithBackingStore);
            }
            match (size, &lun.size) {
                (Some(size), _) => Some(Backing::Memory { size }),
                (None, None) => {
                    fail("size", Problem::MemoryNeedsSize);
                    None
                }
                // Already reported as an invalid size.
                (None, Some(_)) => None,
            }
        }
        None => None,
    };

    let clone_from = match (&backing, lun.clone_from.as_deref()) {
        (_, None) => None,
        (Some(Backing::Path(_)), Some(p)) if Path::new(p).is_absolute() => Some(PathBuf::from(p)),
        (Some(Backing::Path(_)), Some(p)) => {
            fail(
                "cloneFrom",
                Problem::BackingStoreUnusable {
                    path: PathBuf::from(p),
                    reason: "not an absolute path".to_owned(),
                },
            );
            None
        }
        (_, Some(p)) => {
            fail(
                "cloneFrom",
                Problem::BackingStoreUnusable {
                    path: PathBuf::from(p),
                    reason: "a RAM store cannot be cloned from a file".to_owned(),
                },
            );
            None
        }
    };
    let backing = backing.filter(|_| ok)?;
    let create_size = match backing {
        Backing::Path(_) => size,
        Backing::Memory { .. } => None,
    };
    Some(LunConfig {
        lun: number,
        backing,
        block_size,
        read_only: lun.read_only.unwrap_or(false),
        direct,
        create_size,
        clone_from,
        serial: None,
    })
}

// ---------------------------------------------------------------------------------------------
// CHAP

fn chap_config(
    chap: &TargetChap,
    secrets: &SecretIndex<'_>,
) -> Result<ChapConfig, (String, Problem)> {
    chap_accounts(
        ChapRefs {
            secret_ref: &chap.secret_ref,
            secret_field: "spec.chap.secretRef",
            mutual_ref: chap.mutual_secret_ref.as_ref(),
            mutual_field: "spec.chap.mutualSecretRef",
            initiator: ChapRole::Initiator,
            target: ChapRole::Target,
        },
        secrets,
    )
}

/// Discovery CHAP from the agent's `--discovery-chap-secret` (and, for mutual CHAP,
/// `--discovery-chap-mutual-secret`, or the `discovery.sendtargets.auth.*_in` keys of the
/// first Secret). The error names the flag.
pub fn discovery_chap(
    reference: &DiscoveryChap,
    objects: &Objects,
) -> Result<ChapConfig, (String, Problem)> {
    // Duplicate Secrets are reported by the resolution of the Targets.
    let secrets = index_secrets(&objects.secrets, &mut Vec::new());
    chap_accounts(
        ChapRefs {
            secret_ref: &reference.secret_ref,
            secret_field: "--discovery-chap-secret",
            mutual_ref: reference.mutual_secret_ref.as_ref(),
            mutual_field: "--discovery-chap-mutual-secret",
            initiator: ChapRole::DiscoveryInitiator,
            target: ChapRole::DiscoveryTarget,
        },
        &secrets,
    )
}

/// The Secrets of one CHAP configuration, where errors point, and the keys they are read with.
struct ChapRefs<'a> {
    secret_ref: &'a SecretReference,
    secret_field: &'static str,
    mutual_ref: Option<&'a SecretReference>,
    mutual_field: &'static str,
    /// The initiators' account.
    initiator: ChapRole,
    /// The target's own (mutual CHAP).
    target: ChapRole,
}

/// The accounts `refs` names. Without a mutual Secret, the target's keys of kubelet's naming
/// (`*_in`) in the first Secret give mutual CHAP: an initiator handed that Secret will ask
/// for it. The mutual secret must differ from the initiator's (RFC 7143 §12.1.3).
fn chap_accounts(
    refs: ChapRefs<'_>,
    secrets: &SecretIndex<'_>,
) -> Result<ChapConfig, (String, Problem)> {
    let (incoming, secret) = credentials(refs.secret_ref, secrets, refs.initiator)
        .map_err(|(f, p)| (format!("{}{f}", refs.secret_field), p))?;
    let outgoing = match refs.mutual_ref {
        Some(reference) => {
            let (creds, _) = credentials(reference, secrets, refs.target)
                .map_err(|(f, p)| (format!("{}{f}", refs.mutual_field), p))?;
            Some((refs.mutual_field, creds))
        }
        None => read_pair(secret, refs.target.keys()[1], &label(refs.secret_ref))
            .map_err(|p| (refs.secret_field.to_owned(), p))?
            .map(|creds| (refs.secret_field, creds)),
    };
    if let Some((field, creds)) = &outgoing {
        if creds.secret == incoming.secret {
            return Err(((*field).to_owned(), Problem::MutualSecretReused));
        }
    }
    Ok(ChapConfig {
        incoming: vec![incoming],
        outgoing: outgoing.map(|(_, c)| c),
    })
}

/// The Secrets naming discovery CHAP credentials (see [`discovery_chap`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryChap {
    pub secret_ref: SecretReference,
    pub mutual_secret_ref: Option<SecretReference>,
}

/// Which credentials a CHAP Secret is read for, and so which keys are read.
#[derive(Debug, Clone, Copy)]
enum ChapRole {
    /// An initiator logging in to a target (`spec.chap.secretRef`).
    Initiator,
    /// The target's own, for mutual CHAP (`spec.chap.mutualSecretRef`).
    Target,
    /// An initiator opening a discovery session.
    DiscoveryInitiator,
    /// The target's own on discovery sessions.
    DiscoveryTarget,
}

impl ChapRole {
    /// (user key, secret key) pairs, in the order they are looked for: tgtd-operator's
    /// `username`/`password`, then the open-iscsi setting names that kubelet's in-tree iSCSI
    /// volumes and csi-driver-iscsi put in a `kubernetes.io/iscsi-chap` Secret.
    const fn keys(self) -> [(&'static str, &'static str); 2] {
        let ours = ("username", "password");
        match self {
            ChapRole::Initiator => [
                ours,
                ("node.session.auth.username", "node.session.auth.password"),
            ],
            ChapRole::Target => [
                ours,
                (
                    "node.session.auth.username_in",
                    "node.session.auth.password_in",
                ),
            ],
            ChapRole::DiscoveryInitiator => [
                ours,
                (
                    "discovery.sendtargets.auth.username",
                    "discovery.sendtargets.auth.password",
                ),
            ],
            ChapRole::DiscoveryTarget => [
                ours,
                (
                    "discovery.sendtargets.auth.username_in",
                    "discovery.sendtargets.auth.password_in",
                ),
            ],
        }
    }

    /// The key names, for the error when neither pair is there.
    fn describe(self) -> String {
        let [(user, password), (user2, password2)] = self.keys();
        format!("{user} and {password} (or {user2} and {password2})")
    }
}

/// `namespace/name` of a Secret reference, the namespace defaulted.
fn label(reference: &SecretReference) -> String {
    format!(
        "{}/{}",
        reference.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
        reference.name
    )
}

/// Reads the credentials of `role` from the referenced Secret: the first key pair of
/// [`ChapRole::keys`] whose user key is there. Returns the Secret too. The error's field is
/// relative to the reference (`""` or `.name`).
fn credentials<'a>(
    reference: &SecretReference,
    secrets: &SecretIndex<'a>,
    role: ChapRole,
) -> Result<(ChapCredentials, &'a Secret), (String, Problem)> {
    if reference.name.is_empty() {
        return Err((".name".to_owned(), Problem::MissingName));
    }
    let namespace = reference.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let Some(&secret) = secrets.get(&(namespace, reference.name.as_str())) else {
        return Err((
            String::new(),
            Problem::SecretNotFound {
                namespace: namespace.to_owned(),
                name: reference.name.clone(),
            },
        ));
    };
    let label = label(reference);
    for pair in role.keys() {
        if let Some(creds) = read_pair(secret, pair, &label).map_err(|p| (String::new(), p))? {
            return Ok((creds, secret));
        }
    }
    Err((
        String::new(),
        Problem::ChapKeysMissing {
            secret: label,
            keys: role.describe(),
        },
    ))
}

/// The credentials under the key pair `(user, password)`, `None` when the user key is absent.
fn read_pair(
    secret: &Secret,
    (user_key, password_key): (&'static str, &'static str),
    label: &str,
) -> Result<Option<ChapCredentials>, Problem> {
    if !secret.string_data.contains_key(user_key) && !secret.data.contains_key(user_key) {
        return Ok(None);
    }
    let user = secret_value(secret, user_key, label)?;
    let user = String::from_utf8(user).map_err(|_| Problem::SecretKeyInvalid {
        secret: label.to_owned(),
        key: user_key,
        reason: "not UTF-8".to_owned(),
    })?;
    if user.is_empty() {
        return Err(Problem::SecretKeyInvalid {
            secret: label.to_owned(),
            key: user_key,
            reason: "empty".to_owned(),
        });
    }
    let password = secret_value(secret, password_key, label)?;
    if password.len() < MIN_CHAP_SECRET_BYTES {
        return Err(Problem::ChapSecretTooShort {
            secret: label.to_owned(),
            key: password_key,
            len: password.len(),
        });
    }
    Ok(Some(ChapCredentials {
        user,
        secret: password,
    }))
}

/// A Secret value: `stringData` as is, else `data` base64-decoded (Kubernetes semantics).
fn secret_value(secret: &Secret, key: &'static str, label: &str) -> Result<Vec<u8>, Problem> {
    if let Some(v) = secret.string_data.get(key) {
        return Ok(v.as_bytes().to_vec());
    }
    let Some(encoded) = secret.data.get(key) else {
        return Err(Problem::SecretKeyMissing {
            secret: label.to_owned(),
            key,
        });
    };
    // YAML folded scalars may carry whitespace; Kubernetes rejects it, we just drop it.
    let compact: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| Problem::SecretKeyInvalid {
            secret: label.to_owned(),
            key,
            reason: format!("data is not base64: {e}"),
        })
}

// ---------------------------------------------------------------------------------------------
// InitiatorGroups

/// The initiators and addresses an InitiatorGroup contributes.
#[derive(Debug, Clone, Default)]
struct GroupAcl {
    initiators: BTreeSet<String>,
    addresses: Vec<AddressRule>,
}

impl GroupAcl {
    /// The grant binding `binding` makes of this group.
    fn grant(&self, binding: &str, group: &str) -> Grant {
        let mut addresses = self.addresses.clone();
        addresses.sort_by_key(|rule| match rule {
            AddressRule::All => None,
            AddressRule::Net(net) => Some(*net),
        });
        Grant {
            initiators: self.initiators.iter().cloned().collect(),
            addresses,
            source: format!("binding {binding}, group {group}"),
        }
    }
}

fn group_acl(group: &InitiatorGroup, index: usize) -> Result<GroupAcl, Vec<ObjectError>> {
    let name = group.metadata.name_or_empty();
    let mut errors = Vec::new();
    let mut acl = GroupAcl::default();
    let status = group.status.clone().unwrap_or_default();
    let err = |field: String, problem| {
        ObjectError::new(
            ObjectKind::InitiatorGroup,
            name,
            Some(index),
            field,
            problem,
        )
    };

    for (section, list) in [
        ("spec", &group.spec.initiators),
        ("status", &status.initiators),
    ] {
        for (i, initiator) in list.iter().enumerate() {
            match check_iscsi_name(initiator) {
                Ok(()) => {
                    acl.initiators.insert(initiator.clone());
                }
                Err(reason) => errors.push(err(
                    format!("{section}.initiators[{i}]"),
                    Problem::InvalidIscsiName {
                        value: initiator.clone(),
                        reason,
                    },
                )),
            }
        }
    }
    for (section, list) in [
        ("spec", &group.spec.addresses),
        ("status", &status.addresses),
    ] {
        for (i, address) in list.iter().enumerate() {
            match parse_address(address) {
                Ok(rule) => {
                    if !acl.addresses.contains(&rule) {
                        acl.addresses.push(rule);
                    }
                }
                Err(reason) => errors.push(err(
                    format!("{section}.addresses[{i}]"),
                    Problem::InvalidAddress {
                        value: address.clone(),
                        reason,
                    },
                )),
            }
        }
    }
    if errors.is_empty() {
        Ok(acl)
    } else {
        Err(errors)
    }
}

/// `ALL` (any case, as tgtd's `ALL`), an IP address, or a CIDR block. Host bits of a CIDR
/// block are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
pub fn parse_address(s: &str) -> Result<AddressRule, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(AddressRule::All);
    }
    if s.contains('/') {
        return s
            .parse::<IpNet>()
            .map(|net| AddressRule::Net(net.trunc()))
            .map_err(|_| "bad CIDR block".to_owned());
    }
    s.parse::<IpAddr>()
        .map(|addr| AddressRule::Net(IpNet::from(addr)))
        .map_err(|_| "bad IP address".to_owned())
}
