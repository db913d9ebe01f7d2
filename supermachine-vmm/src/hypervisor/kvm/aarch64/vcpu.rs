//! Bringing up an arm64 vCPU: `KVM_ARM_VCPU_INIT` and the registers the boot protocol fixes.

use kvm_bindings::{kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2};
use kvm_ioctls::{VcpuFd, VmFd};

use super::{regs, KvmArm64Error};

/// PSTATE at boot (Documentation/arm64/booting.rst): EL1 using SP_EL1 (`EL1h`) with the D, A, I
/// and F exceptions all masked.
pub const BOOT_PSTATE: u64 = PSR_MODE_EL1H | PSR_F_BIT | PSR_I_BIT | PSR_A_BIT | PSR_D_BIT;

const PSR_MODE_EL1H: u64 = 0x5;
const PSR_F_BIT: u64 = 1 << 6;
const PSR_I_BIT: u64 = 1 << 7;
const PSR_A_BIT: u64 = 1 << 8;
const PSR_D_BIT: u64 = 1 << 9;

/// The vCPU features this VMM asks for: PSCI 0.2 (so the guest starts secondaries and powers
/// off through standard PSCI calls that KVM handles), plus "start powered off" for every vCPU
/// but the boot one, which then waits for the guest's PSCI `CPU_ON`.
pub fn features(boot_vcpu: bool) -> [u32; 7] {
    let mut features = [0u32; 7];
    features[0] = 1 << KVM_ARM_VCPU_PSCI_0_2;
    if !boot_vcpu {
        features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    features
}

/// Initialises `vcpu` as the host's preferred CPU type with `features`. Resets every register;
/// must precede any register access and the vGIC's initialisation.
pub fn init(vm: &VmFd, vcpu: &VcpuFd, features: [u32; 7]) -> Result<(), KvmArm64Error> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(KvmArm64Error::call("KVM_ARM_PREFERRED_TARGET"))?;
    kvi.features = features;
    vcpu.vcpu_init(&kvi)
        .map_err(KvmArm64Error::call("KVM_ARM_VCPU_INIT"))
}

/// Sets the boot vCPU's registers for entering a kernel `Image`: PC at its first byte, X0 the
/// device tree's guest-physical address, X1..X3 zero (reserved), PSTATE [`BOOT_PSTATE`].
pub fn set_boot_regs(vcpu: &VcpuFd, entry: u64, dtb: u64) -> Result<(), KvmArm64Error> {
    regs::set_u64(vcpu, regs::PSTATE, BOOT_PSTATE)?;
    regs::set_u64(vcpu, regs::x(0), dtb)?;
    for n in 1..4 {
        regs::set_u64(vcpu, regs::x(n), 0)?;
    }
    regs::set_u64(vcpu, regs::PC, entry)
}

/// The vCPU's MPIDR_EL1, which the device tree's CPU nodes and the vGIC's per-CPU registers are
/// addressed by.
pub fn mpidr(vcpu: &VcpuFd) -> Result<u64, KvmArm64Error> {
    regs::get_u64(vcpu, regs::MPIDR_EL1)
}
