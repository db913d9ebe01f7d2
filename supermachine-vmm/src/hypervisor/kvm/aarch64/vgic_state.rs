//! Saving and restoring the vGICv3 (Documentation/virt/kvm/devices/arm-vgic-v3.rst).
//!
//! Three register groups hold the state: the distributor (SPI configuration: group, enable,
//! pending latch, active, priority, trigger, routing), each vCPU's redistributor (the same for
//! its SGIs and PPIs, in the SGI frame at +64 KiB) and each vCPU's CPU interface (the ICC_*
//! system registers: priority mask, binary points, active priorities, group enables). Line levels
//! of level-triggered inputs come from a fourth group. No ITS is created, so there are no LPI
//! tables to flush.
//!
//! Restore order: GICD_IIDR first (KVM's rule: it fixes the behaviour the other registers are
//! interpreted with), then the per-interrupt registers, routing and GICD_CTLR last, then each
//! redistributor, then the line levels, then the CPU interfaces with ICC_SRE_EL1 and
//! ICC_CTLR_EL1 first (the latter fixes how many active-priority registers exist). "Set/clear"
//! register pairs are restored by clearing what was clear and setting what was set, so the
//! result does not depend on the fresh VM's reset values.

use kvm_bindings::{
    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
    KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
    KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT, VGIC_LEVEL_INFO_LINE_LEVEL,
};
use serde::{Deserialize, Serialize};

use super::vgic::Vgic;
use super::KvmArm64Error;
use crate::arch::aarch64::layout;

/// A per-interrupt register bank: the "set" register, its "clear" twin if it has one, and how
/// many bits each interrupt takes.
struct IrqReg {
    set: u32,
    clear: Option<u32>,
    bits_per_irq: u32,
}

/// The per-interrupt registers, at the same offsets in the distributor (SPIs) and in a
/// redistributor's SGI frame (SGIs and PPIs). ISPENDR through this interface reads and writes
/// the pending latch exactly, so it needs no clear.
const IRQ_REGS: [IrqReg; 6] = [
    // IGROUPR
    IrqReg {
        set: 0x0080,
        clear: None,
        bits_per_irq: 1,
    },
    // ISENABLER / ICENABLER
    IrqReg {
        set: 0x0100,
        clear: Some(0x0180),
        bits_per_irq: 1,
    },
    // ISPENDR
    IrqReg {
        set: 0x0200,
        clear: None,
        bits_per_irq: 1,
    },
    // ISACTIVER / ICACTIVER
    IrqReg {
        set: 0x0300,
        clear: Some(0x0380),
        bits_per_irq: 1,
    },
    // IPRIORITYR
    IrqReg {
        set: 0x0400,
        clear: None,
        bits_per_irq: 8,
    },
    // ICFGR
    IrqReg {
        set: 0x0c00,
        clear: None,
        bits_per_irq: 2,
    },
];

const GICD_CTLR: u32 = 0x0000;
const GICD_IIDR: u32 = 0x0008;
/// 64 bits per SPI, accessed as two 32-bit halves.
const GICD_IROUTER: u32 = 0x6000;
const GICR_CTLR: u32 = 0x0000;
/// Offset of a redistributor's SGI frame from its RD frame.
const GICR_SGI_FRAME: u32 = 0x1_0000;

/// A CPU interface register's `MRS` encoding (op0, op1, CRn, CRm, op2), as the attribute wants.
const fn icc(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

const ICC_PMR_EL1: u64 = icc(3, 0, 4, 6, 0);
const ICC_BPR0_EL1: u64 = icc(3, 0, 12, 8, 3);
const ICC_BPR1_EL1: u64 = icc(3, 0, 12, 12, 3);
const ICC_CTLR_EL1: u64 = icc(3, 0, 12, 12, 4);
const ICC_SRE_EL1: u64 = icc(3, 0, 12, 12, 5);
const ICC_IGRPEN0_EL1: u64 = icc(3, 0, 12, 12, 6);
const ICC_IGRPEN1_EL1: u64 = icc(3, 0, 12, 12, 7);

/// ICC_AP0R<n>_EL1 and ICC_AP1R<n>_EL1.
const fn icc_ap0r(n: u64) -> u64 {
    icc(3, 0, 12, 8, 4 + n)
}
const fn icc_ap1r(n: u64) -> u64 {
    icc(3, 0, 12, 9, n)
}

/// How many of each ICC_AP{0,1}R<n> exist, from ICC_CTLR_EL1.PRIbits (bits 10:8, the number of
/// priority bits minus one): 5 bits → 1, 6 → 2, 7 → 4.
fn active_priority_regs(icc_ctlr: u64) -> u64 {
    let pri_bits = ((icc_ctlr >> 8) & 0x7) + 1;
    1 << pri_bits.clamp(5, 7).saturating_sub(5)
}

/// A 32-bit register at a distributor or redistributor offset (or, for line levels, the first
/// INTID of a 32-interrupt bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reg32 {
    /// Offset or INTID.
    pub offset: u32,
    /// Value.
    pub value: u32,
}

