//! The start protocol with a fake hypervisor: every vCPU is created on its own thread, a failure
//! is reported with its typed error, and no vCPU runs before the gate opens.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::hypervisor::x86_64::{
    ArchVcpu, CpuidEntry, FpuControl, LapicState, MsrEntry, Regs, SpecialRegs,
};
use crate::hypervisor::HvError;
use crate::interrupt::InterruptLine;

/// Counts what the fake vCPUs do.
#[derive(Default)]
struct Log {
    /// Threads that created a vCPU, by thread id.
    created_on: Mutex<Vec<std::thread::ThreadId>>,
    runs: AtomicUsize,
    ends: Mutex<Vec<VcpuEnd>>,
}

struct FakeVm {
    fail: Option<u32>,
    log: Arc<Log>,
}

struct FakeVcpu {
    id: u32,
    log: Arc<Log>,
}

struct NoKick;

impl VcpuKicker for NoKick {
    fn kick(&self) {}
}

impl EndSink for Log {
    fn vcpu_ended(&self, end: VcpuEnd) {
        self.ends.lock().unwrap().push(end);
    }
}

fn refused() -> HvError {
    HvError::Unsupported {
        what: "not used by this test".into(),
    }
}

impl HvVm for FakeVm {
    fn map_memory(&self, _: &Arc<GuestMemoryMmap>) -> Result<(), HvError> {
        Err(refused())
    }
    fn create_irqchip(&self) -> Result<(), HvError> {
        Err(refused())
    }
    fn interrupt_line(&self, _: u32) -> Result<Arc<dyn InterruptLine>, HvError> {
        Err(refused())
    }
    fn bind_queue_notify(&self, _: &EventFd, _: u64, _: u32) -> Result<(), HvError> {
        Err(refused())
    }
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn HvVcpu>, HvError> {
        if self.fail == Some(id) {
            return Err(HvError::Call {
                op: "KVM_CREATE_VCPU",
                source: std::io::Error::from_raw_os_error(libc::EEXIST),
            });
        }
        self.log
            .created_on
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        Ok(Box::new(FakeVcpu {
            id,
            log: Arc::clone(&self.log),
        }))
    }
    fn save_state(&self) -> Result<HvState, HvError> {
        Err(refused())
    }
    fn restore_state(&self, _: &HvState) -> Result<(), HvError> {
        Err(refused())
    }
}

impl HvVcpu for FakeVcpu {
    fn id(&self) -> u32 {
        self.id
    }
    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(NoKick)
    }
    fn run(&mut self) -> Result<VcpuExit<'_>, HvError> {
        self.log.runs.fetch_add(1, Ordering::SeqCst);
        Ok(VcpuExit::SystemEvent(SystemEvent::Shutdown))
    }
    fn instruction_pointer(&self) -> Result<u64, HvError> {
        Err(refused())
    }
    fn save_state(&mut self) -> Result<HvState, HvError> {
        Err(refused())
    }
    fn restore_state(&mut self, _: &HvState) -> Result<(), HvError> {
        Ok(())
    }
}

impl ArchVcpu for FakeVcpu {
    fn regs(&self) -> Result<Regs, HvError> {
        Err(refused())
    }
    fn set_regs(&self, _: &Regs) -> Result<(), HvError> {
        Err(refused())
    }
    fn sregs(&self) -> Result<SpecialRegs, HvError> {
        Err(refused())
    }
    fn set_sregs(&self, _: &SpecialRegs) -> Result<(), HvError> {
        Err(refused())
    }
    fn set_fpu(&self, _: &FpuControl) -> Result<(), HvError> {
        Err(refused())
    }
    fn set_cpuid(&self, _: &[CpuidEntry]) -> Result<(), HvError> {
        Err(refused())
    }
    fn set_msrs(&self, _: &[MsrEntry]) -> Result<(), HvError> {
        Err(refused())
    }
    fn lapic(&self) -> Result<LapicState, HvError> {
        Err(refused())
    }
    fn set_lapic(&self, _: &LapicState) -> Result<(), HvError> {
        Err(refused())
    }
}

/// Spawns `n` vCPU threads on a fake VM and collects their reports.
fn start(
    n: u32,
    fail: Option<u32>,
) -> (Arc<Log>, Arc<RunControl>, Vec<JoinHandle<()>>, Vec<Ready>) {
    let log = Arc::new(Log::default());
    let vm: Arc<dyn HvVm> = Arc::new(FakeVm {
        fail,
        log: Arc::clone(&log),
    });
    let control = RunControl::new();
    let ctx = Arc::new(VcpuContext {
        mmio: Arc::new(Bus::new()),
        pio: Arc::new(Bus::new()),
        control: Arc::clone(&control),
        end: log.clone(),
    });
    let (tx, rx) = mpsc::channel();
    let threads = (0..n)
        .map(|id| {
            let setup = VcpuSetup::Restore(HvState {
                backend: "fake".into(),
                bytes: Vec::new(),
            });
            spawn(id, Arc::clone(&vm), setup, Arc::clone(&ctx), tx.clone()).unwrap()
        })
        .collect();
    drop(tx);
    let reports = rx.iter().collect();
    (log, control, threads, reports)
}

#[test]
fn a_failed_vcpu_is_reported_and_nothing_runs() {
    let (log, control, threads, reports) = start(3, Some(1));
    assert_eq!(reports.len(), 3);
    let failed: Vec<_> = reports.iter().filter(|(_, r)| r.is_err()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, 1);
    assert!(matches!(
        &failed[0].1,
        Err(Error::Hypervisor(HvError::Call {
            op: "KVM_CREATE_VCPU",
            ..
        }))
    ));
    // The machine gives up: the waiting vCPUs leave without entering the guest.
    control.request_stop();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(log.runs.load(Ordering::SeqCst), 0);
    assert!(log.ends.lock().unwrap().is_empty());
}

#[test]
fn vcpus_are_created_on_their_own_threads_and_run_after_the_gate() {
    let (log, control, threads, reports) = start(2, None);
    assert!(reports.iter().all(|(_, r)| r.is_ok()));
    let created = log.created_on.lock().unwrap().clone();
    assert_eq!(created.len(), 2);
    assert_ne!(created[0], created[1]);
    assert!(!created.contains(&std::thread::current().id()));
    assert_eq!(log.runs.load(Ordering::SeqCst), 0, "ran before the gate");
    control.open_gate();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(log.runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        *log.ends.lock().unwrap(),
        vec![VcpuEnd::Shutdown, VcpuEnd::Shutdown]
    );
}
