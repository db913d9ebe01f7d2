//! The x86-64 part of the KVM backend: the PC interrupt controllers and PIT, CPUID, MSRs and
//! the register file ([`ArchVcpu`]), and the saved state (`state.rs`).

mod state;

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_pit_config,
    kvm_regs, kvm_segment, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

pub(super) use self::state::{restore_vcpu, restore_vm, save_vcpu, save_vm};
use super::{call_err, KvmHypervisor, KvmVcpu};
use crate::hypervisor::x86_64::{
    ArchHypervisor, ArchVcpu, CpuidEntry, DescriptorTable, FpuControl, LapicState, MsrEntry, Regs,
    Segment, SpecialRegs, LAPIC_REGS_SIZE,
};
use crate::hypervisor::HvError;

/// The x86 capabilities this VMM relies on, beyond the neutral ones.
pub(super) const REQUIRED_CAPS: &[(Cap, &str)] = &[(Cap::Pit2, "KVM_CAP_PIT2")];

/// Where KVM puts the 3-page TSS it needs for real-mode emulation on Intel without "unrestricted
/// guest": just below the 4 GiB boundary, inside the MMIO hole, where no RAM or device lives.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// CPUID.1:ECX bit 24, TSC-deadline timer. KVM reports the in-kernel LAPIC's support through
/// `KVM_CAP_TSC_DEADLINE_TIMER` instead of `KVM_GET_SUPPORTED_CPUID`.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// What the x86 backend keeps per host, shared by its VMs and vCPUs.
#[derive(Clone)]
pub(super) struct ArchData {
    /// The MSRs a snapshot saves: every MSR KVM can save or emulate (KVM_GET_MSR_INDEX_LIST).
    pub(super) msr_index: Arc<[u32]>,
    /// Whether the in-kernel LAPIC has the TSC-deadline timer.
    tsc_deadline: bool,
}

impl ArchData {
    pub(super) fn new(kvm: &Kvm) -> Result<Self, HvError> {
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(call_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .into();
        Ok(ArchData {
            msr_index,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        })
    }
}

/// Nothing per VM beyond KVM's own state.
#[derive(Default)]
pub(super) struct VmData;

/// The in-kernel IOAPIC takes irqfds as soon as it exists.
pub(super) const IRQFD_AFTER_VCPUS: bool = false;

/// Nothing to do per vCPU at creation (`arch::x86_64` sets it up on its thread).
pub(super) fn setup_vcpu(
    _: &VmFd,
    _: &VmData,
    _: &kvm_ioctls::VcpuFd,
    _: u32,
) -> Result<(), HvError> {
    Ok(())
}

/// The irqchip was complete before the vCPUs.
pub(super) fn vcpus_created(_: &VmFd, _: &VmData) -> Result<(), HvError> {
    Ok(())
}

/// What every new x86 VM needs before anything else.
pub(super) fn setup_vm(fd: &VmFd) -> Result<(), HvError> {
    fd.set_tss_address(TSS_ADDRESS)
        .map_err(call_err("KVM_SET_TSS_ADDR"))
}

/// PIC, IOAPIC and local APICs in the kernel, and the PIT.
pub(super) fn create_irqchip(fd: &VmFd) -> Result<(), HvError> {
    fd.create_irq_chip()
        .map_err(call_err("KVM_CREATE_IRQCHIP"))?;
    // A dummy PC speaker port (0x61) lets the guest's PIT calibration poll it in-kernel.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(call_err("KVM_CREATE_PIT2"))
}

/// `RIP`.
pub(super) fn instruction_pointer(fd: &kvm_ioctls::VcpuFd) -> Result<u64, HvError> {
    Ok(fd.get_regs().map_err(call_err("KVM_GET_REGS"))?.rip)
}

impl ArchHypervisor for KvmHypervisor {
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HvError> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(call_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = self.arch.tsc_deadline;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| {
                let mut entry = CpuidEntry {
                    function: e.function,
                    index: e.index,
                    significant_index: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                    eax: e.eax,
                    ebx: e.ebx,
                    ecx: e.ecx,
                    edx: e.edx,
                };
                if entry.function == 1 && tsc_deadline {
                    entry.ecx |= CPUID_1_ECX_TSC_DEADLINE;
                }
                entry
            })
            .collect())
    }
}

