//! A fake Hypervisor.framework for unit tests on any host: registers live in maps, `run` pops
//! scripted exits, and VM-wide calls are recorded for the tests to check.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::framework::{Exit, Framework, FwCode, FwError, FwVcpu, IccReg, Reg, SysReg, VmSetup};

/// What the fake VM was asked to do.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    /// `set_spi` calls, in order.
    pub spis: Vec<(u32, bool)>,
    /// Handles passed to `exit_vcpus`.
    pub exits: Vec<u64>,
    /// Guest-physical ranges mapped.
    pub maps: Vec<(u64, usize)>,
}

/// A fake VM.
#[derive(Default)]
pub(crate) struct FakeFramework {
    /// Recorded calls.
    pub calls: Mutex<Calls>,
    /// The GIC's opaque state.
    pub gic: Mutex<Vec<u8>>,
    /// The host counter (24 MHz, as on Apple silicon).
    pub ticks: AtomicU64,
    next_vcpu: AtomicU64,
}

impl FakeFramework {
    /// The calls so far.
    pub(crate) fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap()
    }
}

impl Framework for FakeFramework {
    type Vcpu = FakeVcpu;
    type Handle = u64;

    fn create(setup: &VmSetup) -> Result<Self, FwError> {
        if setup.ipa_bits > 40 {
            return Err(FwError::new("hv_vm_create", FwCode::Unsupported));
        }
        Ok(FakeFramework::default())
    }

    fn max_vcpus() -> Result<u32, FwError> {
        Ok(8)
    }

    unsafe fn map(&self, _host: *mut u8, gpa: u64, size: usize) -> Result<(), FwError> {
        self.calls().maps.push((gpa, size));
        Ok(())
    }

    fn create_vcpu(&self) -> Result<FakeVcpu, FwError> {
        Ok(FakeVcpu {
            handle: self.next_vcpu.fetch_add(1, Ordering::SeqCst),
            ..FakeVcpu::default()
        })
    }

    fn exit_vcpus(&self, vcpus: &[u64]) -> Result<(), FwError> {
        self.calls().exits.extend_from_slice(vcpus);
        Ok(())
    }

    fn set_spi(&self, intid: u32, level: bool) -> Result<(), FwError> {
        self.calls().spis.push((intid, level));
        Ok(())
    }

    fn gic_state(&self) -> Result<Vec<u8>, FwError> {
        Ok(self.gic.lock().unwrap().clone())
    }

    fn set_gic_state(&self, data: &[u8]) -> Result<(), FwError> {
        *self.gic.lock().unwrap() = data.to_vec();
        Ok(())
    }

    fn counter(&self) -> (u64, u64) {
        (self.ticks.load(Ordering::SeqCst), 24_000_000)
    }
}

/// A fake vCPU.
#[derive(Default)]
pub(crate) struct FakeVcpu {
    handle: u64,
    /// Exits `run` returns, in order; once empty, `run` returns `Exit::Unknown(0)`.
    pub script: VecDeque<Exit>,
    /// Called at each `run` before the exit is popped (a test's "guest").
    #[allow(clippy::type_complexity)]
    pub on_run: Option<Arc<dyn Fn(&mut FakeVcpu) + Send + Sync>>,
    /// How many times `run` was called.
    pub runs: usize,
    /// General-purpose and special registers.
    pub regs: HashMap<Reg, u64>,
    /// SIMD registers.
    pub simd: HashMap<u8, u128>,
    /// System registers.
    pub sys: HashMap<SysReg, u64>,
    /// GIC CPU-interface registers.
    pub icc: HashMap<IccReg, u64>,
    /// Whether an SGI or PPI is pending for this vCPU.
    pub sgi_pending: bool,
    /// PPIs marked pending.
    pub ppis: Vec<u32>,
    /// The vtimer mask.
    pub vtimer_masked: bool,
    /// The vtimer offset.
    pub vtimer_offset: u64,
}

impl FwVcpu for FakeVcpu {
    type Handle = u64;

    fn handle(&self) -> u64 {
        self.handle
    }

    fn run(&mut self) -> Result<Exit, FwError> {
        self.runs += 1;
        if let Some(hook) = self.on_run.clone() {
            hook(self);
        }
        Ok(self.script.pop_front().unwrap_or(Exit::Unknown(0)))
    }

    fn reg(&self, reg: Reg) -> Result<u64, FwError> {
        Ok(self.regs.get(&reg).copied().unwrap_or(0))
    }

    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<(), FwError> {
        self.regs.insert(reg, value);
        Ok(())
    }

    fn simd(&self, n: u8) -> Result<u128, FwError> {
        Ok(self.simd.get(&n).copied().unwrap_or(0))
    }

    fn set_simd(&mut self, n: u8, value: u128) -> Result<(), FwError> {
        self.simd.insert(n, value);
        Ok(())
    }

    fn sys_reg(&self, reg: SysReg) -> Result<u64, FwError> {
        Ok(self.sys.get(&reg).copied().unwrap_or(0))
    }

    fn set_sys_reg(&mut self, reg: SysReg, value: u64) -> Result<(), FwError> {
        self.sys.insert(reg, value);
        Ok(())
    }

    fn icc_reg(&self, reg: IccReg) -> Result<u64, FwError> {
        Ok(self.icc.get(&reg).copied().unwrap_or(0))
    }

    fn set_icc_reg(&mut self, reg: IccReg, value: u64) -> Result<(), FwError> {
        self.icc.insert(reg, value);
        Ok(())
    }

    fn sgi_ppi_pending(&self) -> Result<bool, FwError> {
        Ok(self.sgi_pending)
    }

    fn set_ppi_pending(&mut self, intid: u32) -> Result<(), FwError> {
        self.ppis.push(intid);
        Ok(())
    }

    fn set_vtimer_masked(&mut self, masked: bool) -> Result<(), FwError> {
        self.vtimer_masked = masked;
        Ok(())
    }

    fn vtimer_offset(&self) -> Result<u64, FwError> {
        Ok(self.vtimer_offset)
    }

    fn set_vtimer_offset(&mut self, offset: u64) -> Result<(), FwError> {
        self.vtimer_offset = offset;
        Ok(())
    }
}
