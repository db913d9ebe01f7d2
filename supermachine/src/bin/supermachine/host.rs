//! Hosting a VM: start it, register it (vsock muxer, control socket, info), serve until its
//! command ends, `stop` is asked for, the VM dies or the host is told to quit; then stop it and
//! leave nothing behind. The foreground `run` hosts its VM itself; `run -d` hosts it in a
//! worker process of its own (`worker`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use supermachine::{Image, ImageConfig, Vm, VmConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::RunArgs;
use crate::control::{self, Answer, Request};
use crate::failure::Failure;
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
            .image(image.clone())
            .network(crate::network::from_args(args)?);
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

    /// The VM's registry directory.
    pub fn dir(&self) -> &std::path::Path {
        self._claim.dir()
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
        self.vm.stop_blocking();
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
                Request::Ping => Answer::text(host_state(&vm).into()),
                Request::Console => Answer::text(vm.console()),
                Request::Pause => match vm.pause().await {
                    Ok(()) => Answer::ok(),
                    Err(e) => Answer::error(format!("cannot pause: {}", supermachine::Report(&e))),
                },
                Request::Unpause => match vm.resume().await {
                    Ok(()) => Answer::ok(),
                    Err(e) => {
                        Answer::error(format!("cannot unpause: {}", supermachine::Report(&e)))
                    }
                },
                Request::Stop => Answer::ok(),
            };
            let _ = control::answer(&mut stream, answer).await;
            if request == Request::Stop {
                stop.cancel();
            }
        });
    }
}

/// What a ping answers: whether the VM runs or is paused.
fn host_state(vm: &Vm) -> &'static str {
    if vm.is_paused() {
        PAUSED
    } else {
        "running"
    }
}

/// The ping answer of a paused VM (`ps` shows it).
pub const PAUSED: &str = "paused";

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
