//! [`Vm`]: a microVM whose PID 1 is the supermachine agent, reached over virtio-vsock.
//!
//! Start-up: the config is checked, the initramfs (the agent as `/init`, plus any extra files)
//! is built and cached under its content hash, the machine boots with a vsock device, and
//! [`Vm::start`] returns once the agent answers a `ping` over vsock (a start restored from the
//! snapshot cache: once its vCPUs run, see [`Vm::restore`]). From then on the VM is an
//! [`Agent`] like any other: [`Vm::exec`] has exactly the host-mode API.
//!
//! When the VM ends for any reason (kernel panic, reset, VMM failure, [`Vm::stop`], drop),
//! every pending exec and control call fails with [`Error::VmExited`], which carries the
//! reason and, for crashes, the console tail.

mod cache_lock;
mod config;
mod connector;
mod exit;
mod first_answer;
mod initramfs;
pub(crate) mod network;
mod snapshot;
mod working_set;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use supermachine_vmm::devices::serial::ConsoleLog;
use supermachine_vmm::devices::vsock::{VsockConfig, VsockHandle};
use supermachine_vmm::{DiskConfig, Machine, MachineBuilder, MachineConfig, PausedFlag};
use tracing::{debug, info, warn};

pub use config::{ConfigError, VmConfig, AGENT_ENV, KERNEL_ENV, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
pub use exit::{VmExit, VmExitReason};
pub use network::{Action, Limits, Network, Rule, RuleError};
pub use snapshot::{Snapshot, SnapshotError};

use crate::agent::Agent;
use crate::error::Error;
use crate::exec::ExecBuilder;
use crate::publish::{GuestTcpStream, Listeners, PortMapping, PublishedPort, Publisher};
use config::GuestFile;
pub(crate) use connector::VmGone;
use connector::{Liveness, VsockConnector};
use initramfs::{Entry, Initramfs};
use snapshot::Identity;

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
/// Tells the agent that `/dev/vda` is the image root filesystem to run execs in.
const ROOTFS_FLAG: &str = "supermachine.rootfs=1";

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
    /// Locked on the blocking pool by snapshot, pause, resume and stop (for as long as they
    /// block), and on the caller's thread only by `stop_blocking` and drop.
    machine: Arc<Mutex<Machine>>,
    /// The machine's console log and vsock device, kept here so reading them never waits for
    /// the machine lock.
    console: ConsoleLog,
    vsock: VsockHandle,
    /// The machine's own "paused" flag (set and cleared under the machine's pause lock).
    paused: PausedFlag,
    identity: Identity,
    timings: StartTimings,
    /// The OCI image config whose Env / WorkingDir / User every exec defaults to.
    image: Option<crate::image::ImageConfig>,
    /// Published ports; dropped (listeners closed, connections cut) with the VM.
    publisher: Publisher,
    /// The agent protocol revision the guest's agent speaks: from its first ping after a boot;
    /// after a restore the snapshot's (which [`Vm::snapshot`] only writes for agents of this
    /// library's revision).
    agent_protocol: u32,
}

/// Where the time of [`Vm::start`] / [`Vm::restore`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StartTimings {
    /// Whether the VM was restored from a snapshot (otherwise it cold-booted).
    pub restored: bool,
    /// From the call until the vCPUs ran (config checks, initramfs or snapshot checks, VMM
    /// set-up: memory mapped, state loaded).
    pub vcpus_running: Duration,
    /// From the call until the VM was handed over: a cold-booted VM's agent had answered over
    /// vsock; a restored VM's vCPUs were running, as nothing is waited for after that (its
    /// agent reseeds the RNG and sets the clock from the first request, before serving it).
    pub agent_ready: Duration,
}

/// How long a snapshot waits for closing vsock connections to finish (see
/// `Vm::settle_connections`).
const SNAPSHOT_SETTLE: Duration = Duration::from_secs(1);

