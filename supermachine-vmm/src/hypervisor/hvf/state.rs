//! Snapshot state of the HVF backend: per vCPU every register a Linux guest's EL1 context lives
//! in (general, SIMD/FP, the system registers of [`SysReg::ALL`], the GIC CPU interface), its
//! virtual counter, timer mask and PSCI power state; per VM the framework's GIC state. Encoded
//! by [`crate::hypervisor::blob`] under the name "hvf", so a KVM snapshot is refused here (and
//! this one there) by name.
//!
//! The virtual counter is saved as the guest saw it and the vtimer offset recomputed on
//! restore, so the guest's clock continues from the snapshot instead of jumping by the host's
//! uptime (what KVM does with CNTVCT_EL0).

use serde::{Deserialize, Serialize};

use super::engine::Engine;
use super::framework::{Framework, FwError, FwVcpu, IccReg, Reg, SysReg};
use super::psci::Power;
use crate::hypervisor::{blob, HvError, HvState};

/// The backend name in saved state.
pub(crate) const BACKEND: &str = "hvf";

/// One vCPU's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VcpuState {
    x: Vec<u64>,
    pc: u64,
    cpsr: u64,
    fpcr: u64,
    fpsr: u64,
    simd: Vec<u128>,
    sys: Vec<(SysReg, u64)>,
    icc: Vec<(IccReg, u64)>,
    /// The guest's virtual count at the save.
    counter: u64,
    timer_masked: bool,
    power: Power,
}

/// The VM's saved state: the framework's GIC blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VmState {
    gic: Vec<u8>,
}

fn fw_err(what: &'static str) -> impl Fn(FwError) -> HvError {
    move |e| HvError::Arch {
        what,
        source: Box::new(e),
    }
}

/// Saves vCPU `engine` (between two runs, no MMIO load pending: see `HvVcpu::save_state`).
pub(crate) fn save_vcpu<F: Framework>(engine: &Engine<F>) -> Result<HvState, HvError> {
    let err = fw_err("saving an HVF vCPU");
    let v = &engine.vcpu;
    let x = (0..31u8)
        .map(|n| v.reg(Reg::X(n)))
        .collect::<Result<_, _>>()
        .map_err(&err)?;
    let simd = (0..32u8)
        .map(|n| v.simd(n))
        .collect::<Result<_, _>>()
        .map_err(&err)?;
    let sys = SysReg::ALL
        .iter()
        .map(|&r| v.sys_reg(r).map(|value| (r, value)))
        .collect::<Result<_, _>>()
        .map_err(&err)?;
    let icc = IccReg::ALL
        .iter()
        .map(|&r| v.icc_reg(r).map(|value| (r, value)))
        .collect::<Result<_, _>>()
        .map_err(&err)?;
    let (host, _) = engine.fw.counter();
    let counter = host.wrapping_sub(v.vtimer_offset().map_err(&err)?);
    let state = VcpuState {
        x,
        pc: v.reg(Reg::Pc).map_err(&err)?,
        cpsr: v.reg(Reg::Cpsr).map_err(&err)?,
        fpcr: v.reg(Reg::Fpcr).map_err(&err)?,
        fpsr: v.reg(Reg::Fpsr).map_err(&err)?,
        simd,
        sys,
        icc,
        counter,
        timer_masked: engine.timer_masked,
        power: engine.shared.board.power(engine.id),
    };
    blob::encode(BACKEND, &state)
}

/// Loads a saved vCPU into the fresh vCPU `engine`.
pub(crate) fn restore_vcpu<F: Framework>(
    engine: &mut Engine<F>,
    state: &HvState,
) -> Result<(), HvError> {
    let s: VcpuState = blob::decode(BACKEND, state, "vCPU")?;
    if s.x.len() != 31 || s.simd.len() != 32 {
        return Err(HvError::BadState(format!(
            "vCPU state has {} general and {} SIMD registers (31 and 32 expected)",
            s.x.len(),
            s.simd.len()
        )));
    }
    let err = fw_err("restoring an HVF vCPU");
    let v = &mut engine.vcpu;
    for (n, &value) in s.x.iter().enumerate() {
        v.set_reg(Reg::X(n as u8), value).map_err(&err)?;
    }
    for (reg, value) in [
        (Reg::Pc, s.pc),
        (Reg::Cpsr, s.cpsr),
        (Reg::Fpcr, s.fpcr),
        (Reg::Fpsr, s.fpsr),
    ] {
        v.set_reg(reg, value).map_err(&err)?;
    }
    for (n, &value) in s.simd.iter().enumerate() {
        v.set_simd(n as u8, value).map_err(&err)?;
    }
    for &(reg, value) in &s.sys {
        v.set_sys_reg(reg, value).map_err(&err)?;
    }
    for &(reg, value) in &s.icc {
        v.set_icc_reg(reg, value).map_err(&err)?;
    }
    let (host, _) = engine.fw.counter();
    v.set_vtimer_offset(host.wrapping_sub(s.counter))
        .map_err(&err)?;
    v.set_vtimer_masked(s.timer_masked).map_err(&err)?;
    engine.timer_masked = s.timer_masked;
    engine.shared.board.set_power(engine.id, s.power);
    Ok(())
}

