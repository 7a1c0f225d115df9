//! Configuration errors. Every problem names the object (kind and name), the field path and,
//! for files, the document it came from.

use std::fmt;
use std::path::PathBuf;

/// Failure to load a standalone configuration file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    ///
    /// The cause is part of the message and deliberately not a `source()`: an error report
    /// that walks the chain (anyhow's "Caused by:") would print it twice.
    #[error("{}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A document is not well-formed YAML (the cause in the message, as for `Read`).
    #[error("{origin}: document {document}: {cause}")]
    Yaml {
        origin: String,
        /// 1-based.
        document: usize,
        cause: serde_yaml::Error,
    },
    /// One or more objects are invalid. Nothing is applied.
    #[error("{origin}: invalid configuration ({}):\n{}", plural(errors.len()), ErrorList(errors))]
    Invalid {
        origin: String,
        errors: Vec<ObjectError>,
    },
    /// The discovery CHAP Secret named on the command line is missing or invalid.
    #[error("{origin}: {field}: {problem}")]
    DiscoveryChap {
        origin: String,
        /// The flag (and reference field) at fault.
        field: String,
        problem: Problem,
    },
}

impl ConfigError {
    /// The object errors, if this is [`ConfigError::Invalid`].
    pub fn object_errors(&self) -> &[ObjectError] {
        match self {
            ConfigError::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }
}

fn plural(n: usize) -> String {
    if n == 1 {
        "1 problem".to_owned()
    } else {
        format!("{n} problems")
    }
}

struct ErrorList<'a>(&'a [ObjectError]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// The kind of the object an error is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ObjectKind {
    Target,
    InitiatorGroup,
    InitiatorGroupBinding,
    Secret,
    /// A document of another (or no) kind; holds the kind as written.
    Other(String),
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKind::Target => f.write_str("Target"),
            ObjectKind::InitiatorGroup => f.write_str("InitiatorGroup"),
            ObjectKind::InitiatorGroupBinding => f.write_str("InitiatorGroupBinding"),
            ObjectKind::Secret => f.write_str("Secret"),
            ObjectKind::Other(k) if k.is_empty() => f.write_str("object"),
            ObjectKind::Other(k) => f.write_str(k),
        }
    }
}

/// One invalid field of one object.
///
/// Displays as `Target "disk1": spec.luns[1].lun: duplicate LUN 1`, prefixed with the
/// document (`document 3: ...`) when loaded from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    pub kind: ObjectKind,
    /// `metadata.name`; empty when missing.
    pub name: String,
    /// Position of the object in its list in [`super::Objects`], when it got that far.
    pub index: Option<usize>,
    /// Where it was read from (`document 3`, `document 2, items[0]`), for files.
    pub location: Option<String>,
    /// Field path such as `spec.luns[1].lun`.
    pub field: String,
    pub problem: Problem,
}

