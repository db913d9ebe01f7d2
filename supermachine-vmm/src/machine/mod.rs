//! A running microVM: memory, VM, devices and vCPU threads, and its lifecycle.
//!
//! Split by job: `config.rs` (what a machine is made of), `builder.rs` (assembling and
//! starting it), `slots.rs` (virtio-mmio slots and their interrupt lines), `exit.rs` (how it
//! ends), `lifecycle.rs` (pause, resume, stop), `persist.rs` (snapshots). Everything that depends
//! on the guest architecture comes from `arch/`, everything hypervisor-specific from
//! `hypervisor/`.

mod builder;
mod config;
mod exit;
mod lifecycle;
mod persist;
mod slots;

pub use builder::MachineBuilder;
pub use config::{DiskConfig, MachineConfig, MIN_MEMORY_MIB};
pub use exit::{ExitReason, MachineExit};
pub use lifecycle::PausedFlag;

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::watch;
use vm_memory::GuestMemoryMmap;

use self::exit::{ExitRecorder, CONSOLE_TAIL_BYTES};
use self::lifecycle::Hold;
use crate::arch::{self, BASE_CMDLINE};
use crate::devices::serial::{ConsoleLog, Serial};
use crate::devices::virtio::MmioTransport;
use crate::devices::vsock::VsockHandle;
use crate::hypervisor::HvVm;
use crate::snapshot::SavedConfig;
use crate::vcpu::RunControl;

/// The part of every machine's kernel command line that depends on this host and build, not on
/// the config: [`BASE_CMDLINE`] and the host's guest workarounds (on x86 PVM hosts, those of
/// `guest/pvm-cmdline.txt`). Snapshot caches key on it (a snapshot booted with other parameters
/// is another guest).
pub fn platform_cmdline() -> String {
    let mut line = BASE_CMDLINE.to_string();
    if let Some(extra) = arch::host_cmdline() {
        line.push(' ');
        line.push_str(extra);
    }
    line
}

/// Environment variable: when set to `1`, the console is also copied to stderr as it arrives.
pub const CONSOLE_STDERR_ENV: &str = "SUPERMACHINE_CONSOLE_STDERR";

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running (or ended) microVM. Dropping it stops the vCPUs and frees everything.
pub struct Machine {
    control: Arc<RunControl>,
    exit: Arc<ExitRecorder>,
    exit_rx: watch::Receiver<Option<MachineExit>>,
    threads: Vec<JoinHandle<()>>,
    console: ConsoleLog,
    vsock: Option<VsockHandle>,
    serial: Arc<Mutex<Serial>>,
    transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    opaque_devices: Vec<String>,
    saved_config: SavedConfig,
    /// Set while the machine is paused (by [`Machine::pause`] or a snapshot in progress).
    hold: Mutex<Option<Hold>>,
    /// Set while paused by [`Machine::pause`] (not by a snapshot), under `hold`'s lock.
    paused: PausedFlag,
    // Dropped after the threads are joined (in `Drop`): the VM fd, then guest RAM.
    vm: Arc<dyn HvVm>,
    memory: Arc<GuestMemoryMmap>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.threads.len())
            .field("exit", &*self.exit_rx.borrow())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Validates `config`, boots it and returns once the vCPUs run. Must be called inside a
    /// tokio runtime.
    pub fn start(config: MachineConfig) -> Result<Machine, crate::Error> {
        MachineBuilder::new(config)?.start()
    }

    /// The console log: everything the guest wrote to the serial port that is still in the ring.
    pub fn console(&self) -> Vec<u8> {
        self.console.contents()
    }

    /// The shared console log (cheap to clone; keeps filling while the machine runs).
    pub fn console_log(&self) -> &ConsoleLog {
        &self.console
    }

    /// The host side of the vsock device, when the config has one.
    pub fn vsock(&self) -> Option<&VsockHandle> {
        self.vsock.as_ref()
    }

    /// A watch of the machine's end: `None` while it runs, then how it ended (set once, before
    /// the vCPU threads leave and the devices are dropped). Outlives the machine: after a drop
    /// the last value stays readable and `changed()` fails.
    pub fn exit_watch(&self) -> watch::Receiver<Option<MachineExit>> {
        self.exit_rx.clone()
    }

    /// How the machine ended, or `None` while it runs.
    pub fn exit_status(&self) -> Option<MachineExit> {
        self.exit_rx.borrow().clone()
    }

    /// Waits until the machine ends (guest reset/shutdown/panic, failure, or [`stop`]).
    ///
    /// [`stop`]: Machine::stop
    pub async fn wait_exit(&self) -> MachineExit {
        let mut rx = self.exit_rx.clone();
        // The sender lives in `self.exit`, so the channel cannot close while `self` is
        // borrowed; `stopped_exit` only keeps this free of panics.
        let result = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match result {
            Ok(Some(exit)) => exit,
            _ => self.stopped_exit(),
        }
    }

    fn stopped_exit(&self) -> MachineExit {
        self.exit_status().unwrap_or_else(|| MachineExit {
            reason: ExitReason::Stopped,
            console_tail: self.console.tail(CONSOLE_TAIL_BYTES),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"not really").unwrap();
        assert!(matches!(
            Machine::start(MachineConfig::new(kernel)),
            Err(Error::NoRuntime)
        ));
    }

    #[test]
    fn machine_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Machine>();
        send_sync::<MachineExit>();
        send_sync::<Error>();
    }
}