/// A CPU interface system register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reg64 {
    /// Its `MRS` encoding.
    pub encoding: u64,
    /// Value.
    pub value: u64,
}

/// One vCPU's share of the GIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuGicState {
    /// The vCPU's MPIDR_EL1 (the restored vCPU must have the same).
    pub mpidr: u64,
    /// Redistributor registers in restore order.
    pub redist: Vec<Reg32>,
    /// Input levels of its PPIs (bit *n*: INTID *n*).
    pub ppi_levels: u32,
    /// CPU interface registers in restore order.
    pub icc: Vec<Reg64>,
}

/// The whole vGIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VgicState {
    /// Interrupt lines (SGIs and PPIs included) the saved GIC had.
    pub nr_irqs: u32,
    /// Distributor registers in restore order.
    pub dist: Vec<Reg32>,
    /// SPI input levels, one bitmap per 32 INTIDs from 32.
    pub spi_levels: Vec<Reg32>,
    /// Per vCPU, in vCPU order.
    pub cpus: Vec<CpuGicState>,
}

/// The attribute's MPIDR field: Aff3..Aff0 packed into bits 63..32.
fn mpidr_attr(mpidr: u64) -> u64 {
    let affinity = (mpidr & 0xff_ffff) | ((mpidr >> 8) & 0xff00_0000);
    affinity << 32
}

fn level_attr(mpidr: u64, intid: u32) -> u64 {
    mpidr_attr(mpidr)
        | u64::from(VGIC_LEVEL_INFO_LINE_LEVEL << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT)
        | u64::from(intid)
}

/// The 32-bit words of `reg` that cover INTIDs `first..end`, relative to `base`.
fn irq_reg_words(
    reg_base: u32,
    bits_per_irq: u32,
    first: u32,
    end: u32,
) -> impl Iterator<Item = u32> {
    let irqs_per_word = 32 / bits_per_irq;
    (first..end)
        .step_by(irqs_per_word as usize)
        .map(move |intid| reg_base + intid * bits_per_irq / 8)
}

/// The registers of `bank` (distributor or a redistributor) for INTIDs `first..end`, read with
/// `read`, in restore order.
fn save_irq_regs(
    frame: u32,
    first: u32,
    end: u32,
    mut read: impl FnMut(u32) -> Result<u32, KvmArm64Error>,
) -> Result<Vec<Reg32>, KvmArm64Error> {
    let mut out = Vec::new();
    for reg in &IRQ_REGS {
        for offset in irq_reg_words(frame + reg.set, reg.bits_per_irq, first, end) {
            out.push(Reg32 {
                offset,
                value: read(offset)?,
            });
        }
    }
    Ok(out)
}

/// Writes registers saved by [`save_irq_regs`] (or plain ones): for a set register with a
/// clear twin, clears the bits that were clear first.
fn restore_regs(
    frame: u32,
    regs: &[Reg32],
    mut write: impl FnMut(u32, u32) -> Result<(), KvmArm64Error>,
) -> Result<(), KvmArm64Error> {
    for reg in regs {
        if let Some(clear) = clear_twin(frame, reg.offset) {
            write(clear, !reg.value)?;
        }
        write(reg.offset, reg.value)?;
    }
    Ok(())
}

/// The clear register that pairs with the set register at `offset`, if any.
fn clear_twin(frame: u32, offset: u32) -> Option<u32> {
    let within = offset.checked_sub(frame)?;
    IRQ_REGS.iter().find_map(|reg| {
        let clear = reg.clear?;
        // Per-interrupt banks are 0x80 bytes apart; each holds 1024 one-bit interrupts.
        (within >= reg.set && within < reg.set + 0x80).then(|| frame + clear + (within - reg.set))
    })
}

