//! An eventfd made of a pipe, for hosts without `eventfd(2)` (macOS).
//!
//! It offers the calls the VMM makes on `vmm_sys_util`'s `EventFd` (`new`, `write`, `read`,
//! `try_clone`, `as_raw_fd`) with the semantics those callers rely on: a `write` makes the
//! descriptor readable until a `read` consumes every signal so far; `read` on an idle
//! non-blocking one fails with `WouldBlock`. The count `read` returns is the number of signals
//! still in the pipe, at least 1 (callers only care that it is non-zero). The write end is always
//! non-blocking: a full pipe already means "signalled", so a write that would block is dropped.
//! Plain POSIX, so it is unit-tested on Linux too.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// [`PipeEventFd::new`] flag: a `read` with nothing signalled returns `WouldBlock`.
pub const NONBLOCK: i32 = 0o4000;
/// [`PipeEventFd::new`] flag: accepted for compatibility; both ends are always close-on-exec.
pub const CLOEXEC: i32 = 0o2000000;

/// A signal counter on a pipe (see the module docs). Polling it means polling
/// [`as_raw_fd`](AsRawFd::as_raw_fd), the read end.
#[derive(Debug)]
pub struct PipeEventFd {
    read: File,
    write: File,
}

impl PipeEventFd {
    /// A new, unsignalled counter. `flags` may hold [`NONBLOCK`] and [`CLOEXEC`].
    pub fn new(flags: i32) -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid two-int out-array for the call.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe() succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        set_flags(read.as_raw_fd(), flags & NONBLOCK != 0)?;
        set_flags(write.as_raw_fd(), true)?;
        Ok(PipeEventFd {
            read: File::from(read),
            write: File::from(write),
        })
    }

    /// Signals the counter (`value` is ignored beyond being a signal, as callers write 1).
    pub fn write(&self, _value: u64) -> io::Result<()> {
        match (&self.write).write(&[1]) {
            Ok(_) => Ok(()),
            // The pipe is full: it is signalled already.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Consumes every signal so far and returns how many there were (at least 1).
    pub fn read(&self) -> io::Result<u64> {
        let mut buf = [0u8; 512];
        let mut total = 0u64;
        loop {
            match (&self.read).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    total += n as u64;
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            // Only the first read may block; the rest just drain what is there.
            if total > 0 && !self.is_nonblocking()? {
                break;
            }
        }
        if total == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        Ok(total)
    }

    /// Another handle on the same counter (both ends duplicated, as `dup` does for an eventfd).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(PipeEventFd {
            read: self.read.try_clone()?,
            write: self.write.try_clone()?,
        })
    }

    fn is_nonblocking(&self) -> io::Result<bool> {
        // SAFETY: F_GETFL on a descriptor this value owns; no memory is passed.
        let flags = unsafe { libc::fcntl(self.read.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(flags & libc::O_NONBLOCK != 0)
    }
}

impl AsRawFd for PipeEventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

/// Sets close-on-exec, and `O_NONBLOCK` when asked.
fn set_flags(fd: RawFd, nonblocking: bool) -> io::Result<()> {
    // SAFETY: fcntl on an open descriptor the caller owns; no memory is passed.
    unsafe {
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        if nonblocking {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_read_once_then_the_counter_is_idle() {
        let fd = PipeEventFd::new(NONBLOCK).unwrap();
        assert_eq!(
            fd.read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "idle"
        );
        fd.write(1).unwrap();
        fd.write(1).unwrap();
        assert_eq!(fd.read().unwrap(), 2);
        assert_eq!(fd.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_clone_signals_the_same_counter_and_a_full_pipe_stays_signalled() {
        let fd = PipeEventFd::new(NONBLOCK).unwrap();
        let other = fd.try_clone().unwrap();
        for _ in 0..200_000 {
            other.write(1).unwrap();
        }
        assert!(fd.read().unwrap() > 0);
        assert_eq!(fd.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn poll_sees_a_signal_on_the_raw_fd() {
        let fd = PipeEventFd::new(NONBLOCK | CLOEXEC).unwrap();
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0);
        fd.write(1).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 1);
    }
}
