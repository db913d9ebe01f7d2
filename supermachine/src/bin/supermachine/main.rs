//! `supermachine`: run OCI images as microVMs from the command line, with `docker run` habits.
//!
//! Every VM is hosted by one process: the foreground `run`, or for `run -d` a worker process of
//! its own (ARCHITECTURE.md decision 2). The host process registers the VM under the per-user
//! runtime directory ([`registry`]) with a Unix-socket vsock muxer and a small control socket,
//! which is how `exec`, `ps`, `stop`, `logs` and `cp` reach it from other processes.

mod attach;
mod cli;
mod commands;
mod control;
mod failure;
mod host;
mod image_arg;
mod network;
mod output;
mod progress;
mod registry;
mod terminal;
mod worker;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use failure::Failure;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return Failure::from(e).report(),
    };
    let result = runtime.block_on(dispatch(cli.command));
    // VM device tasks and forwarded connections must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(failure) => failure.report(),
    }
}

async fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Pull(args) => commands::pull(args).await,
        Command::Images => commands::images().await,
        Command::Rmi(args) => commands::rmi(args).await,
        Command::Run(args) => commands::run(args).await,
        Command::Exec(args) => commands::exec(args).await,
        Command::Ps => commands::ps().await,
        Command::Stop(args) => commands::stop(args).await,
        Command::Pause(args) => commands::pause(args, true).await,
        Command::Unpause(args) => commands::pause(args, false).await,
        Command::Logs(args) => commands::logs(args).await,
        Command::Cp(args) => commands::cp(args).await,
        Command::Worker(args) => worker::main(args).await,
    }
}

/// Logs go to stderr, off unless `-v` or `RUST_LOG` asks for them: the CLI's own output is
/// the guest's.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info,supermachine=debug",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