/// Saves the VM's GIC.
pub(crate) fn save_vm<F: Framework>(fw: &F) -> Result<HvState, HvError> {
    let gic = fw.gic_state().map_err(fw_err("saving the HVF GIC"))?;
    blob::encode(BACKEND, &VmState { gic })
}

/// Decodes saved VM state (to load with [`load_vm`] once the vCPUs exist).
pub(crate) fn decode_vm(state: &HvState) -> Result<VmState, HvError> {
    blob::decode(BACKEND, state, "VM")
}

/// Loads decoded VM state into the GIC.
pub(crate) fn load_vm<F: Framework>(fw: &F, state: &VmState) -> Result<(), HvError> {
    fw.set_gic_state(&state.gic)
        .map_err(fw_err("restoring the HVF GIC"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::*;
    use crate::hypervisor::hvf::engine::VmShared;
    use crate::hypervisor::hvf::fake::FakeFramework;
    use crate::hypervisor::hvf::framework::VmSetup;
    use crate::hypervisor::hvf::wait::Waker;

    fn engine(fw: &Arc<FakeFramework>, id: u32, power: Power) -> Engine<FakeFramework> {
        let shared = Arc::new(VmShared::default());
        let waker = Arc::new(Waker::default());
        shared
            .board
            .register(id, u64::from(id), power, Arc::clone(&waker));
        let vcpu = fw.create_vcpu().unwrap();
        Engine::new(Arc::clone(fw), vcpu, id, shared, waker)
    }

    fn fake() -> Arc<FakeFramework> {
        Arc::new(
            FakeFramework::create(&VmSetup {
                ipa_bits: 40,
                gic_distributor: 0,
                gic_redistributors: 0,
                gic_redistributors_end: 0,
            })
            .unwrap(),
        )
    }

    #[test]
    fn a_vcpu_round_trips_through_saved_state() {
        let (fw_a, fw_b) = (fake(), fake());
        let mut a = engine(
            &fw_a,
            1,
            Power::Pending {
                entry: 0x8020_0000,
                context: 7,
            },
        );
        for n in 0..31u8 {
            a.vcpu.regs.insert(Reg::X(n), 0x1000 + u64::from(n));
        }
        a.vcpu.regs.insert(Reg::Pc, 0x8000_1234);
        a.vcpu.regs.insert(Reg::Cpsr, 0x3c5);
        a.vcpu.regs.insert(Reg::Fpcr, 3);
        a.vcpu.regs.insert(Reg::Fpsr, 4);
        for n in 0..32u8 {
            a.vcpu.simd.insert(n, u128::MAX - u128::from(n));
        }
        for (i, &r) in SysReg::ALL.iter().enumerate() {
            a.vcpu.sys.insert(r, 0xabc0_0000 + i as u64);
        }
        for (i, &r) in IccReg::ALL.iter().enumerate() {
            a.vcpu.icc.insert(r, 0x10 + i as u64);
        }
        a.timer_masked = true;
        // Guest counter at the save: 1_000_000 - 400_000.
        fw_a.ticks.store(1_000_000, Ordering::SeqCst);
        a.vcpu.vtimer_offset = 400_000;

        let saved = save_vcpu(&a).unwrap();
        assert_eq!(saved.backend, "hvf");

        fw_b.ticks.store(9_000_000, Ordering::SeqCst);
        let mut b = engine(&fw_b, 1, Power::Off);
        restore_vcpu(&mut b, &saved).unwrap();
        assert_eq!(b.vcpu.regs, a.vcpu.regs);
        assert_eq!(b.vcpu.simd, a.vcpu.simd);
        assert_eq!(b.vcpu.sys, a.vcpu.sys);
        assert_eq!(b.vcpu.icc, a.vcpu.icc);
        assert!(b.timer_masked && b.vcpu.vtimer_masked);
        assert_eq!(b.shared.board.power(1), a.shared.board.power(1));
        // The guest's clock continues where it was: 9_000_000 - offset == 600_000.
        assert_eq!(9_000_000 - b.vcpu.vtimer_offset, 600_000);
        // And it saves to the same bytes again.
        assert_eq!(save_vcpu(&b).unwrap().bytes.len(), saved.bytes.len());
    }

    #[test]
    fn the_gic_round_trips_and_other_backends_state_is_refused_by_name() {
        let (fw_a, fw_b) = (fake(), fake());
        *fw_a.gic.lock().unwrap() = vec![1, 2, 3, 4];
        let saved = save_vm(&*fw_a).unwrap();
        load_vm(&*fw_b, &decode_vm(&saved).unwrap()).unwrap();
        assert_eq!(*fw_b.gic.lock().unwrap(), [1, 2, 3, 4]);

        let kvm = HvState {
            backend: "kvm".into(),
            bytes: saved.bytes.clone(),
        };
        let msg = decode_vm(&kvm).unwrap_err().to_string();
        assert!(
            msg.contains("saved by the kvm backend, this is hvf"),
            "{msg}"
        );
        let mut b = engine(&fw_b, 0, Power::On);
        let msg = restore_vcpu(&mut b, &kvm).unwrap_err().to_string();
        assert!(msg.contains("kvm backend"), "{msg}");
        // Garbage under the right name is refused too, never guessed at.
        let junk = HvState {
            backend: "hvf".into(),
            bytes: vec![0xff; 3],
        };
        assert!(restore_vcpu(&mut b, &junk).is_err());
    }
}