impl VgicState {
    /// Saves `vgic`, whose vCPUs have `mpidrs` (in vCPU order). No vCPU may be running.
    pub fn save(vgic: &Vgic, mpidrs: &[u64]) -> Result<Self, KvmArm64Error> {
        check_vcpus(vgic, mpidrs.len())?;
        let nr_irqs = layout::GIC_NR_IRQS;
        let spi = layout::SPI_INTID_BASE;
        let dist_get = |offset: u32| vgic.get::<u32>(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset.into());

        let mut dist = vec![Reg32 {
            offset: GICD_IIDR,
            value: dist_get(GICD_IIDR)?,
        }];
        dist.extend(save_irq_regs(0, spi, nr_irqs, dist_get)?);
        for intid in spi..nr_irqs {
            for half in [0, 4] {
                let offset = GICD_IROUTER + intid * 8 + half;
                dist.push(Reg32 {
                    offset,
                    value: dist_get(offset)?,
                });
            }
        }
        dist.push(Reg32 {
            offset: GICD_CTLR,
            value: dist_get(GICD_CTLR)?,
        });

        let any_mpidr = mpidrs.first().copied().unwrap_or_default();
        let spi_levels = (spi..nr_irqs)
            .step_by(32)
            .map(|intid| {
                let attr = level_attr(any_mpidr, intid);
                Ok(Reg32 {
                    offset: intid,
                    value: vgic.get::<u32>(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, attr)?,
                })
            })
            .collect::<Result<_, KvmArm64Error>>()?;

        let cpus = mpidrs
            .iter()
            .map(|&mpidr| save_cpu(vgic, mpidr))
            .collect::<Result<_, _>>()?;
        Ok(VgicState {
            nr_irqs,
            dist,
            spi_levels,
            cpus,
        })
    }

    /// Loads the state into `vgic`, freshly created for vCPUs with `mpidrs` whose own registers
    /// are already restored. No vCPU may be running.
    pub fn restore(&self, vgic: &Vgic, mpidrs: &[u64]) -> Result<(), KvmArm64Error> {
        check_vcpus(vgic, mpidrs.len())?;
        if self.nr_irqs != layout::GIC_NR_IRQS {
            return Err(KvmArm64Error::Mismatch {
                what: "vGIC interrupt count",
                saved: self.nr_irqs.into(),
                here: layout::GIC_NR_IRQS.into(),
            });
        }
        if self.cpus.len() != mpidrs.len() {
            return Err(KvmArm64Error::Mismatch {
                what: "vGIC vCPU count",
                saved: self.cpus.len() as u64,
                here: mpidrs.len() as u64,
            });
        }
        restore_regs(0, &self.dist, |offset, value| {
            vgic.set::<u32>(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset.into(), value)
        })?;
        for (cpu, &mpidr) in self.cpus.iter().zip(mpidrs) {
            if cpu.mpidr != mpidr {
                return Err(KvmArm64Error::Mismatch {
                    what: "vCPU MPIDR",
                    saved: cpu.mpidr,
                    here: mpidr,
                });
            }
            restore_regs(GICR_SGI_FRAME, &cpu.redist, |offset, value| {
                let attr = mpidr_attr(mpidr) | u64::from(offset);
                vgic.set::<u32>(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, attr, value)
            })?;
        }
        let any_mpidr = mpidrs.first().copied().unwrap_or_default();
        for level in &self.spi_levels {
            let attr = level_attr(any_mpidr, level.offset);
            vgic.set::<u32>(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, attr, level.value)?;
        }
        for cpu in &self.cpus {
            let attr = level_attr(cpu.mpidr, 0);
            vgic.set::<u32>(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, attr, cpu.ppi_levels)?;
            for reg in &cpu.icc {
                let attr = mpidr_attr(cpu.mpidr) | reg.encoding;
                vgic.set::<u64>(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, attr, reg.value)?;
            }
        }
        Ok(())
    }
}

fn check_vcpus(vgic: &Vgic, count: usize) -> Result<(), KvmArm64Error> {
    if count as u64 != u64::from(vgic.vcpus()) {
        return Err(KvmArm64Error::Mismatch {
            what: "MPIDR count",
            saved: count as u64,
            here: vgic.vcpus().into(),
        });
    }
    Ok(())
}

