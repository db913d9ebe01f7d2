//! One vCPU's run loop over the framework: enters the guest, decodes each exit, handles what the
//! VMM answers itself (PSCI, WFI, system-register traps, the virtual timer) and returns only what
//! the machine must see (MMIO, power events, kicks) as a [`Step`].
//!
//! MMIO follows KVM's contract, which the vCPU loop relies on: a load's value is written to its
//! register, and the PC stepped over the instruction, at the start of the *next* `run`; a store's
//! PC step happens at once. A kicked vCPU completes any pending load and returns
//! [`Step::Interrupted`] without entering the guest, so its state is then complete to save.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::framework::{Exit, Framework, FwError, FwVcpu, Reg, SysReg};
use super::mmio::{MmioAccess, ZERO_REG};
use super::psci::{Outcome, Power, PowerBoard};
use super::syndrome::{self, Trap, Wfx};
use super::wait::{self, Timer, Wake, Waker};
use crate::hypervisor::SystemEvent;

/// PSTATE for entering a kernel: EL1h, every exception (D, A, I, F) masked.
pub(crate) const BOOT_PSTATE: u64 = 0x3c5;
/// GIC INTID of the EL1 virtual timer's PPI.
pub(crate) const VTIMER_INTID: u32 = 27;
/// The longest a WFI sleeps before it looks at its redistributor again: an IPI (SGI) another vCPU
/// sends goes through the framework's GIC without telling the VMM, so a sleeping vCPU polls for
/// one at this interval (an SPI from a device wakes it at once).
pub(crate) const SGI_POLL: Duration = Duration::from_millis(1);

/// What a VM's vCPUs share: the PSCI power board and every vCPU's [`Waker`].
#[derive(Default)]
pub(crate) struct VmShared {
    /// Which vCPU is powered.
    pub board: PowerBoard,
    wakers: Mutex<Vec<Arc<Waker>>>,
}

impl VmShared {
    /// Adds a vCPU's waker (interrupts wake it from WFI).
    pub(crate) fn add_waker(&self, waker: Arc<Waker>) {
        self.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(waker);
    }

    /// Wakes every vCPU sleeping in WFI: an SPI was raised, and which vCPU the GIC routes it to
    /// is the guest's business.
    pub(crate) fn wake_all(&self) {
        for w in self.wakers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            w.wake();
        }
    }
}

/// What [`Engine::run`] hands the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// The guest loads `len` bytes at `addr`: fill [`Engine::io_buf`]`[..len]` before the next
    /// run.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Bytes.
        len: usize,
    },
    /// The guest stored [`Engine::io_buf`]`[..len]` at `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes.
        len: usize,
    },
    /// A PSCI power event.
    System(SystemEvent),
    /// The vCPU was kicked.
    Interrupted,
    /// Something this backend cannot handle; the text says what.
    Unsupported(String),
}

/// One vCPU and its run state.
pub(crate) struct Engine<F: Framework> {
    /// The VM.
    pub fw: Arc<F>,
    /// The framework's vCPU.
    pub vcpu: F::Vcpu,
    /// The vCPU index.
    pub id: u32,
    /// Shared with the VM's other vCPUs.
    pub shared: Arc<VmShared>,
    /// This vCPU's bed (its kicker and the interrupt lines hold it too).
    pub waker: Arc<Waker>,
    buf: [u8; 8],
    pending_load: Option<MmioAccess>,
    /// The framework masked the virtual timer on a vtimer exit and it is not unmasked yet.
    pub timer_masked: bool,
    /// The waker's generation when the guest was last entered.
    seen: u64,
    /// System registers whose traps were logged already.
    logged_sysregs: HashSet<u16>,
}

impl<F: Framework> Engine<F> {
    /// An engine for a freshly created vCPU.
    pub(crate) fn new(
        fw: Arc<F>,
        vcpu: F::Vcpu,
        id: u32,
        shared: Arc<VmShared>,
        waker: Arc<Waker>,
    ) -> Self {
        Engine {
            fw,
            vcpu,
            id,
            shared,
            waker,
            buf: [0; 8],
            pending_load: None,
            timer_masked: false,
            seen: 0,
            logged_sysregs: HashSet::new(),
        }
    }

