//! arm64 register ids for `KVM_{GET,SET}_ONE_REG` and 64-bit accessors.
//!
//! Core registers (X0..X30, SP, PC, PSTATE, ...) are named by their offset in `struct kvm_regs`
//! in 32-bit words; system registers by their `MRS`/`MSR` encoding (op0, op1, CRn, CRm, op2).
//! Both carry the access size in the id (Documentation/virt/kvm/api.rst, "ARM64 registers").

use std::mem::offset_of;

use kvm_bindings::{
    kvm_regs, user_pt_regs, KVM_REG_ARM64, KVM_REG_ARM64_SYSREG, KVM_REG_ARM64_SYSREG_CRM_SHIFT,
    KVM_REG_ARM64_SYSREG_CRN_SHIFT, KVM_REG_ARM64_SYSREG_OP0_SHIFT, KVM_REG_ARM64_SYSREG_OP1_SHIFT,
    KVM_REG_ARM64_SYSREG_OP2_SHIFT, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64,
};
use kvm_ioctls::VcpuFd;

use super::KvmArm64Error;

/// Id of the 64-bit core register at byte `offset` of `struct kvm_regs`.
const fn core_reg(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4) as u64
}

/// Id of the 64-bit system register with this `MRS`/`MSR` encoding.
pub const fn sys_reg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << KVM_REG_ARM64_SYSREG_OP0_SHIFT)
        | (op1 << KVM_REG_ARM64_SYSREG_OP1_SHIFT)
        | (crn << KVM_REG_ARM64_SYSREG_CRN_SHIFT)
        | (crm << KVM_REG_ARM64_SYSREG_CRM_SHIFT)
        | (op2 << KVM_REG_ARM64_SYSREG_OP2_SHIFT)
}

/// General-purpose register Xn (n < 31).
pub const fn x(n: usize) -> u64 {
    core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, regs) + n * 8)
}

/// The program counter.
pub const PC: u64 = core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pc));

/// PSTATE (the saved program status: exception level, SP selection, DAIF masks, flags).
pub const PSTATE: u64 = core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pstate));

/// MPIDR_EL1, the vCPU's affinity (which KVM derives from the vCPU index).
pub const MPIDR_EL1: u64 = sys_reg(3, 0, 0, 0, 5);

/// Reads a 64-bit register.
pub fn get_u64(vcpu: &VcpuFd, id: u64) -> Result<u64, KvmArm64Error> {
    let mut value = [0u8; 8];
    vcpu.get_one_reg(id, &mut value)
        .map_err(reg_err("KVM_GET_ONE_REG", id))?;
    Ok(u64::from_le_bytes(value))
}

/// Writes a 64-bit register.
pub fn set_u64(vcpu: &VcpuFd, id: u64, value: u64) -> Result<(), KvmArm64Error> {
    vcpu.set_one_reg(id, &value.to_le_bytes())
        .map_err(reg_err("KVM_SET_ONE_REG", id))?;
    Ok(())
}

/// Maps a one-reg failure to an error naming the register.
pub(super) fn reg_err(
    op: &'static str,
    id: u64,
) -> impl FnOnce(kvm_ioctls::Error) -> KvmArm64Error {
    move |e| KvmArm64Error::Reg {
        op,
        id,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}
