//! One VM configuration boots at a time: an exclusive `flock` on `<snapshot dir>.lock`, held
//! while a start looks for, restores, or boots and writes the snapshot of that configuration.
//! A concurrent start of the same configuration waits, then finds the finished snapshot; it
//! never sees a half-written one, and the guest is booted and snapshotted once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// How often a start waiting for another start's boot tries the lock again. Waits only happen
/// while another process or task boots the same configuration (seconds), so this is no busy
/// loop, and the uncontended path needs no thread at all.
const RETRY: Duration = Duration::from_millis(50);

/// Holds the lock until dropped (closing the file releases it).
#[derive(Debug)]
pub(crate) struct CacheLock {
    _file: File,
}

/// Waits for the lock of the snapshot directory `dir`.
pub(crate) async fn lock(dir: &Path) -> io::Result<CacheLock> {
    let mut name = dir.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(name)?;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(CacheLock { _file: file });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err);
        }
        tokio::time::sleep(RETRY).await;
    }
}
