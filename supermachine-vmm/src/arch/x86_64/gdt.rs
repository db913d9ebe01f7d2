//! The boot GDT: flat 64-bit code, flat data and a TSS, and the segment registers loaded from it.

use crate::hypervisor::x86_64::Segment;

/// Builds a descriptor from the access/flags word (`flags`: bits 0-7 access byte, bits 12-15 the
/// G/DB/L/AVL nibble), a base and a 20-bit limit.
const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// GDT index of the code segment (selector 0x08).
pub(super) const CODE_INDEX: u16 = 1;
/// GDT index of the data segment (selector 0x10).
pub(super) const DATA_INDEX: u16 = 2;
/// GDT index of the TSS (selector 0x18).
pub(super) const TSS_INDEX: u16 = 3;

/// null; code: present, ring 0, execute/read, accessed, L=1, G=1; data: present, ring 0,
/// read/write, accessed, DB=1, G=1; TSS: present, 64-bit busy TSS (KVM wants a usable TR in
/// long mode; the kernel loads its own).
pub(super) const TABLE: [u64; 4] = [
    0,
    entry(0xa09b, 0, 0xfffff),
    entry(0xc093, 0, 0xfffff),
    entry(0x808b, 0, 0xfffff),
];

/// The segment register contents that loading selector `index * 8` from [`TABLE`] produces.
pub(super) fn segment(index: u16) -> Segment {
    let e = TABLE[usize::from(index)];
    let base = ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000);
    let raw_limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = (e >> 55) & 1 == 1;
    let present = (e >> 47) & 1 == 1;
    Segment {
        base,
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 3) as u8,
        db: (e >> 54) & 1 == 1,
        s: (e >> 44) & 1 == 1,
        l: (e >> 53) & 1 == 1,
        g,
        avl: (e >> 52) & 1 == 1,
        unusable: !present,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        // The classic flat 64-bit code/data descriptors.
        assert_eq!(TABLE[1], 0x00af_9b00_0000_ffff);
        assert_eq!(TABLE[2], 0x00cf_9300_0000_ffff);
        assert_eq!(TABLE[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn decoded_segments() {
        let cs = segment(CODE_INDEX);
        assert_eq!(
            (cs.selector, cs.type_, cs.base, cs.limit),
            (8, 0xb, 0, 0xffff_ffff)
        );
        assert!(cs.l && !cs.db && cs.s && cs.present && cs.g);
        let ds = segment(DATA_INDEX);
        assert_eq!((ds.selector, ds.type_), (0x10, 0x3));
        assert!(ds.db && !ds.l && ds.s);
        let tr = segment(TSS_INDEX);
        assert_eq!((tr.selector, tr.type_), (0x18, 0xb));
        assert!(!tr.s && tr.present);
    }
}