impl Vm {
    /// Starts a VM: cold-booted, it is returned once its agent answers; restored, once its
    /// vCPUs run (see [`Vm::restore`]).
    ///
    /// With the snapshot cache on (the default, see [`VmConfig::snapshot_cache`]), the first
    /// start of a configuration cold-boots the guest and snapshots it once the agent answers;
    /// later starts restore that snapshot instead of booting (if the restore itself fails, they
    /// boot; a restored guest that then answers nothing is stopped, see [`Vm::restore`]).
    /// Concurrent first starts of one configuration take turns (a file lock), so only one boots
    /// and snapshots.
    ///
    /// Fails with [`Error::InvalidConfig`] before anything is created when the config is
    /// unusable, [`Error::HypervisorUnavailable`] when `/dev/kvm` cannot be used (the message
    /// says how to fix it), [`Error::VmExited`] if the guest dies while booting and
    /// [`Error::BootTimeout`] if a booted agent does not answer in time; nothing is left running.
    pub async fn start(config: VmConfig) -> Result<Vm, Error> {
        let started = Instant::now();
        // Bound first: a port in use must fail the start before anything is built or booted.
        let listeners = Listeners::bind(&config.publish)?;
        let (config, image) = match config.image.clone() {
            Some(image) => {
                // Refuse a bad config (a foreign image among others) before building a rootfs.
                // Off the runtime: resolving may unpack the bundled guest (first use).
                let config = blocking(move || {
                    config.resolve()?;
                    Ok(config)
                })
                .await?;
                let rootfs = image.rootfs().await?;
                let mut config = config;
                config.rootfs = Some(rootfs.path);
                (config, Some(image.config().clone()))
            }
            None => (config, None),
        };
        let vm = Self::start_with_rootfs(config, started).await?;
        let vm = vm.with_image(image);
        listeners.serve_on(&vm.publisher, &vm.agent)?;
        Ok(vm)
    }

    async fn start_with_rootfs(config: VmConfig, started: Instant) -> Result<Vm, Error> {
        // The kernel's and rootfs's digests and the initramfs come from the cache when their
        // files are unchanged (`cache::file_digest`, `initramfs::Recipe`); otherwise reading
        // and hashing take tens to hundreds of milliseconds: off the runtime either way.
        let (config, resolved, initramfs, identity) = blocking(move || {
            let resolved = config.resolve()?;
            let initramfs = build_initramfs(&config, &resolved.agent)?;
            let identity = identity_from(&config, &resolved, &initramfs)?;
            Ok((config, resolved, initramfs, identity))
        })
        .await?;
        if !config.snapshot_cache {
            return Self::boot(&config, &resolved, &initramfs.path, identity, started).await;
        }
        let key = identity.key();
        let dir = blocking(move || {
            crate::cache::dir("snapshots")
                .map(|dir| dir.join(key))
                .map_err(|source| Error::Cache {
                    what: "snapshots",
                    source,
                })
        })
        .await?;
        let turn = cache_lock::lock(&dir)
            .await
            .map_err(|source| Error::Cache {
                what: "the snapshot lock",
                source,
            })?;
        let cached = {
            let dir = dir.clone();
            blocking(move || {
                Ok(dir
                    .join(snapshot::META_FILE)
                    .exists()
                    .then(|| Snapshot::open_blocking(&dir)))
            })
            .await?
        };
        if let Some(opened) = cached {
            match opened {
                Ok(snap) if snap.identity() == &identity => {
                    match Self::restore_inner(&snap, &config, started).await {
                        Ok(vm) => return Ok(vm),
                        Err(e) => warn!(
                            dir = %dir.display(),
                            "restoring the cached snapshot failed, booting instead: {}", crate::Report(&e)
                        ),
                    }
                }
                Ok(_) => {
                    warn!(dir = %dir.display(), "cached snapshot is of another VM; replacing it")
                }
                Err(e) => {
                    warn!(dir = %dir.display(), "cached snapshot unusable, replacing it: {}", crate::Report(&e))
                }
            }
            let old = dir.clone();
            blocking(move || {
                if let Err(e) = std::fs::remove_dir_all(&old) {
                    warn!(dir = %old.display(), "cannot remove the old snapshot: {e}");
                }
                Ok(())
            })
            .await?;
        }
        let vm = Self::boot(&config, &resolved, &initramfs.path, identity, started).await?;
        // The lock goes with the write: a start cancelled meanwhile must not let another
        // start boot the same configuration while this snapshot is still being written.
        match vm.snapshot_holding(dir.clone(), turn).await {
            Ok(_) => info!(dir = %dir.display(), "VM snapshot cached; later starts restore it"),
            // The VM itself is fine; only later starts lose the shortcut.
            Err(e) => {
                warn!(dir = %dir.display(), "could not cache a snapshot of the VM: {}", crate::Report(&e))
            }
        }
        Ok(vm)
    }

