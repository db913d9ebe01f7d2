//! Starting one program of an exec in its own process group.
//!
//! `std::process::Command` does the fork/exec (and reports exec failures such as ENOENT back to
//! us), but nothing here ever waits on the `Child`: the reaper owns every exit status.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{ExecError, Link};
use crate::sys;
use crate::user::ResolvedUser;

/// Capacity requested for output pipes. The 64 KiB default costs a context switch per 64 KiB;
/// a larger pipe lets a fast producer run ahead while the agent is writing to the host. Measured
/// in host mode (2 shared cores, `head -c 2G /dev/zero`): ~1.3 GB/s with 64 KiB, ~1.8 GB/s with
/// 1 MiB. Pages are only allocated as data is buffered, so idle execs cost nothing extra.
const PIPE_SIZE: i32 = 1024 * 1024;

/// What every link of an exec shares.
#[derive(Debug)]
pub struct LaunchSpec {
    /// The complete environment.
    pub env: BTreeMap<OsString, OsString>,
    /// Working directory (`None`: the agent's own).
    pub cwd: Option<PathBuf>,
    /// Who to run as (`None`: the agent's own user).
    pub user: Option<ResolvedUser>,
}

/// How one link's standard streams are connected.
#[derive(Debug)]
pub enum LinkStdio {
    /// Pipes (or /dev/null) for each stream.
    Pipes {
        /// Read end of the exec's shared stdin pipe; `None` for /dev/null.
        stdin: Option<OwnedFd>,
        /// Pipe stdout to us (else /dev/null).
        stdout: bool,
        /// Pipe stderr to us (else /dev/null).
        stderr: bool,
    },
    /// A pty slave as fds 0, 1 and 2, and as the controlling terminal of a new session.
    Pty {
        /// The slave side.
        slave: OwnedFd,
    },
}

/// A running link.
#[derive(Debug)]
pub struct Spawned {
    /// Pid of the leader, which is also its process group id.
    pub pid: i32,
    /// Our read end of its stdout pipe.
    pub stdout: Option<OwnedFd>,
    /// Our read end of its stderr pipe.
    pub stderr: Option<OwnedFd>,
}

/// Spawns `argv` (link number `link`) per `spec`, in a new process group.
///
/// The caller must register the pid with the reaper before its next `.await`.
pub fn spawn(
    argv: &[String],
    link: Link,
    spec: &LaunchSpec,
    stdio: LinkStdio,
) -> Result<Spawned, ExecError> {
    let program = argv.first().cloned().unwrap_or_default();
    let mut command = Command::new(&program);
    command
        .args(argv.iter().skip(1))
        .env_clear()
        .envs(&spec.env);
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    if let Some(user) = &spec.user {
        command.uid(user.uid).gid(user.gid);
    }
    let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    match stdio {
        LinkStdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            command
                .stdin(stdin.map_or_else(Stdio::null, Stdio::from))
                .stdout(piped(stdout))
                .stderr(piped(stderr))
                .process_group(0);
        }
        LinkStdio::Pty { slave } => {
            let clone = |fd: &OwnedFd| {
                fd.try_clone().map_err(|source| ExecError::Internal {
                    what: "duplicating the pty slave".into(),
                    source,
                })
            };
            command
                .stdin(Stdio::from(clone(&slave)?))
                .stdout(Stdio::from(clone(&slave)?))
                .stderr(Stdio::from(slave));
            // SAFETY: the closure runs in the forked child before exec and only makes two
            // async-signal-safe syscalls (setsid, ioctl) without allocating: errors are built
            // from raw errno values.
            unsafe {
                command.pre_exec(|| {
                    // A new session makes the child a process-group leader too, so signals to
                    // its pgid reach everything it starts, as in pipes mode.
                    nix::unistd::setsid().map_err(io::Error::from)?;
                    // fd 0 is the slave (std dup2'd it before running this closure).
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    let mut child = command.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ExecError::ProgramNotFound {
            link,
            program: program.clone(),
        },
        _ => ExecError::Spawn {
            link,
            program: program.clone(),
            source,
        },
    })?;
    // `command` (and with it our copies of the slave and /dev/null) must close now: a slave fd
    // left open here would keep the pty from ever reporting EOF.
    drop(command);
    let pid = i32::try_from(child.id()).map_err(|_| ExecError::Internal {
        what: format!("pid {} out of range", child.id()),
        source: io::Error::from(io::ErrorKind::InvalidData),
    })?;
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    for fd in stdout.iter().chain(stderr.iter()) {
        if let Err(e) = sys::set_pipe_size(fd, PIPE_SIZE) {
            // Over the per-user pipe quota, say; the default size works, only slower.
            tracing::debug!("cannot grow the output pipe: {e}");
        }
    }
    // Dropping `child` neither waits nor kills; the reaper owns its status.
    drop(child);
    Ok(Spawned {
        pid,
        stdout,
        stderr,
    })
}
