//! The flattened device tree an arm64 guest boots with.
//!
//! An arm64 kernel discovers its machine only from this tree (there is no cmdline device
//! announcement and no firmware table), so it names everything the layout places: RAM, the CPUs
//! and how to start them (PSCI over `hvc`), the GICv3, the architected timer, the console UART and
//! every virtio-mmio slot. Property choices follow the Linux bindings
//! (Documentation/devicetree/bindings: `arm/psci.yaml`, `interrupt-controller/arm,gic-v3.yaml`,
//! `timer/arm,arch_timer.yaml`, `serial/8250.yaml`, `virtio/mmio.yaml`).

use std::ops::Range;

use vm_fdt::FdtWriter;

use super::layout::{self, LayoutError, VirtioSlot};

/// The GIC's phandle; the root's `interrupt-parent`, so every `interrupts` below refers to it.
const GIC_PHANDLE: u32 = 1;

/// First cell of a GIC interrupt specifier: shared (SPI) or per-CPU (PPI).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;

/// Third cell: trigger type (include/dt-bindings/interrupt-controller/irq.h).
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// The affinity fields of MPIDR_EL1 (Aff3, Aff2..Aff0), what a CPU node's `reg` holds.
pub(crate) const MPIDR_HWID_MASK: u64 = 0xff_00ff_ffff;

/// What the tree describes. Addresses of the fixed devices come from [`layout`].
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    /// Bytes of RAM at [`layout::RAM_START`].
    pub ram_size: u64,
    /// MPIDR_EL1 of each vCPU, in vCPU order (read from the hypervisor: KVM derives it from the
    /// vCPU index).
    pub mpidrs: &'a [u64],
    /// The kernel command line.
    pub bootargs: &'a str,
    /// Guest-physical range of the initrd, if any.
    pub initrd: Option<Range<u64>>,
    /// The virtio-mmio slots in use.
    pub virtio: &'a [VirtioSlot],
}

/// The device tree could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// The vCPU count or RAM size does not fit the layout.
    #[error("the machine does not fit the arm64 layout")]
    Layout(#[from] LayoutError),
    /// vm-fdt refused a node or property (e.g. a NUL byte in the command line).
    #[error("writing the device tree failed")]
    Write(#[from] vm_fdt::Error),
    /// The blob is larger than the kernel accepts.
    #[error("the device tree is {size} bytes, more than the {max} the kernel accepts")]
    TooLarge {
        /// Its size.
        size: usize,
        /// [`layout::DTB_MAX_SIZE`].
        max: u64,
    },
}

/// Builds the device tree blob for `config`.
pub fn build(config: &FdtConfig<'_>) -> Result<Vec<u8>, FdtError> {
    let vcpus = u32::try_from(config.mpidrs.len()).unwrap_or(u32::MAX);
    let redist = layout::gic_redist(vcpus)?;
    layout::ram_end(config.ram_size)?;

    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    chosen(&mut fdt, config)?;
    aliases(&mut fdt)?;
    memory(&mut fdt, config.ram_size)?;
    cpus(&mut fdt, config.mpidrs)?;
    psci(&mut fdt)?;
    gic(&mut fdt, redist)?;
    timer(&mut fdt)?;
    serial(&mut fdt)?;
    for slot in config.virtio {
        virtio_mmio(&mut fdt, slot)?;
    }

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() as u64 > layout::DTB_MAX_SIZE {
        return Err(FdtError::TooLarge {
            size: blob.len(),
            max: layout::DTB_MAX_SIZE,
        });
    }
    Ok(blob)
}

fn serial_path() -> String {
    format!("/serial@{:x}", layout::SERIAL.base)
}

fn chosen(fdt: &mut FdtWriter, config: &FdtConfig<'_>) -> Result<(), FdtError> {
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", config.bootargs)?;
    // The console (and `earlycon` without arguments) is the UART.
    fdt.property_string("stdout-path", &serial_path())?;
    if let Some(initrd) = &config.initrd {
        fdt.property_u64("linux,initrd-start", initrd.start)?;
        fdt.property_u64("linux,initrd-end", initrd.end)?;
    }
    fdt.end_node(node)?;
    Ok(())
}

fn aliases(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    // serial0 makes the UART ttyS0 whatever order the 8250 driver probes in.
    let node = fdt.begin_node("aliases")?;
    fdt.property_string("serial0", &serial_path())?;
    fdt.end_node(node)?;
    Ok(())
}

fn memory(fdt: &mut FdtWriter, ram_size: u64) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("memory@{:x}", layout::RAM_START))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[layout::RAM_START, ram_size])?;
    fdt.end_node(node)?;
    Ok(())
}

