use std::io;
use std::time::Duration;

use supermachine_codec::{AgentError, CodecError};

use crate::vm::{ConfigError, VmExit};

/// Everything that can go wrong, as variants a caller can match on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The agent could not be reached (socket missing, connection refused, VM not running).
    #[error("cannot reach the guest agent at {target}")]
    AgentUnreachable {
        /// Where we tried to connect.
        target: String,
        /// What the connect call said.
        #[source]
        source: io::Error,
    },
    /// The connection to the agent broke before the exec or control call finished (agent or VM
    /// died, or the connection was reset).
    #[error("lost the connection to the guest agent {during}: {reason}")]
    ConnectionLost {
        /// What was going on at the time.
        during: &'static str,
        /// What the connection said.
        reason: String,
    },
    /// The request was rejected on the host before anything was sent.
    #[error("invalid exec request: {0}")]
    InvalidRequest(String),
    /// A program could not be found in the guest (`PATH` lookup failed).
    #[error("program not found in the guest: {program}")]
    ProgramNotFound {
        /// The program as the agent reported it (for a chain link: which link).
        program: String,
    },
    /// The agent could not start the exec, or failed while running it.
    #[error("the guest agent could not run the exec")]
    ExecFailed(#[source] AgentError),
    /// A control action (read_file, write_file, ping, ...) failed in the guest.
    #[error("control action {action} failed in the guest: {message}")]
    Control {
        /// The action name.
        action: &'static str,
        /// The agent's explanation.
        message: String,
    },
    /// A published port could not be set up (address in use, no permission for a port below
    /// 1024, an address this host does not have). Nothing was started.
    #[error("cannot publish guest port {guest_port} on {host}")]
    Publish {
        /// The host address asked for.
        host: std::net::SocketAddr,
        /// The guest port it was for.
        guest_port: u16,
        /// What `bind` said.
        #[source]
        source: io::Error,
    },
    /// The exec was cancelled (token, `select!`, or drop) and was killed.
    #[error("exec was cancelled and killed")]
    Cancelled,
    /// [`ExecChild::abort`](crate::ExecChild::abort) tore the exec down.
    #[error("exec was aborted")]
    Aborted,
    /// Output piled up unread while waiting for the exit, past the configured limit.
    #[error(
        "{buffered} bytes of exec output are unread, above the limit of {limit}; read stdout/stderr \
         while waiting, use Stdio::null(), or raise ExecBuilder::max_buffered_output"
    )]
    OutputLimitExceeded {
        /// Bytes buffered.
        buffered: usize,
        /// The limit.
        limit: usize,
    },
    /// The exec has already ended; there is nothing left to signal.
    #[error("the exec is no longer running")]
    NotRunning,
    /// The peer sent something the protocol does not allow.
    #[error("exec protocol error: {0}")]
    Protocol(String),
    /// The [`VmConfig`](crate::VmConfig) cannot work; nothing was started.
    #[error("invalid VM configuration")]
    InvalidConfig(#[from] ConfigError),
    /// The hypervisor (`/dev/kvm`) cannot be used on this host; the message says how to fix it.
    #[error("cannot run VMs on this host: {0}")]
    HypervisorUnavailable(String),
    /// The VMM could not set the VM up (memory, devices, kernel loading).
    #[error("setting up the VM failed")]
    VmSetup(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The VM's agent speaks an older protocol than `what` needs: its binary is not the one
    /// built with this library (an agent installed by an older `setup.sh`, or
    /// `SUPERMACHINE_AGENT_BIN` pointing at one).
    #[error(
        "the VM's agent speaks protocol {found}, {what} needs {needed}: install the agent of this \
         library (`setup.sh`, or SUPERMACHINE_AGENT_BIN)"
    )]
    AgentOutdated {
        /// What could not be done.
        what: &'static str,
        /// The revision the agent reported.
        found: u32,
        /// The revision needed.
        needed: u32,
    },
    /// The guest agent did not answer within the boot timeout; the VM was stopped.
    #[error("the guest agent did not answer within {after:?}\n--- guest console (tail) ---\n{console_tail}")]
    BootTimeout {
        /// The timeout.
        after: Duration,
        /// The end of the guest console.
        console_tail: String,
    },
    /// The VM ended (kernel panic, reset, VMM failure, stopped by the host, or stopped by it as
    /// unresponsive) while the call was pending, or before it.
    #[error("{0}")]
    VmExited(VmExit),
    /// A snapshot could not be taken, opened or restored; the inner error names the problem
    /// (corrupt file, other format version, truncated memory, mismatched VM, ...).
    #[error(transparent)]
    Snapshot(crate::vm::SnapshotError),
    /// An image could not be pulled, imported or turned into a rootfs; the inner error says which
    /// (not found, unauthorized, digest mismatch, ...).
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// The VM could not be paused ([`Vm::pause`](crate::Vm::pause)); it runs on.
    #[error("the VM could not be paused")]
    Pause(#[source] supermachine_vmm::PauseError),
    /// The on-disk cache could not be used.
    #[error("cannot write {what} to the cache (see SUPERMACHINE_CACHE_DIR)")]
    Cache {
        /// What was being cached.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn from_agent(error: AgentError) -> Self {
        use supermachine_codec::ErrorCode;
        match error.code {
            ErrorCode::NotFound => {
                let program = match error.message.rsplit_once("program not found: ") {
                    Some((_, program)) => program.to_owned(),
                    None => error.message,
                };
                Error::ProgramNotFound { program }
            }
            _ => Error::ExecFailed(error),
        }
    }

    /// A broken connection; when the VM behind it ended, the typed [`Error::VmExited`].
    pub(crate) fn from_io(during: &'static str, error: io::Error) -> Self {
        match vm_gone(&error) {
            Some(exit) => Error::VmExited(exit),
            None => Error::ConnectionLost {
                during,
                reason: Report(&error).to_string(),
            },
        }
    }

    /// A VMM error from starting a machine.
    pub(crate) fn from_vmm(error: supermachine_vmm::Error) -> Self {
        if error.is_hypervisor_unavailable() {
            Error::HypervisorUnavailable(Report(&error).to_string())
        } else {
            Error::VmSetup(Box::new(error))
        }
    }

    pub(crate) fn from_codec(during: &'static str, error: CodecError) -> Self {
        match error {
            CodecError::Io(e) => Error::from_io(during, e),
            CodecError::Truncated { .. } => Error::ConnectionLost {
                during,
                reason: error.to_string(),
            },
            other => Error::Protocol(Report(&other).to_string()),
        }
    }

    /// Clones the error for the places that each need their own copy (the exit future and the
    /// spawn call both report a failure that happened once). `io::Error` is not `Clone`, so the
    /// source is flattened to its message where needed.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Error::AgentUnreachable { target, source } => Error::AgentUnreachable {
                target: target.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::ConnectionLost { during, reason } => Error::ConnectionLost {
                during,
                reason: reason.clone(),
            },
            Error::InvalidRequest(m) => Error::InvalidRequest(m.clone()),
            Error::ProgramNotFound { program } => Error::ProgramNotFound {
                program: program.clone(),
            },
            Error::ExecFailed(e) => Error::ExecFailed(e.clone()),
            Error::Control { action, message } => Error::Control {
                action,
                message: message.clone(),
            },
            Error::Publish {
                host,
                guest_port,
                source,
            } => Error::Publish {
                host: *host,
                guest_port: *guest_port,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::Cancelled => Error::Cancelled,
            Error::Aborted => Error::Aborted,
            Error::OutputLimitExceeded { buffered, limit } => Error::OutputLimitExceeded {
                buffered: *buffered,
                limit: *limit,
            },
            Error::NotRunning => Error::NotRunning,
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::InvalidConfig(e) => Error::InvalidConfig(e.clone()),
            Error::HypervisorUnavailable(m) => Error::HypervisorUnavailable(m.clone()),
            Error::VmSetup(e) => Error::VmSetup(Box::new(Flattened::of(e.as_ref()))),
            Error::AgentOutdated {
                what,
                found,
                needed,
            } => Error::AgentOutdated {
                what,
                found: *found,
                needed: *needed,
            },
            Error::BootTimeout {
                after,
                console_tail,
            } => Error::BootTimeout {
                after: *after,
                console_tail: console_tail.clone(),
            },
            Error::VmExited(exit) => Error::VmExited(exit.clone()),
            // Execs (the only callers) never fail with these; kept total, as text.
            Error::Snapshot(e) => Error::VmSetup(Box::new(Flattened::of(e))),
            Error::Image(e) => Error::Image(e.duplicate()),
            Error::Pause(e) => Error::VmSetup(Box::new(Flattened::of(e))),
            Error::Cache { what, source } => Error::Cache {
                what,
                source: io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}

/// Formats an error with all its sources on one line, `what: why: root cause`, as `anyhow`'s
/// `{:#}` does. Every error of this crate says what failed in its own `Display` and returns the
/// cause from `source()`, never both, so a plain `{}` stops at the first level:
///
/// ```
/// use supermachine::{Error, Report};
///
/// fn log(error: &Error) {
///     eprintln!("failed: {}", Report(error));
/// }
/// ```
#[derive(Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

impl std::fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// An error flattened to its [`Report`] text, for copies of errors whose sources cannot be
/// cloned.
#[derive(Debug)]
struct Flattened(String);

impl Flattened {
    fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        Flattened(Report(error).to_string())
    }
}

impl std::fmt::Display for Flattened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Flattened {}

/// The VM's exit, when `error` is a stream failing because its VM ended.
pub(crate) fn vm_gone(error: &io::Error) -> Option<VmExit> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::vm::VmGone>())
        .map(|gone| gone.0.clone())
}

impl From<Error> for io::Error {
    /// For the `AsyncRead`/`AsyncWrite` side, which must speak `io::Error`; the typed error is
    /// kept as the inner error (`io::Error::get_ref` + `downcast_ref::<Error>()`).
    fn from(error: Error) -> Self {
        let kind = match &error {
            Error::AgentUnreachable { source, .. } => source.kind(),
            Error::ConnectionLost { .. } => io::ErrorKind::ConnectionAborted,
            Error::InvalidRequest(_) => io::ErrorKind::InvalidInput,
            Error::ProgramNotFound { .. } => io::ErrorKind::NotFound,
            Error::Protocol(_) => io::ErrorKind::InvalidData,
            Error::VmExited(_) => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, error)
    }
}
