//! vCPU threads: one std thread per vCPU, blocking in the hypervisor's run call and dispatching
//! MMIO/port-I/O exits to the buses.
//!
//! **Stopping.** The host stops a vCPU by arming its immediate exit ([`VcpuKicker`]) and sending
//! its thread a real-time signal whose handler does nothing: a thread inside `KVM_RUN` returns
//! with `EINTR`, one about to enter returns immediately because of the armed flag, and one in
//! userspace sees the stop flag at the top of its loop. [`RunControl`] sends that kick exactly
//! once, and only before any thread is joined, so a signal never targets a joined thread.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::bus::Bus;
use crate::devices::serial::{ConsoleLog, COM1_PORT, COM1_PORT_LEN};
use crate::hypervisor::{HvError, HvState, HvVcpu, SystemEvent, VcpuExit, VcpuKicker};
use crate::machine::{ExitReason, MachineExit, VcpuFailure};

/// i8042 command port. Writing 0xFE pulses the CPU reset line: how Linux reboots with `reboot=k`.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_CMD_RESET: u8 = 0xfe;
/// What reads of the i8042 status port return: "output buffer full, input buffer empty".
///
/// There is no keyboard controller. The kernel's reboot path spins (up to 64K port reads, each
/// a VM exit) until the "input buffer full" bit clears before it writes the reset command, so
/// that bit must read 0. The i8042 driver's probe, meanwhile, drains the output buffer while the
/// "output full" bit is set and gives up after 16 bytes ("No controller found"), which is the
/// quickest way for it to conclude there is no controller. 0x01 satisfies both.
const I8042_STATUS: u8 = 0x01;

/// How much console output a failure report carries.
pub(crate) const CONSOLE_TAIL_BYTES: usize = 8 * 1024;
/// The kernel's panic banner; with `panic=-1` a panic resets the machine right after it.
const PANIC_BANNER: &str = "Kernel panic - not syncing: ";

/// The signal that interrupts `KVM_RUN` (see the module docs).
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the no-op handler for [`kick_signal`] once per process. A handler (not "ignore") is
/// required: an ignored signal is discarded without interrupting the ioctl.
pub(crate) fn install_kick_handler() -> Result<(), std::io::Error> {
    // The OS error is kept as its errno (an `io::Error` is not `Clone`, and every later call
    // must report the same failure).
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
                .map_err(|e| e.errno())
        })
        .map_err(std::io::Error::from_raw_os_error)
}

/// One vCPU thread to kick: its immediate-exit arm and its pthread.
struct KickTarget {
    kicker: Arc<dyn VcpuKicker>,
    thread: libc::pthread_t,
}

#[derive(Default)]
struct KickState {
    targets: Vec<KickTarget>,
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

/// Shared by the machine and its vCPU threads: the stop request and the first exit.
pub(crate) struct RunControl {
    stop: AtomicBool,
    pause_requested: AtomicBool,
    pause: Mutex<PauseState>,
    pause_changed: Condvar,
    kick: Mutex<KickState>,
    exit: watch::Sender<Option<MachineExit>>,
    console: ConsoleLog,
}

impl RunControl {
    pub(crate) fn new(console: ConsoleLog) -> (Arc<Self>, watch::Receiver<Option<MachineExit>>) {
        let (exit, rx) = watch::channel(None);
        let control = Arc::new(RunControl {
            stop: AtomicBool::new(false),
            pause_requested: AtomicBool::new(false),
            pause: Mutex::new(PauseState::default()),
            pause_changed: Condvar::new(),
            kick: Mutex::new(KickState::default()),
            exit,
            console,
        });
        (control, rx)
    }

