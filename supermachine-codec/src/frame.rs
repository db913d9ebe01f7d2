use std::fmt;

use bytes::Bytes;

use crate::control::ControlMessage;
use crate::request::ExecRequest;

/// Frame kind bytes, as they appear on the wire.
pub mod kind {
    /// Host → agent: JSON `ExecRequest`; first frame of an exec connection.
    pub const REQUEST: u8 = 0xff;
    /// Both directions: JSON control action or ack (+ optional attachment).
    pub const CONTROL: u8 = 0xfe;
    /// Host → agent: child stdin bytes; empty means EOF.
    pub const STDIN: u8 = 0x00;
    /// Agent → host: child stdout bytes (and stderr in tty mode).
    pub const STDOUT: u8 = 0x01;
    /// Agent → host: child stderr bytes.
    pub const STDERR: u8 = 0x02;
    /// Host → agent: terminal size, cols u16 BE + rows u16 BE.
    pub const RESIZE: u8 = 0x03;
    /// Host → agent: signal number u32 BE, for the child's process group.
    pub const SIGNAL: u8 = 0x04;
    /// Agent → host: exit code u32 BE, optionally peak RSS KiB u64 BE, optionally the
    /// terminating signal u32 BE (payload of 4, 8, 12 or 16 bytes; see [`ExitInfo`](crate::ExitInfo)).
    pub const EXIT: u8 = 0x05;
    /// Agent → host: UTF-8 error message; last frame.
    pub const ERROR: u8 = 0x06;
    /// Agent → host: pid u32 BE of the spawned child.
    pub const STARTED: u8 = 0x07;

    /// Whether `kind` is one this crate decodes into a typed [`Frame`](crate::Frame).
    pub fn is_known(kind: u8) -> bool {
        matches!(
            kind,
            REQUEST | CONTROL | STDIN | STDOUT | STDERR | RESIZE | SIGNAL | EXIT | ERROR | STARTED
        )
    }
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSize {
    /// Width in character cells.
    pub cols: u16,
    /// Height in character cells.
    pub rows: u16,
}

/// The payload of an EXIT frame.
///
/// On the wire the payload is `code u32 BE`, then `peak_rss_kib u64 BE` when known, then
/// `signal u32 BE` when the process was ended by a signal — 4, 12, 8 or 16 bytes, told apart by
/// length:
///
/// | length | fields                    |
/// |--------|---------------------------|
/// | 4      | code                      |
/// | 8      | code, signal              |
/// | 12     | code, peak_rss_kib        |
/// | 16     | code, peak_rss_kib, signal|
///
/// The 4- and 12-byte forms are the original protocol's; agents from before the signal field
/// send only those, so for them `signal` is `None` even after a kill (their `code` says
/// `128 + N` and nothing more can be known). An agent that knows the field sends it whenever
/// `WIFSIGNALED` was true, so `signal: None` from such an agent means a normal exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitInfo {
    /// Exit code. When the child was killed by signal `N` this is `128 + N`, as a shell reports
    /// it, so a reader that only looks at `code` keeps working.
    pub code: u32,
    /// Peak resident set size of the exec's processes in KiB (from `rusage`), when known.
    pub peak_rss_kib: Option<u64>,
    /// The signal that ended the child (`WTERMSIG`), when the agent reported one; `None` for a
    /// normal exit, and always for the original 4- and 12-byte payloads.
    pub signal: Option<u32>,
}

impl ExitInfo {
    /// A normal exit with `code`, without resource usage.
    pub fn exited(code: u32) -> Self {
        ExitInfo {
            code,
            peak_rss_kib: None,
            signal: None,
        }
    }

    /// An end by signal `signal` (`code` is `128 + signal`, saturating), without resource usage.
    pub fn signaled(signal: u32) -> Self {
        ExitInfo {
            code: signal.saturating_add(128),
            peak_rss_kib: None,
            signal: Some(signal),
        }
    }
}

