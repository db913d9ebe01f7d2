//! [`RunControl`]: how the machine starts, stops and pauses its vCPU threads.
//!
//! **Starting.** Each vCPU thread creates and sets up its own vCPU, reports, and waits at a
//! gate the machine opens once every vCPU is ready, so no guest code runs before all vCPUs
//! exist (a failed start ends the threads without running any).
//!
//! **Stopping.** The host stops a vCPU by kicking it ([`VcpuKicker`], which the hypervisor
//! backend implements) after setting the stop flag: a vCPU in the guest returns, one about to
//! enter returns at once, one in the VMM sees the flag at the top of its loop. [`RunControl`]
//! sends that kick exactly once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::hypervisor::{HvError, HvState, HvVcpu, VcpuKicker};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct KickState {
    targets: Vec<Arc<dyn VcpuKicker>>,
    stopping: bool,
    kicked: bool,
}

/// A pause in progress (for a snapshot or `Machine::pause`): each vCPU parks and leaves its
/// saved state here.
#[derive(Default)]
struct PauseState {
    requested: bool,
    /// Counts pauses. A vCPU still parked from the previous pause (a resume woke it, but a new
    /// pause took the lock before it left) sees a new generation and reports again.
    generation: u64,
    /// Indexed by vCPU id; filled as each vCPU parks.
    saved: Vec<Option<Result<HvState, HvError>>>,
}

/// Why a machine could not be paused (for [`Machine::pause`](crate::Machine::pause) or a
/// snapshot). Nothing stays paused after one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PauseError {
    /// The machine ended (or is stopping).
    #[error("the machine is not running")]
    NotRunning,
    /// A vCPU did not park in time.
    #[error("vCPUs did not pause within {0:?}")]
    Timeout(Duration),
    /// A vCPU parked but could not save its state.
    #[error("vCPU {vcpu} could not save its state")]
    Save {
        /// vCPU index.
        vcpu: usize,
        /// The hypervisor's error.
        #[source]
        source: HvError,
    },
    /// The VM-wide state (clock, interrupt controllers) could not be saved.
    #[error("the VM-wide state could not be saved")]
    VmState {
        /// The hypervisor's error.
        #[source]
        source: HvError,
    },
    /// A device could not be held still.
    #[error("device {device} could not be paused")]
    Device {
        /// Which device.
        device: String,
        /// Why.
        #[source]
        source: crate::devices::virtio::DeviceStateError,
    },
}

/// Shared by the machine and its vCPU threads: the start gate, the stop request and pauses.
#[derive(Default)]
pub(crate) struct RunControl {
    stop: AtomicBool,
    pub(super) pause_requested: AtomicBool,
    pause: Mutex<PauseState>,
    pause_changed: Condvar,
    kick: Mutex<KickState>,
    /// Opened once every vCPU exists and is set up; vCPU threads wait for it before they run.
    gate: Mutex<bool>,
    gate_changed: Condvar,
}