    fn kick_state(&self) -> std::sync::MutexGuard<'_, KickState> {
        self.kick.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn pause_state(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU to stop. Returns once the (single) kick has been sent; after that no
    /// signal is ever sent again, so the caller may join the threads.
    pub(crate) fn request_stop(&self) {
        // The flag first: a vCPU that sees its immediate exit must also see why.
        self.stop.store(true, Ordering::SeqCst);
        {
            // Parked vCPUs wake up and leave; a pause in progress gives up.
            let _pause = self.pause_state();
            self.pause_changed.notify_all();
        }
        let mut st = self.kick_state();
        st.stopping = true;
        Self::kick_all(&mut st);
    }

    /// Parks every vCPU between two guest instructions and returns each one's saved state, in
    /// vCPU order. The vCPUs stay parked until [`resume`](Self::resume) (or a stop).
    ///
    /// Must not run concurrently with joining the vCPU threads (the machine only joins in
    /// `stop(&mut self)`, and pauses from `&self`), because it signals them.
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
            for t in &st.targets {
                t.kicker.kick();
                // SAFETY: the thread is not joined: joining happens only in `Machine::stop`,
                // which needs `&mut Machine`, while pausing borrows it shared (see above); a
                // thread that has already left its loop is still a valid, unjoined pthread.
                let rc = unsafe { libc::pthread_kill(t.thread, kick_signal()) };
                if rc != 0 && rc != libc::ESRCH {
                    tracing::warn!(errno = rc, "could not signal a vCPU thread to pause");
                }
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
    fn park(&self, vcpu: &mut dyn HvVcpu) {
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

    /// Registers the threads to kick, after they were spawned. Kicks them at once if a stop
    /// was requested before (a vCPU that exited very early).
    pub(crate) fn set_threads(&self, vcpus: &[(Arc<dyn VcpuKicker>, &JoinHandle<()>)]) {
        use std::os::unix::thread::JoinHandleExt;
        let mut st = self.kick_state();
        st.targets = vcpus
            .iter()
            .map(|(kicker, handle)| KickTarget {
                kicker: Arc::clone(kicker),
                thread: handle.as_pthread_t(),
            })
            .collect();
        if st.stopping {
            Self::kick_all(&mut st);
        }
    }

    fn kick_all(st: &mut KickState) {
        if st.kicked || st.targets.is_empty() {
            return;
        }
        st.kicked = true;
        for t in &st.targets {
            t.kicker.kick();
            // SAFETY: `t.thread` belongs to a vCPU thread the machine has not joined yet: the
            // machine joins only after `request_stop` returned, which waits for this lock, and
            // `kicked` makes this the only round of signals ever sent.
            let rc = unsafe { libc::pthread_kill(t.thread, kick_signal()) };
            if rc != 0 && rc != libc::ESRCH {
                tracing::warn!(errno = rc, "could not signal a vCPU thread");
            }
        }
    }

    /// Records how the machine ended (the first report wins) and stops the other vCPUs.
    pub(crate) fn finish(&self, reason: ExitReason) {
        let console_tail = self.console.tail(CONSOLE_TAIL_BYTES);
        let reason = match reason {
            ExitReason::Reset => match panic_message(&console_tail) {
                Some(message) => ExitReason::Panic { message },
                None => ExitReason::Reset,
            },
            other => other,
        };
        let mut recorded = false;
        self.exit.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(MachineExit {
                    reason: reason.clone(),
                    console_tail,
                });
                recorded = true;
            }
            recorded
        });
        if recorded {
            match &reason {
                ExitReason::Failed(f) => tracing::error!(failure = %f, "machine failed"),
                r => tracing::debug!(reason = ?r, "machine exited"),
            }
        }
        self.request_stop();
    }
}

/// The message of the last kernel panic in `console`, if the guest panicked.
pub(crate) fn panic_message(console: &str) -> Option<String> {
    let at = console.rfind(PANIC_BANNER)?;
    let line = console[at + PANIC_BANNER.len()..]
        .lines()
        .next()
        .unwrap_or_default();
    Some(line.trim().to_string())
}

/// Whether `line` is the kernel's last word before it powers off or halts (`reboot: Power down`,
/// `reboot: System halted`, after the printk timestamp).
pub(crate) fn is_power_off_line(line: &str) -> bool {
    let line = line.trim_end();
    line.ends_with("] reboot: Power down")
        || line.ends_with("] reboot: System halted")
        || line == "reboot: Power down"
        || line == "reboot: System halted"
}

/// What a vCPU thread needs.
pub(crate) struct VcpuContext {
    pub mmio: Arc<Bus>,
    pub pio: Arc<Bus>,
    pub control: Arc<RunControl>,
}

/// Spawns the thread running `vcpu`.
pub(crate) fn spawn(
    vcpu: Box<dyn HvVcpu>,
    ctx: Arc<VcpuContext>,
) -> std::io::Result<JoinHandle<()>> {
    let id = vcpu.id();
    std::thread::Builder::new()
        .name(format!("sm-vcpu-{id}"))
        .spawn(move || {
            // The thread inherits the spawner's signal mask; the kick must get through.
            if let Err(e) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
                tracing::warn!(error = %e, "could not unblock the vCPU kick signal");
            }
            let reason = match std::panic::catch_unwind(AssertUnwindSafe(|| run_loop(vcpu, &ctx))) {
                Ok(reason) => reason,
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    ExitReason::Failed(VcpuFailure::ThreadPanicked { vcpu: id, message })
                }
            };
            ctx.control.finish(reason);
        })
}

