//! The neutral hypervisor traits over the HVF pieces: [`HvfHypervisor`] → [`HvfVm`] →
//! [`HvfVcpu`], generic over the [`Framework`] so the same code runs against the real framework
//! (macOS) and the fake (tests on arm64 Linux).
//!
//! Interrupts have no irqfd: an [`InterruptLine`] here raises its SPI through the framework's
//! GIC and wakes every vCPU sleeping in WFI. Queue notifications have no ioeventfd:
//! `bind_queue_notify` binds nothing, and the virtio-mmio transport signals the queue's eventfd
//! when the guest's QueueNotify write reaches the bus. Kicks are `hv_vcpus_exit` plus the vCPU's
//! [`Waker`] (for a vCPU asleep in WFI or powered off, which is not in the guest).

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::engine::{Engine, Step, VmShared};
use super::framework::{Framework, FwCode, FwError, FwVcpu, SysReg, VmSetup};
use super::psci::Power;
use super::state::{self, VmState};
use super::wait::Waker;
use crate::arch::aarch64::layout;
use crate::arch::aarch64::mpidr;
use crate::hypervisor::aarch64::{ArchHypervisor, ArchVcpu};
use crate::hypervisor::{HvError, HvState, HvVcpu, HvVm, Hypervisor, VcpuExit, VcpuKicker};
use crate::interrupt::InterruptLine;
use crate::os::EventFd;

/// The name in logs and saved state.
const NAME: &str = "hvf";
/// MPIDR_EL1 bit 31 is RES1.
const MPIDR_RES1: u64 = 1 << 31;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn call_err(what: &'static str) -> impl Fn(FwError) -> HvError {
    move |e| HvError::Arch {
        what,
        source: Box::new(e),
    }
}

/// Opens Hypervisor.framework (macOS 15 or later).
#[cfg(target_os = "macos")]
pub(crate) fn open() -> Result<Arc<dyn Hypervisor>, HvError> {
    super::real::check_host()?;
    Ok(Arc::new(
        HvfHypervisor::<super::real::AppleFramework>::new()?
    ))
}

/// The framework's entry point: creates VMs.
pub(crate) struct HvfHypervisor<F> {
    max_vcpus: usize,
    _framework: PhantomData<fn() -> F>,
}

impl<F: Framework> HvfHypervisor<F> {
    /// Asks the framework how many vCPUs it allows.
    pub(crate) fn new() -> Result<Self, HvError> {
        let max = F::max_vcpus().map_err(unavailable)?;
        Ok(HvfHypervisor {
            max_vcpus: max.min(layout::MAX_VCPUS) as usize,
            _framework: PhantomData,
        })
    }
}

/// Turns a failure to create the VM into an error that says how to fix it.
pub(crate) fn unavailable(e: FwError) -> HvError {
    let (reason, fix) = match e.code {
        FwCode::Denied => (
            "the binary needs the com.apple.security.hypervisor entitlement".to_string(),
            "sign it with the entitlement: `codesign --sign - --force --entitlements \
             supermachine.entitlements /path/to/binary` (supermachine.entitlements is in the \
             repository root; see the README's macOS section)",
        ),
        FwCode::Busy => (
            "this process already has a VM (Hypervisor.framework allows one per process)"
                .to_string(),
            "run each VM in a process of its own (the supermachine CLI does: one worker per VM)",
        ),
        FwCode::Unsupported => (
            format!("{e}"),
            "run on Apple silicon with macOS 15 or later, outside a VM that lacks nested \
             virtualisation (`sysctl kern.hv_support` must say 1)",
        ),
        _ => (
            format!("{e}"),
            "check `sysctl kern.hv_support` and the system log for Hypervisor.framework errors",
        ),
    };
    HvError::Unavailable {
        path: "Hypervisor.framework",
        reason,
        fix,
    }
}

impl<F: Framework> ArchHypervisor for HvfHypervisor<F> {}