impl RunControl {
    /// A control with the gate closed, nothing stopped or paused.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn kick_state(&self) -> MutexGuard<'_, KickState> {
        lock(&self.kick)
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn pause_state(&self) -> MutexGuard<'_, PauseState> {
        lock(&self.pause)
    }

    /// Asks every vCPU to stop: vCPUs waiting at the gate or parked leave, running ones are
    /// kicked (once per machine; vCPUs registered later are kicked as they register).
    pub(crate) fn request_stop(&self) {
        // The flag first: a vCPU that sees its immediate exit must also see why.
        self.stop.store(true, Ordering::SeqCst);
        {
            // Parked vCPUs wake up and leave; a pause in progress gives up.
            let _pause = self.pause_state();
            self.pause_changed.notify_all();
        }
        {
            // vCPUs waiting to start leave without running.
            let _gate = lock(&self.gate);
            self.gate_changed.notify_all();
        }
        let mut st = self.kick_state();
        st.stopping = true;
        Self::kick_all(&mut st);
    }

    /// Parks every vCPU between two guest instructions and returns each one's saved state, in
    /// vCPU order. The vCPUs stay parked until [`resume`](Self::resume) (or a stop).
    pub(crate) fn pause(
        &self,
        vcpus: usize,
        timeout: Duration,
    ) -> Result<Vec<HvState>, PauseError> {
        {
            let mut pause = self.pause_state();
            pause.requested = true;
            pause.generation += 1;
            pause.saved = (0..vcpus).map(|_| None).collect();
            // vCPUs still parked from an earlier pause must report for this one.
            self.pause_changed.notify_all();
        }
        self.pause_requested.store(true, Ordering::SeqCst);
        {
            let st = self.kick_state();
            if st.stopping || self.stopping() {
                drop(st);
                self.resume();
                return Err(PauseError::NotRunning);
            }
            for kicker in &st.targets {
                kicker.kick();
            }
        }
        let deadline = Instant::now() + timeout;
        let mut pause = self.pause_state();
        loop {
            if self.stopping() {
                drop(pause);
                self.resume();
                return Err(PauseError::NotRunning);
            }
            if pause.saved.iter().all(Option::is_some) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(pause);
                self.resume();
                return Err(PauseError::Timeout(timeout));
            }
            pause = self
                .pause_changed
                .wait_timeout(pause, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let saved = std::mem::take(&mut pause.saved);
        drop(pause);
        let mut states = Vec::with_capacity(saved.len());
        for (vcpu, state) in saved.into_iter().enumerate() {
            match state {
                Some(Ok(state)) => states.push(state),
                Some(Err(source)) => {
                    self.resume();
                    return Err(PauseError::Save { vcpu, source });
                }
                // Every slot is filled (checked above, under the same lock).
                None => unreachable!("vCPU {vcpu} parked without reporting"),
            }
        }
        Ok(states)
    }

    /// Lets paused vCPUs run again.
    pub(crate) fn resume(&self) {
        let mut pause = self.pause_state();
        pause.requested = false;
        pause.saved.clear();
        self.pause_requested.store(false, Ordering::SeqCst);
        self.pause_changed.notify_all();
    }

    /// Called by a vCPU thread that noticed a pause: saves its state, reports it and waits
    /// until the pause ends.
    pub(super) fn park(&self, vcpu: &mut dyn HvVcpu) {
        let id = vcpu.id() as usize;
        let mut reported = None;
        let mut pause = self.pause_state();
        while pause.requested && !self.stopping() {
            if reported == Some(pause.generation) {
                pause = self
                    .pause_changed
                    .wait(pause)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Saved without the lock (ioctls); reported only to the pause it was saved for.
            let generation = pause.generation;
            drop(pause);
            let state = vcpu.save_state();
            pause = self.pause_state();
            if pause.generation == generation {
                if let Some(slot) = pause.saved.get_mut(id) {
                    *slot = Some(state);
                }
                self.pause_changed.notify_all();
                reported = Some(generation);
            }
        }
    }

    /// Registers the vCPUs to kick, once they exist. Kicks them at once if a stop was
    /// requested before.
    pub(crate) fn set_kickers(&self, kickers: Vec<Arc<dyn VcpuKicker>>) {
        let mut st = self.kick_state();
        st.targets = kickers;
        if st.stopping {
            Self::kick_all(&mut st);
        }
    }

    fn kick_all(st: &mut KickState) {
        if st.kicked || st.targets.is_empty() {
            return;
        }
        st.kicked = true;
        for kicker in &st.targets {
            kicker.kick();
        }
    }

    /// Lets the vCPU threads waiting in [`wait_gate`](Self::wait_gate) run.
    pub(crate) fn open_gate(&self) {
        *lock(&self.gate) = true;
        self.gate_changed.notify_all();
    }

    /// Waits until the gate opens (`true`: run) or the machine stops (`false`).
    pub(super) fn wait_gate(&self) -> bool {
        let mut open = lock(&self.gate);
        loop {
            if self.stopping() {
                return false;
            }
            if *open {
                return true;
            }
            open = self
                .gate_changed
                .wait(open)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}
