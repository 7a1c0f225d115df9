//! Reflink copies of backing files: a LUN created as a copy of another file (a volume cloned
//! from a snapshot or from another volume), and a snapshot of a LUN.
//!
//! # Contract
//! - [`reflink`] makes `dest` a copy-on-write copy of `source` with `FICLONE`: the two files
//!   share their extents and no data is copied, so a copy of any size takes milliseconds and
//!   no space until one of them is written. ioctl_ficlone(2): "Clones are atomic with regards
//!   to concurrent writes", so a copy of a LUN that is being written holds every write
//!   completed before the call and none after it (a crash-consistent point in time).
//! - It never falls back to copying data. A filesystem without reflink (ext4, tmpfs), or
//!   `source` on another filesystem, is [`BackendError::CloneUnsupported`]: a silent copy of a
//!   large volume would take as long as the volume is big and double its space.
//! - `dest` appears whole or not at all: the copy is made under a temporary name in the same
//!   directory, grown, flushed, then linked into place. An existing `dest` is never replaced
//!   (`AlreadyExists`), and a failure leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::BackendError;

/// Whether an errno from `FICLONE` means "this filesystem (or this pair of files) cannot
/// share extents", as opposed to an I/O failure. ioctl_ficlone(2): EOPNOTSUPP "the
/// filesystem does not support reflinking", EXDEV "dest_fd and src_fd are not on the same
/// mounted filesystem", EINVAL "the filesystem does not support reflinking this range"; a
/// kernel or file type without the ioctl answers ENOTTY or ENOSYS.
fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

/// Makes `dest` a reflink copy of the regular file `source`, grown sparse to `min_size` when
/// that is larger than `source` (never truncated below it). Returns the size of `dest`.
///
/// # Errors
/// [`BackendError::Open`] when `source` cannot be opened or `dest` exists (`AlreadyExists`)
/// or cannot be created; [`BackendError::Invalid`] when `source` is not a regular file;
/// [`BackendError::CloneUnsupported`] when the filesystem cannot reflink them.
pub fn reflink(source: &Path, dest: &Path, min_size: Option<u64>) -> Result<u64, BackendError> {
    let open_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| BackendError::Open { path, source }
    };
    let src = File::open(source).map_err(open_err(source))?;
    let meta = src.metadata().map_err(open_err(source))?;
    if !meta.is_file() {
        return Err(BackendError::Invalid {
            path: source.to_path_buf(),
            reason: "a copy can only be made of a regular file".into(),
        });
    }
    if dest.symlink_metadata().is_ok() {
        return Err(BackendError::Open {
            path: dest.to_path_buf(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "already exists"),
        });
    }
    let tmp = temp_name(dest);
    let result = copy_into(&src, meta.len(), &tmp, min_size).and_then(|size| {
        // link(2) fails with EEXIST rather than replace a `dest` made meanwhile.
        std::fs::hard_link(&tmp, dest).map_err(open_err(dest))?;
        Ok(size)
    });
    let _ = std::fs::remove_file(&tmp);
    let size = result.map_err(|e| match e {
        Copy::Unsupported(e) => BackendError::CloneUnsupported {
            path: dest.to_path_buf(),
            source_path: source.to_path_buf(),
            reason: format!(
                "{e}: the filesystem cannot share extents between these files (reflink needs \
                 both on one XFS filesystem made with reflink=1, or btrfs); no data was copied"
            ),
        },
        Copy::Failed(e) => e,
    })?;
    if let Some(dir) = dest.parent() {
        // The new name is durable with its directory entry.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    tracing::info!(source = %source.display(), dest = %dest.display(), size, "reflink copy made");
    Ok(size)
}

/// `.<name>.clone` beside `dest`: hidden, and the same for every attempt, so the leftover of
/// an attempt cut short (a crash, a kill) is removed by the next one instead of staying in the
/// directory for ever.
fn temp_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.clone"))
}

/// Why [`copy_into`] failed: the filesystem cannot reflink, or something else did.
enum Copy {
    Unsupported(io::Error),
    Failed(BackendError),
}

impl From<BackendError> for Copy {
    fn from(e: BackendError) -> Copy {
        Copy::Failed(e)
    }
}

fn copy_into(src: &File, src_len: u64, tmp: &Path, min_size: Option<u64>) -> Result<u64, Copy> {
    let io_err = |source: io::Error| {
        Copy::Failed(BackendError::Open {
            path: tmp.to_path_buf(),
            source,
        })
    };
    let _ = std::fs::remove_file(tmp);
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io_err)?;
    if let Err(e) = rustix::fs::ioctl_ficlone(&out, src) {
        let e = io::Error::from(e);
        return Err(if is_unsupported(&e) {
            Copy::Unsupported(e)
        } else {
            io_err(e)
        });
    }
    let size = min_size.map_or(src_len, |m| m.max(src_len));
    if size > src_len {
        out.set_len(size).map_err(io_err)?;
    }
    out.sync_all().map_err(io_err)?;
    Ok(size)
}
