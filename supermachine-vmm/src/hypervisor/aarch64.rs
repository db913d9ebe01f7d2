//! The arm64 extension of the hypervisor boundary: what the arm64 platform code
//! (`arch/aarch64`) asks of a vCPU beyond the neutral [`HvVcpu`](super::HvVcpu).
//!
//! Little is needed: the backend initialises each vCPU when it creates it (KVM: the host's
//! preferred CPU type with PSCI 0.2, every vCPU but 0 powered off until the guest's PSCI
//! `CPU_ON`), so the platform only points vCPU 0 at the kernel and checks the MPIDR the device
//! tree names.

use super::HvError;

/// What an arm64 hypervisor offers beyond the neutral [`Hypervisor`](super::Hypervisor):
/// nothing yet.
pub trait ArchHypervisor {}

/// The arm64 vCPU calls the boot protocol needs.
pub trait ArchVcpu {
    /// The vCPU's MPIDR_EL1 (its affinity, which the device tree and the GIC address it by).
    fn mpidr(&self) -> Result<u64, HvError>;

    /// Sets the registers for entering a kernel `Image` (Documentation/arm64/booting.rst): PC
    /// at `entry`, X0 the device tree's guest-physical address `dtb`, X1..X3 zero, EL1h with
    /// every exception masked.
    fn set_boot_regs(&self, entry: u64, dtb: u64) -> Result<(), HvError>;
}
