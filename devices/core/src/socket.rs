//! Listening sockets that frontends and users connect to by path.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0} exists and is not a socket; it is left as it is")]
    NotASocket(PathBuf),
    #[error("cannot listen on socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Listens on `path`. A stale socket at the path is replaced; anything else there (a disk image
/// given by mistake, say) is refused rather than deleted. The socket keeps `path` as its own
/// name, so `ss -x` and `/proc/net/unix` show it; a client that wants to connect the moment it
/// exists waits until `/proc/net/unix` lists it as listening (flag `00010000`), because `bind`
/// creates the file just before `listen` runs.
pub fn listen_at(path: &Path) -> Result<UnixListener, ListenError> {
    let io_error = |source| ListenError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(existing) if existing.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(io_error)?;
        }
        Ok(_) => return Err(ListenError::NotASocket(path.to_owned())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error(error)),
    }
    UnixListener::bind(path).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_stale_socket_is_replaced_and_the_new_one_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.sock");
        drop(UnixListener::bind(&path).unwrap());
        let listener = listen_at(&path).unwrap();
        UnixStream::connect(&path).expect("connects to the new socket");
        listener.accept().expect("the connection arrived");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, b"keep").unwrap();
        assert!(matches!(listen_at(&path), Err(ListenError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn a_missing_directory_is_named() {
        let path = Path::new("/nonexistent-hvisor-vhost-dir/device.sock");
        let error = listen_at(path).unwrap_err().to_string();
        assert!(
            error.contains("/nonexistent-hvisor-vhost-dir/device.sock"),
            "{error}"
        );
    }
}