impl ObjectError {
    pub(crate) fn new(
        kind: ObjectKind,
        name: &str,
        index: Option<usize>,
        field: impl Into<String>,
        problem: Problem,
    ) -> Self {
        ObjectError {
            kind,
            name: name.to_owned(),
            index,
            location: None,
            field: field.into(),
            problem,
        }
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        if self.name.is_empty() {
            write!(f, "{} (unnamed)", self.kind)?;
        } else {
            write!(f, "{} {:?}", self.kind, self.name)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ObjectError {}

/// What is wrong. [`Problem::reason`] gives a stable CamelCase label for Kubernetes
/// condition reasons and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The document does not match the schema (unknown field, wrong type, missing field).
    #[error("{0}")]
    Schema(String),
    #[error("unknown kind {kind:?} (apiVersion {api_version:?}); expected Target, InitiatorGroup or InitiatorGroupBinding of tgtd.unstable.cloud/v1alpha1, or a v1 Secret")]
    UnknownKind { api_version: String, kind: String },
    #[error("apiVersion {found:?} is not served; expected {expected:?}")]
    WrongApiVersion {
        found: String,
        expected: &'static str,
    },
    #[error("missing")]
    MissingName,
    #[error("duplicate name: another {0} has the same name")]
    DuplicateName(ObjectKind),
    #[error("IQN {iqn:?} is already used by Target {other:?}")]
    DuplicateIqn { iqn: String, other: String },
    #[error("duplicate LUN {0}")]
    DuplicateLun(i32),
    #[error("LUN {0} out of range 0..=16383")]
    LunOutOfRange(i32),
    #[error("missing: a backing store path is required for bsType {bs_type:?}")]
    MissingBackingStore { bs_type: String },
    #[error("backing store {path:?} does not exist and no size is given to create it")]
    BackingStoreNotFound { path: PathBuf },
    #[error("backing store {path:?} is not usable: {reason}")]
    BackingStoreUnusable { path: PathBuf, reason: String },
    #[error("{value:?} is not an IP address, CIDR block or ALL: {reason}")]
    InvalidAddress { value: String, reason: String },
    #[error("{value:?} is not a valid iSCSI name (RFC 3720 §3.2.6): {reason}")]
    InvalidIscsiName { value: String, reason: String },
    #[error("unknown bsType {0:?}; accepted: rdwr (default), aio, memory")]
    UnknownBsType(String),
    #[error("unsupported bsOpts entry {0:?}; accepted: direct, bsoflags=direct")]
    UnsupportedBsOpt(String),
    #[error("block size {0} is not supported; use 512 or 4096")]
    InvalidBlockSize(u32),
    #[error("{value:?} is not a size: {reason}")]
    InvalidSize { value: String, reason: String },
    #[error("size {size} is not a multiple of the block size {block_size}")]
    SizeNotBlockMultiple { size: u64, block_size: u32 },
    #[error("required for bsType memory")]
    MemoryNeedsSize,
    #[error("must be empty for bsType memory (a RAM store has no path)")]
    MemoryWithBackingStore,
    #[error("{kind} {name:?} not found")]
    MissingReference { kind: ObjectKind, name: String },
    #[error("InitiatorGroup {group:?} (bound by InitiatorGroupBinding {binding:?}) is invalid; the Target is not served until it is fixed")]
    InvalidBoundGroup { group: String, binding: String },
    #[error("Secret {namespace}/{name} not found")]
    SecretNotFound { namespace: String, name: String },
    #[error("Secret {secret}: key {key:?} missing (in data or stringData)")]
    SecretKeyMissing { secret: String, key: &'static str },
    #[error("Secret {secret}: key {key:?}: {reason}")]
    SecretKeyInvalid {
        secret: String,
        key: &'static str,
        reason: String,
    },
    #[error("Secret {secret}: no CHAP credentials: it needs the keys {keys}")]
    ChapKeysMissing { secret: String, keys: String },
    #[error("Secret {secret}: key {key:?} is {len} bytes; CHAP secrets must be at least 12 bytes (96 bits, RFC 7143 §12.1.3)")]
    ChapSecretTooShort {
        secret: String,
        key: &'static str,
        len: usize,
    },
    #[error("the mutual CHAP secret equals the initiator's secret; RFC 7143 §12.1.3: a secret used for initiator authentication MUST NOT be configured for target authentication")]
    MutualSecretReused,
}

impl Problem {
    /// Stable CamelCase label, e.g. for a Kubernetes condition's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::Schema(_) => "InvalidSchema",
            Problem::UnknownKind { .. } => "UnknownKind",
            Problem::WrongApiVersion { .. } => "WrongApiVersion",
            Problem::MissingName => "MissingName",
            Problem::DuplicateName(_) => "DuplicateName",
            Problem::DuplicateIqn { .. } => "DuplicateIqn",
            Problem::DuplicateLun(_) => "DuplicateLun",
            Problem::LunOutOfRange(_) => "LunOutOfRange",
            Problem::MissingBackingStore { .. } => "MissingBackingStore",
            Problem::BackingStoreNotFound { .. } => "BackingStoreNotFound",
            Problem::BackingStoreUnusable { .. } => "BackingStoreUnusable",
            Problem::InvalidAddress { .. } => "InvalidAddress",
            Problem::InvalidIscsiName { .. } => "InvalidIscsiName",
            Problem::UnknownBsType(_) => "UnknownBsType",
            Problem::UnsupportedBsOpt(_) => "UnsupportedBsOpts",
            Problem::InvalidBlockSize(_) => "InvalidBlockSize",
            Problem::InvalidSize { .. } => "InvalidSize",
            Problem::SizeNotBlockMultiple { .. } => "InvalidSize",
            Problem::MemoryNeedsSize => "InvalidSize",
            Problem::MemoryWithBackingStore => "InvalidBackingStore",
            Problem::MissingReference { .. } => "MissingReference",
            Problem::InvalidBoundGroup { .. } => "InvalidInitiatorGroup",
            Problem::SecretNotFound { .. } => "SecretNotFound",
            Problem::SecretKeyMissing { .. } | Problem::ChapKeysMissing { .. } => {
                "SecretKeyMissing"
            }
            Problem::SecretKeyInvalid { .. } => "SecretKeyInvalid",
            Problem::ChapSecretTooShort { .. } => "ChapSecretTooShort",
            Problem::MutualSecretReused => "MutualSecretReused",
        }
    }
}
