//! Intel MultiProcessor Specification 1.4 table.
//!
//! Without ACPI, this is how the kernel learns the CPUs (local APIC ids), that an IOAPIC exists
//! and how ISA IRQs map to its pins. It needs it even for one vCPU: without an IOAPIC only the
//! 8259 PIC's 16 lines exist, and virtio-mmio devices use GSIs 5 and up to 23.
//!
//! Layout: the 16-byte floating pointer structure, immediately followed by the configuration
//! table (header + entries: processors, one ISA bus, the IOAPIC, 24 I/O interrupt assignments
//! (IRQ n → IOAPIC pin n, as KVM's default routing does), and the LINT0 = ExtINT / LINT1 = NMI
//! local interrupt assignments).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{mem_err, BootError};

/// The local APIC base address every CPU sees.
pub(crate) const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The IOAPIC base address (KVM's in-kernel IOAPIC).
pub(crate) const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// IOAPIC input pins.
pub(crate) const IOAPIC_PINS: u8 = 24;
/// APIC ids are 8 bits, 0xff is broadcast, and the IOAPIC takes the id after the last CPU.
pub(crate) const MAX_CPUS: u32 = 254;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
/// Family 6 (the value is informational: the kernel reads CPUID for the real one).
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX FPU | APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// Polarity/trigger "conforms to bus": ISA means active high, edge — what irqfd delivers.
const IRQ_FLAGS_CONFORM: u16 = 0;

/// Header size of the configuration table.
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The whole structure (floating pointer + configuration table) for `cpus` CPUs, to be placed at
/// guest physical `addr`.
pub(crate) fn build(cpus: u32, addr: u64) -> Result<Vec<u8>, BootError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(BootError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8; // < 255 by the check above
    let table_addr = u32::try_from(addr + 16).map_err(|_| BootError::GuestMemory {
        what: "MP table",
        reason: "must be below 4 GiB".into(),
    })?;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus as u8 {
        let flags = CPU_FLAG_ENABLED | if id == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // Virtual wire: the PIC's output goes to every LAPIC's LINT0, NMI to LINT1.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let table_len =
        u16::try_from(HEADER_LEN + entries.len()).map_err(|_| BootError::TooManyCpus(cpus))?;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"SUPERMCH"); // OEM id, 8 bytes
    table.extend_from_slice(b"supermachine"); // product id, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: a table is present, no IMCR
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the table for `cpus` CPUs at `addr`.
pub(super) fn write(mem: &GuestMemoryMmap, cpus: u32, addr: u64) -> Result<(), BootError> {
    let bytes = build(cpus, addr)?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(mem_err("MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_for_one_to_four_cpus() {
        for cpus in 1..=4u32 {
            let addr = 0x9fc00;
            let b = build(cpus, addr).unwrap();
            // Floating pointer.
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
            let physptr = u32::from_le_bytes(b[4..8].try_into().unwrap());
            assert_eq!(u64::from(physptr), addr + 16);
            // Configuration table.
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([t[4], t[5]]));
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0, "table checksum");
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(
                u32::from_le_bytes(t[36..40].try_into().unwrap()),
                LAPIC_ADDR
            );

            // Walk the entries.
            let mut off = HEADER_LEN;
            let mut cpu_ids = Vec::new();
            let mut bsps = 0;
            let mut io_ints = 0;
            let mut ioapic = None;
            for _ in 0..count {
                match t[off] {
                    ENTRY_PROCESSOR => {
                        cpu_ids.push(t[off + 1]);
                        assert_ne!(t[off + 3] & CPU_FLAG_ENABLED, 0);
                        if t[off + 3] & CPU_FLAG_BSP != 0 {
                            bsps += 1;
                            assert_eq!(t[off + 1], 0, "BSP is APIC id 0");
                        }
                        off += 20;
                    }
                    ENTRY_IOAPIC => {
                        ioapic = Some(t[off + 1]);
                        off += 8;
                    }
                    ENTRY_IO_INTERRUPT => {
                        assert_eq!(t[off + 5], t[off + 7], "IRQ n -> pin n");
                        io_ints += 1;
                        off += 8;
                    }
                    ENTRY_BUS | ENTRY_LOCAL_INTERRUPT => off += 8,
                    other => panic!("unknown entry type {other}"),
                }
            }
            assert_eq!(off, len);
            assert_eq!(cpu_ids, (0..cpus as u8).collect::<Vec<_>>());
            assert_eq!(bsps, 1);
            assert_eq!(io_ints, u32::from(IOAPIC_PINS));
            assert_eq!(ioapic, Some(cpus as u8), "IOAPIC id follows the CPUs");
        }
    }

    #[test]
    fn rejects_impossible_cpu_counts() {
        assert!(build(0, 0x9fc00).is_err());
        assert!(build(MAX_CPUS + 1, 0x9fc00).is_err());
        assert!(build(MAX_CPUS, 0x9fc00).is_ok());
    }
}
