//! Hosting a VM: start it, register it (vsock muxer, control socket, info), serve until its
//! command ends, `stop` is asked for, the VM dies or the host is told to quit; then stop it and
//! leave nothing behind. The foreground `run` hosts its VM itself; `run -d` starts
//! [`worker_main`] in a process of its own.

use std::io::Write;
use std::process::{ExitCode, Stdio as ProcessStdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use supermachine::{Image, ImageConfig, Stdio, Vm, VmConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::{RunArgs, WorkerArgs};
use crate::control::{self, Answer, Request};
use crate::failure::Failure;
use crate::output::out;
use crate::registry::{self, Claim, Info};

/// A hosted, registered VM.
pub struct Host {
    pub vm: Arc<Vm>,
    /// Held for its drop, which unregisters the VM.
    _claim: Claim,
    /// Cancelled when a client asks the host to stop.
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Host {
    /// Starts the VM of `args` on `image` and registers it under `claim`.
    pub async fn start(
        args: &RunArgs,
        image: Image,
        argv: &[String],
        claim: Claim,
        detached: bool,
    ) -> Result<Host, Failure> {
        let mut config = VmConfig::new()
            .vcpus(args.cpus)
            .memory_mib(args.memory)
            .image(image.clone());
        for spec in &args.publish {
            config = config.publish(spec.parse()?);
        }
        let vm = Arc::new(Vm::start(config).await?);
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        let muxer = vm.serve_vsock_unix(claim.dir().join(registry::MUXER_SOCKET));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = muxer.await {
                tracing::warn!("the vsock muxer stopped: {e}");
            }
        }));
        let listener = control::bind(&claim.dir().join(registry::CONTROL_SOCKET))?;
        tasks.push(tokio::spawn(serve_control(
            listener,
            vm.clone(),
            stop.clone(),
        )));

        let info = Info {
            name: claim.name(),
            image: image.source().to_owned(),
            command: argv.to_vec(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ports: vm
                .published_ports()
                .iter()
                .map(|p| format!("{}->{}/tcp", p.host, p.guest_port))
                .collect(),
            image_config: Some(image.config().clone()),
            detached,
        };
        claim.publish(&info)?;
        Ok(Host {
            vm,
            _claim: claim,
            stop,
            tasks,
        })
    }

    /// Resolves when a client asked for a stop, or the VM ended on its own.
    pub async fn ended(&self) {
        tokio::select! {
            () = self.stop.cancelled() => {}
            _ = self.vm.wait() => {}
        }
    }

    /// Stops the VM and unregisters it (sockets and directory removed); dropping does too.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The muxer and control tasks hold the VM: stop it rather than wait for them to end.
        self.vm.stop();
        for task in &self.tasks {
            task.abort();
        }
        // `_claim` is dropped after this, removing the registry directory.
    }
}

async fn serve_control(listener: tokio::net::UnixListener, vm: Arc<Vm>, stop: CancellationToken) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let vm = vm.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Some(request) = control::read_request(&mut stream).await else {
                return;
            };
            let answer = match request {
                Request::Ping => Answer::ok(),
                Request::Console => Answer::text(vm.console()),
                Request::Stop => Answer::ok(),
            };
            let _ = control::answer(&mut stream, answer).await;
            if request == Request::Stop {
                stop.cancel();
            }
        });
    }
}

/// The command `docker run` would run: the entrypoint (`--entrypoint`, else the image's),
/// then the given arguments, else the image's Cmd (dropped when `--entrypoint` is given).
pub fn command(args: &RunArgs, image: &ImageConfig) -> Result<Vec<String>, Failure> {
    let entrypoint = match &args.entrypoint {
        Some(program) => vec![program.clone()],
        None => image.entrypoint.clone(),
    };
    let tail = if !args.command.is_empty() {
        args.command.clone()
    } else if args.entrypoint.is_some() {
        Vec::new()
    } else {
        image.cmd.clone()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(tail).collect();
    if argv.is_empty() {
        return Err(Failure::new(format!(
            "the image {} has no Entrypoint or Cmd: give a command after the image name",
            args.image
        )));
    }
    Ok(argv)
}

/// `run -d`: starts a worker process for the claimed VM and waits until it serves (or fails).
pub async fn spawn_worker(args: &RunArgs, claim: Claim) -> Result<ExitCode, Failure> {
    let name = claim.name();
    let dir = claim.dir().to_owned();
    let log = std::fs::File::create(dir.join("worker.log"))?;
    let exe = std::env::current_exe()?;
    let mut worker = tokio::process::Command::new(exe)
        .arg("__worker")
        .arg(serde_json::to_string(args)?)
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
    match first.as_deref() {
        Some("ok") => {
            out!("{name}");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let _ = worker.wait().await;
            // A worker that died before it could clean up leaves the directory to us.
            let _ = std::fs::remove_dir_all(&dir);
            let message = other
                .and_then(|line| line.strip_prefix("error: "))
                .unwrap_or("the VM worker exited before the VM was up")
                .to_owned();
            Err(Failure::new(message))
        }
    }
}

/// One line to the `run -d` process waiting on our stdout. It may be gone (a broken pipe):
/// nothing to do then, and `println!` would panic.
fn report_to_parent(line: &str) {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// The `run -d` worker process: hosts the VM until its command ends or it is stopped.
pub async fn worker_main(args: WorkerArgs) -> Result<ExitCode, Failure> {
    let run: RunArgs = serde_json::from_str(&args.spec)?;
    let claim = Claim::adopt(args.dir)?;
    let started = async {
        let image = crate::image_arg::resolve(&run.image).await?;
        let argv = command(&run, image.config())?;
        let output = claim.dir().join(registry::OUTPUT_LOG);
        let host = Host::start(&run, image, &argv, claim, true).await?;
        let builder = crate::attach::configure(host.vm.exec(argv), &run.process)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = builder.spawn().await.map_err(crate::attach::exec_failure)?;
        Ok::<_, Failure>((host, child, output))
    };
    let (host, mut child, output) = match started.await {
        Ok(started) => started,
        Err(failure) => {
            report_to_parent(&format!("error: {}", failure.message()));
            return Ok(ExitCode::from(crate::failure::EXIT_FAILURE));
        }
    };
    report_to_parent("ok");

    let log = |path: &std::path::Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(tokio::fs::File::from_std)
    };
    let (mut out_log, mut err_log) = (log(&output)?, log(&output)?);
    let mut stdout = child.take_stdout();
    let mut stderr = child.take_stderr();
    let copy_output = async {
        let out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = tokio::io::copy(s, &mut out_log).await;
            }
        };
        let err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = tokio::io::copy(s, &mut err_log).await;
            }
        };
        tokio::join!(out, err);
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
            Ok(status) => status.code(),
            Err(e) => {
                tracing::warn!("the command ended with an error: {e}");
                crate::failure::EXIT_FAILURE.into()
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
