//! The start protocol with a fake hypervisor: every vCPU is created on its own thread, a failure
//! is reported with its typed error, and no vCPU runs before the gate opens; and a power event
//! from any one vCPU ends them all (arm64 KVM reports PSCI `SYSTEM_OFF` only to the vCPU that
//! called it and leaves the others asleep in `KVM_RUN`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::*;
#[cfg(target_arch = "x86_64")]
use crate::hypervisor::x86_64::{CpuidEntry, FpuControl, LapicState, MsrEntry, Regs, SpecialRegs};
use crate::hypervisor::{ArchVcpu, HvError};
use crate::interrupt::InterruptLine;

/// Counts what the fake vCPUs do.
#[derive(Default)]
struct Log {
    /// Threads that created a vCPU, by thread id.
    created_on: Mutex<Vec<std::thread::ThreadId>>,
    runs: AtomicUsize,
    /// vCPUs asleep in a run.
    asleep: AtomicUsize,
    ends: Mutex<Vec<VcpuEnd>>,
    /// Ranges pre-faulted, as (guest address, bytes).
    prefaulted: Mutex<Vec<(u64, u64)>>,
}

struct FakeVm {
    fail: Option<u32>,
    vcpus: u32,
    /// The vCPU whose run makes a power-off request; the others sleep "in the guest" until
    /// kicked. `None`: every vCPU's first run powers off.
    power_off_from: Option<u32>,
    log: Arc<Log>,
}

struct FakeVcpu {
    id: u32,
    sleeps: bool,
    /// For the vCPU that powers off while others sleep: how many.
    others_to_sleep: Option<usize>,
    kicker: Arc<SleepKick>,
    log: Arc<Log>,
}

/// A vCPU asleep in the hypervisor's run call, as KVM leaves the vCPUs that did not make a PSCI
/// call: only a kick wakes it.
#[derive(Default)]
struct SleepKick {
    kicked: Mutex<bool>,
    woken: Condvar,
}

impl SleepKick {
    /// Sleeps until kicked (at most 10 s, so a broken stop fails the test instead of hanging).
    fn sleep(&self) -> bool {
        let guard = self.kicked.lock().unwrap();
        let (mut guard, _) = self
            .woken
            .wait_timeout_while(guard, Duration::from_secs(10), |kicked| !*kicked)
            .unwrap();
        std::mem::take(&mut *guard)
    }
}

impl VcpuKicker for SleepKick {
    fn kick(&self) {
        *self.kicked.lock().unwrap() = true;
        self.woken.notify_all();
    }
}

/// Where the vCPUs report; with `stops`, also what the machine's exit does with the first
/// report: stop every vCPU (`ExitRecorder::finish` → `RunControl::request_stop`).
struct Sink {
    log: Arc<Log>,
    control: Arc<RunControl>,
    stops: bool,
}

