//! What a descriptor is, in words, for messages about descriptors and paths of the wrong kind.

use std::fs::{File, Metadata};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

/// The target of `/proc/self/fd/N`: a path, or `anon_inode:[eventfd]` and the like.
fn link(file: &File) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

/// "a pipe", "a character device (/dev/zero)", "an anonymous file (anon_inode:[eventpoll])".
pub fn describe(file: &File, metadata: &Metadata) -> String {
    let name = link(file).map(|target| target.display().to_string());
    let file_type = metadata.file_type();
    let kind = if file_type.is_file() {
        "a regular file"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        // Anonymous pipes link to "pipe:[inode]", named ones to their path.
        if name.as_ref().is_some_and(|name| name.starts_with("pipe:")) {
            "a pipe"
        } else {
            "a FIFO"
        }
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        // eventfd, epoll, signalfd, timerfd...: only the link says which.
        "an anonymous file"
    };
    match name {
        Some(name) => format!("{kind} ({name})"),
        None => kind.into(),
    }
}

pub fn is_eventfd(file: &File) -> bool {
    link(file).is_some_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}
