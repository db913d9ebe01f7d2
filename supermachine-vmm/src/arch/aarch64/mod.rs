//! The arm64 platform: what an arm64 guest finds at which address, how it learns that (the
//! flattened device tree) and how its kernel `Image` is placed. `arch/mod.rs` lists what every
//! platform provides; this module provides it for arm64.
//!
//! Hypervisor-neutral: nothing here calls KVM (or Hypervisor.framework); the KVM arm64 pieces
//! (vCPU init, boot registers, the in-kernel GICv3, snapshots) live in `hypervisor/kvm/aarch64`
//! and take their addresses from [`layout`].
//!
//! * **Memory**: RAM from [`RAM_START`] (2 GiB); devices below it ([`layout`]).
//! * **Interrupts**: a line is a GIC SPI number: the console UART has
//!   [`layout::SERIAL_SPI`], virtio-mmio slot *i* has `VIRTIO_SPI_BASE + i`.
//! * **Devices**: announced in the device tree only (the command line names none); the console
//!   is a 16550 on the MMIO bus (there is no port I/O on arm64).
//! * **Boot**: the `Image` at the start of RAM, the initrd and the device tree at the end
//!   (`layout::place_boot`); vCPU 0 enters the kernel with X0 = the tree, the others stay
//!   powered off until the guest starts them with PSCI `CPU_ON`.
//!
//! Compiled on every host for its unit tests; the machine uses it only on arm64 hosts.

#![cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]

pub mod fdt;
pub mod image;
pub mod layout;

use std::fs::File;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{mem_err, BootError, BootSpec, PlatformContext, PlatformDevices, VirtioMmioDevice};
use crate::devices::serial::Serial;
#[cfg(target_arch = "aarch64")]
use crate::hypervisor::HvVcpu;
use crate::hypervisor::{HvError, Hypervisor};

/// This architecture's name, as snapshots record it.
pub const ARCH: &str = "aarch64";

/// Guest RAM starts at 2 GiB.
pub const RAM_START: u64 = layout::RAM_START;
/// Virtio-mmio slot *i* lives at `MMIO_BASE + i * 0x1000`.
pub const MMIO_BASE: u64 = layout::VIRTIO_MMIO_BASE;
/// The largest RAM size, in MiB: what the machine's RAM size check allows (the layout itself
/// takes up to the 40-bit IPA limit; more than this is not a microVM).
pub const MAX_MEMORY_MIB: u32 = 64 << 10;
/// The most vCPUs the redistributor window holds.
pub const MAX_VCPUS: u32 = layout::MAX_VCPUS;

/// The kernel command line every machine starts with (the config's `cmdline` comes last and
/// can override these):
///
/// * `console=ttyS0` — the 16550 the device tree names (`of_serial` registers it with the 8250
///   core as ttyS0; the `serial0` alias fixes the number).
/// * `panic=-1` — reboot at once on a kernel panic (PSCI `SYSTEM_RESET`, reported as a panic
///   exit), so a panicking guest exits instead of hanging.
///
/// Not needed: `reboot=k` (arm64 reboots through PSCI), `8250.nr_uarts` (only the UARTs the
/// tree lists exist).
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1";

/// arm64 `COMMAND_LINE_SIZE`, including the terminating NUL.
const CMDLINE_MAX: usize = 2048;

/// The SPI of virtio-mmio slot `index`, or `None` past the last slot.
pub(crate) fn virtio_irq(index: u32) -> Option<u32> {
    layout::virtio_slot(index).map(|slot| slot.spi)
}

/// No host needs guest workarounds on arm64.
pub(crate) fn host_cmdline() -> Option<&'static str> {
    None
}

/// Nothing to warn about on arm64.
pub(crate) fn warn_host_limits(_vcpus: u32) {}

/// Devices are announced in the device tree ([`load_kernel`]), not on the command line.
pub(crate) fn cmdline_device_entries(_devices: &[VirtioMmioDevice]) -> Vec<String> {
    Vec::new()
}

/// What the kernel accepts: printable ASCII, shorter than `COMMAND_LINE_SIZE`.
pub(crate) fn validate_cmdline(cmdline: &str) -> Result<(), BootError> {
    super::validate_printable_cmdline(cmdline, CMDLINE_MAX)
}

/// The console UART on the MMIO bus with its SPI.
pub(crate) fn add_platform_devices(
    ctx: PlatformContext<'_>,
) -> Result<PlatformDevices, crate::Error> {
    let irq = ctx.vm.interrupt_line(layout::SERIAL_SPI)?;
    let serial = Arc::new(Mutex::new(Serial::new(ctx.console, irq)));
    ctx.mmio
        .insert(layout::SERIAL.base, layout::SERIAL.size, serial.clone())?;
    // Nothing on arm64 asks for power events through a device: PSCI goes through the hypervisor.
    drop(ctx.power);
    Ok(PlatformDevices { serial })
}

/// No port I/O on arm64, so nothing is routine.
pub(crate) fn is_quiet_port(_addr: u64) -> bool {
    false
}

/// The MPIDR_EL1 of vCPU `index` as the platform describes it in the device tree: Aff0 the low 4
/// bits of the index, Aff1 the next 8, Aff2 the next 8 (KVM assigns exactly this; the KVM
/// backend checks it on every vCPU, and another hypervisor sets it).
pub(crate) fn mpidr(index: u32) -> u64 {
    let index = u64::from(index);
    (index & 0xf) | (((index >> 4) & 0xff) << 8) | (((index >> 12) & 0xff) << 16)
}

