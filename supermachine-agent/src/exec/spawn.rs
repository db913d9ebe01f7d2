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

/// Finds `program` the way `execvp` would: a name containing `/` is used as given (relative to
/// `cwd`); otherwise the first executable regular file named `program` in a `PATH` directory
/// (an empty entry means the working directory). `None` when there is none.
fn resolve_program(
    program: &str,
    path: Option<&OsString>,
    cwd: Option<&std::path::Path>,
) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let is_executable = |candidate: &std::path::Path| {
        std::fs::metadata(candidate)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let default_path = OsString::from("/usr/local/bin:/usr/bin:/bin");
    let path = path.unwrap_or(&default_path);
    std::env::split_paths(path)
        .map(|dir| {
            let dir = if dir.as_os_str().is_empty() {
                cwd.map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
            } else if dir.is_relative() {
                cwd.map(|c| c.join(&dir)).unwrap_or(dir)
            } else {
                dir
            };
            dir.join(program)
        })
        .find(|candidate| is_executable(candidate))
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
    // Resolving here, against the child's PATH, is what lets std use posix_spawn (a vfork-style
    // spawn) instead of fork: std falls back to fork whenever the child's environment sets PATH
    // and the program is not a path, since posix_spawnp would search the agent's PATH. A fork
    // copies the agent's page tables, which is the single most expensive thing a guest does
    // under nested virtualization. It also replaces execvp's trial-and-error execve per PATH
    // entry with one stat per entry.
    let resolved = resolve_program(
        &program,
        spec.env.get(&OsString::from("PATH")),
        spec.cwd.as_deref(),
    )
    .ok_or_else(|| ExecError::ProgramNotFound {
        link,
        program: program.clone(),
    })?;
    let mut command = Command::new(&resolved);
    command
        .arg0(&program)
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

#[cfg(test)]
mod resolve_tests {
    use super::resolve_program;
    use std::ffi::OsString;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn searches_path_like_execvp() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // Not executable in `a`: skipped, as execvp skips it.
        std::fs::write(a.join("tool"), "x").unwrap();
        std::fs::write(b.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(a.join("dir")).unwrap();
        let path = OsString::from(format!("{}:{}", a.display(), b.display()));
        assert_eq!(
            resolve_program("tool", Some(&path), None),
            Some(b.join("tool"))
        );
        assert_eq!(resolve_program("dir", Some(&path), None), None);
        assert_eq!(resolve_program("missing", Some(&path), None), None);
        assert_eq!(resolve_program("", Some(&path), None), None);
        assert_eq!(
            resolve_program("./rel/x", Some(&path), None),
            Some("./rel/x".into())
        );
        // A relative PATH entry is relative to the exec's working directory.
        let rel = OsString::from("b");
        assert_eq!(
            resolve_program("tool", Some(&rel), Some(dir.path())),
            Some(b.join("tool"))
        );
    }
}