/// Why the agent could not run (or finish running) an exec; the payload of an ERROR frame.
///
/// On the wire this is UTF-8 text `"<code>: <message>"`, so it stays readable in a packet dump
/// while the host can still match on [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// The machine-readable part of an [`AgentError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A program (argv\[0\] of the command or of a chain link) was not found.
    NotFound,
    /// Permission denied while spawning or staging files.
    PermissionDenied,
    /// The request was malformed (empty argv, unknown user, unsupported version, ...).
    InvalidRequest,
    /// Spawning failed for another reason.
    SpawnFailed,
    /// The agent itself failed.
    Internal,
    /// A code this version does not know.
    Other,
}

impl ErrorCode {
    fn token(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not-found",
            ErrorCode::PermissionDenied => "permission-denied",
            ErrorCode::InvalidRequest => "invalid-request",
            ErrorCode::SpawnFailed => "spawn-failed",
            ErrorCode::Internal => "internal",
            ErrorCode::Other => "error",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        Some(match token {
            "not-found" => ErrorCode::NotFound,
            "permission-denied" => ErrorCode::PermissionDenied,
            "invalid-request" => ErrorCode::InvalidRequest,
            "spawn-failed" => ErrorCode::SpawnFailed,
            "internal" => ErrorCode::Internal,
            "error" => ErrorCode::Other,
            _ => return None,
        })
    }
}

impl AgentError {
    /// An error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AgentError {
            code,
            message: message.into(),
        }
    }

    /// Parses the wire text. Text without a known code becomes [`ErrorCode::Other`] with the
    /// whole text as message, so nothing an older or newer agent says is lost.
    pub fn parse(text: &str) -> Self {
        if let Some((token, message)) = text.split_once(": ") {
            if let Some(code) = ErrorCode::from_token(token) {
                return AgentError::new(code, message);
            }
        }
        AgentError::new(ErrorCode::Other, text)
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.token(), self.message)
    }
}

impl std::error::Error for AgentError {}

/// One unit of the exec protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Host → agent: what to run.
    Request(ExecRequest),
    /// A control request or ack, with its binary attachment (empty when there is none).
    Control {
        /// The JSON part.
        message: ControlMessage,
        /// Raw bytes after the JSON (file contents, entropy).
        data: Bytes,
    },
    /// Host → agent: bytes for the child's stdin; empty means EOF (the connection stays open).
    Stdin(Bytes),
    /// Agent → host: bytes the child wrote to stdout (or to the pty, in tty mode).
    Stdout(Bytes),
    /// Agent → host: bytes the child wrote to stderr.
    Stderr(Bytes),
    /// Host → agent: new terminal size.
    Resize(WindowSize),
    /// Host → agent: deliver this signal to the child's process group.
    Signal(u32),
    /// Agent → host: the child was spawned with this pid.
    Started {
        /// Guest pid of the first command.
        pid: u32,
    },
    /// Agent → host: the exec finished.
    Exit(ExitInfo),
    /// Agent → host: the exec failed; last frame.
    Error(AgentError),
    /// A kind this version does not know. Receivers skip it.
    Unknown {
        /// The kind byte.
        kind: u8,
        /// The raw payload.
        payload: Bytes,
    },
}

impl Frame {
    /// The kind byte this frame is sent with.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Request(_) => kind::REQUEST,
            Frame::Control { .. } => kind::CONTROL,
            Frame::Stdin(_) => kind::STDIN,
            Frame::Stdout(_) => kind::STDOUT,
            Frame::Stderr(_) => kind::STDERR,
            Frame::Resize(_) => kind::RESIZE,
            Frame::Signal(_) => kind::SIGNAL,
            Frame::Started { .. } => kind::STARTED,
            Frame::Exit(_) => kind::EXIT,
            Frame::Error(_) => kind::ERROR,
            Frame::Unknown { kind, .. } => *kind,
        }
    }

    /// A CONTROL frame carrying `message` and no attachment.
    pub fn control(message: ControlMessage) -> Self {
        Frame::Control {
            message,
            data: Bytes::new(),
        }
    }
}
