//! Queue kicks on tokio: the eventfd a queue notification signals (an ioeventfd on KVM, or the
//! transport's write on the bus), watched by a device's async worker. Shared by every device
//! whose worker is a tokio task (vsock, net).

use std::os::fd::AsRawFd;

use crate::os::EventFd;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::Interest;
use tracing::warn;

/// Wraps a queue EventFd for tokio. The fd is switched to non-blocking mode (it is a dup of
/// the machine's ioeventfd; only our reads care about the flag).
pub(crate) fn async_eventfd(fd: EventFd) -> std::io::Result<AsyncFd<EventFd>> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the EventFd owns `raw` and is moved into the AsyncFd, so the descriptor stays
    // open and refers to the same eventfd for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// Consumes a kick: reads the counter and clears readiness (a new kick re-arms it). `device`
/// names the device in the log of a failed wait.
pub(crate) fn drain(r: std::io::Result<AsyncFdReadyGuard<'_, EventFd>>, device: &str) {
    match r {
        Ok(mut guard) => {
            let _ = guard.get_inner().read();
            guard.clear_ready();
        }
        Err(e) => warn!(%e, device, "queue eventfd"),
    }
}
