//! The PC platform: memory layout, IOAPIC interrupt numbering, COM1 and the i8042 on the
//! port-I/O bus, the kernel command line (devices are announced on it), and direct boot of a
//! 64-bit ELF `vmlinux` (no firmware): zero page/E820, MP table, page tables, GDT, and the CPUID,
//! MSR and LAPIC setup of each vCPU. `arch/mod.rs` lists what every platform provides.
//!
//! **Memory.** RAM is one region from guest physical 0 up to the configured size, which must
//! end at or below [`MMIO_BASE`]: the rest of the 32-bit space is the MMIO hole (virtio-mmio
//! slots, then the IOAPIC and LAPIC near 4 GiB). RAM above 4 GiB is not supported yet.
//!
//! **Interrupts.** Lines are IOAPIC pins (GSIs): COM1 has its ISA IRQ 4, virtio-mmio slot *i*
//! has `5 + i`, up to pin 23, so a machine has at most 19 virtio-mmio devices.
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
mod i8042;
mod kernel;
pub(crate) mod mptable;
mod paging;

use std::sync::{Arc, Mutex};

use super::{
    is_pvm_host, mem_err, BootError, BootSpec, PlatformContext, PlatformDevices, VirtioMmioDevice,
};
use crate::devices::serial::Serial;
use crate::hypervisor::{x86_64::CpuidEntry, HvError, HvVcpu, Hypervisor};

pub(crate) use kernel::{load as load_kernel, validate_cmdline, BootImage};

/// This architecture's name, as snapshots record it.
pub const ARCH: &str = "x86_64";

/// Guest RAM starts at guest physical 0.
pub const RAM_START: u64 = 0;
/// Start of the MMIO hole; virtio-mmio device *i* lives at `MMIO_BASE + i * 0x1000`.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// The largest RAM size that fits below the MMIO hole, in MiB.
pub const MAX_MEMORY_MIB: u32 = (MMIO_BASE >> 20) as u32;

/// The most vCPUs the MP table describes.
pub const MAX_VCPUS: u32 = mptable::MAX_CPUS;

/// The kernel command line every machine starts with (the config's `cmdline` is appended last,
/// so it can override any of these):
///
/// * `console=ttyS0` — kernel console on the 8250 at 0x3f8, i.e. the console log.
/// * `reboot=k` — reboot through the keyboard controller (0xFE to port 0x64), which the VMM turns
///   into a reset exit; the x86 default tries ACPI and EFI first, which do not exist here.
/// * `panic=-1` — reboot at once on a kernel panic, so a panicking guest exits instead of
///   hanging (reported as a panic exit).
/// * `8250.nr_uarts=1` — only ttyS0 exists; skips probing three absent legacy UARTs.
///
/// Not needed: `acpi=off`, `pci=off`, `nomodule` (compiled out of the guest kernel); `noapic`
/// would be wrong (virtio-mmio devices use IOAPIC pins 5..23).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1";

/// Appended on PVM hosts ([`is_pvm_host`]): see `guest/pvm-cmdline.txt` and the guest README's
/// table of its tokens. It hides CPU features PVM's instruction emulator cannot run, and makes
/// the guest keep time with kvm-clock, since PVM cannot offset the TSC a restored guest reads.
const PVM_CMDLINE: &str = include_str!("../../../guest/pvm-cmdline.txt");

/// COM1 base port.
const COM1_PORT: u16 = 0x3f8;
/// Number of UART registers (ports `0x3f8..0x400`).
const COM1_PORT_LEN: u16 = 8;
/// COM1's ISA IRQ (GSI).
const COM1_GSI: u32 = 4;

/// The highest GSI the IOAPIC has (24 pins).
const MAX_GSI: u32 = mptable::IOAPIC_PINS as u32 - 1;
/// GSI of virtio-mmio slot 0; slot *i* uses `FIRST_VIRTIO_GSI + i` (DESIGN.md).
const FIRST_VIRTIO_GSI: u32 = 5;

/// The GSI of virtio-mmio slot `index`, or `None` when the IOAPIC has no pin left for it.
pub(crate) fn virtio_irq(index: u32) -> Option<u32> {
    FIRST_VIRTIO_GSI
        .checked_add(index)
        .filter(|&gsi| gsi <= MAX_GSI)
}

/// The PVM workarounds on PVM hosts, nothing elsewhere.
pub(crate) fn host_cmdline() -> Option<&'static str> {
    if !is_pvm_host() {
        return None;
    }
    PVM_CMDLINE.lines().map(str::trim).find(|l| !l.is_empty())
}

/// Logs what this host will not do: under PVM only the first vCPU comes up.
pub(crate) fn warn_host_limits(vcpus: u32) {
    if vcpus > 1 && is_pvm_host() {
        // GUEST-KERNEL.md: secondary CPU bring-up hangs under PVM, so the PVM cmdline has
        // `maxcpus=1`; the other vCPUs exist but stay parked.
        tracing::warn!(vcpus, "PVM host: only one vCPU will run (maxcpus=1)");
    }
}

