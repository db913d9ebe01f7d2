//! The hypervisor boundary.
//!
//! Three small traits — [`Hypervisor`] → [`HvVm`] → [`HvVcpu`] — cover what the machine needs from a
//! hypervisor: create a VM, map guest RAM, create the interrupt controller, hand out interrupt
//! lines and bind queue notifications, create vCPUs, run them, kick them out of the guest, and
//! save/restore their state as opaque bytes. That core is architecture-neutral; what only one
//! architecture has (x86: CPUID, MSRs, segment registers, the local APIC) is a per-arch
//! extension trait that the core traits take as a supertrait ([`ArchHypervisor`],
//! [`ArchVcpu`]), in the architecture's module (`x86_64`, `aarch64`), as Cloud Hypervisor's `hypervisor`
//! crate cfg-gates its per-arch methods.
//!
//! Everything crossing the boundary is backend-neutral (architectural state in `x86_64`,
//! [`VcpuExit`], [`HvError`], [`InterruptLine`] objects). Two backends, and no type of either
//! leaves its folder: `kvm/` (Linux) and `hvf/` (macOS on Apple silicon; its logic is built and
//! unit-tested on every host against a fake framework). `ARCH.md` lists what a backend provides.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub(crate) mod blob;
// Built on every host so its logic is unit-tested on Linux against a fake framework; only macOS
// opens it.
mod hvf;
#[cfg(target_os = "linux")]
mod kvm;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use self::aarch64::{ArchHypervisor, ArchVcpu};
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{ArchHypervisor, ArchVcpu};

use std::sync::Arc;

use crate::os::EventFd;
use vm_memory::GuestMemoryMmap;

use crate::interrupt::InterruptLine;

/// Opens the default hypervisor of this host (KVM on Linux).
///
/// Fails with [`HvError::Unavailable`] (whose message says how to fix it) when the device node is
/// missing or not accessible.
#[cfg(target_os = "linux")]
pub fn open() -> Result<Arc<dyn Hypervisor>, HvError> {
    Ok(Arc::new(kvm::KvmHypervisor::open()?))
}

/// Opens the default hypervisor of this host (Hypervisor.framework on macOS, 15 or later).
///
/// Fails with [`HvError::Unavailable`] (whose message says how to fix it) when the binary lacks
/// the `com.apple.security.hypervisor` entitlement, the host cannot virtualise, or macOS is
/// older than 15.
#[cfg(target_os = "macos")]
pub fn open() -> Result<Arc<dyn Hypervisor>, HvError> {
    hvf::open()
}

/// A hypervisor: creates VMs.
pub trait Hypervisor: ArchHypervisor + Send + Sync {
    /// Short backend name for logs and saved state ("kvm").
    fn name(&self) -> &'static str;

    /// The largest number of vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;

    /// Creates an empty VM (no memory, no vCPUs).
    fn create_vm(&self) -> Result<Box<dyn HvVm>, HvError>;
}

/// A VM: address space, interrupt controller and vCPU factory. Shared by the machine and its
/// vCPU threads (each creates its own vCPU).
pub trait HvVm: Send + Sync {
    /// Maps every region of `mem` into the guest physical address space at its guest address.
    ///
    /// The VM keeps a clone of `mem`, so the host mapping outlives the hypervisor's use of it.
    fn map_memory(&self, mem: &Arc<GuestMemoryMmap>) -> Result<(), HvError>;

    /// Creates the in-kernel interrupt controller (x86: PIC, IOAPIC, per-vCPU local APICs, and
    /// the PIT). Must be called before any vCPU is created.
    fn create_irqchip(&self) -> Result<(), HvError>;

    /// The interrupt line `line` of the interrupt controller (x86: an IOAPIC pin, the GSI), as
    /// an object devices trigger (KVM: an eventfd registered as an irqfd).
    fn interrupt_line(&self, line: u32) -> Result<Arc<dyn InterruptLine>, HvError>;

    /// Lets 4-byte guest writes of `queue` to the MMIO address `addr` (a virtio-mmio
    /// QueueNotify register) signal `notify` without a VM exit to the VMM (KVM: an ioeventfd).
    /// A backend that cannot do that returns `Ok` without binding: the write then reaches the
    /// MMIO bus, whose transport signals the same `notify`.
    fn bind_queue_notify(&self, notify: &EventFd, addr: u64, queue: u32) -> Result<(), HvError>;

    /// Creates vCPU `id` (also its local APIC id on x86). Call it on the thread that will run
    /// the vCPU: some hypervisors (Hypervisor.framework) bind a vCPU to its creating thread,
    /// and the KVM backend records that thread to kick it.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn HvVcpu>, HvError>;

