//! The arm64 guest-physical memory map and interrupt numbering.
//!
//! ```text
//! 0x0800_0000  GICv3 distributor        64 KiB
//! 0x0801_0000  GICv3 redistributors     128 KiB per vCPU (up to MAX_VCPUS)
//! 0x0900_0000  16550 UART               4 KiB, SPI 1
//! 0x0a00_0000  virtio-mmio slots        4 KiB each, slot i on SPI 16 + i
//! 0x8000_0000  RAM                      kernel at the start, initrd and DTB at the end
//! ```
//!
//! RAM starts at 2 GiB, as in Firecracker, rather than at QEMU virt's 1 GiB: every device sits in
//! the low 2 GiB (32-bit addressable, with room to grow), RAM is one contiguous region of any
//! size above them, and its base is 2 MiB aligned as the arm64 boot protocol wants for the
//! kernel. The GIC and UART addresses follow QEMU virt's, so a guest kernel that boots there finds
//! familiar ground.
//!
//! Interrupt numbers here are SPI numbers (GIC INTID − 32), the numbering the device tree uses.
//! On KVM they are also the GSI of an irqfd: without a routing table KVM maps GSI *n* to SPI *n*.

/// A range of guest-physical addresses a device answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioRange {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl MmioRange {
    /// One past the last address.
    pub const fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Whether `addr` falls inside.
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }
}

/// Start of guest RAM.
pub const RAM_START: u64 = 0x8000_0000;

/// One past the highest guest-physical address: KVM's default arm64 IPA size is 40 bits, and a
/// VM created without asking for more cannot map anything above it.
pub const IPA_LIMIT: u64 = 1 << 40;

/// The GICv3 distributor (one 64 KiB frame).
pub const GIC_DIST: MmioRange = MmioRange {
    base: 0x0800_0000,
    size: 0x1_0000,
};

/// Start of the GICv3 redistributors, right after the distributor.
pub const GIC_REDIST_BASE: u64 = GIC_DIST.base + GIC_DIST.size;

/// One redistributor per vCPU: an RD_base and an SGI_base frame of 64 KiB each.
pub const GIC_REDIST_SIZE_PER_VCPU: u64 = 0x2_0000;

/// The most vCPUs a machine may have. The window between the distributor and the UART holds 127
/// redistributors; 64 is a round number under that, and more than the hosts this runs on have
/// cores.
pub const MAX_VCPUS: u32 = 64;

/// The 16550 UART (the console), byte-wide registers at consecutive addresses.
pub const SERIAL: MmioRange = MmioRange {
    base: 0x0900_0000,
    size: 0x1000,
};

/// The UART's SPI.
pub const SERIAL_SPI: u32 = 1;

/// Input clock of the UART the device tree announces (the usual 1.8432 MHz crystal, from which
/// the guest derives divisors; the emulated UART ignores baud rates anyway).
pub const SERIAL_CLOCK_HZ: u32 = 1_843_200;

/// Start of the virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;

/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;

/// SPI of virtio-mmio slot 0; slot *i* uses `VIRTIO_SPI_BASE + i`.
pub const VIRTIO_SPI_BASE: u32 = 16;

/// Number of virtio-mmio slots.
pub const MAX_VIRTIO_SLOTS: u32 = 32;

/// Interrupt lines the GIC implements, SGIs and PPIs (32) included: what `KVM_DEV_ARM_VGIC_GRP_NR_IRQS`
/// takes (a multiple of 32). 96 SPIs cover the UART and every virtio slot with room to spare.
pub const GIC_NR_IRQS: u32 = 128;

/// GIC INTID of SPI 0.
pub const SPI_INTID_BASE: u32 = 32;

/// GIC INTID of PPI 0.
pub const PPI_INTID_BASE: u32 = 16;

/// The GIC maintenance interrupt's PPI (INTID 25), as KVM and QEMU use it.
pub const GIC_MAINTENANCE_PPI: u32 = 9;

/// The architected timer PPIs, in the order the `arm,armv8-timer` binding lists them: secure
/// physical (INTID 29), non-secure physical (30), virtual (27), hypervisor (26). KVM's defaults.
pub const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];

/// Largest device tree blob the kernel accepts (Documentation/arm64/booting.rst).
pub const DTB_MAX_SIZE: u64 = 2 << 20;

/// Alignment of the kernel's load base (booting.rst: a 2 MiB aligned base plus `text_offset`).
pub const KERNEL_ALIGN: u64 = 2 << 20;

/// Alignment of the initrd (a page; the kernel only needs it not to overlap anything).
pub const INITRD_ALIGN: u64 = 0x1000;

