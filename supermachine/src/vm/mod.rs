//! [`Vm`]: a microVM whose PID 1 is the supermachine agent, reached over virtio-vsock.
//!
//! Start-up: the config is checked, the initramfs (the agent as `/init`, plus any extra files)
//! is built and cached under its content hash, the machine boots with a vsock device, and
//! [`Vm::start`] returns once the agent answers a `ping` over vsock. From then on the VM is an
//! [`Agent`] like any other: [`Vm::exec`] has exactly the host-mode API.
//!
//! When the VM ends for any reason (kernel panic, reset, VMM failure, [`Vm::stop`], drop),
//! every pending exec and control call fails with [`Error::VmExited`], which carries the
//! reason and, for crashes, the console tail.

mod config;
mod connector;
mod exit;
mod initramfs;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use supermachine_vmm::devices::vsock::VsockConfig;
use supermachine_vmm::{Machine, MachineBuilder, MachineConfig};
use tracing::{debug, info};

pub use config::{ConfigError, VmConfig, AGENT_ENV, KERNEL_ENV, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
pub use exit::{VmExit, VmExitReason};

use crate::agent::Agent;
use crate::error::Error;
use crate::exec::ExecBuilder;
use config::GuestFile;
pub(crate) use connector::VmGone;
use connector::{Liveness, VsockConnector};
use initramfs::{Entry, Initramfs};

/// The guest's vsock context ID. Every VM has its own device, so one fixed CID is enough.
const GUEST_CID: u64 = 3;

/// How much of the console a boot timeout reports.
const CONSOLE_TAIL_BYTES: usize = 4096;

/// How often start-up asks whether the agent is up. Each refused attempt costs the guest a
/// packet round trip (12–15 ms of guest time on PVM hosts), so this is not a busy poll.
const READY_POLL: Duration = Duration::from_millis(250);

/// Kernel parameters the VM adds (after the VMM's own; see `supermachine_vmm::BASE_CMDLINE`).
/// `quiet` keeps boot chatter off the trapped serial port; panics still print.
const QUIET_CMDLINE: &str = "quiet";
/// Tells the agent the host is PVM, so execs get the glibc workaround (SEMANTICS.md).
const PVM_AGENT_FLAG: &str = "supermachine.pvm=1";
/// Enables the agent's test-only actions.
const TEST_HOOKS_FLAG: &str = "supermachine.test_hooks=1";

/// A running microVM with the supermachine agent as PID 1.
///
/// Dropping it stops the VM (vCPU threads joined, memory and devices freed); clones of
/// [`Vm::agent`] that outlive it fail with [`Error::VmExited`]. The VM's devices run on the tokio
/// runtime `start` was called in, which must outlive the VM.
///
/// ```no_run
/// # async fn demo() -> Result<(), supermachine::Error> {
/// use supermachine::{Vm, VmConfig};
///
/// // Kernel and agent from SUPERMACHINE_KERNEL / SUPERMACHINE_AGENT_BIN.
/// let vm = Vm::start(VmConfig::new()).await?;
/// let out = vm.exec(["/init", "--help"]).output().await?;
/// println!("{}", String::from_utf8_lossy(&out.stdout));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Vm {
    agent: Agent,
    liveness: Arc<Liveness>,
    machine: Mutex<Machine>,
    boot_time: Duration,
}

impl Vm {
    /// Boots a VM and waits until its agent answers.
    ///
    /// Fails with [`Error::InvalidConfig`] before anything is created when the config is
    /// unusable, [`Error::HypervisorUnavailable`] when `/dev/kvm` cannot be used (the message
    /// says how to fix it), [`Error::VmExited`] if the guest dies while booting and
    /// [`Error::BootTimeout`] if the agent does not answer in time; nothing is left running.
    pub async fn start(config: VmConfig) -> Result<Vm, Error> {
        let started = Instant::now();
        let resolved = config.resolve()?;
        let initramfs = build_initramfs(&config, &resolved.agent)?;

        let mut machine_config = MachineConfig::new(&resolved.kernel);
        machine_config.vcpus = config.vcpus;
        machine_config.memory_mib = config.memory_mib;
        machine_config.initramfs = Some(initramfs);
        machine_config.cmdline = guest_cmdline(&config);
        machine_config.console_to_stderr = config.console_to_stderr;
        machine_config.vsock = Some(VsockConfig {
            guest_cid: GUEST_CID,
            ..VsockConfig::default()
        });

        let builder = MachineBuilder::new(machine_config).map_err(Error::from_vmm)?;
        let machine = builder.start().map_err(Error::from_vmm)?;
        let Some(handle) = machine.vsock().cloned() else {
            return Err(Error::Protocol("the machine has no vsock device".into()));
        };
        let liveness = Liveness::new(machine.exit_watch());
        tokio::spawn(liveness.clone().monitor());
        let agent = Agent::with_connector(VsockConnector {
            handle,
            liveness: liveness.clone(),
        });
        let vm = Vm {
            agent,
            liveness,
            machine: Mutex::new(machine),
            boot_time: Duration::ZERO,
        };
        // On any error below, dropping `vm` stops the machine.
        let boot_time = vm.wait_for_agent(started, config.boot_timeout).await?;
        info!(
            boot_ms = boot_time.as_millis() as u64,
            "VM agent is answering"
        );
        Ok(Vm { boot_time, ..vm })
    }

