//! PSCI 1.0 (and the SMCCC discovery calls) over HVC/SMC, which KVM implements in the kernel and
//! Hypervisor.framework leaves to the VMM: CPU_ON/CPU_OFF with a per-VM board of which vCPU is
//! powered, SYSTEM_OFF/SYSTEM_RESET as power events, VERSION, FEATURES, AFFINITY_INFO and
//! MIGRATE_INFO_TYPE (Arm DEN 0022).

use std::sync::{Arc, Mutex, MutexGuard};

use super::wait::Waker;

/// Function ids (SMC32 and SMC64 forms where both exist).
mod func {
    pub const VERSION: u32 = 0x8400_0000;
    pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
    pub const CPU_OFF: u32 = 0x8400_0002;
    pub const CPU_ON_32: u32 = 0x8400_0003;
    pub const CPU_ON_64: u32 = 0xc400_0003;
    pub const AFFINITY_INFO_32: u32 = 0x8400_0004;
    pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    pub const FEATURES: u32 = 0x8400_000a;
    pub const SMCCC_VERSION: u32 = 0x8000_0000;
}

/// PSCI return codes.
pub(crate) mod ret {
    pub const SUCCESS: i64 = 0;
    pub const NOT_SUPPORTED: i64 = -1;
    pub const INVALID_PARAMETERS: i64 = -2;
    pub const ALREADY_ON: i64 = -4;
    pub const ON_PENDING: i64 = -5;
}

/// PSCI 1.0, as `VERSION` reports it (major << 16 | minor).
pub(crate) const PSCI_VERSION: u64 = 1 << 16;
/// SMCCC 1.1: the version Linux expects before it asks for the firmware workarounds.
const SMCCC_VERSION: u64 = 0x1_0001;
/// MIGRATE_INFO_TYPE: no Trusted OS, nothing to migrate.
const NO_TRUSTED_OS: u64 = 2;
/// AFFINITY_INFO answers.
const AFFINITY_ON: u64 = 0;
const AFFINITY_OFF: u64 = 1;
/// The MPIDR bits that name a CPU (Aff3, Aff2, Aff1, Aff0).
const MPIDR_AFFINITY: u64 = 0xff_00ff_ffff;

/// What the calling vCPU does after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Put this in X0 and go on.
    Return(u64),
    /// This vCPU powered itself off: wait for a CPU_ON.
    Off,
    /// Power the machine off.
    SystemOff,
    /// Reset the machine.
    SystemReset,
}

/// The power state of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Power {
    /// Running (or runnable).
    On,
    /// Off until a CPU_ON names it.
    Off,
    /// A CPU_ON named it: enter at `entry` with X0 = `context` on its next run.
    Pending {
        /// Where it starts (an IPA).
        entry: u64,
        /// Its X0.
        context: u64,
    },
}

struct Slot {
    mpidr: u64,
    power: Power,
    waker: Arc<Waker>,
}

/// Which vCPU of a VM is powered, and how to wake each: shared by its vCPUs.
#[derive(Default)]
pub(crate) struct PowerBoard {
    slots: Mutex<Vec<Option<Slot>>>,
}

impl PowerBoard {
    fn slots(&self) -> MutexGuard<'_, Vec<Option<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds vCPU `id` with affinity `mpidr`, powered as `power`.
    pub(crate) fn register(&self, id: u32, mpidr: u64, power: Power, waker: Arc<Waker>) {
        let mut slots = self.slots();
        let i = id as usize;
        if slots.len() <= i {
            slots.resize_with(i + 1, || None);
        }
        slots[i] = Some(Slot {
            mpidr: mpidr & MPIDR_AFFINITY,
            power,
            waker,
        });
    }

    /// vCPU `id`'s power state.
    pub(crate) fn power(&self, id: u32) -> Power {
        self.slots()
            .get(id as usize)
            .and_then(|s| s.as_ref())
            .map_or(Power::Off, |s| s.power)
    }

    /// Sets vCPU `id`'s power state (a restore, or the vCPU taking up a pending CPU_ON).
    pub(crate) fn set_power(&self, id: u32, power: Power) {
        if let Some(Some(slot)) = self.slots().get_mut(id as usize) {
            slot.power = power;
        }
    }

