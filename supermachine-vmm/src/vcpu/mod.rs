//! vCPU threads: one std thread per vCPU, which creates and sets up its vCPU, then blocks in the
//! hypervisor's run call and dispatches MMIO/port-I/O exits to the buses. [`RunControl`]
//! (`control.rs`) starts, stops and pauses them. The machine learns how a vCPU ended through an
//! [`EndSink`]; this module knows nothing of the machine.

mod control;
mod prefault;

pub use control::PauseError;
pub(crate) use control::RunControl;
pub(crate) use prefault::Prefault;

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::arch;
use crate::bus::Bus;
use crate::error::Error;
use crate::hypervisor::{HvState, HvVcpu, HvVm, SystemEvent, VcpuExit, VcpuKicker};

/// Why a vCPU could not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuFailure {
    /// The hypervisor could not handle something the guest did. On PVM hosts this is how an
    /// instruction missing from KVM's emulator shows up (host `dmesg`: "INTERNAL_ERROR in batch
    /// emul").
    #[error(
        "vCPU {vcpu}: hypervisor internal error (suberror {suberror}, guest RIP {rip:x?}, \
         data {data:x?})"
    )]
    InternalError {
        /// vCPU index.
        vcpu: u32,
        /// KVM suberror (1: emulation failure).
        suberror: u32,
        /// Guest instruction pointer, if it could be read.
        rip: Option<u64>,
        /// Diagnostic words from the hypervisor.
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest.
    #[error("vCPU {vcpu}: guest entry failed (hardware reason {reason:#x})")]
    EntryFailed {
        /// vCPU index.
        vcpu: u32,
        /// Hardware-specific reason.
        reason: u64,
    },
    /// The vCPU halted with nothing that could wake it.
    #[error("vCPU {vcpu} halted with nothing to wake it")]
    Halted {
        /// vCPU index.
        vcpu: u32,
    },
    /// The guest reported a crash through the platform.
    #[error("vCPU {vcpu}: the guest reported a crash")]
    GuestCrash {
        /// vCPU index.
        vcpu: u32,
    },
    /// An exit this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u32,
        /// The exit, as the backend names it.
        exit: String,
    },
    /// The run call itself failed.
    #[error("vCPU {vcpu}: run failed: {message}")]
    RunFailed {
        /// vCPU index.
        vcpu: u32,
        /// The error.
        message: String,
    },
    /// The vCPU thread panicked (a VMM bug).
    #[error("vCPU {vcpu} thread panicked: {message}")]
    ThreadPanicked {
        /// vCPU index.
        vcpu: u32,
        /// Panic payload.
        message: String,
    },
}

/// How a vCPU's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VcpuEnd {
    /// The guest reset the machine (x86: a triple fault) or asked the platform to.
    Reset,
    /// The guest asked the platform to power off.
    Shutdown,
    /// The host stopped it.
    Stopped,
    /// It could not go on.
    Failed(VcpuFailure),
}

/// Where vCPU threads report how they ended (the machine's exit).
pub(crate) trait EndSink: Send + Sync {
    /// vCPU thread's run ended with `end`.
    fn vcpu_ended(&self, end: VcpuEnd);
}

/// What a vCPU thread needs.
pub(crate) struct VcpuContext {
    pub mmio: Arc<Bus>,
    pub pio: Arc<Bus>,
    pub control: Arc<RunControl>,
    pub end: Arc<dyn EndSink>,
    /// Every vCPU thread waits here once its vCPU is created.
    pub created: CreatedGate,
}

/// Where vCPU threads create their vCPUs one at a time in id order, then wait until every vCPU
/// of the machine exists (or the machine stops, so a thread that never started cannot leave the
/// others waiting).
///
/// Why in order: arm64 KVM numbers vCPUs (and lays out their GIC redistributors) in creation
/// order; created out of order (threads race), a 4-vCPU arm64 guest booted all its CPUs but then
/// hung in its first initcalls waiting on them. Hypervisors that create vCPUs from one thread
/// (QEMU, Firecracker) get this order for free. Why all before any is set up: on arm64 KVM
/// creating a vCPU resets the virtual counter offset of every vCPU already there, which would
/// undo a restored counter (the guest's clock jumps back and its timers never fire).
pub(crate) struct CreatedGate {
    total: usize,
    created: std::sync::Mutex<usize>,
    changed: std::sync::Condvar,
}

