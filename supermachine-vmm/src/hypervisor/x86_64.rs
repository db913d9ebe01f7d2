//! The x86-64 extension of the hypervisor boundary: architectural vCPU state in backend-neutral
//! types, and the extension traits ([`ArchHypervisor`], [`ArchVcpu`]) through which the x86
//! platform code (`arch/x86_64`) sets a vCPU up for boot.
//!
//! The types mirror what the CPU architecture defines (registers, segment descriptors, CPUID
//! leaves, MSRs, the local APIC register page), not any hypervisor's ABI: the boot code computes
//! them, and each backend converts them to its own structures (`kvm/x86_64` to `kvm_bindings`).

use super::HvError;

/// What an x86 hypervisor offers beyond the neutral [`Hypervisor`](super::Hypervisor).
pub trait ArchHypervisor {
    /// The CPUID leaves this hypervisor can virtualise, before per-vCPU fix-ups.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HvError>;
}

/// The x86 register file of a vCPU, beyond the neutral [`HvVcpu`](super::HvVcpu): what the
/// 64-bit boot protocol needs set before the first run.
pub trait ArchVcpu {
    /// General-purpose registers.
    fn regs(&self) -> Result<Regs, HvError>;
    /// Sets the general-purpose registers.
    fn set_regs(&self, regs: &Regs) -> Result<(), HvError>;
    /// Segment, control and table registers.
    fn sregs(&self) -> Result<SpecialRegs, HvError>;
    /// Sets segment, control and table registers.
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<(), HvError>;
    /// Loads the FPU control state (everything else zeroed).
    fn set_fpu(&self, fpu: &FpuControl) -> Result<(), HvError>;
    /// Sets the CPUID leaves the guest sees.
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<(), HvError>;
    /// Writes MSRs; all or an error naming the first one refused.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<(), HvError>;
    /// The local APIC register page.
    fn lapic(&self) -> Result<LapicState, HvError>;
    /// Sets the local APIC register page.
    fn set_lapic(&self, lapic: &LapicState) -> Result<(), HvError>;
}

/// General-purpose registers, instruction pointer and flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // register names are self-describing
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache, as the CPU holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Selector (GDT index * 8 | TI | RPL).
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (limit in 4 KiB units).
    pub g: bool,
    /// Available for system software.
    pub avl: bool,
    /// Not usable (null selector loaded).
    pub unusable: bool,
}

/// GDTR / IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit (size - 1).
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // register names are self-describing
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
}

/// The x87/SSE control state a vCPU starts with. Everything else in the FPU state is zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpuControl {
    /// x87 control word.
    pub fcw: u16,
    /// SSE control/status register.
    pub mxcsr: u32,
}

/// One CPUID leaf (or sub-leaf) as the guest will see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // register names are self-describing
pub struct CpuidEntry {
    /// EAX input.
    pub function: u32,
    /// ECX input; only meaningful when `significant_index` is set.
    pub index: u32,
    /// The leaf has sub-leaves selected by ECX.
    pub significant_index: bool,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// A model-specific register and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrEntry {
    /// MSR number (ECX of RDMSR/WRMSR).
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// Size of the local APIC register page as hypervisors expose it.
pub const LAPIC_REGS_SIZE: usize = 1024;

/// The local APIC register page (the first 1 KiB of the xAPIC MMIO page: 32-bit registers at
/// 16-byte strides).
#[derive(Clone, PartialEq, Eq)]
pub struct LapicState {
    /// Raw register bytes, little endian.
    pub regs: [u8; LAPIC_REGS_SIZE],
}

impl Default for LapicState {
    fn default() -> Self {
        LapicState {
            regs: [0; LAPIC_REGS_SIZE],
        }
    }
}

impl std::fmt::Debug for LapicState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LapicState").finish_non_exhaustive()
    }
}

impl LapicState {
    /// Reads the 32-bit register at byte offset `reg` (e.g. 0x350 for LVT LINT0).
    pub fn get(&self, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.regs[reg..reg + 4]);
        u32::from_le_bytes(b)
    }

    /// Writes the 32-bit register at byte offset `reg`.
    pub fn set(&mut self, reg: usize, value: u32) {
        self.regs[reg..reg + 4].copy_from_slice(&value.to_le_bytes());
    }
}
