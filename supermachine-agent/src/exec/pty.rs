//! Pseudo-terminals for tty-mode execs.
//!
//! The master is opened through `/dev/ptmx` with `O_CLOEXEC` (libc's `openpty` does not set it,
//! and a master or slave leaking into another exec's child would keep that exec's terminal
//! open). The master is nonblocking and driven by tokio's reactor; [`PtyIo`] gives it
//! `AsyncRead`/`AsyncWrite`, with the EIO a master returns once every slave fd is closed read as
//! end of file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use supermachine_codec::WindowSize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys;

/// The master side of a pty.
#[derive(Debug)]
pub struct Pty {
    master: AsyncFd<File>,
}

impl Pty {
    /// Opens a pty of the given size; returns the master and the slave (for the child's stdio).
    pub fn open(size: WindowSize) -> io::Result<(Pty, OwnedFd)> {
        let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let slave_path = ptsname_r(&master)?;
        // std opens with O_CLOEXEC; O_NOCTTY keeps the slave from becoming *our* ctty.
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&slave_path)?;
        let master = File::from(OwnedFd::from(master));
        sys::set_window_size(&master, size.cols, size.rows)?;
        let flags = OFlag::from_bits_truncate(fcntl(&master, FcntlArg::F_GETFL)?);
        fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the File owns the master fd and keeps it open, unchanged, for as long as the
        // AsyncFd (which owns the File) exists; nothing else closes or replaces it.
        let master = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
        Ok((Pty { master }, OwnedFd::from(slave)))
    }

    /// Changes the terminal size; the kernel sends SIGWINCH to the foreground process group.
    pub fn resize(&self, size: WindowSize) -> io::Result<()> {
        sys::set_window_size(self.master.get_ref().as_fd(), size.cols, size.rows)
    }
}

/// `AsyncRead` + `AsyncWrite` over a shared [`Pty`] master (one reader and one writer may use
/// separate handles at once).
#[derive(Debug, Clone)]
pub struct PtyIo(pub Arc<Pty>);

/// The slave side is gone: reading the master fails with EIO.
fn is_hangup(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EIO)
}

impl AsyncRead for PtyIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.master.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|master| master.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if is_hangup(&e) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.master.poll_write_ready(cx))?;
            match guard.try_io(|master| master.get_ref().write(data)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A pty has no half-close; EOF is the VEOF character, written by the stdin pump.
        Poll::Ready(Ok(()))
    }
}
