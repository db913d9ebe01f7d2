//! MMIO accesses from data-abort syndromes: how many bytes, which register, and how a loaded
//! value lands in it (sign extension, 32-bit register width, the zero register).
//!
//! Hypervisor.framework, unlike KVM, hands the VMM the raw abort: the VMM reads the stored
//! register itself, and after a load writes the value back and steps the PC over the
//! instruction.

use super::syndrome::DataAbort;

/// The zero register's number in load/store encodings (XZR/WZR).
pub(crate) const ZERO_REG: u8 = 31;

/// A decodable MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MmioAccess {
    /// Bytes accessed: 1, 2, 4 or 8.
    pub len: usize,
    /// A store (else a load).
    pub write: bool,
    /// The register loaded or stored (31 = the zero register).
    pub reg: u8,
    /// A load that sign-extends the value to the register.
    pub sign_extend: bool,
    /// The destination is a 64-bit X register (else a 32-bit W register).
    pub sixty_four: bool,
}

/// A data abort the hardware did not describe (ISV clear: load/store pair, writeback, SIMD
/// register), which a VMM cannot emulate without decoding the instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an MMIO access the hardware did not decode (ISV clear: load/store pair, writeback or SIMD register)")]
pub(crate) struct Undecodable;

impl MmioAccess {
    /// The access a data abort describes.
    pub(crate) fn decode(abort: &DataAbort) -> Result<MmioAccess, Undecodable> {
        if !abort.valid {
            return Err(Undecodable);
        }
        Ok(MmioAccess {
            len: 1 << abort.size_log2,
            write: abort.write,
            reg: abort.reg,
            sign_extend: abort.sign_extend,
            sixty_four: abort.sixty_four,
        })
    }

    /// The bytes a store writes, little-endian, from the stored register's value (`reg_value`
    /// is ignored for the zero register, which stores zeros).
    pub(crate) fn store_bytes(&self, reg_value: u64) -> [u8; 8] {
        let value = if self.reg == ZERO_REG { 0 } else { reg_value };
        value.to_le_bytes()
    }

    /// The register value a load of `data` (the access's bytes, little-endian) produces:
    /// zero-extended, or sign-extended from the access size when the instruction says so, then
    /// cut to 32 bits for a W register. `None` for the zero register (the value is discarded).
    pub(crate) fn load_value(&self, data: &[u8]) -> Option<u64> {
        if self.reg == ZERO_REG {
            return None;
        }
        let mut raw = [0u8; 8];
        let n = self.len.min(data.len()).min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let mut value = u64::from_le_bytes(raw);
        let bits = (self.len * 8) as u32;
        if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            value = (((value << shift) as i64) >> shift) as u64;
        }
        if !self.sixty_four {
            value &= 0xffff_ffff;
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(
        len_log2: u8,
        reg: u8,
        sign_extend: bool,
        sixty_four: bool,
        write: bool,
    ) -> MmioAccess {
        MmioAccess::decode(&DataAbort {
            valid: true,
            size_log2: len_log2,
            sign_extend,
            reg,
            sixty_four,
            write,
        })
        .unwrap()
    }

    #[test]
    fn every_access_size_decodes_and_zero_extends() {
        let data = [0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8];
        let cases = [
            (0u8, 1usize, 0xf1u64),
            (1, 2, 0xf2f1),
            (2, 4, 0xf4f3_f2f1),
            (3, 8, 0xf8f7_f6f5_f4f3_f2f1),
        ];
        for (log2, len, want) in cases {
            let a = access(log2, 2, false, true, false);
            assert_eq!(a.len, len);
            assert_eq!(a.load_value(&data[..len]), Some(want), "{len} bytes");
        }
    }

    #[test]
    fn sign_extension_to_x_and_w_registers() {
        // ldrsb x1: 0x80 -> 0xffff_ffff_ffff_ff80.
        assert_eq!(
            access(0, 1, true, true, false).load_value(&[0x80]),
            Some(0xffff_ffff_ffff_ff80)
        );
        // ldrsb w1: sign-extended to 32 bits, upper half zero.
        assert_eq!(
            access(0, 1, true, false, false).load_value(&[0x80]),
            Some(0xffff_ff80)
        );
        // ldrsh x1 / ldrsw x1.
        assert_eq!(
            access(1, 1, true, true, false).load_value(&[0x00, 0x80]),
            Some(0xffff_ffff_ffff_8000)
        );
        assert_eq!(
            access(2, 1, true, true, false).load_value(&[0, 0, 0, 0x80]),
            Some(0xffff_ffff_8000_0000)
        );
        // A positive value is unchanged by sign extension.
        assert_eq!(
            access(1, 1, true, true, false).load_value(&[0x34, 0x12]),
            Some(0x1234)
        );
        // ldr w1 of 4 bytes never sets the upper half.
        assert_eq!(
            access(2, 1, false, false, false).load_value(&[0xff; 4]),
            Some(0xffff_ffff)
        );
    }

    #[test]
    fn the_write_back_register_is_the_one_the_syndrome_names() {
        for reg in [0u8, 7, 30] {
            let a = access(2, reg, false, false, false);
            assert_eq!(a.reg, reg);
            assert!(!a.write);
            assert_eq!(a.load_value(&[1, 0, 0, 0]), Some(1));
        }
    }

    #[test]
    fn the_zero_register_stores_zeros_and_discards_loads() {
        let store = access(2, ZERO_REG, false, false, true);
        assert_eq!(store.store_bytes(0xdead_beef), [0; 8]);
        let load = access(3, ZERO_REG, false, true, false);
        assert_eq!(load.load_value(&[0xff; 8]), None);
        // Any other register stores its own value.
        let store = access(1, 4, false, false, true);
        assert_eq!(&store.store_bytes(0xbeef)[..2], &[0xef, 0xbe]);
    }

    #[test]
    fn an_abort_without_isv_is_refused() {
        let abort = DataAbort {
            valid: false,
            size_log2: 0,
            sign_extend: false,
            reg: 0,
            sixty_four: false,
            write: false,
        };
        assert_eq!(MmioAccess::decode(&abort), Err(Undecodable));
    }
}
