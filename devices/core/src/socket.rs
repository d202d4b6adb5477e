//! Listening sockets that frontends and users connect to by path.

use std::ffi::OsString;
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

/// Listens on `path` such that the path appears only once it accepts connections: the socket
/// is bound under a staging name beside it and renamed into place, because `bind` creates the
/// file before `listen` runs and a client connecting in between would be refused. A stale
/// socket at the path is replaced; anything else there (a disk image given by mistake, say)
/// is refused rather than deleted.
pub fn listen_at(path: &Path) -> Result<UnixListener, ListenError> {
    let io_error = |source| ListenError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(existing) if !existing.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_owned()));
        }
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error(error)),
    }
    let file_name = path.file_name().ok_or_else(|| {
        io_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path has no file name",
        ))
    })?;
    let mut staging_name = OsString::from(".");
    staging_name.push(file_name);
    staging_name.push(format!(".{}", std::process::id()));
    let staging = path.with_file_name(staging_name);
    // Left behind by a killed process that had the same pid, it would fail the bind.
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(io_error)?;
    if let Err(error) = std::fs::rename(&staging, path) {
        let _ = std::fs::remove_file(&staging);
        return Err(io_error(error));
    }
    Ok(listener)
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
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "a staging file was left: {leftovers:?}");
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
