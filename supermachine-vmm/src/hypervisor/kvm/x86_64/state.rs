//! Saving and restoring what KVM holds for a VM and its vCPUs (snapshots).
//!
//! The state is kept in KVM's own structures (kvm-bindings serialises them as raw bytes) and
//! crosses the hypervisor boundary only as an opaque [`HvState`] blob, so nothing outside the
//! backend names a KVM type. The order of the set calls follows what KVM needs: CPUID before
//! anything that depends on the feature set, sregs (APIC base) before the LAPIC, MSRs after the
//! LAPIC (TSC-deadline needs it) and the TSC before the TSC deadline, events last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::hypervisor::kvm::blob::{decode, encode};
use crate::hypervisor::kvm::call_err;
use crate::hypervisor::{HvError, HvState};

/// IA32_TSC: written before the TSC deadline so the deadline is relative to the restored TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: KVM only accepts it once the TSC and the LAPIC are in place.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Bumped whenever a field is added, removed or reinterpreted.
const VCPU_STATE_VERSION: u32 = 1;
const VM_STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct VcpuState {
    version: u32,
    cpuid: Vec<kvm_cpuid_entry2>,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    tsc_khz: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct VmState {
    version: u32,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC.
    irqchips: Vec<kvm_irqchip>,
}

/// Reads every MSR in `index` that this vCPU can read. `KVM_GET_MSRS` stops at the first MSR
/// it cannot read (the index list names MSRs the host supports, not all of which every vCPU
/// model exposes), so that one is skipped and the read resumes after it.
fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, HvError> {
    let mut out = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| HvError::Unsupported {
            what: format!("{} MSRs in one call", entries.len()),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(call_err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(entries.len())]);
        if read < rest.len() {
            tracing::trace!(msr = format_args!("{:#x}", rest[read]), "MSR not readable");
        }
        rest = rest.get(read + 1..).unwrap_or_default();
    }
    // The TSC first, the TSC deadline last (see the module docs).
    out.sort_by_key(|m| match m.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    Ok(out)
}

/// Saves one vCPU.
pub(in crate::hypervisor::kvm) fn save_vcpu(
    fd: &VcpuFd,
    arch: &super::ArchData,
    _id: u32,
) -> Result<HvState, HvError> {
    let mp_state = fd.get_mp_state().map_err(call_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(call_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(call_err("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(call_err("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(call_err("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(call_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(call_err("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(call_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, &arch.msr_index)?;
    let events = fd
        .get_vcpu_events()
        .map_err(call_err("KVM_GET_VCPU_EVENTS"))?;
    encode(&VcpuState {
        version: VCPU_STATE_VERSION,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// Loads a saved vCPU into a fresh one.
pub(in crate::hypervisor::kvm) fn restore_vcpu(
    fd: &VcpuFd,
    state: &HvState,
) -> Result<(), HvError> {
    let s: VcpuState = decode(state, "vCPU")?;
    if s.version != VCPU_STATE_VERSION {
        return Err(HvError::BadState(format!(
            "vCPU state version {} (this build reads {VCPU_STATE_VERSION})",
            s.version
        )));
    }
    if let Some(khz) = s.tsc_khz {
        // Only a different host needs the guest TSC rate scaled; a refusal is survivable (the
        // guest's clocksource recalibrates through kvmclock) but worth a warning.
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!(khz, errno = e.errno(), "could not set the saved TSC rate");
            }
        }
    }
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| HvError::Unsupported {
        what: format!("{} CPUID entries", s.cpuid.len()),
    })?;
    fd.set_cpuid2(&cpuid).map_err(call_err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(call_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(call_err("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(call_err("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` (4 KiB) as KVM_GET_XSAVE returned it; no
    // trailing dynamic features (AMX) are saved, so the legacy-sized ioctl reads no further.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(call_err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(call_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(call_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(call_err("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| HvError::Unsupported {
        what: format!("{} MSRs in one call", s.msrs.len()),
    })?;
    let set = fd.set_msrs(&msrs).map_err(call_err("KVM_SET_MSRS"))?;
    if set != s.msrs.len() {
        return Err(HvError::MsrRefused {
            set,
            total: s.msrs.len(),
            refused: s.msrs[set].index,
        });
    }
    fd.set_vcpu_events(&s.events)
        .map_err(call_err("KVM_SET_VCPU_EVENTS"))
}

/// Saves the VM-wide state.
pub(in crate::hypervisor::kvm) fn save_vm(
    fd: &VmFd,
    _: &super::VmData,
) -> Result<HvState, HvError> {
    let pit = fd.get_pit2().map_err(call_err("KVM_GET_PIT2"))?;
    let mut clock = fd.get_clock().map_err(call_err("KVM_GET_CLOCK"))?;
    // KVM_SET_CLOCK rejects the informational flags KVM_GET_CLOCK reports (TSC_STABLE, ...).
    clock.flags = 0;
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip)
            .map_err(call_err("KVM_GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    encode(&VmState {
        version: VM_STATE_VERSION,
        pit,
        clock,
        irqchips,
    })
}

/// Loads the VM-wide state into a fresh VM (irqchip and PIT already created).
pub(in crate::hypervisor::kvm) fn restore_vm(
    fd: &VmFd,
    _: &super::VmData,
    state: &HvState,
) -> Result<(), HvError> {
    let s: VmState = decode(state, "VM")?;
    if s.version != VM_STATE_VERSION {
        return Err(HvError::BadState(format!(
            "VM state version {} (this build reads {VM_STATE_VERSION})",
            s.version
        )));
    }
    fd.set_pit2(&s.pit).map_err(call_err("KVM_SET_PIT2"))?;
    fd.set_clock(&s.clock).map_err(call_err("KVM_SET_CLOCK"))?;
    for chip in &s.irqchips {
        fd.set_irqchip(chip).map_err(call_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::kvm::blob::BACKEND;

    #[test]
    fn foreign_backend_blobs_are_refused() {
        let state = HvState {
            backend: "hvf".into(),
            bytes: vec![1, 2, 3],
        };
        let err = decode::<VmState>(&state, "VM").err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("hvf")));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let state = HvState {
            backend: BACKEND.into(),
            bytes: vec![0xff; 17],
        };
        assert!(decode::<VcpuState>(&state, "vCPU").is_err());
        assert!(decode::<VmState>(&state, "VM").is_err());
    }
}
