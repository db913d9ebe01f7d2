//! Runs an exec attached to this process's stdio, as `docker run` / `docker exec` do: output
//! streams as produced, stdin is forwarded with `-i`, a terminal with `-t` (raw mode, window
//! size changes forwarded), and the guest command's exit code becomes ours.

use std::process::ExitCode;
use std::time::Duration;

use supermachine::{Error, ExecBuilder, ExitStatus, Stdio};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::ProcessArgs;
use crate::failure::{Failure, EXIT_FAILURE};
use crate::terminal::{self, RawMode};

/// Exit code when `--timeout` killed the command (as `timeout(1)`).
const EXIT_TIMED_OUT: u8 = 124;
/// Exit code when the program was not found in the guest (as shells use).
const EXIT_NOT_FOUND: u8 = 127;

/// Checks `-e` and `--timeout` before anything is started.
pub fn validate(args: &ProcessArgs) -> Result<(), Failure> {
    if let Some(kv) = args.env.iter().find(|kv| kv.starts_with('=')) {
        return Err(Failure::new(format!(
            "invalid -e {kv:?}: expected KEY=VALUE or KEY"
        )));
    }
    if let Some(secs) = args.timeout {
        timeout(secs)?;
    }
    Ok(())
}

/// The longest `--timeout` taken (a year): beyond it the deadline arithmetic would overflow.
const MAX_TIMEOUT_SECS: f64 = 365.0 * 24.0 * 3600.0;

fn timeout(secs: f64) -> Result<Duration, Failure> {
    match Duration::try_from_secs_f64(secs) {
        Ok(limit) if secs > 0.0 && secs <= MAX_TIMEOUT_SECS => Ok(limit),
        _ => Err(Failure::new(format!(
            "invalid --timeout {secs}: expected seconds, more than 0 and at most {MAX_TIMEOUT_SECS}"
        ))),
    }
}

/// Applies `-e`, `-w`, `-u`, `-t`, `--timeout` to `builder`.
pub fn configure(mut builder: ExecBuilder, args: &ProcessArgs) -> Result<ExecBuilder, Failure> {
    validate(args)?;
    for kv in &args.env {
        match kv.split_once('=') {
            Some((key, value)) => {
                builder.env(key, value);
            }
            // `-e KEY`: the host's value, and nothing if the host has none (as Docker does).
            None => {
                if let Ok(value) = std::env::var(kv) {
                    builder.env(kv, value);
                }
            }
        }
    }
    if let Some(dir) = &args.workdir {
        builder.current_dir(dir);
    }
    if let Some(user) = &args.user {
        builder.user(user);
    }
    if let Some(secs) = args.timeout {
        builder.timeout(timeout(secs)?);
    }
    if args.tty {
        builder.tty(true);
        if let Some((cols, rows)) = terminal::size() {
            builder.winsize(cols, rows);
        }
    }
    let stdin = if args.interactive {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    builder.stdin(stdin);
    Ok(builder)
}

/// The exit code the CLI reports for a guest command's status: a timeout is 124 (as
/// `timeout(1)`), an exit its code, a signal `128 + N` (as a shell).
pub fn exit_code(status: &ExitStatus) -> u8 {
    if status.timed_out() {
        return EXIT_TIMED_OUT;
    }
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128i32.saturating_add(signal),
        (None, None) => i32::from(EXIT_FAILURE),
    };
    (code & 0xff) as u8
}

/// Spawns the exec and runs it to its end attached to our stdio; returns its exit code.
pub async fn run(mut builder: ExecBuilder, args: &ProcessArgs) -> Result<ExitCode, Failure> {
    let mut child = builder.spawn().await.map_err(exec_failure)?;
    // Raw mode only for an interactive terminal session; restored on every way out.
    let _raw = if args.tty && args.interactive {
        RawMode::enter()?
    } else {
        None
    };
    let stdin_task = child.stdin.take().map(|mut guest| {
        tokio::spawn(async move {
            let mut host = tokio::io::stdin();
            let _ = tokio::io::copy(&mut host, &mut guest).await;
            let _ = guest.shutdown().await;
        })
    });
    // Once our stdout is gone (`... | head -1`) the guest's further output is discarded.
    let out = drain(child.stdout.take(), tokio::io::stdout());
    let err = drain(child.stderr.take(), tokio::io::stderr());
    let signaler = child.signaler();
    let tty = args.tty;
    let forward_signals = async move {
        let (Ok(mut winch), Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::window_change()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return std::future::pending().await;
        };
        loop {
            // In raw mode Ctrl-C is a byte on stdin the guest terminal turns into SIGINT;
            // these arrive from `kill` or a non-raw terminal, and go to the guest command.
            // A failed send means the exec is ending: its exit is on the way, so carry on
            // waiting for it (and keep these handlers, or the signals would be lost).
            let _ = tokio::select! {
                _ = winch.recv() => {
                    if let (true, Some((cols, rows))) = (tty, terminal::size()) {
                        let _ = signaler.resize(cols, rows);
                    }
                    continue;
                }
                _ = int.recv() => signaler.signal(libc::SIGINT as u32),
                _ = term.recv() => signaler.signal(libc::SIGTERM as u32),
                _ = hup.recv() => signaler.signal(libc::SIGHUP as u32),
            };
        }
    };
    let status = tokio::select! {
        status = async {
            let (_, _, status) = tokio::join!(out, err, child.wait());
            status
        } => status,
        () = forward_signals => std::future::pending().await,
    };
    if let Some(task) = stdin_task {
        task.abort();
    }
    let _ = tokio::io::stdout().flush().await;
    match status {
        Ok(status) if status.timed_out() => {
            drop(_raw);
            let after = args.timeout.unwrap_or_default();
            eprintln!("supermachine: the command timed out after {after}s and was killed");
            Ok(ExitCode::from(EXIT_TIMED_OUT))
        }
        Ok(status) => Ok(ExitCode::from(exit_code(&status))),
        Err(e) => Err(exec_failure(e)),
    }
}

/// Copies a guest output stream (if piped) into `to` until either ends. The guest handle is
/// moved in and dropped with the copy, so when `to` fails (a closed pipe, a full disk) the
/// guest's further output is discarded rather than buffered by the library.
pub async fn drain(from: Option<impl AsyncRead + Unpin>, mut to: impl AsyncWrite + Unpin) {
    if let Some(mut from) = from {
        let _ = tokio::io::copy(&mut from, &mut to).await;
    }
}

/// An exec error as the CLI reports it (a missing program exits 127, as in a shell).
pub fn exec_failure(error: Error) -> Failure {
    match error {
        Error::ProgramNotFound { program } => Failure::with_code(
            format!("program not found in the guest: {program}"),
            EXIT_NOT_FOUND,
        ),
        other => Failure::from(other),
    }
}
