use std::fmt;
use std::time::Duration;

use bytes::Bytes;

/// How an exec ended: the exit code reported by the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitStatus {
    code: u32,
}

/// Highest signal number Linux delivers; codes above `128 + SIGRTMAX` are plain exit codes.
const MAX_SIGNAL: u32 = 64;

impl ExitStatus {
    pub(crate) fn from_code(code: u32) -> Self {
        ExitStatus { code }
    }

    /// The exit code: the program's own (0–255), or `128 + N` when it was killed by signal `N`.
    pub fn code(&self) -> u32 {
        self.code
    }

    /// Whether the program exited with code 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// The signal that killed the program, read from a `128 + N` code. A program that *exits*
    /// with such a code itself looks the same; the protocol does not tell them apart.
    pub fn signal(&self) -> Option<u32> {
        (self.code > 128 && self.code <= 128 + MAX_SIGNAL).then(|| self.code - 128)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.signal() {
            Some(signal) => write!(f, "exit code {} (signal {signal})", self.code),
            None => write!(f, "exit code {}", self.code),
        }
    }
}

/// Everything about a finished exec, from [`ExecBuilder::output`](crate::ExecBuilder::output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How it ended. When `timed_out`, the status of the killed process (`128 + 9`).
    pub status: ExitStatus,
    /// Everything written to stdout (and stderr, in tty mode).
    pub stdout: Bytes,
    /// Everything written to stderr.
    pub stderr: Bytes,
    /// From the start of the spawn to the exit status.
    pub duration: Duration,
    /// Peak resident memory of the exec's processes in KiB, as the guest kernel accounted it.
    pub peak_rss_kib: Option<u64>,
    /// Whether the exec was killed for running past its timeout.
    pub timed_out: bool,
}
