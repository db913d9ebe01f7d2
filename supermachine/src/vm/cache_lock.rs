//! One VM configuration boots at a time: an exclusive `flock` on `<snapshot dir>.lock`, held
//! while a start looks for, restores, or boots and writes the snapshot of that configuration.
//! A concurrent start of the same configuration waits, then finds the finished snapshot; it
//! never sees a half-written one, and the guest is booted and snapshotted once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Holds the lock until dropped (closing the file releases it).
#[derive(Debug)]
pub(crate) struct CacheLock {
    _file: File,
}

/// Waits (off the async threads) for the lock of the snapshot directory `dir`.
pub(crate) async fn lock(dir: &Path) -> io::Result<CacheLock> {
    let mut name = dir.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(CacheLock { _file: file })
    })
    .await
    .map_err(io::Error::other)?
}
