//! The agent's error types.
//!
//! [`ExecError`] is what ends an exec early; it maps onto the codec's [`AgentError`] (the ERROR
//! frame), with the stable `code: message` wording SEMANTICS.md specifies.

use std::fmt;
use std::io;

use supermachine_codec::{AgentError, ErrorCode};

/// A bad command line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag that takes a value came last.
    #[error("{flag} needs a value")]
    MissingValue {
        /// The flag.
        flag: &'static str,
    },
    /// `--vsock` was given something that is not a port number.
    #[error("invalid vsock port {value:?}")]
    InvalidPort {
        /// What was given.
        value: String,
        /// Why it does not parse.
        source: std::num::ParseIntError,
    },
    /// An argument we do not know.
    #[error("unknown argument {0:?}")]
    UnknownArgument(String),
    /// More than one listening mode.
    #[error("--unix and --vsock are mutually exclusive, and each may be given once")]
    ConflictingModes,
    /// No mode, and not PID 1 (where no arguments means "be the guest's init").
    #[error("no mode given: use --unix PATH or --vsock PORT (see --help)")]
    NoMode,
}

/// Why the agent could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener could not be set up.
    #[error("cannot listen on {what}")]
    Listen {
        /// The address, in words.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// Accepting connections failed for good.
    #[error("accepting connections on {what} failed")]
    Accept {
        /// The address, in words.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// A process-wide facility (signal handlers, runtime) could not be set up.
    #[error("{what}")]
    Setup {
        /// What failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Writing the `ready` line failed.
    #[error("cannot announce readiness on stdout")]
    Ready(#[source] io::Error),
}

/// Which program of an exec an error is about: the command itself or one of its chain links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link(pub usize);

impl fmt::Display for Link {
    /// Nothing for the command itself, `chain[i]: ` for `request.chain[i]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, "chain[{}]: ", n - 1),
        }
    }
}

/// Why an exec could not run (or finish running); sent to the host as the ERROR frame.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request itself is unusable.
    #[error("{0}")]
    InvalidRequest(String),
    /// A staged file could not be written.
    #[error("staging {path}")]
    Staging {
        /// The file's path.
        path: String,
        /// What went wrong.
        source: io::Error,
    },
    /// The program does not exist (ENOENT from exec).
    ///
    /// The program name comes last: the host takes what follows `program not found: `.
    #[error("{link}program not found: {program}")]
    ProgramNotFound {
        /// Which link.
        link: Link,
        /// argv\[0\] as requested.
        program: String,
    },
    /// Spawning failed otherwise.
    #[error("{link}cannot run {program}")]
    Spawn {
        /// Which link.
        link: Link,
        /// argv\[0\] as requested.
        program: String,
        /// The OS error.
        source: io::Error,
    },
    /// The agent failed.
    #[error("{what}")]
    Internal {
        /// What it was doing.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

impl ExecError {
    /// The ERROR frame payload for this error.
    pub fn to_agent_error(&self) -> AgentError {
        let code = match self {
            ExecError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            ExecError::Staging { source, .. } if is_permission(source) => {
                ErrorCode::PermissionDenied
            }
            ExecError::Staging { .. } | ExecError::Internal { .. } => ErrorCode::Internal,
            ExecError::ProgramNotFound { .. } => ErrorCode::NotFound,
            ExecError::Spawn { source, .. } if is_permission(source) => ErrorCode::PermissionDenied,
            ExecError::Spawn { .. } => ErrorCode::SpawnFailed,
        };
        AgentError::new(code, chain(self))
    }
}

/// `error` and its sources on one line (`what: why: cause`): the agent's errors say what failed
/// and return the cause as their source, so `{}` alone stops at the first level.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn is_permission(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::PermissionDenied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_text_names_the_link_and_ends_with_the_program() {
        let first = ExecError::ProgramNotFound {
            link: Link(0),
            program: "nope".into(),
        };
        assert_eq!(
            first.to_agent_error().to_string(),
            "not-found: program not found: nope"
        );
        let second = ExecError::ProgramNotFound {
            link: Link(2),
            program: "nope".into(),
        };
        assert_eq!(
            second.to_agent_error().to_string(),
            "not-found: chain[1]: program not found: nope"
        );
        let denied = ExecError::Staging {
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(denied.to_agent_error().code, ErrorCode::PermissionDenied);
        assert!(denied.to_agent_error().message.starts_with("staging /x: "));
    }
}