fn save_cpu(vgic: &Vgic, mpidr: u64) -> Result<CpuGicState, KvmArm64Error> {
    let rd_get = |offset: u32| {
        vgic.get::<u32>(
            KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
            mpidr_attr(mpidr) | u64::from(offset),
        )
    };
    let mut redist = vec![Reg32 {
        offset: GICR_CTLR,
        value: rd_get(GICR_CTLR)?,
    }];
    redist.extend(save_irq_regs(
        GICR_SGI_FRAME,
        0,
        layout::SPI_INTID_BASE,
        rd_get,
    )?);
    let ppi_levels = vgic.get::<u32>(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, level_attr(mpidr, 0))?;

    let icc_get = |encoding: u64| -> Result<Reg64, KvmArm64Error> {
        let value = vgic.get::<u64>(
            KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            mpidr_attr(mpidr) | encoding,
        )?;
        Ok(Reg64 { encoding, value })
    };
    let ctlr = icc_get(ICC_CTLR_EL1)?;
    let mut icc = vec![icc_get(ICC_SRE_EL1)?, ctlr];
    for encoding in [ICC_PMR_EL1, ICC_BPR0_EL1, ICC_BPR1_EL1] {
        icc.push(icc_get(encoding)?);
    }
    for n in 0..active_priority_regs(ctlr.value) {
        icc.push(icc_get(icc_ap0r(n))?);
        icc.push(icc_get(icc_ap1r(n))?);
    }
    for encoding in [ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1] {
        icc.push(icc_get(encoding)?);
    }
    Ok(CpuGicState {
        mpidr,
        redist,
        ppi_levels,
        icc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpidr_attr_packs_all_four_affinity_levels() {
        // Aff3 = 0x12 (bits 39:32), Aff2 = 0x34, Aff1 = 0x56, Aff0 = 0x78, plus RES1 bit 31.
        let mpidr = 0x12_8034_5678;
        assert_eq!(mpidr_attr(mpidr), 0x1234_5678 << 32);
        assert_eq!(mpidr_attr(0x8000_0001), 1 << 32);
    }

    #[test]
    fn irq_words_cover_the_interrupts_asked_for() {
        // Enables of SPIs 32..128: ISENABLER1..3.
        let words: Vec<u32> = irq_reg_words(0x100, 1, 32, 128).collect();
        assert_eq!(words, [0x104, 0x108, 0x10c]);
        // Priorities of SGIs/PPIs 0..32 in the SGI frame: IPRIORITYR0..7.
        let words: Vec<u32> = irq_reg_words(0x1_0400, 8, 0, 32).collect();
        assert_eq!(words.len(), 8);
        assert_eq!((words[0], words[7]), (0x1_0400, 0x1_041c));
        // Trigger config of SPIs 32..128: ICFGR2..7.
        let words: Vec<u32> = irq_reg_words(0xc00, 2, 32, 128).collect();
        assert_eq!(words, [0xc08, 0xc0c, 0xc10, 0xc14, 0xc18, 0xc1c]);
    }

    #[test]
    fn set_registers_find_their_clear_twins_only() {
        assert_eq!(clear_twin(0, 0x104), Some(0x184));
        assert_eq!(clear_twin(0, 0x30c), Some(0x38c));
        assert_eq!(clear_twin(0x1_0000, 0x1_0100), Some(0x1_0180));
        assert_eq!(clear_twin(0, 0x204), None);
        assert_eq!(clear_twin(0, 0x0080), None);
        assert_eq!(clear_twin(0x1_0000, GICR_CTLR), None);
        assert_eq!(clear_twin(0, GICD_IROUTER + 0x100), None);
    }

    #[test]
    fn active_priority_register_count_follows_pribits() {
        assert_eq!(active_priority_regs(4 << 8), 1);
        assert_eq!(active_priority_regs(5 << 8), 2);
        assert_eq!(active_priority_regs(6 << 8), 4);
    }

    #[test]
    fn icc_encodings_match_the_architecture() {
        // ICC_PMR_EL1 is S3_0_C4_C6_0, ICC_SRE_EL1 S3_0_C12_C12_5.
        assert_eq!(ICC_PMR_EL1, 0xc230);
        assert_eq!(ICC_SRE_EL1, 0xc665);
        assert_eq!(icc_ap1r(3), 0xc64b);
    }
}