/// A layout request that cannot be met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Zero vCPUs, or more than the redistributor window holds.
    #[error("{vcpus} vCPUs do not fit the arm64 layout (1 to {MAX_VCPUS})")]
    VcpuCount {
        /// Requested.
        vcpus: u32,
    },
    /// RAM is empty or ends above the IPA limit.
    #[error("{size:#x} bytes of RAM at {RAM_START:#x} do not fit below {IPA_LIMIT:#x}")]
    RamSize {
        /// Requested bytes.
        size: u64,
    },
    /// The kernel, initrd and DTB do not fit in RAM together.
    #[error(
        "the {what} ({need:#x} bytes at {at:#x}) does not fit beside the other boot pieces in RAM \
         ending at {ram_end:#x}"
    )]
    DoesNotFit {
        /// "kernel", "initrd" or "device tree".
        what: &'static str,
        /// Its size.
        need: u64,
        /// Where it would go.
        at: u64,
        /// One past the last RAM byte.
        ram_end: u64,
    },
}

/// The redistributor region for `vcpus` vCPUs.
pub fn gic_redist(vcpus: u32) -> Result<MmioRange, LayoutError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(LayoutError::VcpuCount { vcpus });
    }
    Ok(MmioRange {
        base: GIC_REDIST_BASE,
        size: u64::from(vcpus) * GIC_REDIST_SIZE_PER_VCPU,
    })
}

/// One virtio-mmio slot: where its registers are and which SPI it raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Slot number.
    pub index: u32,
    /// Its register window.
    pub mmio: MmioRange,
    /// Its interrupt (SPI number; also the KVM irqfd GSI).
    pub spi: u32,
}

/// Slot `index`, or `None` past the last one.
pub fn virtio_slot(index: u32) -> Option<VirtioSlot> {
    (index < MAX_VIRTIO_SLOTS).then(|| VirtioSlot {
        index,
        mmio: MmioRange {
            base: VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SLOT_SIZE,
            size: VIRTIO_MMIO_SLOT_SIZE,
        },
        spi: VIRTIO_SPI_BASE + index,
    })
}

/// One past the last RAM byte for `size` bytes of RAM.
pub fn ram_end(size: u64) -> Result<u64, LayoutError> {
    match RAM_START.checked_add(size) {
        Some(end) if size > 0 && end <= IPA_LIMIT => Ok(end),
        _ => Err(LayoutError::RamSize { size }),
    }
}

/// Where the boot pieces go in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPlacement {
    /// Where the kernel `Image` is loaded; also its entry point.
    pub kernel: u64,
    /// One past the kernel's memory footprint (BSS included).
    pub kernel_end: u64,
    /// The initrd's first byte, if there is one.
    pub initrd: Option<u64>,
    /// The device tree blob (2 MiB reserved for it).
    pub dtb: u64,
}

/// Places the kernel at the start of RAM (`text_offset` past the 2 MiB aligned base), the device
/// tree in the last 2 MiB of RAM and the initrd page-aligned right below it, the way Firecracker
/// does: the kernel keeps every byte above its image free to use for itself, and the DTB's 2 MiB
/// block never shares a mapping with the kernel or initrd.
///
/// `kernel_size` is the kernel's full footprint (the header's `image_size`, which covers BSS).
pub fn place_boot(
    ram_size: u64,
    text_offset: u64,
    kernel_size: u64,
    initrd_size: Option<u64>,
) -> Result<BootPlacement, LayoutError> {
    let ram_end = ram_end(ram_size)?;
    let too_big = |what, need, at| LayoutError::DoesNotFit {
        what,
        need,
        at,
        ram_end,
    };
    let kernel =
        RAM_START
            .checked_add(text_offset)
            .ok_or(too_big("kernel", kernel_size, RAM_START))?;
    let kernel_end =
        kernel
            .checked_add(kernel_size)
            .ok_or(too_big("kernel", kernel_size, kernel))?;
    let dtb = align_down(ram_end.saturating_sub(DTB_MAX_SIZE), KERNEL_ALIGN);
    if dtb < kernel_end {
        return Err(too_big("kernel", kernel_size, kernel));
    }
    let initrd = match initrd_size {
        None => None,
        Some(size) => {
            let at = align_down(dtb.saturating_sub(size), INITRD_ALIGN);
            if size > dtb || at < kernel_end {
                return Err(too_big("initrd", size, at));
            }
            Some(at)
        }
    };
    Ok(BootPlacement {
        kernel,
        kernel_end,
        initrd,
        dtb,
    })
}

