//! The host terminal: raw mode for interactive sessions, and its size.

use std::io::IsTerminal;

use rustix::termios::{self, OptionalActions, Termios};

/// Puts stdin's terminal in raw mode (no echo, no line editing, Ctrl-C as a byte) until
/// dropped, so keystrokes go to the guest's terminal as typed.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// `None` when stdin is not a terminal (nothing to do).
    pub fn enter() -> std::io::Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// The size of the terminal on stdout (else stdin), as (cols, rows).
pub fn size() -> Option<(u16, u16)> {
    let from = |fd: std::os::fd::BorrowedFd<'_>| {
        termios::tcgetwinsize(fd)
            .ok()
            .filter(|w| w.ws_col > 0 && w.ws_row > 0)
            .map(|w| (w.ws_col, w.ws_row))
    };
    use std::os::fd::AsFd;
    from(std::io::stdout().as_fd()).or_else(|| from(std::io::stdin().as_fd()))
}
