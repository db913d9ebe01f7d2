//! Saving and restoring an arm64 vCPU.
//!
//! KVM lists every register userspace may save (`KVM_GET_REG_LIST`): the core registers
//! (X0..X30, SP, PC, PSTATE, SP_EL1, ELR_EL1, the SPSRs, V0..V31, FPSR, FPCR), the system
//! registers (the EL1 translation, exception and ID registers, the generic timer's CTL, CVAL and
//! counter) and the firmware pseudo-registers (PSCI version, SMCCC workarounds). Saving all of
//! them by id, rather than a hand-picked set, keeps up with whatever the host's KVM adds. Writing
//! the virtual counter back makes KVM offset it, so the guest's time continues from where it
//! stopped.

use kvm_bindings::{kvm_mp_state, RegList};
use kvm_ioctls::{reg_size, VcpuFd};
use serde::{Deserialize, Serialize};

use super::{regs::reg_err, KvmArm64Error};

/// Capacity of kvm-bindings' `RegList` (its `ARM64_REGS_MAX`); KVM lists about 250 registers on
/// a vCPU without SVE.
const REG_LIST_CAPACITY: usize = 500;

/// Widest register saved: the 128-bit FP/SIMD V registers. SVE's wider ones only exist when the
/// vCPU is created with SVE, which this VMM never asks for.
const MAX_REG_BYTES: usize = 16;

/// One register's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegValue {
    /// KVM register id (encodes the register and its width).
    pub id: u64,
    /// Little-endian value, as wide as the id says.
    pub value: Vec<u8>,
}

/// Everything KVM holds for one arm64 vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The `KVM_ARM_VCPU_INIT` features it was created with (restore initialises the new vCPU
    /// with the same ones).
    pub features: [u32; 7],
    /// `KVM_MP_STATE_RUNNABLE`, `_STOPPED` (powered off by PSCI) or `_SUSPENDED`.
    pub mp_state: u32,
    /// Every register KVM listed, in its order.
    pub regs: Vec<RegValue>,
}

/// The ids of every register KVM lets userspace save for `vcpu`.
pub fn reg_ids(vcpu: &VcpuFd) -> Result<Vec<u64>, KvmArm64Error> {
    // Cannot fail: the capacity is RegList's own maximum.
    let mut list = RegList::new(REG_LIST_CAPACITY).expect("RegList capacity within its maximum");
    vcpu.get_reg_list(&mut list)
        .map_err(KvmArm64Error::call("KVM_GET_REG_LIST"))?;
    Ok(list.as_slice().to_vec())
}

/// Saves `vcpu`, which was initialised with `features`. Call between two runs, after a pending
/// MMIO exit was completed (a run with `immediate_exit` set), so the PC is past the access.
pub fn save(vcpu: &VcpuFd, features: [u32; 7]) -> Result<VcpuState, KvmArm64Error> {
    let ids = reg_ids(vcpu)?;
    let mut regs = Vec::with_capacity(ids.len());
    for id in ids {
        let bytes = reg_size(id);
        if bytes > MAX_REG_BYTES {
            return Err(KvmArm64Error::RegTooWide { id, bytes });
        }
        let mut value = vec![0u8; bytes];
        vcpu.get_one_reg(id, &mut value)
            .map_err(reg_err("KVM_GET_ONE_REG", id))?;
        regs.push(RegValue { id, value });
    }
    let mp_state = vcpu
        .get_mp_state()
        .map_err(KvmArm64Error::call("KVM_GET_MP_STATE"))?
        .mp_state;
    Ok(VcpuState {
        features,
        mp_state,
        regs,
    })
}

/// Loads `state` into `vcpu`, a fresh vCPU with the same index that was initialised with
/// `state.features`.
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), KvmArm64Error> {
    for reg in &state.regs {
        if reg.value.len() != reg_size(reg.id) {
            return Err(KvmArm64Error::Mismatch {
                what: "register width",
                saved: reg.value.len() as u64,
                here: reg_size(reg.id) as u64,
            });
        }
        vcpu.set_one_reg(reg.id, &reg.value)
            .map_err(reg_err("KVM_SET_ONE_REG", reg.id))?;
    }
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(KvmArm64Error::call("KVM_SET_MP_STATE"))
}
