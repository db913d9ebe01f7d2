//! The arm64 hooks of the KVM backend (`kvm/mod.rs` calls them as `arch::*`): vCPU init at
//! creation, the vGIC once every vCPU exists, saved state, and the [`ArchVcpu`] calls.
//!
//! Order (what KVM requires): every vCPU created and `KVM_ARM_VCPU_INIT`ed ([`setup_vcpu`]),
//! then the vGIC created and initialised ([`vcpus_created`]), then irqfds (KVM refuses them
//! before, hence [`IRQFD_AFTER_VCPUS`]). A restore loads the vCPUs' registers on their threads
//! first, and the vGIC state, handed over earlier by [`restore_vm`], once the vGIC exists.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::vgic::Vgic;
use super::vgic_state::VgicState;
use super::{regs, vcpu, vcpu_state, KvmArm64Error};
use crate::arch::aarch64::mpidr;
use crate::hypervisor::aarch64::{ArchHypervisor, ArchVcpu};
use crate::hypervisor::kvm::blob::{decode, encode};
use crate::hypervisor::kvm::{lock, KvmHypervisor, KvmVcpu};
use crate::hypervisor::{HvError, HvState};

/// The arm64 capabilities this VMM relies on, beyond the neutral ones.
pub(in crate::hypervisor::kvm) const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::DeviceCtrl, "KVM_CAP_DEVICE_CTRL"),
    (Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
    (Cap::OneReg, "KVM_CAP_ONE_REG"),
];

/// KVM takes irqfds only once the vGIC is initialised, after the vCPUs.
pub(in crate::hypervisor::kvm) const IRQFD_AFTER_VCPUS: bool = true;

/// Nothing per host.
#[derive(Clone)]
pub(in crate::hypervisor::kvm) struct ArchData;

impl ArchData {
    pub(in crate::hypervisor::kvm) fn new(_: &Kvm) -> Result<Self, HvError> {
        Ok(ArchData)
    }
}

/// Per VM: how many vCPUs exist, the vGIC once they all do, and vGIC state to load into it.
#[derive(Default)]
pub(in crate::hypervisor::kvm) struct VmData {
    vcpus: AtomicU32,
    vgic: OnceLock<Vgic>,
    pending_restore: Mutex<Option<VgicState>>,
}

impl VmData {
    fn mpidrs(&self) -> Vec<u64> {
        (0..self.vcpus.load(Ordering::SeqCst)).map(mpidr).collect()
    }
}

/// Maps an arm64 piece's error onto the neutral one.
fn arch_err(what: &'static str) -> impl FnOnce(KvmArm64Error) -> HvError {
    move |e| HvError::Arch {
        what,
        source: Box::new(e),
    }
}

/// Nothing before memory and vCPUs (the default 40-bit IPA space holds the layout).
pub(in crate::hypervisor::kvm) fn setup_vm(_: &VmFd) -> Result<(), HvError> {
    Ok(())
}

/// The vGIC needs the vCPUs: created in [`vcpus_created`].
pub(in crate::hypervisor::kvm) fn create_irqchip(_: &VmFd) -> Result<(), HvError> {
    Ok(())
}

/// `KVM_ARM_VCPU_INIT` with PSCI 0.2; every vCPU but 0 starts powered off.
pub(in crate::hypervisor::kvm) fn setup_vcpu(
    vm: &VmFd,
    data: &VmData,
    fd: &VcpuFd,
    id: u32,
) -> Result<(), HvError> {
    vcpu::init(vm, fd, vcpu::features(id == 0)).map_err(arch_err("initialising an arm64 vCPU"))?;
    data.vcpus.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Creates and initialises the vGIC for every vCPU, and loads saved vGIC state if a restore
/// handed some over.
pub(in crate::hypervisor::kvm) fn vcpus_created(vm: &VmFd, data: &VmData) -> Result<(), HvError> {
    let vcpus = data.vcpus.load(Ordering::SeqCst);
    let vgic = Vgic::create(vm, vcpus).map_err(|e| HvError::Arch {
        what: "creating the vGICv3",
        source: Box::new(e),
    })?;
    let vgic = data.vgic.get_or_init(|| vgic);
    if let Some(state) = lock(&data.pending_restore).take() {
        state
            .restore(vgic, &data.mpidrs())
            .map_err(arch_err("restoring the vGIC"))?;
    }
    Ok(())
}

/// The vGIC's registers (the timers are vCPU registers).
pub(in crate::hypervisor::kvm) fn save_vm(_: &VmFd, data: &VmData) -> Result<HvState, HvError> {
    let vgic = data.vgic.get().ok_or_else(|| {
        HvError::BadState("the VM has no vGIC yet (its vCPUs never all started)".into())
    })?;
    let state = VgicState::save(vgic, &data.mpidrs()).map_err(arch_err("saving the vGIC"))?;
    encode(&state)
}

/// Keeps the vGIC state until the vGIC exists ([`vcpus_created`]).
pub(in crate::hypervisor::kvm) fn restore_vm(
    _: &VmFd,
    data: &VmData,
    state: &HvState,
) -> Result<(), HvError> {
    let state: VgicState = decode(state, "vGIC")?;
    *lock(&data.pending_restore) = Some(state);
    Ok(())
}

/// `PC`.
pub(in crate::hypervisor::kvm) fn instruction_pointer(fd: &VcpuFd) -> Result<u64, HvError> {
    regs::get_u64(fd, regs::PC).map_err(arch_err("reading the PC"))
}

/// Every register KVM lists, and the MP state.
pub(in crate::hypervisor::kvm) fn save_vcpu(
    fd: &VcpuFd,
    _: &ArchData,
    id: u32,
) -> Result<HvState, HvError> {
    let state =
        vcpu_state::save(fd, vcpu::features(id == 0)).map_err(arch_err("saving an arm64 vCPU"))?;
    encode(&state)
}

/// Loads a saved vCPU into a fresh one (initialised at creation with the same features).
pub(in crate::hypervisor::kvm) fn restore_vcpu(
    fd: &VcpuFd,
    state: &HvState,
) -> Result<(), HvError> {
    let state: vcpu_state::VcpuState = decode(state, "vCPU")?;
    vcpu_state::restore(fd, &state).map_err(arch_err("restoring an arm64 vCPU"))
}

impl ArchHypervisor for KvmHypervisor {}

impl ArchVcpu for KvmVcpu {
    fn mpidr(&self) -> Result<u64, HvError> {
        vcpu::mpidr(&self.fd).map_err(arch_err("reading MPIDR_EL1"))
    }

    fn set_boot_regs(&self, entry: u64, dtb: u64) -> Result<(), HvError> {
        vcpu::set_boot_regs(&self.fd, entry, dtb).map_err(arch_err("setting the boot registers"))
    }
}
