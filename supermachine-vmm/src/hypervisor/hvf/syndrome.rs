//! Decoding the exception syndrome (ESR_EL2) of a guest trap into what the backend must do
//! (Arm ARM D24.2.41, "ESR_EL2"). Only the classes a Linux guest produces under
//! Hypervisor.framework are told apart; anything else is [`Trap::Other`] and ends the vCPU
//! with its class in the message.

/// Exception classes (ESR_EL2.EC).
mod ec {
    pub const WFX: u8 = 0x01;
    pub const HVC64: u8 = 0x16;
    pub const SMC64: u8 = 0x17;
    pub const SYSREG: u8 = 0x18;
    pub const INSTR_ABORT_LOWER: u8 = 0x20;
    pub const DATA_ABORT_LOWER: u8 = 0x24;
}

/// A decoded trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trap {
    /// A data abort on an address with no memory behind it: MMIO (decoded further by
    /// [`super::mmio::MmioAccess::decode`]).
    DataAbort(DataAbort),
    /// `HVC #imm` (PSCI and SMCCC calls arrive here). The PC already points past it.
    Hvc {
        /// The immediate.
        imm: u16,
    },
    /// `SMC #imm`, trapped. The PC still points at it.
    Smc {
        /// The immediate.
        imm: u16,
    },
    /// WFI, WFE, or their timeout forms. The PC still points at it.
    Wfx(Wfx),
    /// An `MRS`/`MSR` of a system register the framework traps.
    SysReg(SysRegAccess),
    /// An instruction fetch from an address with no memory (a guest bug or a wild jump).
    InstructionAbort,
    /// Any other class.
    Other {
        /// ESR_EL2.EC.
        ec: u8,
        /// ESR_EL2.ISS.
        iss: u32,
    },
}

/// Which wait-for instruction trapped (ESR_EL2.ISS.TI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wfx {
    /// WFI: sleep until an interrupt.
    Wfi,
    /// WFE: a hint; nothing to wait for here.
    Wfe,
    /// WFIT (WFI with a timeout in a register): treated as WFI.
    Wfit,
    /// WFET: treated as WFE.
    Wfet,
}

/// The syndrome of a data abort (ISS bits of EC 0x24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DataAbort {
    /// ISV: the fields below are valid (a single-register load/store without writeback).
    pub valid: bool,
    /// SAS: access size, log2 bytes.
    pub size_log2: u8,
    /// SSE: a load that sign-extends.
    pub sign_extend: bool,
    /// SRT: the register loaded or stored (31 = XZR/WZR).
    pub reg: u8,
    /// SF: the register is 64 bits wide (else 32).
    pub sixty_four: bool,
    /// WnR: a store.
    pub write: bool,
}

/// A trapped `MRS`/`MSR` (ISS of EC 0x18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SysRegAccess {
    /// The register's encoding as `op0:op1:CRn:CRm:op2` packed like Hypervisor.framework's
    /// `hv_sys_reg_t` (op0 << 14 | op1 << 11 | CRn << 7 | CRm << 3 | op2).
    pub encoding: u16,
    /// The general-purpose register moved (31 = XZR).
    pub reg: u8,
    /// An `MRS` (read into `reg`), else an `MSR` (write from `reg`).
    pub read: bool,
}