    /// Cold-boots the kernel and waits for the agent.
    async fn boot(
        config: &VmConfig,
        resolved: &config::Resolved,
        initramfs: &std::path::Path,
        identity: Identity,
        started: Instant,
    ) -> Result<Vm, Error> {
        let mut machine_config = MachineConfig::new(&resolved.kernel);
        machine_config.vcpus = config.vcpus;
        machine_config.memory_mib = config.memory_mib;
        machine_config.initramfs = Some(initramfs.to_owned());
        machine_config.cmdline = identity.cmdline.clone();
        machine_config.console_to_stderr = config.console_to_stderr;
        machine_config.vsock = Some(vsock_config());
        machine_config.disks = rootfs_disks(&identity);
        let network = config.network.clone();

        // Loading the kernel and creating the VM and its vCPUs block (file reads, ioctls, the
        // host's resolv.conf).
        let machine = blocking(move || {
            machine_config.network = network.stack_config();
            MachineBuilder::new(machine_config)
                .and_then(MachineBuilder::start)
                .map_err(Error::from_vmm)
        })
        .await?;
        let mut vm = Self::attach(machine, identity, false, started.elapsed())?;
        // On any error below, dropping `vm` stops the machine.
        let (agent_ready, info) = vm.wait_for_agent(started, config.boot_timeout).await?;
        vm.agent_protocol = info.protocol;
        info!(
            boot_ms = agent_ready.as_millis() as u64,
            "VM agent is answering"
        );
        Ok(vm.ready(agent_ready))
    }

    /// Restores `snapshot` into a new VM and returns as soon as its vCPUs run.
    ///
    /// Before the guest serves anything it reseeds its RNG from fresh host entropy and sets
    /// its clock to the host's (so no two VMs restored from one snapshot share randomness, and
    /// none runs on a stale clock): the entropy and the time go in front of the first requests
    /// on their own connections, so the first exec costs no extra round trip (SEMANTICS.md,
    /// `restored`). A guest that cannot reseed powers off, and the request fails with
    /// [`Error::VmExited`]. Processes that were running in the guest when the snapshot was
    /// taken run on until then, so if no request has gone out 20 ms after the restore, the host
    /// sends the reseed itself (a ping). A VM whose agent answers nothing within a minute of
    /// running time is stopped ([`VmExitReason::Unresponsive`]), so requests fail instead of
    /// waiting.
    ///
    /// Guest RAM is the snapshot's memory file mapped copy-on-write, and VMs restored from one
    /// snapshot share its clean pages. Only the snapshot's working set (if it has one: see
    /// [`Vm::snapshot`]) is mapped before the guest runs, its written pages copied up front
    /// as the guest's first writes would copy them. The VM is independent of the
    /// one the snapshot was taken from. Must be called inside a tokio runtime, which must
    /// outlive the VM.
    pub async fn restore(snapshot: &Snapshot) -> Result<Vm, Error> {
        let vm = Self::restore_inner(snapshot, &VmConfig::new(), Instant::now()).await?;
        Ok(vm.with_image(snapshot.image_config().cloned()))
    }

    async fn restore_inner(
        snapshot: &Snapshot,
        config: &VmConfig,
        started: Instant,
    ) -> Result<Vm, Error> {
        let identity = snapshot.identity().clone();
        // The machine's shape comes from the snapshot; the kernel path is not used.
        let mut machine_config = MachineConfig::new("/");
        machine_config.vcpus = identity.vcpus;
        machine_config.memory_mib = identity.memory_mib;
        machine_config.console_to_stderr = config.console_to_stderr;
        machine_config.vsock = Some(vsock_config());
        machine_config.disks = rootfs_disks(&identity);
        // The snapshot decides whether there is a NIC; the config only gives its policy (a
        // snapshot with a NIC restored by a config without a network refuses every flow).
        let has_nic = network::cmdline_has_nic(&identity.cmdline);
        let policy = if config.network.is_enabled() {
            config.network.clone()
        } else {
            network::Network::public().rule(Rule {
                action: Action::Deny,
                target: supermachine_vmm::net::policy::Target::Any,
                ports: None,
                protocol: None,
            })
        };
        // Mapping the memory file, creating the VM and loading its state block (ioctls, file
        // I/O): off the runtime.
        let snapshot_copy = snapshot.clone();
        let rootfs = identity.rootfs.clone();
        let machine = blocking(move || {
            // Every restored VM gets a new user-mode network of its own.
            machine_config.network = if has_nic { policy.stack_config() } else { None };
            if let Some(rootfs) = &rootfs {
                // The guest's page cache holds pieces of this image: it must be the same bytes.
                rootfs.check_unchanged()?;
            }
            Machine::restore_state(machine_config, snapshot_copy.dir(), snapshot_copy.state())
                .map_err(|e| match e {
                    supermachine_vmm::Error::Snapshot(e) => Error::Snapshot(e),
                    other => Error::from_vmm(other),
                })
        })
        .await?;
        let vm = Self::attach(machine, identity, true, started.elapsed())?;
        // No round trip here: the reseed rides on the first requests (`agent::reseed`).
        tokio::spawn(first_answer::watch(
            vm.agent.clone(),
            Arc::downgrade(&vm.machine),
            vm.paused.clone(),
            vm.console.clone(),
        ));
        let ready = started.elapsed();
        debug!(
            restore_ms = ready.as_secs_f64() * 1e3,
            "restored VM is running; its reseed goes with the first request"
        );
        Ok(vm.ready(ready))
    }