fn cpus(fdt: &mut FdtWriter, mpidrs: &[u64]) -> Result<(), FdtError> {
    let node = fdt.begin_node("cpus")?;
    // Two address cells: the affinity includes Aff3 (MPIDR bits 32..39).
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for mpidr in mpidrs {
        let hwid = mpidr & MPIDR_HWID_MASK;
        let cpu = fdt.begin_node(&format!("cpu@{hwid:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        // Secondaries start powered off; the kernel brings them up with PSCI CPU_ON.
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", hwid)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(node)?;
    Ok(())
}

fn psci(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    // KVM implements PSCI 0.2 and later (function IDs are then fixed by the spec, so no
    // cpu_on/cpu_off properties) and takes the calls as `hvc` from EL1.
    let node = fdt.begin_node("psci")?;
    fdt.property_string("compatible", "arm,psci-0.2")?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(node)?;
    Ok(())
}

fn gic(fdt: &mut FdtWriter, redist: layout::MmioRange) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("interrupt-controller@{:x}", layout::GIC_DIST.base))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    // <type number flags>: SPI/PPI, number within that type, trigger.
    fdt.property_u32("#interrupt-cells", 3)?;
    // No child nodes (no ITS); 0 tells interrupt-map parsers the specifier has no address part
    // (dtc warns about an interrupt provider without it).
    fdt.property_u32("#address-cells", 0)?;
    fdt.property_array_u64(
        "reg",
        &[
            layout::GIC_DIST.base,
            layout::GIC_DIST.size,
            redist.base,
            redist.size,
        ],
    )?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_PPI, layout::GIC_MAINTENANCE_PPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    fdt.end_node(node)?;
    Ok(())
}

fn timer(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    let cells: Vec<u32> = layout::TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.end_node(node)?;
    Ok(())
}

fn serial(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node(&serial_path()[1..])?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[layout::SERIAL.base, layout::SERIAL.size])?;
    // of_serial needs the input clock; the registers are bytes at consecutive addresses.
    fdt.property_u32("clock-frequency", layout::SERIAL_CLOCK_HZ)?;
    fdt.property_u32("reg-shift", 0)?;
    fdt.property_u32("reg-io-width", 1)?;
    // Raised through an irqfd, which is an edge.
    fdt.property_array_u32(
        "interrupts",
        &[GIC_SPI, layout::SERIAL_SPI, IRQ_TYPE_EDGE_RISING],
    )?;
    fdt.end_node(node)?;
    Ok(())
}