    /// Handles the call in `x[0..4]` made by vCPU `caller`.
    pub(crate) fn call(&self, caller: u32, x: [u64; 4]) -> Outcome {
        // SMC32 calls carry their arguments in W registers.
        let function = x[0] as u32;
        let arg = |i: usize| {
            if function & 0x4000_0000 == 0 {
                x[i] & 0xffff_ffff
            } else {
                x[i]
            }
        };
        match function {
            func::VERSION => Outcome::Return(PSCI_VERSION),
            func::SMCCC_VERSION => Outcome::Return(SMCCC_VERSION),
            func::MIGRATE_INFO_TYPE => Outcome::Return(NO_TRUSTED_OS),
            func::FEATURES => Outcome::Return(code(features(arg(1) as u32))),
            func::CPU_ON_32 | func::CPU_ON_64 => {
                Outcome::Return(code(self.cpu_on(arg(1), arg(2), arg(3))))
            }
            func::CPU_OFF => {
                self.set_power(caller, Power::Off);
                Outcome::Off
            }
            func::AFFINITY_INFO_32 | func::AFFINITY_INFO_64 => {
                Outcome::Return(self.affinity_info(arg(1), arg(2)))
            }
            func::SYSTEM_OFF => Outcome::SystemOff,
            func::SYSTEM_RESET => Outcome::SystemReset,
            _ => Outcome::Return(code(ret::NOT_SUPPORTED)),
        }
    }

    /// CPU_ON: marks the target pending and wakes it.
    fn cpu_on(&self, target: u64, entry: u64, context: u64) -> i64 {
        let mut slots = self.slots();
        let Some(slot) = slots
            .iter_mut()
            .flatten()
            .find(|s| s.mpidr == target & MPIDR_AFFINITY)
        else {
            return ret::INVALID_PARAMETERS;
        };
        match slot.power {
            Power::On => ret::ALREADY_ON,
            Power::Pending { .. } => ret::ON_PENDING,
            Power::Off => {
                slot.power = Power::Pending { entry, context };
                slot.waker.wake();
                ret::SUCCESS
            }
        }
    }

    /// AFFINITY_INFO for one CPU (level 0 only, as Linux asks).
    fn affinity_info(&self, target: u64, level: u64) -> u64 {
        if level != 0 {
            return code(ret::INVALID_PARAMETERS);
        }
        let slots = self.slots();
        match slots
            .iter()
            .flatten()
            .find(|s| s.mpidr == target & MPIDR_AFFINITY)
        {
            None => code(ret::INVALID_PARAMETERS),
            Some(s) if s.power == Power::Off => AFFINITY_OFF,
            Some(_) => AFFINITY_ON,
        }
    }
}

/// FEATURES: which functions exist (0) or not.
fn features(function: u32) -> i64 {
    match function {
        func::VERSION
        | func::CPU_OFF
        | func::CPU_ON_32
        | func::CPU_ON_64
        | func::AFFINITY_INFO_32
        | func::AFFINITY_INFO_64
        | func::MIGRATE_INFO_TYPE
        | func::SYSTEM_OFF
        | func::SYSTEM_RESET
        | func::FEATURES => ret::SUCCESS,
        // CPU_SUSPEND is not offered: idle CPUs use WFI, which the backend handles.
        func::CPU_SUSPEND_32 => ret::NOT_SUPPORTED,
        _ => ret::NOT_SUPPORTED,
    }
}

