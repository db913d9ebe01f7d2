//! The hypervisor boundary.
//!
//! Three small traits — [`Hypervisor`] → [`HvVm`] → [`HvVcpu`] — cover what the machine needs from a
//! hypervisor: create a VM, map guest RAM, create the interrupt controller, wire eventfds to
//! interrupts and MMIO doorbells, create vCPUs, load their architectural state and run them.
//! Everything crossing the boundary is backend-neutral (architectural state in [`x86_64`],
//! [`VcpuExit`], [`HvError`]); `kvm.rs` is the only backend today, and no KVM type leaves this
//! module, so HVF or WHP can be added beside it.

mod kvm;
mod kvm_state;
pub mod x86_64;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::x86_64::{CpuidEntry, FpuControl, LapicState, MsrEntry, Regs, SpecialRegs};

/// Opens the default hypervisor of this host (KVM on Linux).
///
/// Fails with [`HvError::Unavailable`] (whose message says how to fix it) when the device node is
/// missing or not accessible.
pub fn open() -> Result<Arc<dyn Hypervisor>, HvError> {
    Ok(Arc::new(kvm::KvmHypervisor::open()?))
}

/// A hypervisor: creates VMs.
pub trait Hypervisor: Send + Sync {
    /// Short backend name for logs ("kvm").
    fn name(&self) -> &'static str;

    /// The largest number of vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;

    /// The CPUID leaves this hypervisor can virtualise, before per-vCPU fix-ups.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HvError>;

    /// Creates an empty VM (no memory, no vCPUs).
    fn create_vm(&self) -> Result<Box<dyn HvVm>, HvError>;
}

/// Where an ioeventfd listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    /// A guest physical MMIO address.
    Mmio(u64),
    /// An x86 I/O port.
    Pio(u16),
}

/// A VM: address space, interrupt controller and vCPU factory.
pub trait HvVm: Send + Sync {
    /// Maps every region of `mem` into the guest physical address space at its guest address.
    ///
    /// The VM keeps a clone of `mem`, so the host mapping outlives the hypervisor's use of it.
    fn map_memory(&self, mem: &Arc<GuestMemoryMmap>) -> Result<(), HvError>;

    /// Creates the in-kernel interrupt controllers (PIC, IOAPIC, per-vCPU local APICs) and the
    /// PIT. Must be called before any vCPU is created.
    fn create_irqchip(&self) -> Result<(), HvError>;

    /// Writing to `fd` raises the (edge) interrupt `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HvError>;

    /// A guest write to `addr` signals `fd` instead of exiting to the VMM. With `datamatch`, only
    /// 4-byte writes of exactly that value match.
    fn register_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), HvError>;

    /// Creates vCPU `id` (also its local APIC id on x86).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn HvVcpu>, HvError>;

    /// Saves the VM-wide state the hypervisor holds (x86: PIC, IOAPIC, PIT, kvmclock). Call
    /// only while every vCPU is out of `run`.
    fn save_state(&self) -> Result<HvState, HvError>;

    /// Loads state saved by [`save_state`](Self::save_state) into this (fresh) VM, after
    /// [`create_irqchip`](Self::create_irqchip) and before any vCPU runs.
    fn restore_state(&self, state: &HvState) -> Result<(), HvError>;
}

/// Hypervisor state saved for a snapshot: opaque bytes only the backend that wrote them can
/// read (snapshots do not move between hypervisors; `backend` says whose they are).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HvState {
    /// The backend that produced the bytes ([`Hypervisor::name`]).
    pub backend: String,
    /// The backend's own encoding.
    pub bytes: Vec<u8>,
}

/// Why [`HvVcpu::run`] returned.
///
/// Data slices borrow the vCPU: fill `MmioRead`/`IoIn` data before the next `run`.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// The guest read `data.len()` bytes of MMIO at `addr`.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Fill with the value read.
        data: &'a mut [u8],
    },
    /// The guest wrote `data` to MMIO at `addr`.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// The guest executed IN on `port`.
    IoIn {
        /// I/O port.
        port: u16,
        /// Fill with the value read.
        data: &'a mut [u8],
    },
    /// The guest executed OUT on `port`.
    IoOut {
        /// I/O port.
        port: u16,
        /// The bytes written.
        data: &'a [u8],
    },
    /// The guest halted and the hypervisor has nothing that could wake it (only happens without
    /// an in-kernel interrupt controller).
    Hlt,
    /// The vCPU shut down: a triple fault, which on a PC means "reset".
    Shutdown,
    /// The guest asked the platform for a power event (PSCI, Hyper-V, ...).
    SystemEvent(SystemEvent),
    /// The hypervisor could not handle something the guest did (on PVM hosts: an instruction its
    /// emulator lacks).
    InternalError {
        /// Backend-specific sub-error code (KVM: 1 = emulation failure).
        suberror: u32,
        /// Backend-specific diagnostic words.
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest.
    FailEntry {
        /// Hardware-specific failure reason.
        reason: u64,
    },
    /// The run was interrupted: a signal arrived or [`VcpuKicker::kick`] was called. Not an
    /// error; check why and run again.
    Interrupted,
    /// Anything else (the backend's exit name for diagnostics).
    Unsupported(String),
}

