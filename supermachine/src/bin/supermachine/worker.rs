//! `run -d`: the VM is hosted by a worker process (the same binary, `__worker DIR`), so it
//! outlives the command that started it (ARCHITECTURE.md decision 2).
//!
//! Hand-over: the parent claims the VM's registry directory, writes the `run` request into
//! `DIR/spec.json` (mode 0600: it may hold `-e` secrets, which must not show in the worker's
//! world-readable command line), and starts the worker in a process group of its own. The worker
//! adopts the directory, starts and registers the VM, starts the command, and answers on its
//! stdout with one line, `ok` or `error <exit code> <message>`. From then on the command's output
//! goes to `DIR/output.log`, and the worker stops the VM and removes the directory when the
//! command ends, on `stop`, on SIGTERM/SIGINT, or when the VM dies.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{ExitCode, Stdio as ProcessStdio};

use supermachine::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};

use crate::attach::drain;
use crate::cli::{RunArgs, WorkerArgs};
use crate::failure::{Failure, EXIT_FAILURE};
use crate::host::{command, Host};
use crate::output::out;
use crate::registry::{self, Claim};

const SPEC_FILE: &str = "spec.json";

/// Starts a worker process for the claimed VM and waits until it serves (or fails).
pub async fn spawn(args: &RunArgs, claim: Claim) -> Result<ExitCode, Failure> {
    let name = claim.name();
    let dir = claim.dir().to_owned();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(SPEC_FILE))?
        .write_all(&serde_json::to_vec(args)?)?;
    let log = std::fs::File::create(dir.join("worker.log"))?;
    let mut worker = tokio::process::Command::new(std::env::current_exe()?)
        .arg("__worker")
        .arg(&dir)
        .stdin(ProcessStdio::null())
        .stdout(ProcessStdio::piped())
        .stderr(log)
        // Its own process group: Ctrl-C in this terminal is not for the detached VM.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()?;
    // The worker owns the directory from here on, and removes it when it ends.
    let dir = claim.hand_over();
    let Some(stdout) = worker.stdout.take() else {
        return Err(Failure::new("the worker's stdout was not captured"));
    };
    let mut lines = BufReader::new(stdout).lines();
    // Ctrl-C while the VM starts (a first boot takes a while) means "never mind": the worker
    // goes too, rather than carry on in the background unasked.
    let first = tokio::select! {
        line = lines.next_line() => line.ok().flatten(),
        _ = tokio::signal::ctrl_c() => {
            let _ = worker.start_kill();
            let _ = worker.wait().await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(Failure::with_code(format!("interrupted; {name} was not started"), 130));
        }
    };
    if first.as_deref() == Some("ok") {
        out!("{name}");
        return Ok(ExitCode::SUCCESS);
    }
    let _ = worker.wait().await;
    // A worker that died before it could clean up leaves the directory to us.
    let _ = std::fs::remove_dir_all(&dir);
    Err(parse_error(first.as_deref()))
}

/// `error <code> <message>` → the failure it reports.
fn parse_error(line: Option<&str>) -> Failure {
    let reported = line
        .and_then(|l| l.strip_prefix("error "))
        .and_then(|rest| {
            let (code, message) = rest.split_once(' ')?;
            Some(Failure::with_code(message, code.parse().ok()?))
        });
    reported.unwrap_or_else(|| Failure::new("the VM worker exited before the VM was up"))
}

/// One line to the `run -d` process waiting on our stdout. It may be gone (a broken pipe):
/// nothing to do then, and `println!` would panic.
fn report_to_parent(line: &str) {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// The worker process: hosts the VM until its command ends or it is stopped.
pub async fn main(args: WorkerArgs) -> Result<ExitCode, Failure> {
    let claim = Claim::adopt(args.dir)?;
    let spec_path = claim.dir().join(SPEC_FILE);
    let spec = std::fs::read(&spec_path);
    let _ = std::fs::remove_file(&spec_path);
    let run: RunArgs = serde_json::from_slice(&spec?)?;
    let started = async {
        let image = crate::image_arg::resolve(&run.image).await?;
        let argv = command(&run, image.config())?;
        let host = Host::start(&run, image, &argv, claim, true).await?;
        let mut builder = crate::attach::configure(host.vm.exec(argv), &run.process)?;
        builder
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = builder.spawn().await.map_err(crate::attach::exec_failure)?;
        Ok::<_, Failure>((host, child))
    };
    let (host, mut child) = match started.await {
        Ok(started) => started,
        Err(failure) => {
            report_to_parent(&format!("error {} {}", failure.code(), failure.message()));
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
    };
    report_to_parent("ok");

    let output = host.dir().join(registry::OUTPUT_LOG);
    let copy_output = {
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (out_log, err_log) = (append(&output)?, append(&output)?);
        // A full disk discards the command's output (see `drain`).
        async move { tokio::join!(drain(stdout, out_log), drain(stderr, err_log)) }
    };
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    // The terminal that started it going away must not end a detached VM: a registered
    // handler replaces SIGHUP's default action (exit), and nothing needs to act on it.
    let _hangup = signal(SignalKind::hangup())?;
    let code = tokio::select! {
        (_, status) = async { tokio::join!(copy_output, child.wait()) } => match status {
            Ok(status) => crate::attach::exit_code(&status).into(),
            Err(e) => {
                tracing::warn!("the command ended with an error: {}", supermachine::Report(&e));
                EXIT_FAILURE.into()
            }
        },
        () = host.ended() => 137,
        _ = term.recv() => 143,
        _ = int.recv() => 130,
    };
    tracing::info!(code, "the detached VM's command ended; stopping the VM");
    drop(child);
    host.shutdown();
    Ok(ExitCode::from((code & 0xff) as u8))
}

fn append(path: &Path) -> std::io::Result<tokio::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(tokio::fs::File::from_std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_errors_keep_their_exit_code() {
        let failure = parse_error(Some("error 127 program not found in the guest: nope"));
        assert_eq!(failure.code(), 127);
        assert_eq!(failure.message(), "program not found in the guest: nope");
        assert_eq!(parse_error(None).code(), EXIT_FAILURE);
        assert_eq!(parse_error(Some("garbage")).code(), EXIT_FAILURE);
    }
}
