//! The command line, as clap sees it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run OCI images as hardware-isolated microVMs.
///
/// IMAGE is a registry reference (`registry.example.com/repo:tag`; pulled on first use),
/// `oci:DIR[:TAG]` (an OCI image layout) or `docker-archive:FILE` (a `docker save` tar).
#[derive(Debug, Parser)]
#[command(name = "supermachine", version, about, long_about = None)]
pub struct Cli {
    /// More logs on stderr (-v: info, -vv: debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download an image and prepare its root filesystem.
    Pull(PullArgs),
    /// List the images in the local cache, with their sizes.
    Images,
    /// Remove an image from the local cache.
    Rmi(RmiArgs),
    /// Run a command in a new microVM.
    Run(RunArgs),
    /// Run a command in a running microVM.
    Exec(ExecArgs),
    /// List running microVMs.
    Ps,
    /// Stop running microVMs (paused ones too).
    Stop(NamesArgs),
    /// Pause running microVMs: their vCPUs and devices stop until `unpause`; nothing is lost.
    Pause(NamesArgs),
    /// Let paused microVMs run again.
    Unpause(NamesArgs),
    /// Show the output of a detached microVM's command, or its guest console.
    Logs(LogsArgs),
    /// Copy a file into or out of a running microVM (`cp FILE NAME:PATH`, `cp NAME:PATH FILE`).
    Cp(CpArgs),
    /// The process that hosts a detached VM (started by `run -d`).
    #[command(name = "__worker", hide = true)]
    Worker(WorkerArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image reference.
    pub image: String,
}

#[derive(Debug, Args)]
pub struct RmiArgs {
    /// Image names or IDs (as `supermachine images` shows them).
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// What `run` and `exec` share: how the command runs in the guest.
#[derive(Debug, Args, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProcessArgs {
    /// Keep stdin open and send it to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal (with -i: an interactive session, Ctrl-C goes to the guest).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE; KEY alone copies it from here).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short, long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User in the guest (name, uid or uid:gid).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
}

#[derive(Debug, Args, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunArgs {
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Publish a guest TCP port: [IP:]HOST_PORT:GUEST_PORT (IP defaults to 127.0.0.1).
    #[arg(short, long = "publish", value_name = "[IP:]HOST:GUEST")]
    pub publish: Vec<String>,
    /// The VM's network: `public` (a NIC; the public internet allowed, private, loopback,
    /// link-local and metadata addresses refused) or `none` (no NIC).
    #[arg(long, value_name = "none|public", default_value = "public")]
    pub network: String,
    /// Allow a destination the policy would refuse: TARGET[:PORTS][/tcp|udp], e.g.
    /// 10.1.2.3:5432, 203.0.113.0/24, example.com:443. Rules apply in order.
    #[arg(long = "allow", value_name = "RULE")]
    pub allow: Vec<String>,
    /// Refuse a destination (same syntax as --allow); `--deny any` + --allow is an allow-list.
    #[arg(long = "deny", value_name = "RULE")]
    pub deny: Vec<String>,
    /// Let the guest reach this host's 127.0.0.1:PORT as host.supermachine.internal:PORT.
    #[arg(long = "host-loopback", value_name = "PORT")]
    pub host_loopback: Vec<u16>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    pub memory: u32,
    /// A name for the VM (for exec, stop, logs, cp); generated if not given.
    #[arg(long)]
    pub name: Option<String>,
    /// Run in the background: print the name and return; the VM runs until its command ends
    /// or `supermachine stop NAME`.
    #[arg(short, long)]
    pub detach: bool,
    /// Replace the image's Entrypoint.
    #[arg(long, value_name = "PROGRAM")]
    pub entrypoint: Option<String>,
    /// The image.
    pub image: String,
    /// Arguments replacing the image's Cmd (they follow its Entrypoint).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub process: ProcessArgs,
    /// The VM's name.
    pub name: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct NamesArgs {
    /// The VMs' names.
    #[arg(required = true)]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Show the guest kernel console instead of the command's output.
    #[arg(long)]
    pub console: bool,
    /// The VM's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// A host file, or NAME:PATH in a VM.
    pub source: String,
    /// A host path, or NAME:PATH in a VM.
    pub destination: String,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The registry directory claimed for it (with the `run` request in `spec.json`).
    pub dir: PathBuf,
}