fn align_down(value: u64, align: u64) -> u64 {
    value & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn devices_do_not_overlap_each_other_or_ram() {
        let redist = gic_redist(MAX_VCPUS).unwrap();
        let last_slot = virtio_slot(MAX_VIRTIO_SLOTS - 1).unwrap().mmio;
        let mut regions = [
            GIC_DIST,
            redist,
            SERIAL,
            virtio_slot(0).unwrap().mmio,
            last_slot,
        ];
        regions.sort_by_key(|r| r.base);
        for pair in regions.windows(2) {
            assert!(pair[0].end() <= pair[1].base, "{pair:x?} overlap");
        }
        assert!(last_slot.end() <= RAM_START);
        assert!(SERIAL.contains(SERIAL.base) && !SERIAL.contains(SERIAL.end()));
        // The KVM vGIC wants 64 KiB aligned frames.
        assert_eq!(GIC_DIST.base % 0x1_0000, 0);
        assert_eq!(redist.base % 0x1_0000, 0);
    }

    #[test]
    fn redistributors_grow_with_vcpus_and_refuse_bad_counts() {
        assert_eq!(gic_redist(1).unwrap().size, 0x2_0000);
        assert_eq!(gic_redist(4).unwrap().end(), GIC_REDIST_BASE + 4 * 0x2_0000);
        assert_eq!(gic_redist(0), Err(LayoutError::VcpuCount { vcpus: 0 }));
        assert_eq!(
            gic_redist(MAX_VCPUS + 1),
            Err(LayoutError::VcpuCount {
                vcpus: MAX_VCPUS + 1
            })
        );
    }

    #[test]
    fn virtio_slots_are_a_page_apart_on_their_own_spis() {
        let first = virtio_slot(0).unwrap();
        let second = virtio_slot(1).unwrap();
        assert_eq!(first.mmio.base, VIRTIO_MMIO_BASE);
        assert_eq!(second.mmio.base - first.mmio.base, 0x1000);
        assert_eq!((first.spi, second.spi), (16, 17));
        assert_eq!(virtio_slot(MAX_VIRTIO_SLOTS), None);
        let last_spi = virtio_slot(MAX_VIRTIO_SLOTS - 1).unwrap().spi;
        // Every SPI in use exists on the GIC, and none is shared with the UART.
        assert!(SPI_INTID_BASE + last_spi < GIC_NR_IRQS);
        const { assert!(SERIAL_SPI < VIRTIO_SPI_BASE) };
        assert_eq!(GIC_NR_IRQS % 32, 0);
        // PPIs are per-CPU INTIDs 16..32: the maintenance interrupt is INTID 25, the virtual
        // timer 27.
        assert_eq!(PPI_INTID_BASE + GIC_MAINTENANCE_PPI, 25);
        assert_eq!(PPI_INTID_BASE + TIMER_PPIS[2], 27);
        assert!(TIMER_PPIS
            .iter()
            .all(|p| PPI_INTID_BASE + p < SPI_INTID_BASE));
    }

    #[test]
    fn ram_must_be_non_empty_and_below_the_ipa_limit() {
        assert_eq!(ram_end(256 * MIB), Ok(RAM_START + 256 * MIB));
        assert!(ram_end(0).is_err());
        assert!(ram_end(IPA_LIMIT - RAM_START).is_ok());
        assert!(ram_end(IPA_LIMIT - RAM_START + 1).is_err());
        assert!(ram_end(u64::MAX).is_err());
    }

    #[test]
    fn boot_pieces_go_kernel_low_dtb_and_initrd_high() {
        let p = place_boot(256 * MIB, 0, 30 * MIB, Some(5 * MIB + 123)).unwrap();
        assert_eq!(p.kernel, RAM_START);
        assert_eq!(p.kernel % KERNEL_ALIGN, 0);
        assert_eq!(p.kernel_end, RAM_START + 30 * MIB);
        assert_eq!(p.dtb, RAM_START + 254 * MIB);
        let initrd = p.initrd.unwrap();
        assert_eq!(initrd % INITRD_ALIGN, 0);
        assert!(initrd + 5 * MIB + 123 <= p.dtb);
        assert!(initrd >= p.kernel_end);

        let old = place_boot(256 * MIB, 0x8_0000, MIB, None).unwrap();
        assert_eq!(old.kernel, RAM_START + 0x8_0000);
        assert_eq!(old.initrd, None);
    }

    #[test]
    fn boot_pieces_that_do_not_fit_are_named() {
        let kernel = place_boot(32 * MIB, 0, 31 * MIB, None).unwrap_err();
        assert!(
            matches!(kernel, LayoutError::DoesNotFit { what: "kernel", .. }),
            "{kernel}"
        );
        let initrd = place_boot(64 * MIB, 0, 30 * MIB, Some(40 * MIB)).unwrap_err();
        assert!(
            matches!(initrd, LayoutError::DoesNotFit { what: "initrd", .. }),
            "{initrd}"
        );
        let huge = place_boot(64 * MIB, 0, 30 * MIB, Some(u64::MAX)).unwrap_err();
        assert!(matches!(
            huge,
            LayoutError::DoesNotFit { what: "initrd", .. }
        ));
        assert!(place_boot(64 * MIB, u64::MAX, 1, None).is_err());
    }
}