    /// The data of the last MMIO step.
    pub(crate) fn io_buf(&mut self) -> &mut [u8; 8] {
        &mut self.buf
    }

    /// Sets the registers for entering a kernel at `entry` with X0 = `x0`.
    pub(crate) fn set_entry(&mut self, entry: u64, x0: u64) -> Result<(), FwError> {
        self.vcpu.set_reg(Reg::Pc, entry)?;
        self.vcpu.set_reg(Reg::X(0), x0)?;
        for n in 1..4 {
            self.vcpu.set_reg(Reg::X(n), 0)?;
        }
        self.vcpu.set_reg(Reg::Cpsr, BOOT_PSTATE)
    }

    /// Runs until the machine must see something (module docs).
    pub(crate) fn run(&mut self) -> Result<Step, FwError> {
        loop {
            self.complete_load()?;
            if self.waker.take_kick() {
                return Ok(Step::Interrupted);
            }
            match self.shared.board.power(self.id) {
                Power::On => {}
                Power::Off => {
                    // Powered off: sleep until a CPU_ON (a wake) or a kick, then look again.
                    let since = self.waker.generation();
                    if self.shared.board.power(self.id) == Power::Off {
                        self.waker.wait(since, None);
                    }
                    continue;
                }
                Power::Pending { entry, context } => {
                    self.set_entry(entry, context)?;
                    self.shared.board.set_power(self.id, Power::On);
                }
            }
            self.sync_vtimer()?;
            self.seen = self.waker.generation();
            match self.vcpu.run()? {
                // A kick (taken at the top of the loop) or a spurious exit.
                Exit::Canceled => {}
                Exit::VtimerActivated => {
                    // The framework masked the timer; raise its PPI and unmask it once the guest
                    // has dealt with it (sync_vtimer).
                    self.vcpu.set_ppi_pending(VTIMER_INTID)?;
                    self.timer_masked = true;
                }
                Exit::Exception { syndrome, ipa } => {
                    if let Some(step) = self.exception(syndrome, ipa)? {
                        return Ok(step);
                    }
                }
                Exit::Unknown(reason) => {
                    return Ok(Step::Unsupported(format!(
                        "Hypervisor.framework exit reason {reason}"
                    )))
                }
            }
        }
    }

    /// Writes back a load the machine answered, and steps over it.
    fn complete_load(&mut self) -> Result<(), FwError> {
        if let Some(access) = self.pending_load.take() {
            if let Some(value) = access.load_value(&self.buf[..access.len]) {
                self.vcpu.set_reg(Reg::X(access.reg), value)?;
            }
            self.advance_pc()?;
        }
        Ok(())
    }

    fn advance_pc(&mut self) -> Result<(), FwError> {
        let pc = self.vcpu.reg(Reg::Pc)?;
        self.vcpu.set_reg(Reg::Pc, pc.wrapping_add(4))
    }

    /// Unmasks the virtual timer once the guest no longer has it asserted.
    fn sync_vtimer(&mut self) -> Result<(), FwError> {
        if self.timer_masked {
            let ctl = self.vcpu.sys_reg(SysReg::CNTV_CTL_EL0)?;
            if !wait::timer_asserted(ctl) {
                self.vcpu.set_vtimer_masked(false)?;
                self.timer_masked = false;
            }
        }
        Ok(())
    }

