//! One function per subcommand.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use supermachine::{Agent, Image, UnixConnector};

use crate::attach;
use crate::cli::{CpArgs, ExecArgs, LogsArgs, NamesArgs, PullArgs, RmiArgs, RunArgs};
use crate::control::{self, Request};
use crate::failure::Failure;
use crate::host::{self, Host};
use crate::image_arg;
use crate::output::{self, out};
use crate::progress::{human_bytes, short};
use crate::registry::{self, Registry};

/// The largest file `cp` carries: one protocol frame less room for its header.
const MAX_CP_BYTES: u64 = supermachine_codec::DEFAULT_MAX_FRAME_LENGTH as u64 - 64 * 1024;

/// How long `stop` waits for a host to finish before killing it.
const STOP_GRACE: Duration = Duration::from_secs(30);

pub async fn pull(args: PullArgs) -> Result<ExitCode, Failure> {
    let image = image_arg::pull(&args.image).await?;
    eprintln!("preparing the root filesystem...");
    let rootfs = image.rootfs().await?;
    out!(
        "{}: image {} ({} compressed, rootfs {})",
        args.image,
        short(image.digest()),
        human_bytes(image.compressed_size()),
        human_bytes(rootfs.allocated)
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn images() -> Result<ExitCode, Failure> {
    let images = Image::list_local().await?;
    let width = images
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    out!(
        "{:<width$}  {:<12}  {:<14}  {:>10}  {:>10}",
        "NAME",
        "IMAGE ID",
        "ADDED",
        "SIZE",
        "ROOTFS"
    );
    for image in images {
        out!(
            "{:<width$}  {:<12}  {:<14}  {:>10}  {:>10}",
            image.name,
            short(&image.image_id),
            ago(image.added),
            human_bytes(image.compressed_size),
            image.rootfs_size.map_or_else(|| "-".into(), human_bytes),
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rmi(args: RmiArgs) -> Result<ExitCode, Failure> {
    let mut failed = None;
    for name in &args.images {
        match Image::remove_local(name).await {
            Ok(removed) => out!(
                "Deleted {} ({}, freed {})",
                removed.name,
                short(&removed.image_id),
                human_bytes(removed.freed_bytes)
            ),
            Err(e) => {
                let failure = Failure::from(e);
                eprintln!("supermachine: {}", failure.message());
                failed = Some(failure);
            }
        }
    }
    match failed {
        // Each failure was printed; the exit code says that one happened.
        Some(_) => Ok(ExitCode::from(1)),
        None => Ok(ExitCode::SUCCESS),
    }
}

pub async fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    // Everything that can be checked without a VM fails before one exists.
    attach::validate(&args.process)?;
    for spec in &args.publish {
        spec.parse::<supermachine::PortMapping>()?;
    }
    crate::network::from_args(&args)?;
    if args.detach && (args.process.interactive || args.process.tty) {
        return Err(Failure::new(
            "-d runs the command in the background, without a terminal: drop -i/-t, and use \
             `supermachine exec -it NAME sh` for a shell in it",
        ));
    }
    let registry = Registry::open()?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => registry.fresh_name(),
    };
    let claim = registry.claim(&name)?;
    let image = image_arg::resolve(&args.image).await?;
    let argv = host::command(&args, image.config())?;
    if args.detach {
        return crate::worker::spawn(&args, claim).await;
    }
    let host = Host::start(&args, image, &argv, claim, false).await?;
    let builder = attach::configure(host.vm.exec(argv), &args.process)?;
    let code = tokio::select! {
        code = attach::run(builder, &args.process) => code,
        () = host.ended() => {
            Err(Failure::with_code(format!("the VM {name} was stopped"), 137))
        }
    };
    host.shutdown();
    code
}

pub async fn exec(args: ExecArgs) -> Result<ExitCode, Failure> {
    attach::validate(&args.process)?;
    let registry = Registry::open()?;
    let (entry, info) = registry.find_ready(&args.name)?;
    let agent = Agent::with_connector(UnixConnector::muxed(entry.dir.join(registry::MUXER_SOCKET)));
    let mut builder = agent.exec(args.command.clone());
    if let Some(image) = &info.image_config {
        builder.image_defaults(image);
    }
    let builder = attach::configure(builder, &args.process)?;
    attach::run(builder, &args.process).await
}

/// How long `ps` waits for each VM's host to say whether it is paused.
const PS_PING_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn ps() -> Result<ExitCode, Failure> {
    let registry = Registry::open()?;
    let entries = registry.list()?;
    // Asked all at once, briefly: a wedged host must not hold up the listing.
    let states = futures::future::join_all(entries.iter().map(|entry| async {
        let socket = entry.dir.join(registry::CONTROL_SOCKET);
        match control::call_within(&socket, Request::Ping, PS_PING_TIMEOUT).await {
            Ok(answer) if answer.text.as_deref() == Some(host::PAUSED) => "paused",
            _ => "up",
        }
    }))
    .await;
    let mut rows: Vec<[String; 6]> = Vec::with_capacity(entries.len());
    for (entry, state) in entries.iter().zip(states) {
        rows.push(match &entry.info {
            Some(info) => [
                entry.name.clone(),
                info.image.clone(),
                quote_command(&info.command),
                ago(UNIX_EPOCH + Duration::from_secs(info.created_unix)),
                format!("{state}, pid {}", entry.host.pid),
                info.ports.join(", "),
            ],
            None => [
                entry.name.clone(),
                String::new(),
                String::new(),
                String::new(),
                format!("starting, pid {}", entry.host.pid),
                String::new(),
            ],
        });
    }
    let header = ["NAME", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out!("{}", line.join("  ").trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(args: NamesArgs) -> Result<ExitCode, Failure> {
    let registry = Registry::open()?;
    let mut outcome = EachVm::default();
    for name in &args.names {
        outcome.record(name, stop_one(&registry, name).await);
    }
    Ok(outcome.exit_code())
}

/// `pause` (`pausing`) or `unpause`: asks each VM's host.
pub async fn pause(args: NamesArgs, pausing: bool) -> Result<ExitCode, Failure> {
    let registry = Registry::open()?;
    let request = if pausing {
        Request::Pause
    } else {
        Request::Unpause
    };
    let mut outcome = EachVm::default();
    for name in &args.names {
        let asked = match registry.find(name) {
            Ok(entry) => control::call(&entry.dir.join(registry::CONTROL_SOCKET), request)
                .await
                .map(drop),
            Err(failure) => Err(failure),
        };
        outcome.record(name, asked);
    }
    Ok(outcome.exit_code())
}

/// A command on several named VMs, as `docker stop a b` reports it: the name of each one it
/// did on stdout, one line per failure on stderr, exit code 1 if any failed.
#[derive(Default)]
struct EachVm {
    failed: bool,
}

impl EachVm {
    fn record(&mut self, name: &str, result: Result<(), Failure>) {
        match result {
            Ok(()) => out!("{name}"),
            Err(failure) => {
                eprintln!("supermachine: {}", failure.message());
                self.failed = true;
            }
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

async fn stop_one(registry: &Registry, name: &str) -> Result<(), Failure> {
    let entry = registry.find(name)?;
    let asked = control::call(&entry.dir.join(registry::CONTROL_SOCKET), Request::Stop).await;
    if let Err(e) = &asked {
        tracing::info!("asking {name} to stop: {}; killing its host", e.message());
    } else {
        // Done when the host has unregistered the VM *and* exited, so nothing of it runs
        // once `stop` returns.
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if registry.entry(name).is_none() && !entry.host.runs() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A host that does not answer or finish in time is killed (if it is still the same
    // process: pids get reused); its directory goes with the next registry read.
    if !entry.host.runs() {
        return match registry.entry(name) {
            None => Ok(()),
            Some(_) => Err(Failure::new(format!("{name} did not stop"))),
        };
    }
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(entry.host.pid as i32)
            .ok_or_else(|| Failure::new("bad pid"))?,
        rustix::process::Signal::KILL,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while registry.entry(name).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match registry.entry(name) {
        None => Ok(()),
        Some(_) => Err(Failure::new(format!(
            "{name} (pid {}) would not stop",
            entry.host.pid
        ))),
    }
}

pub async fn logs(args: LogsArgs) -> Result<ExitCode, Failure> {
    let registry = Registry::open()?;
    let entry = registry.find(&args.name)?;
    if args.console {
        let answer =
            control::call(&entry.dir.join(registry::CONTROL_SOCKET), Request::Console).await?;
        output::write(answer.text.unwrap_or_default().as_bytes());
    } else {
        let path = entry.dir.join(registry::OUTPUT_LOG);
        match std::fs::read(&path) {
            Ok(bytes) => output::write(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Failure::from(e).context(format!("cannot read {}", path.display())))
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `NAME:PATH` → (name, path); a host path (with a `/` before any colon, or none) → `None`.
fn vm_path(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (!name.is_empty() && !name.contains('/')).then_some((name, path))
}

pub async fn cp(args: CpArgs) -> Result<ExitCode, Failure> {
    let registry = Registry::open()?;
    let agent_of = |name: &str| -> Result<Agent, Failure> {
        let (entry, _) = registry.find_ready(name)?;
        Ok(Agent::with_connector(UnixConnector::muxed(
            entry.dir.join(registry::MUXER_SOCKET),
        )))
    };
    match (vm_path(&args.source), vm_path(&args.destination)) {
        (None, Some((name, guest))) => {
            let host = Path::new(&args.source);
            let metadata = std::fs::metadata(host)
                .map_err(|e| Failure::from(e).context(format!("cannot read {}", host.display())))?;
            if !metadata.is_file() {
                return Err(Failure::new(format!(
                    "{} is not a regular file: cp copies single files (for a directory, pipe a \
                     tar: `tar c DIR | supermachine exec -i {name} tar x -C /dest`)",
                    host.display()
                )));
            }
            let mut guest = guest.to_owned();
            if guest.ends_with('/') {
                guest.push_str(&file_name(host)?);
            }
            if !guest.starts_with('/') {
                return Err(Failure::new(format!(
                    "{name}:{guest}: the guest path must be absolute"
                )));
            }
            if metadata.len() > MAX_CP_BYTES {
                return Err(Failure::new(format!(
                    "{} is {} bytes; cp carries files up to {MAX_CP_BYTES} bytes (pipe larger ones: \
                     `supermachine exec -i {name} sh -c 'cat > PATH' < FILE`)",
                    host.display(),
                    metadata.len()
                )));
            }
            let bytes = std::fs::read(host)?;
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o7777;
            agent_of(name)?.write_file(guest, bytes, Some(mode)).await?;
        }
        (Some((name, guest)), None) => {
            let bytes = agent_of(name)?.read_file(guest).await?;
            let mut host = PathBuf::from(&args.destination);
            if host.is_dir() {
                host.push(file_name(Path::new(guest))?);
            }
            std::fs::write(&host, &bytes).map_err(|e| {
                Failure::from(e).context(format!("cannot write {}", host.display()))
            })?;
        }
        (Some(_), Some(_)) => {
            return Err(Failure::new(
                "cp copies between the host and a VM, not between two VM paths",
            ))
        }
        (None, None) => {
            return Err(Failure::new(
                "one side of cp must be NAME:PATH in a VM (cp FILE NAME:PATH, cp NAME:PATH FILE)",
            ))
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn file_name(path: &Path) -> Result<String, Failure> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Failure::new(format!("{} has no file name", path.display())))
}

/// `3 minutes ago`, as `docker ps` says it.
fn ago(when: SystemTime) -> String {
    let secs = when.elapsed().map_or(0, |d| d.as_secs());
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86_399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

fn quote_command(argv: &[String]) -> String {
    let line = argv.join(" ");
    if line.chars().count() > 30 {
        format!("\"{}…\"", line.chars().take(29).collect::<String>())
    } else {
        format!("\"{line}\"")
    }
}