/// A platform power event requested by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// Power off.
    Shutdown,
    /// Reboot.
    Reset,
    /// The guest crashed (e.g. reported through a crash MSR).
    Crash,
    /// Another event type (backend code).
    Other(u32),
}

/// Makes a running vCPU return from [`HvVcpu::run`] soon, from any thread.
///
/// `kick` only arms the exit (the next or current `run` returns [`VcpuExit::Interrupted`]); a
/// vCPU blocked inside the hypervisor also needs a signal delivered to its thread to notice, which
/// `vcpu.rs` sends.
pub trait VcpuKicker: Send + Sync {
    /// Arms the exit.
    fn kick(&self);
}

/// A virtual CPU. Owned by one thread at a time; `run` blocks while the guest runs.
pub trait HvVcpu: Send {
    /// The vCPU index given at creation.
    fn id(&self) -> u32;

    /// A handle that interrupts this vCPU's `run` from another thread. It stays valid (and
    /// harmless) after the vCPU is dropped.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    /// Runs the guest until it needs the VMM.
    fn run(&mut self) -> Result<VcpuExit<'_>, HvError>;

    /// General-purpose registers.
    fn regs(&self) -> Result<Regs, HvError>;
    /// Sets the general-purpose registers.
    fn set_regs(&self, regs: &Regs) -> Result<(), HvError>;
    /// Segment, control and table registers.
    fn sregs(&self) -> Result<SpecialRegs, HvError>;
    /// Sets segment, control and table registers.
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<(), HvError>;
    /// Loads the FPU control state (everything else zeroed).
    fn set_fpu(&self, fpu: &FpuControl) -> Result<(), HvError>;
    /// Sets the CPUID leaves the guest sees.
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<(), HvError>;
    /// Writes MSRs; all or an error naming the first one refused.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<(), HvError>;
    /// The local APIC register page.
    fn lapic(&self) -> Result<LapicState, HvError>;
    /// Sets the local APIC register page.
    fn set_lapic(&self, lapic: &LapicState) -> Result<(), HvError>;

    /// Saves everything the hypervisor holds for this vCPU (registers, FPU/XSAVE, MSRs, local
    /// APIC, pending events, CPUID, ...). Call on the vCPU's thread, between two `run`s, after
    /// any pending MMIO/PIO exit was completed by a `run` that returned
    /// [`VcpuExit::Interrupted`].
    fn save_state(&mut self) -> Result<HvState, HvError>;

    /// Loads state saved by [`save_state`](Self::save_state) into this fresh vCPU.
    fn restore_state(&mut self, state: &HvState) -> Result<(), HvError>;
}

/// Errors from the hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    /// The hypervisor device cannot be used at all; `fix` says what to do.
    #[error("{path} is not usable: {reason}. Fix: {fix}")]
    Unavailable {
        /// The device node (`/dev/kvm`).
        path: &'static str,
        /// What went wrong.
        reason: String,
        /// What to do about it.
        fix: &'static str,
    },
    /// The hypervisor lacks something this VMM needs.
    #[error("the hypervisor lacks {what}")]
    Unsupported {
        /// The missing capability or API version.
        what: String,
    },
    /// A hypervisor call failed.
    #[error("{op} failed")]
    Call {
        /// The operation (e.g. "KVM_CREATE_VM").
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Saved state could not be used by this backend.
    #[error("saved hypervisor state is unusable: {0}")]
    BadState(String),
    /// Some MSRs were refused.
    #[error("the hypervisor accepted {set} of {total} MSRs; MSR {refused:#x} was refused")]
    MsrRefused {
        /// How many were set.
        set: usize,
        /// How many were asked for.
        total: usize,
        /// The first MSR not set.
        refused: u32,
    },
}