    /// Wraps a started machine: liveness watch and the agent over its vsock.
    fn attach(
        machine: Machine,
        identity: Identity,
        restored: bool,
        vcpus_running: Duration,
    ) -> Result<Vm, Error> {
        let Some(handle) = machine.vsock().cloned() else {
            return Err(Error::Protocol("the machine has no vsock device".into()));
        };
        let liveness = Liveness::new(machine.exit_watch());
        tokio::spawn(liveness.clone().monitor());
        let agent = Agent::with_connector(VsockConnector {
            handle: handle.clone(),
            liveness: liveness.clone(),
        });
        let agent = if restored {
            agent
                .reseeding_first_requests()
                .map_err(|e| Error::VmSetup(Box::new(e)))?
        } else {
            agent
        };
        Ok(Vm {
            agent,
            liveness,
            console: machine.console_log().clone(),
            paused: machine.paused_flag(),
            vsock: handle,
            machine: Arc::new(Mutex::new(machine)),
            identity,
            timings: StartTimings {
                restored,
                vcpus_running,
                agent_ready: Duration::ZERO,
            },
            image: None,
            publisher: Publisher::new(),
            agent_protocol: supermachine_codec::AGENT_PROTOCOL,
        })
    }

    fn ready(mut self, agent_ready: Duration) -> Vm {
        self.timings.agent_ready = agent_ready;
        self
    }

    fn with_image(mut self, image: Option<crate::image::ImageConfig>) -> Vm {
        self.image = image;
        self
    }

    /// The config of the OCI image this VM runs, if any.
    pub fn image_config(&self) -> Option<&crate::image::ImageConfig> {
        self.image.as_ref()
    }

