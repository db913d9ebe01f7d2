//! A machine's life after the start: pause and resume ([`Hold`], [`PausedFlag`]), stop, and
//! the guard that ends it when the device runtime goes away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::exit::{ExitReason, ExitRecorder, MachineExit};
use super::{lock, Machine};
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::MmioTransport;
use crate::error::Error;
use crate::hypervisor::HvState;
use crate::vcpu::{PauseError, RunControl};

/// How long a pause (or snapshot) waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Machine {
    /// Pauses the machine: every vCPU parks between two guest instructions and every device
    /// worker stops between two batches, until [`resume`](Self::resume). Nothing is lost:
    /// vsock connections stay open (the host side of a stream simply sees no data), pending
    /// guest I/O carries on after the resume, and [`snapshot`](Self::snapshot) and
    /// [`stop`](Self::stop) work on a paused machine. The guest's clock is not stopped, so
    /// after a resume the guest sees the time that passed. Idempotent. Blocks for as long as
    /// the vCPUs take to leave the guest (microseconds on hardware KVM), and for a snapshot
    /// in progress to finish.
    pub fn pause(&self) -> Result<(), Error> {
        if self.exit_status().is_some() {
            return Err(PauseError::NotRunning.into());
        }
        let mut hold = lock(&self.hold);
        if hold.is_none() {
            *hold = Some(self.hold_still()?);
        }
        self.paused.0.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets a paused machine run again (see [`pause`](Self::pause)); does nothing when it is
    /// not paused.
    pub fn resume(&self) {
        let mut hold = lock(&self.hold);
        self.paused.0.store(false, Ordering::SeqCst);
        drop(hold.take());
    }

    /// Whether the machine is paused by [`pause`](Self::pause) (and has not ended since).
    pub fn is_paused(&self) -> bool {
        self.paused.get() && self.exit_status().is_none()
    }

    /// A handle that reads [`is_paused`](Self::is_paused)'s flag without the machine (and
    /// without waiting for a pause or snapshot in progress).
    pub fn paused_flag(&self) -> PausedFlag {
        self.paused.clone()
    }

    /// Parks the vCPUs, then holds the device workers, keeping what each saved.
    pub(super) fn hold_still(&self) -> Result<Hold, PauseError> {
        let vcpu_states = self.control.pause(self.threads.len(), PAUSE_TIMEOUT)?;
        let vcpus = ParkedVcpus(Arc::clone(&self.control));
        let mut devices = PausedDevices(Vec::with_capacity(self.transports.len()));
        let mut transport_states = Vec::with_capacity(self.transports.len());
        for (name, transport) in &self.transports {
            let state = lock(transport)
                .pause()
                .map_err(|source| PauseError::Device {
                    device: name.clone(),
                    source,
                })?;
            devices.0.push(Arc::clone(transport));
            transport_states.push(state);
        }
        let vm_state = self
            .vm
            .save_state()
            .map_err(|source| PauseError::VmState { source })?;
        Ok(Hold {
            _devices: devices,
            _vcpus: vcpus,
            vm_state,
            vcpu_states,
            transport_states,
        })
    }

    /// Spawns the task that turns a shutdown of the device runtime into a machine exit.
    pub(super) fn watch_device_runtime(&self) {
        let mut guard = DeviceRuntimeGuard {
            exit: Arc::downgrade(&self.exit),
            armed: true,
        };
        let mut exit = self.exit_rx.clone();
        self.runtime.spawn(async move {
            // Ends (disarmed) with the machine: its exit is recorded, or the machine is gone.
            let _ = exit.wait_for(Option::is_some).await;
            guard.disarm();
        });
    }

    /// [`stop`](Self::stop), recording [`ExitReason::Unresponsive`] with `message` (what the
    /// host waited for) unless the machine had already ended: callers waiting on the machine
    /// then learn why it was stopped, not only that it was.
    pub fn stop_unresponsive(&mut self, message: String) -> MachineExit {
        self.exit.finish(ExitReason::Unresponsive { message });
        self.stop()
    }

    /// Stops the vCPUs (if still running), joins their threads and returns how the machine
    /// ended. Idempotent. Blocks only for as long as the vCPUs take to leave the guest.
    pub fn stop(&mut self) -> MachineExit {
        self.control.request_stop();
        for handle in self.threads.drain(..) {
            // A panicking vCPU thread already reported through its end.
            let _ = handle.join();
        }
        // A pause ends with the vCPUs: the device workers are let go, to be closed with them.
        drop(
            self.hold
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        self.paused.0.store(false, Ordering::SeqCst);
        // Threads that never ran far enough to report leave the slot empty.
        self.exit.finish(ExitReason::Stopped);
        self.stopped_exit()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ends the machine with [`ExitReason::DeviceFailed`] when dropped while armed: it lives in a
/// task on the device runtime, and the runtime drops its tasks when it shuts down. A machine
/// whose devices no longer run must not keep its vCPUs spinning or its callers waiting.
struct DeviceRuntimeGuard {
    exit: Weak<ExitRecorder>,
    armed: bool,
}

impl DeviceRuntimeGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for DeviceRuntimeGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(exit) = self.exit.upgrade() {
            exit.finish(ExitReason::DeviceFailed {
                message: "the tokio runtime running this machine's devices shut down while the \
                          machine ran; keep the runtime alive for as long as the machine"
                    .to_owned(),
            });
        }
    }
}

/// Whether a machine is paused by [`Machine::pause`]; cheap to clone and read from anywhere
/// (see [`Machine::paused_flag`]). Reads `false` once the machine has been stopped; a machine
/// that ends on its own while paused keeps it set, so check the machine's exit too.
#[derive(Debug, Clone, Default)]
pub struct PausedFlag(Arc<AtomicBool>);

impl PausedFlag {
    /// Whether the machine is paused.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A paused machine: every vCPU parked between two instructions (with the state each saved as
/// it parked) and every device worker held between two batches (with its transport's state).
/// Nothing in the guest runs while it exists, so the saved states stay current; dropping it lets
/// the devices go on first, then the vCPUs (field order).
pub(super) struct Hold {
    _devices: PausedDevices,
    _vcpus: ParkedVcpus,
    /// VM-wide state (clock, interrupt controllers) taken with the vCPUs', so a snapshot of a
    /// machine paused long ago is of one moment.
    pub(super) vm_state: HvState,
    pub(super) vcpu_states: Vec<HvState>,
    pub(super) transport_states: Vec<TransportState>,
}

/// Lets parked vCPUs go on when dropped.
struct ParkedVcpus(Arc<RunControl>);

impl Drop for ParkedVcpus {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// Resumes paused device workers when dropped.
struct PausedDevices(Vec<Arc<Mutex<MmioTransport>>>);

impl Drop for PausedDevices {
    fn drop(&mut self) {
        for transport in &self.0 {
            lock(transport).resume();
        }
    }
}