impl CreatedGate {
    /// A gate for `total` vCPUs.
    pub(crate) fn new(total: usize) -> Self {
        CreatedGate {
            total,
            created: std::sync::Mutex::new(0),
            changed: std::sync::Condvar::new(),
        }
    }

    /// Waits for vCPU `id`'s turn, runs `create`, then waits until every vCPU was created. `None`
    /// when the machine stopped first (`create` did not run).
    fn create_in_turn<T>(
        &self,
        id: u32,
        control: &RunControl,
        create: impl FnOnce() -> T,
    ) -> Option<T> {
        let turn = id as usize;
        // A vCPU whose thread failed to spawn never takes its turn: the builder then stops the
        // machine, which ends this wait.
        drop(self.wait_until(control, |n| n >= turn)?);
        let made = create();
        {
            let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
            *created += 1;
            self.changed.notify_all();
        }
        drop(self.wait_until(control, |n| n >= self.total)?);
        Some(made)
    }

    /// Waits until `done(created count)` holds or the machine stops (`None`).
    fn wait_until(
        &self,
        control: &RunControl,
        done: impl Fn(usize) -> bool,
    ) -> Option<std::sync::MutexGuard<'_, usize>> {
        let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        while !done(*created) {
            if control.stopping() {
                return None;
            }
            created = self
                .changed
                .wait_timeout(created, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Some(created)
    }
}

/// How a vCPU thread sets up its vCPU before the first run.
pub(crate) enum VcpuSetup {
    /// For a boot, as the platform says.
    Boot(Arc<arch::VcpuInit>),
    /// From a snapshot, then the vCPU's share of the snapshot's working set, if it has one.
    Restore(HvState, Option<Arc<Prefault>>),
}

/// What a vCPU thread reports once its vCPU is set up: the handle that kicks it, or why it
/// could not be created.
pub(crate) type Ready = (u32, Result<Arc<dyn VcpuKicker>, Error>);

/// Spawns the thread of vCPU `id`: it creates the vCPU on `vm` (on that thread, which some
/// hypervisors require), sets it up, reports on `ready`, and runs once the control's gate
/// opens.
pub(crate) fn spawn(
    id: u32,
    vm: Arc<dyn HvVm>,
    setup: VcpuSetup,
    ctx: Arc<VcpuContext>,
    ready: mpsc::Sender<Ready>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("sm-vcpu-{id}"))
        .spawn(move || {
            // In id order, and every vCPU before any is set up (CreatedGate says why).
            let Some(created) = ctx
                .created
                .create_in_turn(id, &ctx.control, || vm.create_vcpu(id))
            else {
                // The machine stopped while this vCPU waited its turn (another vCPU's thread
                // failed to spawn): nobody waits for this report.
                return;
            };
            let vcpu = match created
                .map_err(Error::from)
                .and_then(|v| setup_vcpu(v, setup))
            {
                Ok(vcpu) => {
                    let _ = ready.send((id, Ok(vcpu.kicker())));
                    vcpu
                }
                Err(e) => {
                    let _ = ready.send((id, Err(e)));
                    return;
                }
            };
            // The machine owns the VM; the vCPU keeps what it needs of it.
            drop((vm, ready));
            if !ctx.control.wait_gate() {
                return;
            }
            let end = match std::panic::catch_unwind(AssertUnwindSafe(|| run_loop(vcpu, &ctx))) {
                Ok(end) => end,
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    VcpuEnd::Failed(VcpuFailure::ThreadPanicked { vcpu: id, message })
                }
            };
            ctx.end.vcpu_ended(end);
        })
}

/// Sets a created vCPU up for its first run.
fn setup_vcpu(mut vcpu: Box<dyn HvVcpu>, setup: VcpuSetup) -> Result<Box<dyn HvVcpu>, Error> {
    match setup {
        VcpuSetup::Boot(init) => arch::configure_vcpu(vcpu.as_mut(), &init)?,
        VcpuSetup::Restore(state, prefault) => {
            vcpu.restore_state(&state)?;
            if let Some(prefault) = prefault {
                prefault.apply(vcpu.as_ref());
            }
        }
    }
    Ok(vcpu)
}