    async fn wait_for_agent(&self, started: Instant, timeout: Duration) -> Result<Duration, Error> {
        let deadline = started + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.agent.ping()).await {
                Ok(Ok(info)) => {
                    debug!(version = %info.version, "agent ping answered");
                    return Ok(started.elapsed());
                }
                Ok(Err(e @ Error::VmExited(_))) => return Err(e),
                Ok(Err(e)) => debug!("agent not up yet: {e}"),
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::BootTimeout {
                    after: timeout,
                    console_tail: self.console_tail(),
                });
            }
            tokio::time::sleep(READY_POLL.min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }

    /// The agent of this VM (cheap to clone; every call opens its own vsock connection).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// Starts building an exec of `argv` in the guest; see [`Agent::exec`].
    pub fn exec<I, S>(&self, argv: I) -> ExecBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.agent.exec(argv)
    }

    /// Test hook: makes the guest kernel panic (see [`VmConfig::test_hooks`]).
    #[doc(hidden)]
    pub async fn crash_guest(&self) -> Result<(), Error> {
        self.agent.crash_guest().await
    }

    /// How long [`Vm::start`] took, from the call to the agent's first answer.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The machine, even if a panicking thread poisoned the lock: `Machine`'s methods keep it
    /// consistent on their own.
    fn machine(&self) -> std::sync::MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest console (serial port) as far as it is kept (the last 256 KiB or so).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.machine().console()).into_owned()
    }

    fn console_tail(&self) -> String {
        self.machine().console_log().tail(CONSOLE_TAIL_BYTES)
    }

    /// How the VM ended, or `None` while it runs.
    pub fn exit_status(&self) -> Option<VmExit> {
        self.liveness.exit()
    }

    /// Waits until the VM ends, and says how.
    pub async fn wait(&self) -> VmExit {
        let mut rx = self.liveness.exit.clone();
        let _ = rx.wait_for(Option::is_some).await;
        self.exit_status().unwrap_or(VmExit {
            reason: VmExitReason::Stopped,
            console_tail: String::new(),
        })
    }

    /// Stops the VM (if still running) and frees its vCPUs; every pending exec fails with
    /// [`Error::VmExited`]. Idempotent. Blocks briefly while the vCPU threads leave the guest.
    pub fn stop(&self) -> VmExit {
        VmExit::from(self.machine().stop())
    }
}

/// The guest kernel parameters this VM adds.
fn guest_cmdline(config: &VmConfig) -> String {
    let mut parts = Vec::new();
    if !config.verbose_console {
        parts.push(QUIET_CMDLINE);
    }
    if supermachine_vmm::is_pvm_host() {
        parts.push(PVM_AGENT_FLAG);
    }
    if config.test_hooks {
        parts.push(TEST_HOOKS_FLAG);
    }
    if !config.kernel_cmdline.trim().is_empty() {
        parts.push(config.kernel_cmdline.trim());
    }
    parts.join(" ")
}

/// Builds (or finds in the cache) the initramfs for `config`.
fn build_initramfs(
    config: &VmConfig,
    agent: &std::path::Path,
) -> Result<std::path::PathBuf, Error> {
    let invalid = |e: initramfs::InitramfsError| Error::from(ConfigError::Initramfs(e.to_string()));
    let agent_bytes = initramfs::read_host_file(agent).map_err(invalid)?;
    let mut fs = Initramfs::with_agent(agent_bytes);
    for file in &config.files {
        match file {
            GuestFile::Copy { guest, host, mode } => {
                let contents = initramfs::read_host_file(host).map_err(invalid)?;
                let mode = match mode {
                    Some(mode) => *mode,
                    None => std::fs::metadata(host)
                        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                        .unwrap_or(0o644),
                };
                fs.add(guest, Entry::File { mode, contents })
                    .map_err(invalid)?;
            }
            GuestFile::Symlink { guest, target } => {
                fs.add(
                    guest,
                    Entry::Symlink {
                        target: target.clone(),
                    },
                )
                .map_err(invalid)?;
            }
        }
    }
    fs.cached().map_err(|source| Error::Cache {
        what: "the initramfs",
        source,
    })
}