    /// Called once every vCPU exists and before any runs: where a backend finishes what needs
    /// the vCPUs (an arm64 GIC is initialised only then). Nothing to do on x86.
    fn vcpus_created(&self) -> Result<(), HvError> {
        Ok(())
    }

    /// Saves the VM-wide state the hypervisor holds (x86: PIC, IOAPIC, PIT, kvmclock). Call
    /// only while every vCPU is out of `run`.
    fn save_state(&self) -> Result<HvState, HvError>;

    /// Loads state saved by [`save_state`](Self::save_state) into this (fresh) VM, after
    /// [`create_irqchip`](Self::create_irqchip) and before any vCPU runs.
    fn restore_state(&self, state: &HvState) -> Result<(), HvError>;

    /// Whether this VM's vCPUs can [`prefault`](HvVcpu::prefault) guest memory (false, the
    /// default, where the hypervisor cannot).
    fn can_prefault(&self) -> bool {
        false
    }
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
    /// The guest executed IN on `port` (x86 port I/O; never on other architectures).
    IoIn {
        /// I/O port.
        port: u16,
        /// Fill with the value read.
        data: &'a mut [u8],
    },
    /// The guest executed OUT on `port` (x86 port I/O; never on other architectures).
    IoOut {
        /// I/O port.
        port: u16,
        /// The bytes written.
        data: &'a [u8],
    },
    /// The guest halted and the hypervisor has nothing that could wake it (only happens without
    /// an in-kernel interrupt controller).
    Hlt,
    /// The vCPU shut down (x86: a triple fault, which on a PC means "reset").
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
/// The backend does whatever its hypervisor needs (KVM: arm `immediate_exit` and signal the
/// vCPU's thread, so a vCPU blocked in `KVM_RUN` returns with `EINTR`): the current or next
/// `run` returns [`VcpuExit::Interrupted`]. Kicking a vCPU that was dropped does nothing.
pub trait VcpuKicker: Send + Sync {
    /// Interrupts the vCPU's run.
    fn kick(&self);
}

/// A virtual CPU. It lives on the thread that created it (see [`HvVm::create_vcpu`]), so it is
/// not `Send`; `run` blocks while the guest runs.
pub trait HvVcpu: ArchVcpu {
    /// The vCPU index given at creation.
    fn id(&self) -> u32;

    /// A handle that interrupts this vCPU's `run` from another thread. It stays valid (and
    /// harmless) after the vCPU is dropped.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    /// Runs the guest until it needs the VMM.
    fn run(&mut self) -> Result<VcpuExit<'_>, HvError>;

    /// The guest's instruction pointer (x86 `RIP`, arm64 `PC`), for failure reports.
    fn instruction_pointer(&self) -> Result<u64, HvError>;

    /// Saves everything the hypervisor holds for this vCPU (x86: registers, FPU/XSAVE, MSRs,
    /// local APIC, pending events, CPUID, ...). Call on the vCPU's thread, between two `run`s,
    /// after any pending MMIO/PIO exit was completed by a `run` that returned
    /// [`VcpuExit::Interrupted`].
    fn save_state(&mut self) -> Result<HvState, HvError>;

    /// Loads state saved by [`save_state`](Self::save_state) into this fresh vCPU.
    fn restore_state(&mut self, state: &HvState) -> Result<(), HvError>;

    /// Maps guest RAM `[gpa, gpa + len)` (page aligned) into the hypervisor's second-level page
    /// tables now, as guest reads of those pages would, so the guest's first touches of them do
    /// not each exit to the host (KVM: `KVM_PRE_FAULT_MEMORY`, Linux 6.10+). A restored machine
    /// calls it for its snapshot's recorded working set before the vCPU first runs.
    ///
    /// Returns `Ok(false)` where the hypervisor cannot (the default: nothing mapped; KVM may
    /// say so after mapping part of the range, which stays mapped).
    fn prefault(&self, _gpa: u64, _len: u64) -> Result<bool, HvError> {
        Ok(false)
    }
}

/// Errors from the hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    /// The hypervisor device cannot be used at all; `fix` says what to do.
    #[error("{path} unavailable: {reason}. Fix: {fix}")]
    Unavailable {
        /// The device node or framework (`/dev/kvm`).
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
    /// An architecture-specific hypervisor operation failed (arm64: a register, the vGIC).
    #[error("{what} failed")]
    Arch {
        /// What was being done.
        what: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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