    /// Starts building the image's own command, as `docker run IMAGE [ARGS...]` would: its
    /// `Entrypoint` followed by `args`, or by its `Cmd` when `args` is empty. Fails with
    /// [`Error::InvalidRequest`] when the VM runs no image or the result is empty.
    pub fn run<I, S>(&self, args: I) -> Result<ExecBuilder, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let Some(image) = &self.image else {
            return Err(Error::InvalidRequest(
                "Vm::run needs a VM started on an image (VmConfig::image); use Vm::exec".into(),
            ));
        };
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        let tail = if args.is_empty() { &image.cmd } else { &args };
        let argv: Vec<String> = image.entrypoint.iter().chain(tail).cloned().collect();
        if argv.is_empty() {
            return Err(Error::InvalidRequest(
                "the image has no Entrypoint or Cmd; give a command".into(),
            ));
        }
        Ok(self.exec(argv))
    }

    /// Saves this VM into the new directory `dir` (created; it must not exist or be empty)
    /// and returns the snapshot, ready for [`Vm::restore`]. The VM is paused while its state
    /// and RAM are written (a sparse file: only pages the guest touched), then carries on; its
    /// running execs and connections are not disturbed. A VM paused with [`Vm::pause`] can be
    /// snapshotted and stays paused.
    ///
    /// First it waits up to a second for vsock connections that are still open or closing
    /// (a finished exec's connection needs one guest round trip to close): a snapshot without
    /// connections restores faster, as the restored guest then needs no transport reset.
    /// Connections still open are fine too; their guest sockets are reset in restored VMs.
    ///
    /// Where the hypervisor can map guest memory ahead of the guest (KVM on Linux 6.10+ with
    /// two-dimensional paging; not PVM), the snapshot is then restored once, that VM answers
    /// a `true` exec (the reseed in front of it), and the guest pages it touched are saved beside the
    /// snapshot (`working-set`): every later restore maps them before its vCPUs run, instead
    /// of the guest exiting to the host once per page while it answers its first requests.
    /// That costs one restore and one exec more here; if it fails the snapshot is still fine,
    /// only slower to restore, and a warning is logged.
    ///
    /// The writing (a few hundred milliseconds for a few hundred MiB of touched RAM) runs on
    /// tokio's blocking pool, not on the calling task's thread. Dropping this future does not
    /// cancel a write that has begun: it completes (or fails) in the background, and the VM
    /// stays paused until it has.
    ///
    /// Fails with [`Error::AgentOutdated`] when the VM's agent is older than this library
    /// (restores of the snapshot could not hand it the reseed), before anything is written.
    pub async fn snapshot(&self, dir: impl AsRef<std::path::Path>) -> Result<Snapshot, Error> {
        self.snapshot_holding(dir.as_ref().to_owned(), ()).await
    }

    /// [`Vm::snapshot`], keeping `keep` (a lock) alive until the write has ended, even when
    /// this future is dropped first.
    async fn snapshot_holding(
        &self,
        dir: std::path::PathBuf,
        keep: impl Send + 'static,
    ) -> Result<Snapshot, Error> {
        // Restores of it send the reseed as a preamble, which older agents answer as an
        // exchange of its own (dropping the request behind it).
        if self.agent_protocol < supermachine_codec::AGENT_PROTOCOL {
            return Err(Error::AgentOutdated {
                what: "a snapshot",
                found: self.agent_protocol,
                needed: supermachine_codec::AGENT_PROTOCOL,
            });
        }
        {
            let dir = dir.clone();
            blocking(move || {
                if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
                    return Err(SnapshotError::Exists(dir).into());
                }
                Ok(())
            })
            .await?;
        }
        // Paused VMs have no connection traffic to wait for (and none would settle).
        if !self.is_paused() {
            self.settle_connections(SNAPSHOT_SETTLE).await;
        }
        let machine = Arc::clone(&self.machine);
        let identity = self.identity.clone();
        let image = self.image.clone();
        let liveness = Arc::clone(&self.liveness);
        let (snapshot, paused_for, memory_bytes) = blocking(move || {
            let written =
                write_snapshot(&lock(&machine), &dir, &identity, image.as_ref(), &liveness);
            drop(keep);
            written
        })
        .await?;
        debug!(
            dir = %snapshot.dir().display(),
            paused_ms = paused_for.as_secs_f64() * 1e3,
            memory_bytes,
            "snapshot written"
        );
        self.record_working_set(&snapshot).await;
        Ok(snapshot)
    }

    /// Pauses the VM: its vCPUs stop between two instructions and its devices between two
    /// requests, until [`Vm::resume`]. Nothing is lost: running execs keep their streams (they
    /// just see no output meanwhile), published ports keep their listeners (new connections
    /// wait), and both carry on after the resume. [`Vm::snapshot`] and [`Vm::stop`] work on a
    /// paused VM. The guest clock is not stopped, so the guest sees the pause as time passed.
    /// Timeouts of execs (host-side deadlines) keep running. Idempotent.
    ///
    /// Fails with [`Error::VmExited`] if the VM has ended (or is stopping), and with
    /// [`Error::Pause`] if a vCPU or device could not be held still (the VM then runs on).
    /// Parking the vCPUs happens on the blocking pool.
    pub async fn pause(&self) -> Result<(), Error> {
        let machine = Arc::clone(&self.machine);
        let result = blocking(move || Ok(lock(&machine).pause())).await?;
        result.map_err(|e| match e {
            supermachine_vmm::Error::Pause(supermachine_vmm::PauseError::NotRunning) => {
                Error::VmExited(self.exit_status().unwrap_or(VmExit {
                    reason: VmExitReason::Stopped,
                    console_tail: String::new(),
                }))
            }
            supermachine_vmm::Error::Pause(e) => Error::Pause(e),
            other => Error::from_vmm(other),
        })
    }

    /// Lets a paused VM run again (see [`Vm::pause`]); does nothing if it is not paused.
    pub async fn resume(&self) -> Result<(), Error> {
        let machine = Arc::clone(&self.machine);
        // Waits out a snapshot in progress, which holds the machine.
        blocking(move || {
            lock(&machine).resume();
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Whether the VM is paused ([`Vm::pause`]). Cheap.
    pub fn is_paused(&self) -> bool {
        self.paused.get() && self.liveness.exit().is_none()
    }

    /// Waits (at most `limit`) until the vsock device tracks no connection: a snapshot taken
    /// then restores without a transport reset, saving the guest a round trip on every
    /// restore. Connections that just closed need one guest round trip to go away.
    async fn settle_connections(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let open = self.vsock.connection_count();
            if open == 0 || Instant::now() >= deadline {
                debug!(open, "vsock connections before the snapshot");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Where the time of starting this VM went.
    pub fn start_timings(&self) -> StartTimings {
        self.timings
    }

    /// Pings the agent until it answers; returns when it did and what it said.
    async fn wait_for_agent(
        &self,
        started: Instant,
        timeout: Duration,
    ) -> Result<(Duration, crate::agent::AgentInfo), Error> {
        let deadline = started + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.agent.ping()).await {
                Ok(Ok(info)) => {
                    debug!(version = %info.version, protocol = info.protocol, "agent ping answered");
                    return Ok((started.elapsed(), info));
                }
                Ok(Err(e @ Error::VmExited(_))) => return Err(e),
                Ok(Err(e)) => debug!("agent not up yet: {}", crate::Report(&e)),
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

    /// Starts building an exec of `argv` in the guest; see [`Agent::exec`]. In a VM that
    /// runs an image, the image's `Env`, `WorkingDir` and `User` are the defaults (the
    /// builder's own `env`, `current_dir` and `user` override them).
    pub fn exec<I, S>(&self, argv: I) -> ExecBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut builder = self.agent.exec(argv);
        if let Some(image) = &self.image {
            builder.image_defaults(image);
        }
        builder
    }

    /// Opens a TCP connection to `127.0.0.1:port` in the guest (published or not); see
    /// [`Agent::connect_tcp`].
    pub async fn connect_tcp(&self, port: u16) -> Result<GuestTcpStream, Error> {
        self.agent.connect_tcp(port).await
    }

    /// Publishes one more guest port while the VM runs (see [`VmConfig::publish`]); returns
    /// the bound address (useful with host port 0).
    pub fn publish(&self, mapping: PortMapping) -> Result<PublishedPort, Error> {
        let ports = Listeners::bind(std::slice::from_ref(&mapping))?
            .serve_on(&self.publisher, &self.agent)?;
        ports
            .into_iter()
            .next()
            .ok_or_else(|| Error::Protocol("a bound port was not recorded".into()))
    }

    /// The ports this VM publishes, as bound (host port 0 resolved to the actual port).
    pub fn published_ports(&self) -> Vec<PublishedPort> {
        self.publisher.ports()
    }

    /// Serves the VM's vsock on the Unix socket `path` (ARCHITECTURE.md decision 2): a client
    /// connects, writes `CONNECT <port>\n`, reads `OK <port>\n`, and the socket is then that
    /// guest port's connection ([`UnixConnector::muxed`](crate::UnixConnector::muxed) is the
    /// client). Runs until the returned future is dropped, which removes the socket file and
    /// closes its clients; fails only if `path` cannot be bound. In a restored VM whose agent
    /// has answered nothing yet, a client waits until the guest has taken its reseed (one ping
    /// carries it) before it is connected: clients reach the guest around this VM's [`Agent`],
    /// which otherwise carries the reseed.
    pub fn serve_vsock_unix(
        &self,
        path: impl Into<std::path::PathBuf>,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
        let agent = self.agent.clone();
        let gate: supermachine_vmm::devices::vsock::ClientGate = Arc::new(move || {
            let agent = agent.clone();
            Box::pin(async move {
                agent.ensure_reseeded().await.map_err(|e| {
                    std::io::Error::other(format!(
                        "the restored VM's agent did not take its reseed: {}",
                        crate::Report(&e)
                    ))
                })
            })
        });
        self.vsock.serve_unix_gated(path, gate)
    }

    /// Test hook: makes the guest kernel panic (see [`VmConfig::test_hooks`]).
    #[doc(hidden)]
    pub async fn crash_guest(&self) -> Result<(), Error> {
        self.agent.crash_guest().await
    }

    /// How long [`Vm::start`] (or [`Vm::restore`]) took, from the call until the VM was
    /// handed over ([`StartTimings::agent_ready`]).
    pub fn boot_time(&self) -> Duration {
        self.timings.agent_ready
    }

    /// The guest console (serial port) as far as it is kept (the last 256 KiB or so).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.contents()).into_owned()
    }

    fn console_tail(&self) -> String {
        self.console.tail(CONSOLE_TAIL_BYTES)
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

    /// Stops the VM (if still running, or paused) and frees its vCPUs; every pending exec
    /// fails with [`Error::VmExited`]. Idempotent. Joining the vCPU threads happens on the
    /// blocking pool. (Dropping a `Vm` stops it too, but on the dropping thread.)
    pub async fn stop(&self) -> VmExit {
        // A stopped VM's host ports must be free for the next one at once.
        self.publisher.close();
        let machine = Arc::clone(&self.machine);
        let exit = tokio::task::spawn_blocking(move || lock(&machine).stop()).await;
        match exit {
            Ok(exit) => VmExit::from(exit),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down and cancelled the task: stop here instead.
            Err(_) => self.stop_blocking(),
        }
    }

    /// [`Vm::stop`] for synchronous code (`Drop` implementations, threads of your own): stops
    /// the VM and joins its vCPU threads on the calling thread, which it blocks meanwhile
    /// (usually well under a millisecond; longer while a snapshot or pause is in progress).
    pub fn stop_blocking(&self) -> VmExit {
        self.publisher.close();
        let exit = lock(&self.machine).stop();
        VmExit::from(exit)
    }
}

/// The machine, even if a panicking thread poisoned the lock: `Machine`'s methods keep it
/// consistent on their own.
fn lock(machine: &Mutex<Machine>) -> MutexGuard<'_, Machine> {
    machine.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs blocking VM work (file I/O, hashing, hypervisor calls) on tokio's blocking pool, so the
/// runtime that awaits it keeps running its other tasks. A panic in `f` is resumed here.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Only a runtime shutting down cancels a blocking task.
        Err(e) => Err(Error::VmSetup(Box::new(e))),
    }
}

/// Writes a snapshot of `machine` into the new directory `dir` (through a temporary sibling,
/// renamed into place) with its metadata, and opens it. Blocking.
fn write_snapshot(
    machine: &Machine,
    dir: &std::path::Path,
    identity: &Identity,
    image: Option<&crate::image::ImageConfig>,
    liveness: &Liveness,
) -> Result<(Snapshot, Duration, u64), Error> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|source| SnapshotError::Io {
        path: parent.clone(),
        source,
    })?;
    // Written under a temporary name and renamed into place, so no reader ever sees a
    // half-written snapshot.
    let tmp = tempfile::Builder::new()
        .prefix(".snapshot-")
        .tempdir_in(&parent)
        .map_err(|source| SnapshotError::Io {
            path: parent.clone(),
            source,
        })?;
    let info = machine.snapshot(tmp.path()).map_err(|e| match e {
        supermachine_vmm::Error::Snapshot(
            supermachine_vmm::snapshot::SnapshotError::NotRunning,
        ) => match liveness.exit() {
            Some(exit) => Error::VmExited(exit),
            None => Error::Snapshot(SnapshotError::NotRunning),
        },
        supermachine_vmm::Error::Snapshot(e) => Error::Snapshot(e),
        other => Error::from_vmm(other),
    })?;
    snapshot::write_meta(tmp.path(), identity, image, &info.memory_sha256)?;
    // An empty directory left at `dir` (checked by the caller) is replaced; a non-empty one
    // makes the rename fail, and the temporary directory is removed on drop.
    let _ = std::fs::remove_dir(dir);
    let tmp_path = tmp.keep();
    if let Err(source) = std::fs::rename(&tmp_path, dir) {
        let _ = std::fs::remove_dir_all(&tmp_path);
        return Err(if dir.exists() {
            SnapshotError::Exists(dir.to_owned())
        } else {
            SnapshotError::Io {
                path: dir.to_owned(),
                source,
            }
        }
        .into());
    }
    let snapshot = Snapshot::open_blocking(dir)?;
    Ok((snapshot, info.paused_for, info.memory_bytes_written))
}