    /// Handles one trap; `Some` when the machine must see it.
    fn exception(&mut self, esr: u64, ipa: u64) -> Result<Option<Step>, FwError> {
        Ok(match syndrome::decode(esr) {
            Trap::DataAbort(abort) => match MmioAccess::decode(&abort) {
                Err(e) => Some(self.unsupported(format!("{e}, at {ipa:#x}"))?),
                Ok(access) if access.write => {
                    let value = if access.reg == ZERO_REG {
                        0
                    } else {
                        self.vcpu.reg(Reg::X(access.reg))?
                    };
                    self.buf = access.store_bytes(value);
                    self.advance_pc()?;
                    Some(Step::MmioWrite {
                        addr: ipa,
                        len: access.len,
                    })
                }
                Ok(access) => {
                    self.buf = [0; 8];
                    self.pending_load = Some(access);
                    Some(Step::MmioRead {
                        addr: ipa,
                        len: access.len,
                    })
                }
            },
            Trap::Hvc { .. } => self.psci()?,
            Trap::Smc { .. } => {
                // A trapped SMC leaves the PC on the instruction (an HVC's is past it).
                self.advance_pc()?;
                self.psci()?
            }
            Trap::Wfx(Wfx::Wfi | Wfx::Wfit) => {
                self.advance_pc()?;
                self.idle()?
            }
            Trap::Wfx(Wfx::Wfe | Wfx::Wfet) => {
                self.advance_pc()?;
                None
            }
            Trap::SysReg(access) => {
                // Registers the framework leaves to the VMM (debug, OS lock, PMU, ...) read as
                // zero and ignore writes, as Linux copes with on hardware that lacks them.
                if self.logged_sysregs.insert(access.encoding) {
                    tracing::debug!(
                        vcpu = self.id,
                        encoding = format_args!("{:#06x}", access.encoding),
                        read = access.read,
                        "system register access emulated as RAZ/WI"
                    );
                }
                if access.read && access.reg != ZERO_REG {
                    self.vcpu.set_reg(Reg::X(access.reg), 0)?;
                }
                self.advance_pc()?;
                None
            }
            Trap::InstructionAbort => Some(self.unsupported(format!(
                "instruction fetch from {ipa:#x}, where there is no memory"
            ))?),
            Trap::Other { ec, iss } => {
                Some(self.unsupported(format!("exception class {ec:#x} (ISS {iss:#x})"))?)
            }
        })
    }

    fn unsupported(&self, what: String) -> Result<Step, FwError> {
        let pc = self.vcpu.reg(Reg::Pc)?;
        Ok(Step::Unsupported(format!("{what} (guest PC {pc:#x})")))
    }

    /// A PSCI call in X0..X3.
    fn psci(&mut self) -> Result<Option<Step>, FwError> {
        let mut x = [0u64; 4];
        for (n, v) in x.iter_mut().enumerate() {
            *v = self.vcpu.reg(Reg::X(n as u8))?;
        }
        Ok(match self.shared.board.call(self.id, x) {
            Outcome::Return(value) => {
                self.vcpu.set_reg(Reg::X(0), value)?;
                None
            }
            // The next run sleeps until a CPU_ON.
            Outcome::Off => None,
            Outcome::SystemOff => Some(Step::System(SystemEvent::Shutdown)),
            Outcome::SystemReset => Some(Step::System(SystemEvent::Reset)),
        })
    }

    /// WFI: sleeps until an interrupt could be pending for this vCPU, or a kick.
    fn idle(&mut self) -> Result<Option<Step>, FwError> {
        loop {
            if self.vcpu.sgi_ppi_pending()? {
                return Ok(None);
            }
            let ctl = self.vcpu.sys_reg(SysReg::CNTV_CTL_EL0)?;
            let cval = self.vcpu.sys_reg(SysReg::CNTV_CVAL_EL0)?;
            let (host, hz) = self.fw.counter();
            let now = host.wrapping_sub(self.vcpu.vtimer_offset()?);
            let sleep = match wait::timer(ctl, cval, now, hz) {
                Timer::Expired => return Ok(None),
                Timer::Off => SGI_POLL,
                Timer::In(left) => left.min(SGI_POLL),
            };
            match self.waker.wait(self.seen, Some(Instant::now() + sleep)) {
                Wake::Kicked => {
                    self.waker.take_kick();
                    return Ok(Some(Step::Interrupted));
                }
                Wake::Woken => return Ok(None),
                Wake::TimedOut => {}
            }
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
