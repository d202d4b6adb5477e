//! The entropy source: any readable file, character device or FIFO, read straight into guest
//! buffers (zero-copy) without ever blocking the queue worker.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hvisor_vhost_core::chain::{Segment, stream_parts};
use vm_memory::{
    GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, ReadVolatile, VolatileMemoryError,
};

#[derive(Debug, thiserror::Error)]
#[error("cannot open entropy source {path}: {source}")]
pub struct OpenError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Why a request got fewer bytes than it asked for.
#[derive(Debug, thiserror::Error)]
pub enum Shortfall {
    #[error("end of file")]
    EndOfFile,
    #[error("no data ready (a FIFO without a writer's data)")]
    NoData,
    #[error("read failed: {0}")]
    Read(io::Error),
    #[error("guest buffer unusable: {0}")]
    GuestMemory(GuestMemoryError),
}

pub struct EntropySource {
    file: File,
    path: PathBuf,
}

impl EntropySource {
    /// Opens `path` non-blocking, so an empty FIFO yields a short request rather than a stuck
    /// worker.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| OpenError {
                path: path.to_owned(),
                source,
            })?;
        Ok(EntropySource {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads up to `limit` bytes into the start of the stream `segments` describes; returns how
    /// many arrived and, if fewer than `limit`, why.
    pub fn fill(
        &mut self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        limit: u64,
    ) -> (u64, Option<Shortfall>) {
        let mut filled = 0u64;
        for (addr, _, len) in stream_parts(segments, 0, limit) {
            for slice in mem.get_slices(addr, len) {
                let mut rest = match slice {
                    Ok(slice) => slice,
                    Err(error) => return (filled, Some(Shortfall::GuestMemory(error))),
                };
                while !rest.is_empty() {
                    match self.file.read_volatile(&mut rest) {
                        Ok(0) => return (filled, Some(Shortfall::EndOfFile)),
                        Ok(read) => {
                            filled += read as u64;
                            rest = rest.offset(read).expect("a read stays within its buffer");
                        }
                        Err(VolatileMemoryError::IOError(error)) => match error.kind() {
                            io::ErrorKind::Interrupted => {}
                            io::ErrorKind::WouldBlock => return (filled, Some(Shortfall::NoData)),
                            _ => return (filled, Some(Shortfall::Read(error))),
                        },
                        Err(error) => {
                            return (
                                filled,
                                Some(Shortfall::Read(io::Error::other(error.to_string()))),
                            );
                        }
                    }
                }
            }
        }
        (filled, None)
    }
}