impl ArchVcpu for KvmVcpu {
    fn regs(&self) -> Result<Regs, HvError> {
        let r = self.fd.get_regs().map_err(call_err("KVM_GET_REGS"))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&self, r: &Regs) -> Result<(), HvError> {
        let regs = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd.set_regs(&regs).map_err(call_err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegs, HvError> {
        let s = self.fd.get_sregs().map_err(call_err("KVM_GET_SREGS"))?;
        Ok(SpecialRegs {
            cs: seg_from_kvm(&s.cs),
            ds: seg_from_kvm(&s.ds),
            es: seg_from_kvm(&s.es),
            fs: seg_from_kvm(&s.fs),
            gs: seg_from_kvm(&s.gs),
            ss: seg_from_kvm(&s.ss),
            tr: seg_from_kvm(&s.tr),
            ldt: seg_from_kvm(&s.ldt),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_sregs(&self, s: &SpecialRegs) -> Result<(), HvError> {
        // Start from the current state so what the neutral type does not carry (the pending
        // interrupt bitmap) is preserved.
        let mut k = self.fd.get_sregs().map_err(call_err("KVM_GET_SREGS"))?;
        k.cs = seg_to_kvm(&s.cs);
        k.ds = seg_to_kvm(&s.ds);
        k.es = seg_to_kvm(&s.es);
        k.fs = seg_to_kvm(&s.fs);
        k.gs = seg_to_kvm(&s.gs);
        k.ss = seg_to_kvm(&s.ss);
        k.tr = seg_to_kvm(&s.tr);
        k.ldt = seg_to_kvm(&s.ldt);
        k.gdt = kvm_dtable {
            base: s.gdt.base,
            limit: s.gdt.limit,
            ..Default::default()
        };
        k.idt = kvm_dtable {
            base: s.idt.base,
            limit: s.idt.limit,
            ..Default::default()
        };
        k.cr0 = s.cr0;
        k.cr2 = s.cr2;
        k.cr3 = s.cr3;
        k.cr4 = s.cr4;
        k.cr8 = s.cr8;
        k.efer = s.efer;
        k.apic_base = s.apic_base;
        self.fd.set_sregs(&k).map_err(call_err("KVM_SET_SREGS"))
    }

    fn set_fpu(&self, fpu: &FpuControl) -> Result<(), HvError> {
        let k = kvm_fpu {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd.set_fpu(&k).map_err(call_err("KVM_SET_FPU"))
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<(), HvError> {
        let kvm_entries: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: if e.significant_index {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries).map_err(|_| HvError::Unsupported {
            what: format!("{} CPUID entries", entries.len()),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(call_err("KVM_SET_CPUID2"))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<(), HvError> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|_| HvError::Unsupported {
            what: format!("{} MSRs in one call", msrs.len()),
        })?;
        // KVM_SET_MSRS returns how many it set, stopping at the first it refuses.
        let set = self
            .fd
            .set_msrs(&kvm_msrs)
            .map_err(call_err("KVM_SET_MSRS"))?;
        if set != msrs.len() {
            return Err(HvError::MsrRefused {
                set,
                total: msrs.len(),
                refused: msrs[set].index,
            });
        }
        Ok(())
    }

    fn lapic(&self) -> Result<LapicState, HvError> {
        let k = self.fd.get_lapic().map_err(call_err("KVM_GET_LAPIC"))?;
        let mut state = LapicState::default();
        for (dst, src) in state.regs.iter_mut().zip(k.regs.iter()) {
            *dst = *src as u8;
        }
        Ok(state)
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<(), HvError> {
        let mut k = kvm_lapic_state::default();
        debug_assert_eq!(k.regs.len(), LAPIC_REGS_SIZE);
        for (dst, src) in k.regs.iter_mut().zip(lapic.regs.iter()) {
            *dst = *src as std::os::raw::c_char;
        }
        self.fd.set_lapic(&k).map_err(call_err("KVM_SET_LAPIC"))
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip() {
        let s = Segment {
            base: 0x1234,
            limit: 0xfffff,
            selector: 0x10,
            type_: 3,
            present: true,
            dpl: 0,
            db: true,
            s: true,
            l: false,
            g: true,
            avl: false,
            unusable: false,
        };
        assert_eq!(seg_from_kvm(&seg_to_kvm(&s)), s);
    }
}
