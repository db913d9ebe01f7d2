//! The arm64 half of the KVM backend: what an arm64 VM needs beyond the neutral VM/vCPU calls.
//!
//! * [`vcpu`]: `KVM_ARM_VCPU_INIT` with the host's preferred target and PSCI 0.2 (secondaries
//!   powered off until the guest's PSCI `CPU_ON`), the boot registers, the vCPU's MPIDR.
//! * [`vgic`]: the in-kernel GICv3 (`KVM_DEV_TYPE_ARM_VGIC_V3`) at the addresses of
//!   [`layout`](crate::arch::aarch64::layout), and SPI injection.
//! * [`vcpu_state`], [`vgic_state`]: snapshot state as serde structs (bincode in the snapshot
//!   file): every register KVM lists for a vCPU (core, FP/SIMD, system, timer, firmware) and
//!   its MP state; the distributor, redistributor and CPU-interface registers of the vGIC.
//!
//! Exits need nothing arm64-specific: KVM decodes the guest's data aborts on unmapped addresses
//! into `KVM_EXIT_MMIO` (address, width, data) and turns PSCI `SYSTEM_OFF` / `SYSTEM_RESET`
//! into `KVM_EXIT_SYSTEM_EVENT` with `KVM_SYSTEM_EVENT_SHUTDOWN` / `_RESET`, which the backend's
//! neutral exit translation already maps; `tests.rs` checks both on real arm64 KVM. One arm64
//! rule the machine's exit loop must follow: KVM reports the power event only to the vCPU that
//! made the PSCI call (whichever CPU the guest panicked or powered off on) and parks every
//! other vCPU inside `KVM_RUN`, so an event from any vCPU ends the machine and the others must
//! be kicked out (`boot_test.rs` hung whenever the guest panicked on CPU 1 until it did this).
//!
//! `boot_test.rs` boots a real arm64 Linux with all of it (ignored unless
//! `SUPERMACHINE_KERNEL_AARCH64` names an `Image`).
//!
//! Order of a VM's creation (what KVM requires): create every vCPU and [`vcpu::init`] it, then
//! [`vgic::Vgic::create`] (its `CTRL_INIT` needs all vCPUs), then boot registers or
//! [`vcpu_state::restore`] + [`vgic_state::restore`], then run.

// Some helpers (SPI injection through KVM_IRQ_LINE, register accessors) serve the tests only.
#![cfg_attr(not(test), allow(dead_code))]

mod backend;
mod error;
pub mod regs;
pub mod vcpu;
pub mod vcpu_state;
pub mod vgic;
pub mod vgic_state;

#[cfg(test)]
mod boot_test;
#[cfg(test)]
mod tests;

pub(super) use backend::{
    create_irqchip, instruction_pointer, restore_vcpu, restore_vm, save_vcpu, save_vm, setup_vcpu,
    setup_vm, vcpus_created, ArchData, VmData, IRQFD_AFTER_VCPUS, REQUIRED_CAPS,
};
pub use error::KvmArm64Error;
