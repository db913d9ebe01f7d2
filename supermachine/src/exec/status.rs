use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use supermachine_codec::ExitInfo;

/// How an exec ended, as the guest agent reported it: an exit code or a terminating signal,
/// like [`std::process::ExitStatus`] on Unix.
///
/// A [timed-out](crate::ExecBuilder::timeout) exec is not an error: it ends with the status of
/// the killed process (normally `signal() == Some(9)`), and [`timed_out`](Self::timed_out) says
/// why it was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitStatus {
    end: End,
    timed_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The status the agent's EXIT frame describes.
    ///
    /// Agents from before the EXIT frame carried the signal report a kill only as code
    /// `128 + N`; that is passed on as the code it is, since it cannot be told from a program
    /// that exited with that code itself.
    pub(crate) fn from_info(info: &ExitInfo, timed_out: bool) -> Self {
        // Numbers come from the guest: saturate instead of trusting them to fit.
        let to_i32 = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        let end = match info.signal {
            Some(signal) if signal != 0 => End::Signal(to_i32(signal)),
            _ => End::Code(to_i32(info.code)),
        };
        ExitStatus { end, timed_out }
    }

    /// The exit code, or `None` when a signal ended the process (as `std` and `tokio` report
    /// it). A shell would show a signal death as `128 + signal`.
    pub fn code(&self) -> Option<i32> {
        match self.end {
            End::Code(code) => Some(code),
            End::Signal(_) => None,
        }
    }

    /// The signal that ended the process, or `None` when it exited by itself.
    pub fn signal(&self) -> Option<i32> {
        match self.end {
            End::Code(_) => None,
            End::Signal(signal) => Some(signal),
        }
    }

    /// Whether the process exited with code 0.
    pub fn success(&self) -> bool {
        self.end == End::Code(0)
    }

    /// Whether the exec ran past its [timeout](crate::ExecBuilder::timeout) and was killed for
    /// it. The rest of the status is what the killed process reported (normally SIGKILL; if it
    /// exited on its own in the same instant, that exit).
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }
}

impl fmt::Display for ExitStatus {
    /// Formats like `std`'s Unix `ExitStatus`: `exit status: 3`, `signal: 9 (SIGKILL)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end {
            End::Code(code) => write!(f, "exit status: {code}"),
            End::Signal(signal) => match signal_name(signal) {
                Some(name) => write!(f, "signal: {signal} ({name})"),
                None => write!(f, "signal: {signal}"),
            },
        }
    }
}

/// Linux x86-64 names of the standard signals.
fn signal_name(signal: i32) -> Option<&'static str> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    let index = usize::try_from(signal.checked_sub(1)?).ok()?;
    NAMES.get(index).copied()
}

/// Everything about a finished exec, from [`ExecBuilder::output`](crate::ExecBuilder::output)
/// or [`ExecChild::wait_with_output`](crate::ExecChild::wait_with_output): `tokio`'s `Output`
/// plus what the guest measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How it ended. When `timed_out`, the status of the killed process (normally SIGKILL).
    pub status: ExitStatus,
    /// Everything written to stdout (and stderr, in tty mode).
    pub stdout: Bytes,
    /// Everything written to stderr.
    pub stderr: Bytes,
    /// From the start of the spawn to the exit status.
    pub duration: Duration,
    /// Peak resident memory of the exec's processes in KiB, as the guest kernel accounted it.
    pub peak_rss_kib: Option<u64>,
    /// Whether the exec was killed for running past its timeout (same as
    /// `status.timed_out()`).
    pub timed_out: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_signals_are_carried_exactly() {
        let exited = ExitStatus::from_info(&ExitInfo::exited(137), false);
        assert_eq!((exited.code(), exited.signal()), (Some(137), None));
        assert!(!exited.success());
        assert_eq!(exited.to_string(), "exit status: 137");

        let killed = ExitStatus::from_info(&ExitInfo::signaled(9), true);
        assert_eq!((killed.code(), killed.signal()), (None, Some(9)));
        assert!(killed.timed_out());
        assert_eq!(killed.to_string(), "signal: 9 (SIGKILL)");

        let ok = ExitStatus::from_info(&ExitInfo::exited(0), false);
        assert!(ok.success());
        assert_eq!(ok.to_string(), "exit status: 0");

        let rt = ExitStatus::from_info(&ExitInfo::signaled(40), false);
        assert_eq!(rt.to_string(), "signal: 40");
        let huge = ExitStatus::from_info(&ExitInfo::exited(u32::MAX), false);
        assert_eq!(huge.code(), Some(i32::MAX));
        // A zero "signal" is no signal: the code stands.
        let zero = ExitInfo {
            signal: Some(0),
            ..ExitInfo::exited(3)
        };
        assert_eq!(ExitStatus::from_info(&zero, false).code(), Some(3));
    }
}
