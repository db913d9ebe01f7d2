//! `supermachine-agent`: the in-guest exec agent (PID 1 of every supermachine VM), also runnable
//! on a host for tests.
//!
//! ```text
//! supermachine-agent --unix PATH    host mode: serve on a Unix socket
//! supermachine-agent --vsock PORT   guest mode: serve on AF_VSOCK
//! supermachine-agent                as PID 1: guest init (mounts), then --vsock 1024
//! ```
//!
//! Everything runs as tasks on one current-thread tokio runtime: the guest has one vCPU, and an
//! exec costs a handful of tasks, not threads. See `SEMANTICS.md` for the behaviour.

mod boot_flags;
mod control;
mod error;
mod exec;
mod forward;
mod hangup;
mod init;
mod reaper;
mod rootfs;
mod server;
mod staging;
mod state;
mod sys;
mod task;
mod user;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tracing::level_filters::LevelFilter;

use crate::boot_flags::BootFlags;
use crate::error::{CliError, ServeError};
use crate::reaper::Reaper;
use crate::server::{Listener, StopSignals};
use crate::state::{Agent, Mode};

/// musl's allocator maps and unmaps memory for every mid-sized buffer (a connection's or an
/// output chunk's), and in a guest on a nested (PVM) host each mmap, munmap and first touch of a
/// page costs the guest kernel dearly. dlmalloc takes memory from the kernel in large segments
/// and keeps what is freed for reuse.
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// Environment variable with the log level (`error`, `warn`, `info`, `debug`, `trace`, `off`).
const LOG_ENV: &str = "SUPERMACHINE_AGENT_LOG";

const USAGE: &str = "\
usage: supermachine-agent --unix PATH | --vsock PORT | --help

  --unix PATH    host mode: serve execs on a Unix socket at PATH (for tests); prints
                 'supermachine-agent ready' once listening
  --vsock PORT   guest mode: serve execs on AF_VSOCK port PORT, any CID
  --help         this text

Run as PID 1 without arguments, it is the guest's init: it mounts /proc, /sys, /dev,
/dev/pts, /tmp and /run, then serves --vsock 1024.
Log level: SUPERMACHINE_AGENT_LOG (default warn).";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    Unix(PathBuf),
    Vsock(u32),
    /// No arguments as PID 1.
    Init,
}