impl<F: Framework> Hypervisor for HvfHypervisor<F> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    fn create_vm(&self) -> Result<Box<dyn HvVm>, HvError> {
        let setup = VmSetup {
            ipa_bits: layout::IPA_LIMIT.trailing_zeros(),
            gic_distributor: layout::GIC_DIST.base,
            gic_redistributors: layout::GIC_REDIST_BASE,
            gic_redistributors_end: layout::SERIAL.base,
        };
        let fw = F::create(&setup).map_err(unavailable)?;
        Ok(Box::new(HvfVm {
            fw: Arc::new(fw),
            shared: Arc::new(VmShared::default()),
            pending_gic: Mutex::new(None),
            memory: Mutex::new(Vec::new()),
        }))
    }
}

/// The process's VM.
pub(crate) struct HvfVm<F: Framework> {
    fw: Arc<F>,
    shared: Arc<VmShared>,
    /// GIC state from a snapshot, loaded once every vCPU exists.
    pending_gic: Mutex<Option<VmState>>,
    /// Keeps mapped memory alive until after the VM (dropped first: declaration order; vCPUs
    /// hold `fw` clones, and end before the machine drops this).
    memory: Mutex<Vec<Arc<GuestMemoryMmap>>>,
}

impl<F: Framework> HvVm for HvfVm<F> {
    fn map_memory(&self, mem: &Arc<GuestMemoryMmap>) -> Result<(), HvError> {
        let mut kept = lock(&self.memory);
        for region in mem.iter() {
            let size = usize::try_from(region.len()).map_err(|_| HvError::Unsupported {
                what: "a memory region that large".into(),
            })?;
            // SAFETY: the host range is a live mapping owned by `mem`, which this VM keeps (pushed
            // below) for as long as the framework's VM exists.
            unsafe { self.fw.map(region.as_ptr(), region.start_addr().0, size) }
                .map_err(call_err("mapping guest memory (hv_vm_map)"))?;
        }
        kept.push(Arc::clone(mem));
        Ok(())
    }

    fn create_irqchip(&self) -> Result<(), HvError> {
        // The GIC was created with the VM (the framework wants both at once).
        Ok(())
    }

    fn interrupt_line(&self, line: u32) -> Result<Arc<dyn InterruptLine>, HvError> {
        Ok(Arc::new(HvfLine {
            fw: Arc::clone(&self.fw),
            intid: layout::SPI_INTID_BASE + line,
            shared: Arc::clone(&self.shared),
        }))
    }