/// Decodes ESR_EL2.
pub(crate) fn decode(esr: u64) -> Trap {
    let ec = ((esr >> 26) & 0x3f) as u8;
    let iss = (esr & 0x01ff_ffff) as u32;
    match ec {
        ec::DATA_ABORT_LOWER => Trap::DataAbort(DataAbort {
            valid: iss & (1 << 24) != 0,
            size_log2: ((iss >> 22) & 0b11) as u8,
            sign_extend: iss & (1 << 21) != 0,
            reg: ((iss >> 16) & 0x1f) as u8,
            sixty_four: iss & (1 << 15) != 0,
            write: iss & (1 << 6) != 0,
        }),
        ec::HVC64 => Trap::Hvc {
            imm: (iss & 0xffff) as u16,
        },
        ec::SMC64 => Trap::Smc {
            imm: (iss & 0xffff) as u16,
        },
        ec::WFX => Trap::Wfx(match iss & 0b11 {
            0 => Wfx::Wfi,
            1 => Wfx::Wfe,
            2 => Wfx::Wfit,
            _ => Wfx::Wfet,
        }),
        ec::SYSREG => {
            let op0 = (iss >> 20) & 0b11;
            let op2 = (iss >> 17) & 0b111;
            let op1 = (iss >> 14) & 0b111;
            let crn = (iss >> 10) & 0xf;
            let crm = (iss >> 1) & 0xf;
            Trap::SysReg(SysRegAccess {
                encoding: ((op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2) as u16,
                reg: ((iss >> 5) & 0x1f) as u8,
                read: iss & 1 != 0,
            })
        }
        ec::INSTR_ABORT_LOWER => Trap::InstructionAbort,
        _ => Trap::Other { ec, iss },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ESR_EL2 with class `ec`, IL set (32-bit instruction), and `iss`.
    fn esr(ec: u64, iss: u64) -> u64 {
        (ec << 26) | (1 << 25) | iss
    }

    #[test]
    fn data_abort_fields() {
        // ldrsh w3, [x1]: ISV, SAS=1 (2 bytes), SSE, SRT=3, SF=0, read.
        let iss = (1 << 24) | (1 << 22) | (1 << 21) | (3 << 16);
        assert_eq!(
            decode(esr(0x24, iss)),
            Trap::DataAbort(DataAbort {
                valid: true,
                size_log2: 1,
                sign_extend: true,
                reg: 3,
                sixty_four: false,
                write: false,
            })
        );
        // str x30, [x0]: SAS=3, SRT=30, SF, WnR.
        let iss = (1 << 24) | (3 << 22) | (30 << 16) | (1 << 15) | (1 << 6);
        let Trap::DataAbort(d) = decode(esr(0x24, iss)) else {
            panic!("not a data abort")
        };
        assert!(d.valid && d.write && d.sixty_four && !d.sign_extend);
        assert_eq!((d.size_log2, d.reg), (3, 30));
        // ISV clear (ldp, or writeback): not decodable.
        let Trap::DataAbort(d) = decode(esr(0x24, 1 << 6)) else {
            panic!("not a data abort")
        };
        assert!(!d.valid);
    }

    #[test]
    fn hvc_smc_and_wait_instructions() {
        assert_eq!(decode(esr(0x16, 0)), Trap::Hvc { imm: 0 });
        assert_eq!(decode(esr(0x16, 0x1234)), Trap::Hvc { imm: 0x1234 });
        assert_eq!(decode(esr(0x17, 7)), Trap::Smc { imm: 7 });
        assert_eq!(decode(esr(0x01, 0)), Trap::Wfx(Wfx::Wfi));
        assert_eq!(decode(esr(0x01, 1)), Trap::Wfx(Wfx::Wfe));
        assert_eq!(decode(esr(0x01, 2)), Trap::Wfx(Wfx::Wfit));
        assert_eq!(decode(esr(0x01, 3)), Trap::Wfx(Wfx::Wfet));
    }

    #[test]
    fn sysreg_trap_packs_the_encoding_like_the_framework() {
        // mrs x5, oslsr_el1 (op0=2, op1=0, CRn=1, CRm=1, op2=4): read.
        let iss = (2 << 20) | (4 << 17) | (1 << 10) | (5 << 5) | (1 << 1) | 1;
        assert_eq!(
            decode(esr(0x18, iss)),
            Trap::SysReg(SysRegAccess {
                encoding: (2 << 14) | (1 << 7) | (1 << 3) | 4,
                reg: 5,
                read: true,
            })
        );
        // msr pmuserenr_el0, xzr (op0=3, op1=3, CRn=9, CRm=14, op2=0): write of XZR.
        let iss = (3 << 20) | (3 << 14) | (9 << 10) | (31 << 5) | (14 << 1);
        let Trap::SysReg(a) = decode(esr(0x18, iss)) else {
            panic!("not a sysreg trap")
        };
        assert_eq!(
            a.encoding, 0xdcf0,
            "PMUSERENR_EL0 as hv_sys_reg_t would spell it"
        );
        assert_eq!((a.reg, a.read), (31, false));
    }

    #[test]
    fn other_classes_keep_class_and_iss() {
        assert_eq!(decode(esr(0x20, 0x10)), Trap::InstructionAbort);
        assert_eq!(
            decode(esr(0x07, 0x1ff)),
            Trap::Other {
                ec: 0x07,
                iss: 0x1ff
            }
        );
    }
}