fn parse_args(args: &[OsString], pid1: bool) -> Result<Command, CliError> {
    let mut command = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let next = match arg.to_str() {
            Some("--help" | "-h") => return Ok(Command::Help),
            Some("--unix") => {
                let path = args
                    .next()
                    .ok_or(CliError::MissingValue { flag: "--unix" })?;
                Command::Unix(PathBuf::from(path))
            }
            Some("--vsock") => {
                let value = args
                    .next()
                    .ok_or(CliError::MissingValue { flag: "--vsock" })?;
                let value = value.to_string_lossy();
                let port = value.parse().map_err(|source| CliError::InvalidPort {
                    value: value.clone().into_owned(),
                    source,
                })?;
                Command::Vsock(port)
            }
            _ => {
                return Err(CliError::UnknownArgument(
                    arg.to_string_lossy().into_owned(),
                ))
            }
        };
        if command.replace(next).is_some() {
            return Err(CliError::ConflictingModes);
        }
    }
    match command {
        Some(command) => Ok(command),
        None if pid1 => Ok(Command::Init),
        None => Err(CliError::NoMode),
    }
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    init_logging();
    let command = match parse_args(&args, pid1) {
        Ok(command) => command,
        // The kernel hands init any boot parameters it does not know; PID 1 must not give up
        // over them (exiting would panic the kernel).
        Err(e) if pid1 => {
            tracing::warn!("ignoring the command line ({e}); running as init");
            Command::Init
        }
        Err(e) => {
            eprintln!("supermachine-agent: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if command == Command::Help {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if pid1 {
        init::mount_early_filesystems();
        init::loopback_up();
        let flags = boot_flags::read();
        let dns = flags.net.map(|net| net.dns);
        if let Some(net) = &flags.net {
            init::network_up(net);
        }
        if flags.rootfs {
            // Without its image the VM cannot do what it was started for; say why on the
            // console (the host shows its tail) and power off rather than serve the initramfs.
            if let Err(e) = rootfs::enter_image_rootfs(dns) {
                tracing::error!("cannot enter the image rootfs: {}", error::chain(&e));
                init::power_off();
            }
        } else if let Some(dns) = dns {
            // The initramfs is the root: its /etc gets the resolver.
            if let Err(e) = rootfs::write_resolv_conf(std::path::Path::new("/etc"), dns) {
                tracing::error!("writing /etc/resolv.conf: {e}");
            }
        }
    }
    raise_fd_limit();
    if pid1 {
        // PID 1 must never exit, not even by panicking (the kernel would panic): whatever
        // happens, the VM is powered off instead.
        match std::panic::catch_unwind(|| run(command, pid1)) {
            Ok(Ok(())) => tracing::error!("the exec server stopped"),
            Ok(Err(e)) => tracing::error!("{}", error::chain(&e)),
            Err(_) => tracing::error!("the agent panicked"),
        }
        init::power_off();
    }
    let result = run(command, pid1);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supermachine-agent: {}", error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Builds the runtime and serves until stopped.
fn run(command: Command, pid1: bool) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Setup {
            what: "starting the tokio runtime",
            source,
        })?;
    runtime.block_on(async {
        if !pid1 {
            // Orphaned grandchildren come to us, as they would to PID 1 in the guest, so no
            // process an exec started escapes our reaper.
            sys::set_child_subreaper().map_err(|source| ServeError::Setup {
                what: "becoming a child subreaper",
                source,
            })?;
        }
        let reaper = Reaper::start().map_err(|source| ServeError::Setup {
            what: "installing the SIGCHLD handler",
            source,
        })?;
        let (listener, mode) = match command {
            Command::Unix(path) => (Listener::unix(&path)?, Mode::Host),
            Command::Vsock(port) => (Listener::vsock(port)?, Mode::Guest),
            Command::Init | Command::Help => (
                Listener::vsock(supermachine_codec::AGENT_VSOCK_PORT)?,
                Mode::Guest,
            ),
        };
        // As PID 1 the kernel already shields us from stray signals; SIGTERM to init must not
        // stop the guest's agent.
        let stop = if pid1 {
            None
        } else {
            Some(StopSignals::install()?)
        };
        // Once, up front: the flags cannot change while the guest runs.
        let flags = match mode {
            Mode::Guest => boot_flags::read(),
            Mode::Host => BootFlags::default(),
        };
        server::announce_ready()?;
        server::serve(listener, Agent::new(mode, flags, reaper), stop).await
    })
}

fn init_logging() {
    let setting = std::env::var(LOG_ENV).ok();
    let (level, invalid) = match setting.as_deref().map(str::trim) {
        None | Some("") => (LevelFilter::WARN, None),
        Some(s) => match s.parse::<LevelFilter>() {
            Ok(level) => (level, None),
            Err(_) => (LevelFilter::WARN, Some(s.to_owned())),
        },
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    if let Some(invalid) = invalid {
        tracing::warn!("{LOG_ENV}={invalid:?} is not a level; using warn");
    }
}

/// 200 concurrent execs need well over a thousand fds (socket, pipes, pty per exec): lift the
/// soft limit to the hard one.
fn raise_fd_limit() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], pid1: bool) -> Result<Command, CliError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse_args(&args, pid1)
    }

    #[test]
    fn parses_modes() {
        assert_eq!(
            parse(&["--unix", "/tmp/a.sock"], false).unwrap(),
            Command::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            parse(&["--vsock", "1024"], false).unwrap(),
            Command::Vsock(1024)
        );
        assert_eq!(parse(&["--help"], false).unwrap(), Command::Help);
        assert_eq!(parse(&[], true).unwrap(), Command::Init);
    }

    #[test]
    fn rejects_bad_command_lines() {
        assert!(matches!(parse(&[], false), Err(CliError::NoMode)));
        assert!(matches!(
            parse(&["--unix"], false),
            Err(CliError::MissingValue { flag: "--unix" })
        ));
        assert!(matches!(
            parse(&["--vsock", "x"], false),
            Err(CliError::InvalidPort { .. })
        ));
        assert!(matches!(
            parse(&["--vsock", "1", "--unix", "/s"], false),
            Err(CliError::ConflictingModes)
        ));
        assert!(matches!(
            parse(&["--bogus"], false),
            Err(CliError::UnknownArgument(a)) if a == "--bogus"
        ));
    }
}
