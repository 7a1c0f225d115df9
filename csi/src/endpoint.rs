//! The CSI endpoint: gRPC over a unix socket named `unix://PATH` (the CSI convention; the
//! sidecars and csi-sanity connect there).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// The socket path of a `unix://PATH` (or `unix:PATH`) endpoint.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .with_context(|| {
            format!("--endpoint {endpoint:?}: only unix://PATH endpoints are served")
        })?;
    if path.is_empty() {
        bail!("--endpoint {endpoint:?}: no socket path");
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket, replacing a stale one (a socket file nobody listens on); refuses to
/// replace anything that is not a socket.
pub fn bind(path: &Path) -> anyhow::Result<UnixListenerStream> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    Ok(UnixListenerStream::new(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_sockets() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi.sock").unwrap(),
            PathBuf::from("/csi.sock")
        );
        let e = socket_path("tcp://127.0.0.1:10000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only unix://PATH"), "{e}");
        assert!(socket_path("unix://").is_err());
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert!(bind(&sock).is_ok(), "stale socket not replaced");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let e = bind(&file).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
    }
}