/// Exits that reached the VMM, by kind (logged at debug level when the vCPU ends: on PVM
/// hosts each costs tens of microseconds, so these counts explain boot time).
#[derive(Debug, Default)]
struct ExitCounts {
    mmio: u64,
    pio: u64,
    serial_pio: u64,
    interrupted: u64,
}

/// Runs until the guest or the host ends the machine.
fn run_loop(vcpu: Box<dyn HvVcpu>, ctx: &VcpuContext) -> ExitReason {
    let id = vcpu.id();
    let started = std::time::Instant::now();
    let mut counts = ExitCounts::default();
    let reason = dispatch_exits(vcpu, ctx, &mut counts);
    tracing::debug!(
        vcpu = id,
        ran_for = ?started.elapsed(),
        cpu_time = ?thread_cpu_time(),
        exits = ?counts,
        vcpu_loop_ended = %reason,
        "vCPU finished"
    );
    reason
}

/// CPU time this thread has used. For a vCPU thread that is guest execution plus exit handling
/// (the guest runs in the thread's context), i.e. what the boot would take on an idle host.
fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

fn dispatch_exits(
    mut vcpu: Box<dyn HvVcpu>,
    ctx: &VcpuContext,
    counts: &mut ExitCounts,
) -> ExitReason {
    let id = vcpu.id();
    let mut unhandled = UnhandledLog::default();
    // Whether the last run ended without an MMIO/PIO exit waiting to be completed: only then is
    // the vCPU state complete enough to save (KVM finishes an I/O exit on the next run).
    let mut settled = true;
    let own_kicker = vcpu.kicker();
    loop {
        if ctx.control.stopping() {
            return ExitReason::Stopped;
        }
        if ctx.control.pause_requested.load(Ordering::SeqCst) {
            if settled {
                ctx.control.park(vcpu.as_mut());
                continue;
            }
            // Enter once with the immediate exit armed: KVM completes the pending I/O and
            // returns at once (Interrupted), after which the state is settled.
            own_kicker.kick();
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                return ExitReason::Failed(VcpuFailure::RunFailed {
                    vcpu: id,
                    message: crate::error::flatten(&e),
                })
            }
        };
        settled = matches!(exit, VcpuExit::Interrupted);
        match &exit {
            VcpuExit::MmioRead { .. } | VcpuExit::MmioWrite { .. } => counts.mmio += 1,
            VcpuExit::IoIn { port, .. } | VcpuExit::IoOut { port, .. } => {
                counts.pio += 1;
                if (COM1_PORT..COM1_PORT + COM1_PORT_LEN).contains(port) {
                    counts.serial_pio += 1;
                }
            }
            VcpuExit::Interrupted => counts.interrupted += 1,
            _ => {}
        }
        match exit {
            VcpuExit::MmioRead { addr, data } => {
                if !ctx.mmio.read(addr, data) {
                    unhandled.note("MMIO read", addr);
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite { addr, data } => {
                if !ctx.mmio.write(addr, data) {
                    unhandled.note("MMIO write", addr);
                }
            }
            VcpuExit::IoIn { port, data } => {
                if port == I8042_COMMAND_PORT {
                    data.fill(I8042_STATUS);
                } else if !ctx.pio.read(u64::from(port), data) {
                    unhandled.note("port read", u64::from(port));
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut { port, data } => {
                if port == I8042_COMMAND_PORT {
                    if data.first() == Some(&I8042_CMD_RESET) {
                        return ExitReason::Reset;
                    }
                } else if !ctx.pio.write(u64::from(port), data) {
                    unhandled.note("port write", u64::from(port));
                }
            }
            VcpuExit::Interrupted => {}
            VcpuExit::Shutdown => {
                // Triple fault: what a PC does then is reset.
                return ExitReason::Reset;
            }
            VcpuExit::SystemEvent(SystemEvent::Reset) => return ExitReason::Reset,
            VcpuExit::SystemEvent(SystemEvent::Shutdown) => return ExitReason::Shutdown,
            VcpuExit::SystemEvent(SystemEvent::Crash) => {
                return ExitReason::Failed(VcpuFailure::GuestCrash { vcpu: id })
            }
            VcpuExit::SystemEvent(SystemEvent::Other(kind)) => {
                return ExitReason::Failed(VcpuFailure::UnexpectedExit {
                    vcpu: id,
                    exit: format!("system event {kind}"),
                })
            }
            VcpuExit::Hlt => return ExitReason::Failed(VcpuFailure::Halted { vcpu: id }),
            VcpuExit::InternalError { suberror, data } => {
                let rip = vcpu.regs().ok().map(|r| r.rip);
                tracing::error!(
                    vcpu = id,
                    suberror,
                    rip = ?rip.map(|r| format!("{r:#x}")),
                    data = ?data,
                    "KVM internal error (on PVM hosts: an instruction its emulator lacks)"
                );
                return ExitReason::Failed(VcpuFailure::InternalError {
                    vcpu: id,
                    suberror,
                    rip,
                    data,
                });
            }
            VcpuExit::FailEntry { reason } => {
                return ExitReason::Failed(VcpuFailure::EntryFailed { vcpu: id, reason })
            }
            VcpuExit::Unsupported(exit) => {
                return ExitReason::Failed(VcpuFailure::UnexpectedExit { vcpu: id, exit })
            }
        }
    }
}

/// Ports the guest probes without a device behind them; logged once each, not per access.
const QUIET_PORTS: &[u64] = &[
    0x80, // POST/debug port, used as an I/O delay
    0x60, // i8042 data (see I8042_STATUS)
    0x70, 0x71, // CMOS/RTC: not emulated, reads as absent
    0x2f8, 0x2f9, 0x2fa, 0x2fb, 0x2fc, 0x2fd, 0x2fe, 0x2ff, // COM2..4 probes
    0x3e8, 0x3e9, 0x3ea, 0x3eb, 0x3ec, 0x3ed, 0x3ee, 0x3ef, 0x2e8, 0x2e9, 0x2ea, 0x2eb, 0x2ec,
    0x2ed, 0x2ee, 0x2ef,
];

/// Logs the first access to each unhandled address at debug level (guests probe a lot of
/// absent hardware; per-access logs would swamp everything).
#[derive(Default)]
struct UnhandledLog {
    seen: HashSet<(&'static str, u64)>,
}

impl UnhandledLog {
    fn note(&mut self, what: &'static str, addr: u64) {
        if self.seen.len() < 4096 && self.seen.insert((what, addr)) && !QUIET_PORTS.contains(&addr)
        {
            tracing::debug!(addr = format_args!("{addr:#x}"), "unhandled {what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_panic_message() {
        let console = "[    1.0] Run /init as init process\n\
                       [    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n\
                       [    1.2] CPU: 0 PID: 1 Comm: init\n";
        assert_eq!(
            panic_message(console).as_deref(),
            Some("Attempted to kill init! exitcode=0x00000100")
        );
        assert_eq!(panic_message("reboot: Restarting system\n"), None);
    }

    #[test]
    fn recognises_power_off_lines() {
        assert!(is_power_off_line("[   69.561837] reboot: Power down"));
        assert!(is_power_off_line("[    1.000000] reboot: System halted\r"));
        assert!(is_power_off_line("reboot: Power down"));
        assert!(!is_power_off_line(
            "[   69.557387] reboot: Restarting system"
        ));
        assert!(!is_power_off_line("echo reboot: Power down now"));
    }
}