/// The boot files of a config for another VMM (benchmarks against peers): the kernel, the
/// initramfs with the agent and the config's files (built into the cache), and the full kernel
/// command line this VMM would boot it with. Not a stable API.
#[doc(hidden)]
pub fn boot_files(
    config: &VmConfig,
) -> Result<(std::path::PathBuf, std::path::PathBuf, String), Error> {
    let resolved = config.resolve()?;
    let initramfs = build_initramfs(config, &resolved.agent)?;
    let cmdline = format!(
        "{} {}",
        supermachine_vmm::platform_cmdline(),
        guest_cmdline(config)
    );
    Ok((resolved.kernel, initramfs.path, cmdline))
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
    if config.rootfs.is_some() {
        parts.push(ROOTFS_FLAG);
    }
    let net_flag = network::guest_flag();
    if config.network.is_enabled() {
        parts.push(&net_flag);
    }
    if !config.kernel_cmdline.trim().is_empty() {
        parts.push(config.kernel_cmdline.trim());
    }
    parts.join(" ")
}

/// The disks of a VM: its rootfs image, read-only, as `/dev/vda`.
fn rootfs_disks(identity: &Identity) -> Vec<DiskConfig> {
    identity
        .rootfs
        .iter()
        .map(|r| DiskConfig {
            path: r.path.clone(),
            read_only: true,
        })
        .collect()
}

