//! Direct boot of a 64-bit ELF `vmlinux` (no firmware).
//!
//! **Entry point.** The kernel is entered at its ELF entry (`startup_64`) through the Linux 64-bit
//! boot protocol: the vCPU already in long mode with identity-mapped page tables, a flat GDT and
//! `RSI` = the zero page (`boot_params`). The kernel also carries a PVH note (a 32-bit entry,
//! protected mode, paging off, `RBX` = `hvm_start_info`). We use the 64-bit entry because:
//! * it is the one verified here first (QEMU's PVH boot also works on this host, so PVH is
//!   possible, not needed);
//! * the guest starts in the mode PVM hosts are built to run (PVM runs 64-bit guest kernels;
//!   a 32-bit phase with paging off only works there through emulation);
//! * the zero page is all the kernel needs (E820, cmdline, initrd), with no second boot-info
//!   format to maintain, and the same state is what a snapshot restore sets up later.
//!
//! Guest physical layout of the boot structures. Everything but the kernel and initramfs lives in
//! low memory, which the kernel reuses only after it has copied the zero page and cmdline and
//! switched to its own GDT and page tables; the MP table sits in the EBDA, which E820 marks
//! reserved, because the kernel reads it later:
//!
//! | address            | what                                                     |
//! |--------------------|----------------------------------------------------------|
//! | `0x500`            | GDT (null, code64, data, TSS)                            |
//! | `0x520`            | IDT (empty: any exception before the kernel's = triple fault) |
//! | `0x7000`           | zero page (`boot_params`, 4 KiB)                         |
//! | `0x8ff0`           | initial stack pointer (grows down)                       |
//! | `0x9000..0xf000`   | page tables: PML4, PDPT, 4 PDs (identity, 2 MiB pages, 4 GiB) |
//! | `0x20000`          | kernel command line (≤ 2 KiB)                            |
//! | `0x9fc00..`        | MP table (last KiB of base memory, where the kernel scans) |
//! | `0x100_0000..`     | kernel (its ELF physical addresses, 16 MiB)              |
//! | end of RAM         | initramfs, page aligned, ending at or below the end of RAM |

mod cpu;
mod gdt;
mod kernel;
pub(crate) mod mptable;
mod paging;

use std::path::PathBuf;

use crate::hypervisor::{x86_64::CpuidEntry, HvError, HvVcpu};

pub(crate) use kernel::{load, validate_cmdline, BootImage, BootSpec};

/// GDT location.
const GDT_ADDR: u64 = 0x500;
/// IDT location (one null descriptor).
const IDT_ADDR: u64 = 0x520;
/// Zero page (`struct boot_params`).
const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial `RSP`/`RBP`; the kernel switches to its own stack immediately.
const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 (then PDPT and PDs in the following pages).
const PML4_ADDR: u64 = 0x9000;
/// Kernel command line.
const CMDLINE_ADDR: u64 = 0x20000;
/// x86 `COMMAND_LINE_SIZE`, including the terminating NUL.
pub(crate) const CMDLINE_MAX: usize = 2048;
/// Start of the "extended BIOS data area": the last KiB of 640 KiB base memory. The kernel
/// scans it for the MP floating pointer.
const EBDA_START: u64 = 0x9fc00;
/// First address above the legacy hole (1 MiB); the kernel must load at or above it.
const HIMEM_START: u64 = 0x10_0000;

/// Booting failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be opened.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        /// Kernel path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a loadable x86-64 ELF `vmlinux` (a bzImage is not accepted).
    #[error("cannot load kernel {path} (need an x86-64 ELF vmlinux): {reason}")]
    KernelLoad {
        /// Kernel path.
        path: PathBuf,
        /// What linux-loader reported.
        reason: String,
    },
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    InitramfsRead {
        /// Initramfs path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of RAM.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest RAM above the kernel \
         ({available} bytes free): give the machine more memory"
    )]
    InitramfsTooLarge {
        /// Initramfs path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room between the kernel's end and the end of RAM.
        available: u64,
    },
    /// The command line is too long or has a byte the kernel cannot take.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Too many vCPUs for the MP table.
    #[error("{0} vCPUs do not fit the MP table (at most {max})", max = mptable::MAX_CPUS)]
    TooManyCpus(u32),
    /// Writing a boot structure into guest memory failed (RAM too small for the layout).
    #[error("writing {what} into guest memory failed: {reason}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// vm-memory's error.
        reason: String,
    },
    /// Setting a vCPU's boot state failed.
    #[error("setting up vCPU {id} for boot failed")]
    Vcpu {
        /// vCPU index.
        id: u32,
        /// Hypervisor error.
        #[source]
        source: HvError,
    },
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |e| BootError::GuestMemory {
        what,
        reason: e.to_string(),
    }
}

/// Puts vCPU `id` (of `total`) into the state the 64-bit boot protocol expects: CPUID, MSRs,
/// long-mode registers pointing at `image`'s entry, FPU, LAPIC virtual-wire LINT pins.
///
/// Every vCPU gets the same state; on x86 the in-kernel LAPIC keeps the application processors
/// waiting for INIT/SIPI until the guest starts them, which resets that state anyway.
pub(crate) fn configure_vcpu(
    vcpu: &dyn HvVcpu,
    total: u32,
    image: &BootImage,
    supported_cpuid: &[CpuidEntry],
) -> Result<(), BootError> {
    let id = vcpu.id();
    let wrap = |source| BootError::Vcpu { id, source };
    // CPUID first: KVM validates CR4/EFER bits in the sregs against it.
    vcpu.set_cpuid(&cpu::cpuid_for_vcpu(supported_cpuid, id, total))
        .map_err(wrap)?;
    vcpu.set_msrs(&cpu::boot_msrs()).map_err(wrap)?;
    vcpu.set_regs(&cpu::boot_regs(image.entry)).map_err(wrap)?;
    let mut sregs = vcpu.sregs().map_err(wrap)?;
    cpu::set_long_mode(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(wrap)?;
    vcpu.set_fpu(&cpu::BOOT_FPU).map_err(wrap)?;
    let mut lapic = vcpu.lapic().map_err(wrap)?;
    cpu::set_lint_virtual_wire(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(wrap)?;
    Ok(())
}
