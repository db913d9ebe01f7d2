//! Noticing that the host closed an exec connection while nobody is reading it.
//!
//! The connection reader stops reading while the stdin queue is full (a child that does not read
//! its stdin), so it cannot see EOF then. A host that gives up on such an exec and closes the
//! connection must still get its processes killed, so the exec also watches a duplicate of the
//! connection's fd for read-hangup (`EPOLLRDHUP`), which the kernel reports without anything
//! being read, and for errors (`EPOLLERR`): a connection the transport reset (the host's vsock
//! device after a snapshot restore) reports only that — no hangup, nothing to read — so a
//! watch for readability alone would never wake and the orphaned exec would run forever.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Watches a connection for the peer closing it (or shutting down its write side).
#[derive(Debug)]
pub struct HangupWatch {
    fd: AsyncFd<OwnedFd>,
}

impl HangupWatch {
    /// Watches the connection `socket` refers to (through a duplicate fd).
    pub fn new(socket: impl AsFd) -> io::Result<HangupWatch> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        // SAFETY: the OwnedFd is owned by the AsyncFd and stays open, unchanged, until the
        // AsyncFd is dropped; nothing else closes or replaces it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE.add(Interest::ERROR)) }
                .map_err(io::Error::from)?;
        Ok(HangupWatch { fd })
    }

    /// Completes once the peer has closed, the connection failed (reset), or watching it
    /// failed. Cancel-safe.
    pub async fn closed(&self) {
        loop {
            match self.fd.ready(Interest::READABLE.add(Interest::ERROR)).await {
                Ok(mut ready) => {
                    if ready.ready().is_read_closed() || ready.ready().is_error() {
                        return;
                    }
                    // Plain data arrived; that is the reader's business. Wait for the next
                    // event (closed states survive clearing, so a hangup is never missed).
                    ready.clear_ready();
                }
                Err(e) => {
                    tracing::debug!("watching the connection failed: {e}");
                    return;
                }
            }
        }
    }
}