fn virtio_mmio(fdt: &mut FdtWriter, slot: &VirtioSlot) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("virtio_mmio@{:x}", slot.mmio.base))?;
    fdt.property_string("compatible", "virtio,mmio")?;
    fdt.property_array_u64("reg", &[slot.mmio.base, slot.mmio.size])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, slot.spi, IRQ_TYPE_EDGE_RISING])?;
    // Guest RAM is ordinary cacheable memory the VMM reads coherently: without this the guest
    // would bounce every virtio buffer through cache maintenance.
    fdt.property_null("dma-coherent")?;
    fdt.end_node(node)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::layout::{virtio_slot, RAM_START};

    const MIB: u64 = 1 << 20;

    /// Big-endian 32-bit cells of a property.
    fn cells(value: &[u8]) -> Vec<u32> {
        value
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Big-endian 64-bit values (two cells each) of a property.
    fn u64s(value: &[u8]) -> Vec<u64> {
        value
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn prop<'a>(tree: &'a fdt::Fdt<'a>, path: &str, name: &str) -> &'a [u8] {
        let node = tree
            .find_node(path)
            .unwrap_or_else(|| panic!("no node {path}"));
        node.property(name)
            .unwrap_or_else(|| panic!("{path} has no {name}"))
            .value
    }

    fn string<'a>(tree: &'a fdt::Fdt<'a>, path: &str, name: &str) -> &'a str {
        let value = prop(tree, path, name);
        std::str::from_utf8(value.strip_suffix(&[0]).expect("NUL-terminated")).unwrap()
    }

    fn sample() -> Vec<u8> {
        let slots = [virtio_slot(0).unwrap(), virtio_slot(3).unwrap()];
        build(&FdtConfig {
            ram_size: 512 * MIB,
            mpidrs: &[0x8000_0000, 0x8000_0001, 0x8000_0100],
            bootargs: "console=ttyS0 panic=-1",
            initrd: Some(RAM_START + 200 * MIB..RAM_START + 210 * MIB),
            virtio: &slots,
        })
        .unwrap()
    }

    #[test]
    fn root_memory_and_chosen() {
        let blob = sample();
        let tree = fdt::Fdt::new(&blob).unwrap();
        assert_eq!(string(&tree, "/", "compatible"), "linux,dummy-virt");
        assert_eq!(cells(prop(&tree, "/", "#address-cells")), [2]);
        assert_eq!(cells(prop(&tree, "/", "interrupt-parent")), [GIC_PHANDLE]);

        let memory = tree.find_node("/memory@80000000").unwrap();
        assert_eq!(string(&tree, "/memory@80000000", "device_type"), "memory");
        let region = memory.reg().unwrap().next().unwrap();
        assert_eq!(region.starting_address as u64, RAM_START);
        assert_eq!(region.size, Some(512 << 20));

        assert_eq!(tree.chosen().bootargs(), Some("console=ttyS0 panic=-1"));
        assert_eq!(string(&tree, "/chosen", "stdout-path"), "/serial@9000000");
        assert_eq!(tree.chosen().stdout().unwrap().name, "serial@9000000");
        assert_eq!(
            u64s(prop(&tree, "/chosen", "linux,initrd-start")),
            [RAM_START + 200 * MIB]
        );
        assert_eq!(
            u64s(prop(&tree, "/chosen", "linux,initrd-end")),
            [RAM_START + 210 * MIB]
        );
        assert_eq!(string(&tree, "/aliases", "serial0"), "/serial@9000000");
    }

    #[test]
    fn cpus_are_named_by_affinity_and_started_by_psci() {
        let blob = sample();
        let tree = fdt::Fdt::new(&blob).unwrap();
        let regs: Vec<u64> = ["/cpus/cpu@0", "/cpus/cpu@1", "/cpus/cpu@100"]
            .iter()
            .map(|path| {
                assert_eq!(string(&tree, path, "device_type"), "cpu");
                assert_eq!(string(&tree, path, "enable-method"), "psci");
                u64s(prop(&tree, path, "reg"))[0]
            })
            .collect();
        // Bit 31 of MPIDR (RES1) is not part of the hardware id.
        assert_eq!(regs, [0, 1, 0x100]);
        assert_eq!(tree.cpus().count(), 3);
        assert_eq!(cells(prop(&tree, "/cpus", "#address-cells")), [2]);
        assert_eq!(cells(prop(&tree, "/cpus", "#size-cells")), [0]);

        assert_eq!(string(&tree, "/psci", "compatible"), "arm,psci-0.2");
        assert_eq!(string(&tree, "/psci", "method"), "hvc");
    }

    #[test]
    fn gic_and_timer() {
        let blob = sample();
        let tree = fdt::Fdt::new(&blob).unwrap();
        let gic = "/interrupt-controller@8000000";
        assert_eq!(string(&tree, gic, "compatible"), "arm,gic-v3");
        assert!(prop(&tree, gic, "interrupt-controller").is_empty());
        assert_eq!(cells(prop(&tree, gic, "#interrupt-cells")), [3]);
        assert_eq!(cells(prop(&tree, gic, "#address-cells")), [0]);
        assert_eq!(
            u64s(prop(&tree, gic, "reg")),
            [0x0800_0000, 0x1_0000, 0x0801_0000, 3 * 0x2_0000]
        );
        assert_eq!(cells(prop(&tree, gic, "phandle")), [GIC_PHANDLE]);
        assert_eq!(tree.find_phandle(GIC_PHANDLE).unwrap().name, &gic[1..]);
        assert_eq!(cells(prop(&tree, gic, "interrupts")), [1, 9, 4]);

        assert_eq!(string(&tree, "/timer", "compatible"), "arm,armv8-timer");
        assert_eq!(
            cells(prop(&tree, "/timer", "interrupts")),
            [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );
    }

    #[test]
    fn serial_is_a_byte_wide_16550_on_its_spi() {
        let blob = sample();
        let tree = fdt::Fdt::new(&blob).unwrap();
        let uart = "/serial@9000000";
        assert_eq!(string(&tree, uart, "compatible"), "ns16550a");
        assert_eq!(u64s(prop(&tree, uart, "reg")), [0x0900_0000, 0x1000]);
        assert_eq!(cells(prop(&tree, uart, "clock-frequency")), [1_843_200]);
        assert_eq!(cells(prop(&tree, uart, "reg-shift")), [0]);
        assert_eq!(cells(prop(&tree, uart, "reg-io-width")), [1]);
        assert_eq!(cells(prop(&tree, uart, "interrupts")), [0, 1, 1]);
    }

    #[test]
    fn one_virtio_node_per_slot_with_its_spi() {
        let blob = sample();
        let tree = fdt::Fdt::new(&blob).unwrap();
        let nodes: Vec<_> = tree
            .all_nodes()
            .filter(|n| n.compatible().is_some_and(|c| c.first() == "virtio,mmio"))
            .map(|n| n.name)
            .collect();
        assert_eq!(nodes, ["virtio_mmio@a000000", "virtio_mmio@a003000"]);
        let slot3 = "/virtio_mmio@a003000";
        assert_eq!(u64s(prop(&tree, slot3, "reg")), [0x0a00_3000, 0x1000]);
        assert_eq!(cells(prop(&tree, slot3, "interrupts")), [0, 19, 1]);
        assert!(prop(&tree, slot3, "dma-coherent").is_empty());
    }

    #[test]
    fn no_initrd_no_initrd_properties() {
        let blob = build(&FdtConfig {
            ram_size: 128 * MIB,
            mpidrs: &[0x8000_0000],
            bootargs: "",
            initrd: None,
            virtio: &[],
        })
        .unwrap();
        let tree = fdt::Fdt::new(&blob).unwrap();
        let chosen = tree.find_node("/chosen").unwrap();
        assert!(chosen.property("linux,initrd-start").is_none());
        assert!(chosen.property("linux,initrd-end").is_none());
    }

    #[test]
    fn bad_descriptions_are_refused() {
        let base = FdtConfig {
            ram_size: 128 * MIB,
            mpidrs: &[0x8000_0000],
            bootargs: "console=ttyS0",
            initrd: None,
            virtio: &[],
        };
        let no_cpus = FdtConfig {
            mpidrs: &[],
            ..base.clone()
        };
        assert!(matches!(
            build(&no_cpus),
            Err(FdtError::Layout(LayoutError::VcpuCount { vcpus: 0 }))
        ));
        let no_ram = FdtConfig {
            ram_size: 0,
            ..base.clone()
        };
        assert!(matches!(
            build(&no_ram),
            Err(FdtError::Layout(LayoutError::RamSize { size: 0 }))
        ));
        let nul = FdtConfig {
            bootargs: "a\0b",
            ..base
        };
        assert!(matches!(build(&nul), Err(FdtError::Write(_))));
    }
}