impl EndSink for Sink {
    fn vcpu_ended(&self, end: VcpuEnd) {
        self.log.ends.lock().unwrap().push(end);
        if self.stops {
            self.control.request_stop();
        }
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
            sleeps: self.power_off_from.is_some_and(|from| from != id),
            others_to_sleep: (self.power_off_from == Some(id)).then_some(self.vcpus as usize - 1),
            kicker: Arc::default(),
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
        self.kicker.clone()
    }
    fn run(&mut self) -> Result<VcpuExit<'_>, HvError> {
        self.log.runs.fetch_add(1, Ordering::SeqCst);
        if self.sleeps {
            self.log.asleep.fetch_add(1, Ordering::SeqCst);
            if self.kicker.sleep() {
                return Ok(VcpuExit::Interrupted);
            }
            return Err(refused());
        }
        if let Some(others) = self.others_to_sleep {
            // Power off only once every other vCPU is inside its run.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while self.log.asleep.load(Ordering::SeqCst) < others {
                if std::time::Instant::now() > deadline {
                    return Err(refused());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
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
    fn prefault(&self, gpa: u64, len: u64) -> Result<bool, HvError> {
        self.log.prefaulted.lock().unwrap().push((gpa, len));
        Ok(true)
    }
}

#[cfg(target_arch = "aarch64")]
impl ArchVcpu for FakeVcpu {
    fn mpidr(&self) -> Result<u64, HvError> {
        Err(refused())
    }
    fn set_boot_regs(&self, _: u64, _: u64) -> Result<(), HvError> {
        Err(refused())
    }
}

#[cfg(target_arch = "x86_64")]
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
    power_off_from: Option<u32>,
) -> (Arc<Log>, Arc<RunControl>, Vec<JoinHandle<()>>, Vec<Ready>) {
    let log = Arc::new(Log::default());
    let vm: Arc<dyn HvVm> = Arc::new(FakeVm {
        fail,
        vcpus: n,
        power_off_from,
        log: Arc::clone(&log),
    });
    let control = RunControl::new();
    let ctx = Arc::new(VcpuContext {
        mmio: Arc::new(Bus::new()),
        pio: Arc::new(Bus::new()),
        control: Arc::clone(&control),
        end: Arc::new(Sink {
            log: Arc::clone(&log),
            control: Arc::clone(&control),
            stops: power_off_from.is_some(),
        }),
        created: CreatedGate::new(n as usize),
    });
    let (tx, rx) = mpsc::channel();
    let threads = (0..n)
        .map(|id| {
            let setup = VcpuSetup::Restore(
                HvState {
                    backend: "fake".into(),
                    bytes: Vec::new(),
                },
                None,
            );
            spawn(id, Arc::clone(&vm), setup, Arc::clone(&ctx), tx.clone()).unwrap()
        })
        .collect();
    drop(tx);
    let reports = rx.iter().collect();
    (log, control, threads, reports)
}

#[test]
fn a_failed_vcpu_is_reported_and_nothing_runs() {
    let (log, control, threads, reports) = start(3, Some(1), None);
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
    let (log, control, threads, reports) = start(2, None, None);
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
    assert_eq!(
        *log.ends.lock().unwrap(),
        vec![VcpuEnd::Shutdown, VcpuEnd::Shutdown]
    );
}

#[test]
fn a_power_off_from_any_vcpu_wakes_and_stops_the_others() {
    for from in [0, 2] {
        let (log, control, threads, reports) = start(3, None, Some(from));
        let kickers = reports
            .into_iter()
            .map(|(_, r)| r.unwrap_or_else(|e| panic!("vCPU setup failed: {e}")))
            .collect();
        control.set_kickers(kickers);
        control.open_gate();
        for t in threads {
            t.join().unwrap();
        }
        let ends = log.ends.lock().unwrap().clone();
        assert_eq!(ends[0], VcpuEnd::Shutdown, "vCPU {from} powered off");
        assert_eq!(ends.len(), 3, "every vCPU ended: {ends:?}");
        assert!(
            ends[1..].iter().all(|e| *e == VcpuEnd::Stopped),
            "the sleeping vCPUs were kicked out, not failed: {ends:?}"
        );
    }
}

/// Every run of a working set is pre-faulted exactly once, whether one vCPU does them all
/// (pipelined with the host stage's thread) or several share them.
#[test]
fn a_working_set_is_prefaulted_once_per_run_across_vcpus() {
    use vm_memory::{Bytes, GuestAddress};
    let mem = crate::memory::create(4, crate::memory::RamBacking::Anonymous).unwrap();
    for page in [0u64, 1, 5, 9, 10, 11, 700] {
        mem.write_obj(1u8, GuestAddress(crate::memory::RAM_START + page * 4096))
            .unwrap();
    }
    let set = crate::snapshot::working_set::WorkingSet::resident(&mem).unwrap();
    assert_eq!(set.runs().len(), 4, "{:?}", set.runs());
    let mut expected: Vec<(u64, u64)> = set.runs().iter().map(|r| (r.gpa(), r.bytes())).collect();
    expected.sort_unstable();
    for vcpus in [1u32, 2, 3] {
        let log = Arc::new(Log::default());
        let prefault = Prefault::start(set.clone(), Arc::clone(&mem), vcpus);
        std::thread::scope(|scope| {
            for id in 0..vcpus {
                let (prefault, log) = (&prefault, Arc::clone(&log));
                scope.spawn(move || {
                    let vcpu = FakeVcpu {
                        id,
                        sleeps: false,
                        others_to_sleep: None,
                        kicker: Arc::default(),
                        log,
                    };
                    prefault.apply(&vcpu);
                });
            }
        });
        let mut done = log.prefaulted.lock().unwrap().clone();
        done.sort_unstable();
        assert_eq!(done, expected, "{vcpus} vCPUs");
    }
}