    fn bind_queue_notify(&self, _: &EventFd, _: u64, _: u32) -> Result<(), HvError> {
        // No ioeventfd: the transport signals the eventfd on the bus write (module docs).
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn HvVcpu>, HvError> {
        let mut vcpu = self
            .fw
            .create_vcpu()
            .map_err(call_err("creating a vCPU (hv_vcpu_create)"))?;
        let affinity = mpidr(id);
        vcpu.set_sys_reg(SysReg::MPIDR_EL1, MPIDR_RES1 | affinity)
            .map_err(call_err("setting MPIDR_EL1"))?;
        let waker = Arc::new(Waker::default());
        self.shared.add_waker(Arc::clone(&waker));
        // vCPU 0 boots; the others wait for the guest's PSCI CPU_ON.
        let power = if id == 0 { Power::On } else { Power::Off };
        self.shared
            .board
            .register(id, affinity, power, Arc::clone(&waker));
        let kicker = Arc::new(HvfKicker {
            fw: Arc::clone(&self.fw),
            vcpu: vcpu.handle(),
            waker: Arc::clone(&waker),
        });
        let engine = Engine::new(
            Arc::clone(&self.fw),
            vcpu,
            id,
            Arc::clone(&self.shared),
            waker,
        );
        Ok(Box::new(HvfVcpu {
            engine,
            kicker,
            boot: Cell::new(None),
        }))
    }

    fn vcpus_created(&self) -> Result<(), HvError> {
        if let Some(state) = lock(&self.pending_gic).take() {
            state::load_vm(&*self.fw, &state)?;
        }
        Ok(())
    }

    fn save_state(&self) -> Result<HvState, HvError> {
        state::save_vm(&*self.fw)
    }

    fn restore_state(&self, state: &HvState) -> Result<(), HvError> {
        *lock(&self.pending_gic) = Some(state::decode_vm(state)?);
        Ok(())
    }
}

/// An SPI of the framework's GIC (module docs).
struct HvfLine<F: Framework> {
    fw: Arc<F>,
    intid: u32,
    shared: Arc<VmShared>,
}

impl<F: Framework> InterruptLine for HvfLine<F> {
    fn trigger(&self) -> std::io::Result<()> {
        // An edge: the device tree declares these SPIs edge-triggered, so the GIC latches the
        // rising level as pending.
        let raise = |level| {
            self.fw
                .set_spi(self.intid, level)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        raise(true)?;
        raise(false)?;
        self.shared.wake_all();
        Ok(())
    }
}

/// Kicks one vCPU out of the guest, WFI or its powered-off wait.
struct HvfKicker<F: Framework> {
    fw: Arc<F>,
    vcpu: F::Handle,
    waker: Arc<Waker>,
}

impl<F: Framework> VcpuKicker for HvfKicker<F> {
    fn kick(&self) {
        // The flag first: the vCPU checks it before every entry, so a kick that lands between
        // that check and the entry is caught by hv_vcpus_exit, and one before by the flag.
        self.waker.kick();
        if let Err(e) = self.fw.exit_vcpus(std::slice::from_ref(&self.vcpu)) {
            tracing::warn!(error = %e, "could not make a vCPU exit");
        }
    }
}

/// A vCPU on its thread.
struct HvfVcpu<F: Framework> {
    engine: Engine<F>,
    kicker: Arc<HvfKicker<F>>,
    /// Kernel entry and device tree address for the first run (`set_boot_regs`).
    boot: Cell<Option<(u64, u64)>>,
}

impl<F: Framework> ArchVcpu for HvfVcpu<F> {
    fn mpidr(&self) -> Result<u64, HvError> {
        self.engine
            .vcpu
            .sys_reg(SysReg::MPIDR_EL1)
            .map_err(call_err("reading MPIDR_EL1"))
    }

    fn set_boot_regs(&self, entry: u64, dtb: u64) -> Result<(), HvError> {
        // The trait lends `&self` and the registers are written through `&mut`: they are set
        // on the vCPU's thread at the start of its first run, before the guest enters.
        self.boot.set(Some((entry, dtb)));
        Ok(())
    }
}

impl<F: Framework> HvVcpu for HvfVcpu<F> {
    fn id(&self) -> u32 {
        self.engine.id
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn run(&mut self) -> Result<VcpuExit<'_>, HvError> {
        if let Some((entry, dtb)) = self.boot.take() {
            self.engine
                .set_entry(entry, dtb)
                .map_err(call_err("setting the boot registers"))?;
        }
        let step = self
            .engine
            .run()
            .map_err(call_err("running a vCPU (hv_vcpu_run)"))?;
        Ok(match step {
            Step::MmioRead { addr, len } => VcpuExit::MmioRead {
                addr,
                data: &mut self.engine.io_buf()[..len],
            },
            Step::MmioWrite { addr, len } => VcpuExit::MmioWrite {
                addr,
                data: &self.engine.io_buf()[..len],
            },
            Step::System(event) => VcpuExit::SystemEvent(event),
            Step::Interrupted => VcpuExit::Interrupted,
            Step::Unsupported(what) => VcpuExit::Unsupported(what),
        })
    }

    fn instruction_pointer(&self) -> Result<u64, HvError> {
        self.engine
            .vcpu
            .reg(super::framework::Reg::Pc)
            .map_err(call_err("reading the PC"))
    }

    fn save_state(&mut self) -> Result<HvState, HvError> {
        state::save_vcpu(&self.engine)
    }

    fn restore_state(&mut self, state: &HvState) -> Result<(), HvError> {
        self.boot.set(None);
        state::restore_vcpu(&mut self.engine, state)
    }
}