/// Where the kernel was put: what vCPU 0 starts with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BootImage {
    /// The kernel's first byte (PC).
    entry: u64,
    /// The device tree (X0).
    dtb: u64,
}

/// Loads the `Image`, the initramfs and the device tree describing the machine.
pub(crate) fn load_kernel(
    mem: &GuestMemoryMmap,
    spec: &BootSpec<'_>,
) -> Result<BootImage, BootError> {
    let ram_size: u64 = mem.iter().map(|r| r.len()).sum();
    let mut file = File::open(spec.kernel).map_err(|source| BootError::KernelOpen {
        path: spec.kernel.to_owned(),
        source,
    })?;
    let load_err = |reason: String| BootError::KernelLoad {
        path: spec.kernel.to_owned(),
        format: "an arm64 Image",
        reason,
    };
    let len = file
        .metadata()
        .map_err(|source| BootError::KernelOpen {
            path: spec.kernel.to_owned(),
            source,
        })?
        .len();
    let loaded = image::load(mem, ram_size, &mut file, len)
        .map_err(|e| load_err(crate::error::flatten(&e)))?;

    let initrd = match spec.initramfs {
        Some(path) => Some(
            std::fs::read(path).map_err(|source| BootError::InitramfsRead {
                path: path.to_owned(),
                source,
            })?,
        ),
        None => None,
    };
    let placement = layout::place_boot(
        ram_size,
        loaded.header.text_offset,
        loaded.header.footprint(len),
        initrd.as_ref().map(|i| i.len() as u64),
    )
    .map_err(|e| match (&initrd, spec.initramfs) {
        (Some(bytes), Some(path)) => BootError::InitramfsTooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
            available: ram_size.saturating_sub(loaded.end - RAM_START),
        },
        _ => load_err(e.to_string()),
    })?;
    let initrd_range = match (&initrd, placement.initrd) {
        (Some(bytes), Some(at)) => {
            mem.write_slice(bytes, GuestAddress(at))
                .map_err(mem_err("initramfs"))?;
            Some(at..at + bytes.len() as u64)
        }
        _ => None,
    };

    let mpidrs: Vec<u64> = (0..spec.vcpus).map(mpidr).collect();
    let virtio: Vec<layout::VirtioSlot> = spec
        .devices
        .iter()
        .map(|d| layout::VirtioSlot {
            index: ((d.base - MMIO_BASE) / layout::VIRTIO_MMIO_SLOT_SIZE) as u32,
            mmio: layout::MmioRange {
                base: d.base,
                size: d.size,
            },
            spi: d.irq,
        })
        .collect();
    let dtb = fdt::build(&fdt::FdtConfig {
        ram_size,
        mpidrs: &mpidrs,
        bootargs: spec.cmdline,
        initrd: initrd_range,
        virtio: &virtio,
    })
    .map_err(|e| BootError::GuestMemory {
        what: "device tree",
        reason: crate::error::flatten(&e),
    })?;
    mem.write_slice(&dtb, GuestAddress(placement.dtb))
        .map_err(mem_err("device tree"))?;
    Ok(BootImage {
        entry: loaded.entry,
        dtb: placement.dtb,
    })
}

/// What every vCPU gets before its first run.
#[derive(Debug)]
pub(crate) struct VcpuInit {
    image: BootImage,
}

/// Nothing to ask the hypervisor: the boot registers come from the image.
pub(crate) fn vcpu_init(
    _hv: &dyn Hypervisor,
    image: &BootImage,
    _total: u32,
) -> Result<VcpuInit, HvError> {
    Ok(VcpuInit { image: *image })
}

/// Checks the vCPU's MPIDR is the one the device tree names, and points vCPU 0 at the kernel
/// (the others wait, powered off, for the guest's PSCI `CPU_ON`, which sets their entry).
#[cfg(target_arch = "aarch64")]
pub(crate) fn configure_vcpu(vcpu: &mut dyn HvVcpu, init: &VcpuInit) -> Result<(), BootError> {
    let id = vcpu.id();
    let wrap = |source| BootError::Vcpu { id, source };
    let actual = vcpu.mpidr().map_err(wrap)? & fdt::MPIDR_HWID_MASK;
    if actual != mpidr(id) {
        return Err(wrap(HvError::Unsupported {
            what: format!("vCPU {id} with MPIDR {:#x} (it has {actual:#x})", mpidr(id)),
        }));
    }
    if id == 0 {
        vcpu.set_boot_regs(init.image.entry, init.image.dtb)
            .map_err(wrap)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpidrs_follow_kvm_affinity_packing() {
        assert_eq!(mpidr(0), 0);
        assert_eq!(mpidr(15), 0xf);
        assert_eq!(mpidr(16), 0x100);
        assert_eq!(mpidr(0x1234), 0x01_2304);
    }

    #[test]
    fn virtio_slots_use_spis_from_16() {
        assert_eq!(virtio_irq(0), Some(layout::VIRTIO_SPI_BASE));
        assert_eq!(virtio_irq(layout::MAX_VIRTIO_SLOTS), None);
        assert!(cmdline_device_entries(&[VirtioMmioDevice {
            base: MMIO_BASE,
            size: 0x1000,
            irq: 16
        }])
        .is_empty());
    }
}