/// Exits that reached the VMM, by kind (logged at debug level when the vCPU ends: on PVM
/// hosts each costs tens of microseconds, so these counts explain boot time).
#[derive(Debug, Default)]
struct ExitCounts {
    mmio: u64,
    pio: u64,
    interrupted: u64,
}

/// Runs until the guest or the host ends the machine.
fn run_loop(vcpu: Box<dyn HvVcpu>, ctx: &VcpuContext) -> VcpuEnd {
    let id = vcpu.id();
    let started = std::time::Instant::now();
    let mut counts = ExitCounts::default();
    let end = dispatch_exits(vcpu, ctx, &mut counts);
    tracing::debug!(
        vcpu = id,
        ran_for = ?started.elapsed(),
        cpu_time = ?thread_cpu_time(),
        exits = ?counts,
        vcpu_loop_ended = ?end,
        "vCPU finished"
    );
    end
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
) -> VcpuEnd {
    let id = vcpu.id();
    let mut unhandled = UnhandledLog::default();
    // Whether the last run ended without an MMIO/PIO exit waiting to be completed: only then is
    // the vCPU state complete enough to save (KVM finishes an I/O exit on the next run).
    let mut settled = true;
    let own_kicker = vcpu.kicker();
    loop {
        if ctx.control.stopping() {
            return VcpuEnd::Stopped;
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
                return VcpuEnd::Failed(VcpuFailure::RunFailed {
                    vcpu: id,
                    message: crate::error::flatten(&e),
                })
            }
        };
        settled = matches!(exit, VcpuExit::Interrupted);
        match &exit {
            VcpuExit::MmioRead { .. } | VcpuExit::MmioWrite { .. } => counts.mmio += 1,
            VcpuExit::IoIn { .. } | VcpuExit::IoOut { .. } => counts.pio += 1,
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
                if !ctx.pio.read(u64::from(port), data) {
                    unhandled.note("port read", u64::from(port));
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut { port, data } => {
                if !ctx.pio.write(u64::from(port), data) {
                    unhandled.note("port write", u64::from(port));
                }
            }
            VcpuExit::Interrupted => {}
            VcpuExit::Shutdown => {
                // x86 triple fault: what a PC does then is reset.
                return VcpuEnd::Reset;
            }
            VcpuExit::SystemEvent(SystemEvent::Reset) => return VcpuEnd::Reset,
            VcpuExit::SystemEvent(SystemEvent::Shutdown) => return VcpuEnd::Shutdown,
            VcpuExit::SystemEvent(SystemEvent::Crash) => {
                return VcpuEnd::Failed(VcpuFailure::GuestCrash { vcpu: id })
            }
            VcpuExit::SystemEvent(SystemEvent::Other(kind)) => {
                return VcpuEnd::Failed(VcpuFailure::UnexpectedExit {
                    vcpu: id,
                    exit: format!("system event {kind}"),
                })
            }
            VcpuExit::Hlt => return VcpuEnd::Failed(VcpuFailure::Halted { vcpu: id }),
            VcpuExit::InternalError { suberror, data } => {
                let rip = vcpu.instruction_pointer().ok();
                tracing::error!(
                    vcpu = id,
                    suberror,
                    rip = ?rip.map(|r| format!("{r:#x}")),
                    data = ?data,
                    "hypervisor internal error (on PVM hosts: an instruction its emulator lacks)"
                );
                return VcpuEnd::Failed(VcpuFailure::InternalError {
                    vcpu: id,
                    suberror,
                    rip,
                    data,
                });
            }
            VcpuExit::FailEntry { reason } => {
                return VcpuEnd::Failed(VcpuFailure::EntryFailed { vcpu: id, reason })
            }
            VcpuExit::Unsupported(exit) => {
                return VcpuEnd::Failed(VcpuFailure::UnexpectedExit { vcpu: id, exit })
            }
        }
    }
}

/// Logs the first access to each unhandled address at debug level (guests probe a lot of
/// absent hardware; per-access logs would swamp everything).
#[derive(Default)]
struct UnhandledLog {
    seen: HashSet<(&'static str, u64)>,
}

impl UnhandledLog {
    fn note(&mut self, what: &'static str, addr: u64) {
        if self.seen.len() < 4096 && self.seen.insert((what, addr)) && !arch::is_quiet_port(addr) {
            tracing::debug!(addr = format_args!("{addr:#x}"), "unhandled {what}");
        }
    }
}

#[cfg(test)]
mod tests;