/// The vsock device every VM has.
fn vsock_config() -> VsockConfig {
    VsockConfig {
        guest_cid: GUEST_CID,
        ..VsockConfig::default()
    }
}

/// The initramfs of a config, in the cache.
struct BuiltInitramfs {
    path: std::path::PathBuf,
    sha256: String,
    agent_sha256: String,
}

/// The identity (snapshot cache key material) of the VM `config` describes.
pub(crate) fn identity_of(config: &VmConfig) -> Result<Identity, Error> {
    let resolved = config.resolve()?;
    let initramfs = build_initramfs(config, &resolved.agent)?;
    identity_from(config, &resolved, &initramfs)
}

fn identity_from(
    config: &VmConfig,
    resolved: &config::Resolved,
    initramfs: &BuiltInitramfs,
) -> Result<Identity, Error> {
    let kernel_sha256 =
        crate::cache::file_digest::sha256_file_cached(&resolved.kernel).map_err(|e| {
            ConfigError::KernelUnreadable {
                path: resolved.kernel.clone(),
                reason: e.to_string(),
            }
        })?;
    Ok(Identity {
        kernel_sha256,
        agent_sha256: initramfs.agent_sha256.clone(),
        initramfs_sha256: initramfs.sha256.clone(),
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        cmdline: guest_cmdline(config),
        platform_cmdline: supermachine_vmm::platform_cmdline(),
        rootfs: match &config.rootfs {
            Some(path) => Some(snapshot::RootfsIdentity::of(path).map_err(|e| {
                ConfigError::RootfsUnreadable {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?),
            None => None,
        },
    })
}

/// Builds (or finds in the cache) the initramfs for `config`: a recipe built before is found
/// without reading the agent again ([`initramfs::Recipe`]).
fn build_initramfs(config: &VmConfig, agent: &std::path::Path) -> Result<BuiltInitramfs, Error> {
    let recipe = initramfs::Recipe::of(agent, &config.files);
    if let Some(recipe) = &recipe {
        if let Some(built) = recipe.lookup() {
            return Ok(BuiltInitramfs {
                path: built.path,
                sha256: built.sha256,
                agent_sha256: recipe.agent_sha256.clone(),
            });
        }
    }
    let invalid = |e: initramfs::InitramfsError| {
        Error::from(ConfigError::Initramfs(crate::Report(&e).to_string()))
    };
    let agent_bytes = initramfs::read_host_file(agent).map_err(invalid)?;
    let agent_sha256 = snapshot::sha256_hex(&agent_bytes);
    let mut fs = Initramfs::with_agent(agent_bytes);
    let mut copied = Vec::with_capacity(config.files.len());
    for file in &config.files {
        match file {
            GuestFile::Copy { guest, host, mode } => {
                let contents = initramfs::read_host_file(host).map_err(invalid)?;
                let mode = initramfs::host_file_mode(host, *mode);
                copied.push(Some((mode, snapshot::sha256_hex(&contents))));
                fs.add(guest, Entry::File { mode, contents })
                    .map_err(invalid)?;
            }
            GuestFile::Symlink { guest, target } => {
                copied.push(None);
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
    let (path, sha256, len) = fs.cached().map_err(|source| Error::Cache {
        what: "the initramfs",
        source,
    })?;
    let built = initramfs::Built { path, sha256 };
    // Recorded only when what was read is what the recipe names: no input changed between
    // its digest and its read.
    let read = initramfs::Recipe::from_digests(agent_sha256.clone(), &config.files, &copied);
    if recipe.as_ref() == Some(&read) {
        read.record(&built, len);
    }
    Ok(BuiltInitramfs {
        path: built.path,
        sha256: built.sha256,
        agent_sha256,
    })
}