/// A return code as the 64-bit X0 value.
fn code(c: i64) -> u64 {
    c as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(n: u32) -> (PowerBoard, Vec<Arc<Waker>>) {
        let board = PowerBoard::default();
        let wakers: Vec<_> = (0..n).map(|_| Arc::new(Waker::default())).collect();
        for (i, w) in wakers.iter().enumerate() {
            let power = if i == 0 { Power::On } else { Power::Off };
            // Bit 31 is RES1 in a real MPIDR; CPU_ON names the affinity bits only.
            board.register(i as u32, (1 << 31) | i as u64, power, Arc::clone(w));
        }
        (board, wakers)
    }

    #[test]
    fn version_features_and_discovery() {
        let (b, _) = board(1);
        assert_eq!(b.call(0, [0x8400_0000, 0, 0, 0]), Outcome::Return(0x1_0000));
        assert_eq!(b.call(0, [0x8000_0000, 0, 0, 0]), Outcome::Return(0x1_0001));
        assert_eq!(b.call(0, [0x8400_0006, 0, 0, 0]), Outcome::Return(2));
        for supported in [0xc400_0003u64, 0x8400_0008, 0x8400_0009, 0x8400_0002] {
            assert_eq!(
                b.call(0, [0x8400_000a, supported, 0, 0]),
                Outcome::Return(0),
                "{supported:#x}"
            );
        }
        assert_eq!(
            b.call(0, [0x8400_000a, 0x8400_0001, 0, 0]),
            Outcome::Return(-1i64 as u64),
            "CPU_SUSPEND is not offered"
        );
        assert_eq!(
            b.call(0, [0x8400_00ff, 0, 0, 0]),
            Outcome::Return(-1i64 as u64),
            "unknown function"
        );
    }

    #[test]
    fn cpu_on_powers_a_secondary_once_and_wakes_it() {
        let (b, wakers) = board(3);
        let before = wakers[2].generation();
        assert_eq!(
            b.call(0, [0xc400_0003, 2, 0x8020_0000, 0x1234]),
            Outcome::Return(0)
        );
        assert_eq!(
            b.power(2),
            Power::Pending {
                entry: 0x8020_0000,
                context: 0x1234
            }
        );
        assert_ne!(wakers[2].generation(), before, "the target was woken");
        assert_eq!(wakers[1].generation(), 0, "nobody else was");
        // Again while pending, then once it runs.
        assert_eq!(
            b.call(0, [0xc400_0003, 2, 0, 0]),
            Outcome::Return(ret::ON_PENDING as u64)
        );
        b.set_power(2, Power::On);
        assert_eq!(
            b.call(0, [0xc400_0003, 2, 0, 0]),
            Outcome::Return(ret::ALREADY_ON as u64)
        );
        // No such CPU.
        assert_eq!(
            b.call(0, [0xc400_0003, 9, 0, 0]),
            Outcome::Return(ret::INVALID_PARAMETERS as u64)
        );
    }

    #[test]
    fn smc32_cpu_on_uses_w_registers() {
        let (b, _) = board(2);
        assert_eq!(
            b.call(
                0,
                [0x8400_0003, 0xffff_ffff_0000_0001, 0xdead_0000_8000_0000, 0]
            ),
            Outcome::Return(0)
        );
        assert_eq!(
            b.power(1),
            Power::Pending {
                entry: 0x8000_0000,
                context: 0
            }
        );
    }

    #[test]
    fn cpu_off_and_affinity_info() {
        let (b, _) = board(2);
        assert_eq!(b.call(0, [0xc400_0004, 1, 0, 0]), Outcome::Return(1), "off");
        assert_eq!(b.call(0, [0xc400_0004, 0, 0, 0]), Outcome::Return(0), "on");
        b.set_power(1, Power::On);
        assert_eq!(b.call(1, [0x8400_0002, 0, 0, 0]), Outcome::Off);
        assert_eq!(b.power(1), Power::Off);
        assert_eq!(
            b.call(0, [0xc400_0004, 0, 1, 0]),
            Outcome::Return(ret::INVALID_PARAMETERS as u64),
            "levels above 0"
        );
    }

    #[test]
    fn system_off_and_reset_are_power_events() {
        let (b, _) = board(1);
        assert_eq!(b.call(0, [0x8400_0008, 0, 0, 0]), Outcome::SystemOff);
        assert_eq!(b.call(0, [0x8400_0009, 0, 0, 0]), Outcome::SystemReset);
        // The upper half of X0 is ignored for SMC32 ids.
        assert_eq!(
            b.call(0, [0xffff_ffff_8400_0008, 0, 0, 0]),
            Outcome::SystemOff
        );
    }
}