/// Devices are announced on the command line: `virtio_mmio.device=4K@<base>:<gsi>` each.
pub(crate) fn cmdline_device_entries(devices: &[VirtioMmioDevice]) -> Vec<String> {
    devices
        .iter()
        .map(|d| {
            debug_assert_eq!(d.size, 0x1000, "the entry says 4K");
            format!("virtio_mmio.device=4K@{:#x}:{}", d.base, d.irq)
        })
        .collect()
}

/// COM1 (with its IRQ 4) and the i8042's command port on the port-I/O bus.
pub(crate) fn add_platform_devices(
    ctx: PlatformContext<'_>,
) -> Result<PlatformDevices, crate::Error> {
    let irq = ctx.vm.interrupt_line(COM1_GSI)?;
    let serial = Arc::new(Mutex::new(Serial::new(ctx.console, irq)));
    ctx.pio.insert(
        u64::from(COM1_PORT),
        u64::from(COM1_PORT_LEN),
        serial.clone(),
    )?;
    ctx.pio.insert(
        u64::from(i8042::COMMAND_PORT),
        1,
        Arc::new(Mutex::new(i8042::I8042::new(ctx.power))),
    )?;
    Ok(PlatformDevices { serial })
}

/// Ports the guest probes without a device behind them; logged once each, not per access.
const QUIET_PORTS: &[u64] = &[
    0x80, // POST/debug port, used as an I/O delay
    0x60, // i8042 data (see i8042::STATUS)
    0x70, 0x71, // CMOS/RTC: not emulated, reads as absent
    0x2f8, 0x2f9, 0x2fa, 0x2fb, 0x2fc, 0x2fd, 0x2fe, 0x2ff, // COM2..4 probes
    0x3e8, 0x3e9, 0x3ea, 0x3eb, 0x3ec, 0x3ed, 0x3ee, 0x3ef, 0x2e8, 0x2e9, 0x2ea, 0x2eb, 0x2ec,
    0x2ed, 0x2ee, 0x2ef,
];

/// Whether an unhandled access to `addr` is one the guest makes routinely (see
/// [`QUIET_PORTS`]).
pub(crate) fn is_quiet_port(addr: u64) -> bool {
    QUIET_PORTS.contains(&addr)
}

/// What every vCPU gets before its first run, computed once per boot.
#[derive(Debug)]
pub(crate) struct VcpuInit {
    /// The hypervisor's CPUID, before per-vCPU fix-ups.
    supported_cpuid: Vec<CpuidEntry>,
    /// The 64-bit entry point.
    entry: u64,
    /// The vCPU count.
    total: u32,
}

/// Collects what [`configure_vcpu`] needs (the supported CPUID is one ioctl, not one per vCPU).
pub(crate) fn vcpu_init(
    hv: &dyn Hypervisor,
    image: &BootImage,
    total: u32,
) -> Result<VcpuInit, HvError> {
    Ok(VcpuInit {
        supported_cpuid: hv.supported_cpuid()?,
        entry: image.entry,
        total,
    })
}

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

/// Puts `vcpu` into the state the 64-bit boot protocol expects: CPUID, MSRs, long-mode registers
/// pointing at the kernel's entry, FPU, LAPIC virtual-wire LINT pins.
///
/// Every vCPU gets the same state; on x86 the in-kernel LAPIC keeps the application processors
/// waiting for INIT/SIPI until the guest starts them, which resets that state anyway.
pub(crate) fn configure_vcpu(vcpu: &mut dyn HvVcpu, init: &VcpuInit) -> Result<(), BootError> {
    let id = vcpu.id();
    let wrap = |source| BootError::Vcpu { id, source };
    // CPUID first: KVM validates CR4/EFER bits in the sregs against it.
    vcpu.set_cpuid(&cpu::cpuid_for_vcpu(&init.supported_cpuid, id, init.total))
        .map_err(wrap)?;
    vcpu.set_msrs(&cpu::boot_msrs()).map_err(wrap)?;
    vcpu.set_regs(&cpu::boot_regs(init.entry)).map_err(wrap)?;
    let mut sregs = vcpu.sregs().map_err(wrap)?;
    cpu::set_long_mode(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(wrap)?;
    vcpu.set_fpu(&cpu::BOOT_FPU).map_err(wrap)?;
    let mut lapic = vcpu.lapic().map_err(wrap)?;
    cpu::set_lint_virtual_wire(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(wrap)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_line_is_one_line() {
        assert_eq!(PVM_CMDLINE.trim().lines().count(), 1);
        assert!(PVM_CMDLINE.contains("maxcpus=1"));
    }

    #[test]
    fn virtio_slots_use_ioapic_pins_5_to_23() {
        assert_eq!(virtio_irq(0), Some(5));
        assert_eq!(virtio_irq(18), Some(23));
        assert_eq!(virtio_irq(19), None);
        assert_eq!(virtio_irq(u32::MAX), None);
    }

    #[test]
    fn devices_are_announced_on_the_cmdline() {
        let entries = cmdline_device_entries(&[VirtioMmioDevice {
            base: MMIO_BASE + 0x1000,
            size: 0x1000,
            irq: 6,
        }]);
        assert_eq!(entries, vec!["virtio_mmio.device=4K@0xd0001000:6"]);
    }
}
