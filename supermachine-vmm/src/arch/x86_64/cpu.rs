//! Per-vCPU architectural boot state: CPUID, MSRs, registers, FPU, LAPIC.

use crate::hypervisor::x86_64::{
    CpuidEntry, DescriptorTable, FpuControl, LapicState, MsrEntry, Regs, SpecialRegs,
};

use super::gdt;
use super::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

// CPUID bits.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xb/0x1f level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The supported CPUID table, adjusted for vCPU `id` of `total`: APIC ids (leaf 1, 0xb, 0x1f),
/// the topology (one thread per core, `total` cores in one package), the hypervisor bit, and no
/// architectural PMU (leaf 0xa zeroed: a microVM has no use for guest perf counters, and on PVM
/// hosts every PMU MSR access traps).
pub(super) fn cpuid_for_vcpu(supported: &[CpuidEntry], id: u32, total: u32) -> Vec<CpuidEntry> {
    let apic_id = id & 0xff;
    // Bits needed to number `total` cores (x2APIC id shift of the core level).
    let core_bits = u32::BITS - (total.max(1) - 1).leading_zeros();
    supported
        .iter()
        .map(|&e| {
            let mut e = e;
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((total.min(255)) << 16);
                    e.ecx |= LEAF1_ECX_HYPERVISOR;
                    if total > 1 {
                        e.edx |= LEAF1_EDX_HTT;
                    } else {
                        e.edx &= !LEAF1_EDX_HTT;
                    }
                }
                4 => {
                    // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache
                    // - 1 (shared by the package from L3 up, private below).
                    let level = (e.eax >> 5) & 0x7;
                    let sharing = if level >= 3 {
                        total.saturating_sub(1)
                    } else {
                        0
                    };
                    e.eax = (e.eax & 0x3fff)
                        | ((sharing & 0xfff) << 14)
                        | ((total.saturating_sub(1) & 0x3f) << 26);
                }
                0xa => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                0xb | 0x1f => {
                    e.edx = id;
                    match e.index {
                        0 => {
                            e.eax = 0;
                            e.ebx = 1;
                            e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                        }
                        1 => {
                            e.eax = core_bits;
                            e.ebx = total;
                            e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                        }
                        _ => {
                            e.eax = 0;
                            e.ebx = 0;
                            e.ecx = e.index;
                        }
                    }
                }
                _ => {}
            }
            e
        })
        .collect()
}

// MSR numbers.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without it the guest would treat all of RAM
/// as uncacheable (matters on real hardware with device assignment; harmless otherwise).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// MSRs as firmware would leave them: syscall/sysenter MSRs cleared (a reused vCPU or a snapshot
/// must not leak old entry points), TSC at 0, fast strings on, MTRRs on with write-back default.
pub(super) fn boot_msrs() -> Vec<MsrEntry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| MsrEntry { index, data })
    .collect()
}

/// 64-bit boot protocol entry registers: RIP at the kernel entry, RSI = zero page, a small stack,
/// RFLAGS with only the always-one bit (interrupts off).
pub(super) fn boot_regs(entry: u64) -> Regs {
    Regs {
        rip: entry,
        rsi: ZERO_PAGE_ADDR,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rflags: 0x2,
        ..Default::default()
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Long mode with the boot GDT/IDT and page tables. Caches stay enabled (CD/NW clear); the
/// kernel writes its own CR0/CR4/EFER right away.
pub(super) fn set_long_mode(s: &mut SpecialRegs) {
    s.cs = gdt::segment(gdt::CODE_INDEX);
    let data = gdt::segment(gdt::DATA_INDEX);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = gdt::segment(gdt::TSS_INDEX);
    s.gdt = DescriptorTable {
        base: GDT_ADDR,
        limit: (gdt::TABLE.len() * 8 - 1) as u16,
    };
    s.idt = DescriptorTable {
        base: IDT_ADDR,
        limit: 7,
    };
    s.cr0 = CR0_PE | CR0_ET | CR0_PG;
    s.cr3 = PML4_ADDR;
    s.cr4 = CR4_PAE;
    s.efer = EFER_LME | EFER_LMA;
}

/// x87 control word with all exceptions masked (FNINIT's value), MXCSR likewise (reset value).
pub(super) const BOOT_FPU: FpuControl = FpuControl {
    fcw: 0x37f,
    mxcsr: 0x1f80,
};

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4 << 8;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;

/// Virtual-wire mode as the BIOS leaves it: the PIC behind LINT0 (ExtINT), NMI on LINT1 —
/// matching the MP table's local interrupt entries.
pub(super) fn set_lint_virtual_wire(lapic: &mut LapicState) {
    let lint0 = lapic.get(APIC_LVT_LINT0);
    lapic.set(
        APIC_LVT_LINT0,
        (lint0 & !APIC_DELIVERY_MODE_MASK) | APIC_MODE_EXTINT,
    );
    let lint1 = lapic.get(APIC_LVT_LINT1);
    lapic.set(
        APIC_LVT_LINT1,
        (lint1 & !APIC_DELIVERY_MODE_MASK) | APIC_MODE_NMI,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            significant_index: matches!(function, 4 | 0xb | 0x1f),
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0x0,
            edx: 0x0,
        }
    }

    #[test]
    fn cpuid_fixups_per_vcpu() {
        let supported = vec![
            leaf(0, 0),
            leaf(1, 0),
            leaf(4, 0),
            leaf(0xa, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
        ];
        for total in 1..=4u32 {
            for id in 0..total {
                let c = cpuid_for_vcpu(&supported, id, total);
                let l1 = c.iter().find(|e| e.function == 1).unwrap();
                assert_eq!(l1.ebx >> 24, id, "initial APIC id");
                assert_eq!((l1.ebx >> 16) & 0xff, total);
                assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
                assert_eq!(l1.edx & LEAF1_EDX_HTT != 0, total > 1);
                let pmu = c.iter().find(|e| e.function == 0xa).unwrap();
                assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
                for e in c.iter().filter(|e| e.function == 0xb) {
                    assert_eq!(e.edx, id, "x2APIC id in every 0xb sub-leaf");
                }
                let core = c
                    .iter()
                    .find(|e| e.function == 0xb && e.index == 1)
                    .unwrap();
                assert_eq!(core.ebx, total);
                assert!(1u32 << core.eax >= total, "core shift covers all cores");
                let l4 = c.iter().find(|e| e.function == 4).unwrap();
                assert_eq!(l4.eax >> 26, total - 1);
                // Untouched leaf.
                assert_eq!(c[0], supported[0]);
            }
        }
    }

    #[test]
    fn long_mode_sregs() {
        let mut s = SpecialRegs::default();
        set_long_mode(&mut s);
        assert_eq!(s.cs.selector, 8);
        assert!(s.cs.l);
        assert_eq!(s.ss.selector, 0x10);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn lint_pins() {
        let mut l = LapicState::default();
        l.set(APIC_LVT_LINT0, 0x1_0700); // masked, some mode
        set_lint_virtual_wire(&mut l);
        assert_eq!(l.get(APIC_LVT_LINT0), 0x1_0000 | APIC_MODE_EXTINT);
        assert_eq!(l.get(APIC_LVT_LINT1), APIC_MODE_NMI);
    }
}
