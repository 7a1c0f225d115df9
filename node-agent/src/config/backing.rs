//! Filesystem checks of backing stores, kept apart from the pure resolution so the cluster
//! mode can report them as Target conditions instead of failing.

use std::fmt;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use target_core::config::{Backing, DesiredState};

use super::error::Problem;

/// A LUN whose backing store cannot be opened or created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingStoreError {
    pub iqn: String,
    pub lun: u16,
    /// [`Problem::BackingStoreNotFound`] or [`Problem::BackingStoreUnusable`].
    pub problem: Problem,
}

impl fmt::Display for BackingStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "target {} LUN {}: {}", self.iqn, self.lun, self.problem)
    }
}

impl std::error::Error for BackingStoreError {}

/// Checks that every path-backed LUN names a regular file or block device, or does not exist
/// yet and has a size to be created with. Only inspects metadata; opens nothing.
///
/// The parent directory of a file still to be created is not checked: creating the file is
/// the LUN backend's job (and it may create the directory).
pub fn check_backing_stores(state: &DesiredState) -> Vec<BackingStoreError> {
    let mut errors = Vec::new();
    for (iqn, target) in &state.targets {
        for (&lun, config) in &target.luns {
            let Backing::Path(path) = &config.backing else {
                continue;
            };
            let can_create = config.create_size.is_some() || config.clone_from.is_some();
            let checked = check_path(path, can_create).and_then(|()| match &config.clone_from {
                // The copy's source must be there while the copy is still to be made.
                Some(source) if !path.exists() => check_clone_source(source),
                _ => Ok(()),
            });
            if let Err(problem) = checked {
                errors.push(BackingStoreError {
                    iqn: iqn.clone(),
                    lun,
                    problem,
                });
            }
        }
    }
    errors
}

fn check_clone_source(source: &Path) -> Result<(), Problem> {
    match std::fs::metadata(source) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(Problem::BackingStoreUnusable {
            path: source.to_owned(),
            reason: "cloneFrom: a copy can only be made of a regular file".to_owned(),
        }),
        Err(e) => Err(Problem::BackingStoreUnusable {
            path: source.to_owned(),
            reason: format!("cloneFrom: {e}"),
        }),
    }
}

fn check_path(path: &Path, can_create: bool) -> Result<(), Problem> {
    let unusable = |reason: String| Problem::BackingStoreUnusable {
        path: path.to_owned(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            let file_type = meta.file_type();
            if file_type.is_file() || file_type.is_block_device() {
                Ok(())
            } else if file_type.is_dir() {
                Err(unusable("is a directory".to_owned()))
            } else {
                Err(unusable("not a regular file or block device".to_owned()))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if can_create {
                Ok(())
            } else {
                Err(Problem::BackingStoreNotFound {
                    path: path.to_owned(),
                })
            }
        }
        Err(e) => Err(unusable(e.to_string())),
    }
}

/// A backing store that several LUNs name: each writes over the others' data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBackingStore {
    pub path: std::path::PathBuf,
    /// (target IQN, LUN) of every LUN naming it, in IQN and LUN order.
    pub luns: Vec<(String, u16)>,
}

impl fmt::Display for SharedBackingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let users: Vec<String> = self
            .luns
            .iter()
            .map(|(iqn, lun)| format!("{iqn} LUN {lun}"))
            .collect();
        write!(
            f,
            "{} is the backing store of {} LUNs ({}): each initiator's writes land on the others' data",
            self.path.display(),
            self.luns.len(),
            users.join(", ")
        )
    }
}

/// Backing stores named by more than one LUN (same path; different spellings of one file,
/// such as a symbolic link, are not resolved).
pub fn shared_backing_stores(state: &DesiredState) -> Vec<SharedBackingStore> {
    let mut by_path: std::collections::BTreeMap<&Path, Vec<(String, u16)>> = Default::default();
    for (iqn, target) in &state.targets {
        for (&lun, config) in &target.luns {
            if let Backing::Path(path) = &config.backing {
                by_path
                    .entry(path.as_path())
                    .or_default()
                    .push((iqn.clone(), lun));
            }
        }
    }
    by_path
        .into_iter()
        .filter(|(_, luns)| luns.len() > 1)
        .map(|(path, luns)| SharedBackingStore {
            path: path.to_path_buf(),
            luns,
        })
        .collect()
}
