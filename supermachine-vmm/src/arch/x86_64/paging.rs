//! Identity-mapped boot page tables.
//!
//! `startup_64` is entered with paging on, so something must map the kernel image, the zero page
//! and the stack at their physical addresses until the kernel installs its own tables (which it
//! does within a few hundred instructions). 2 MiB pages over the whole 32-bit space: one PML4
//! entry, one PDPT with 4 entries, 4 page directories — 24 KiB, and everything RAM-backed
//! (up to the 3.25 GiB this VMM supports) is covered.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{mem_err, BootError};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;
/// How many GiB the tables map.
const MAPPED_GIB: u64 = 4;

/// Writes the tables at `pml4` (using the following `1 + MAPPED_GIB` pages too) and returns the
/// value for CR3.
pub(super) fn write(mem: &GuestMemoryMmap, pml4: u64) -> Result<u64, BootError> {
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    mem.write_obj(pdpt | PRESENT_RW, GuestAddress(pml4))
        .map_err(mem_err("PML4"))?;
    for gib in 0..MAPPED_GIB {
        let this_pd = pd + gib * 0x1000;
        mem.write_obj(this_pd | PRESENT_RW, GuestAddress(pdpt + gib * 8))
            .map_err(mem_err("PDPT"))?;
        let mut table = [0u8; 4096];
        for (i, slot) in table.chunks_exact_mut(8).enumerate() {
            let phys = ((gib << 30) | ((i as u64) << 21)) | PRESENT_RW | PAGE_SIZE_2M;
            slot.copy_from_slice(&phys.to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(this_pd))
            .map_err(mem_err("page directory"))?;
    }
    Ok(pml4)
}

/// The first address after the tables written for `pml4`.
pub(super) const fn end(pml4: u64) -> u64 {
    pml4 + (2 + MAPPED_GIB) * 0x1000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((va >> 39) & 511) * 8))
            .unwrap();
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & (PRESENT_RW | PAGE_SIZE_2M), PRESENT_RW | PAGE_SIZE_2M);
        (pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff)
    }

    #[test]
    fn identity_maps_four_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write(&mem, 0x9000).unwrap();
        for va in [
            0u64,
            0x7000,
            0x100_0000,
            0x4000_1234,
            0xcfff_ffff,
            0xffff_f000,
        ] {
            assert_eq!(translate(&mem, cr3, va), va);
        }
        assert_eq!(end(0x9000), 0xf000);
    }
}
