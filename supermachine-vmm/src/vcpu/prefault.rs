//! A restore's working set ([`WorkingSet`](crate::snapshot::working_set::WorkingSet)) mapped
//! before the guest runs, in two stages that overlap:
//!
//! 1. **The host's page tables**, on a thread of its own (one-vCPU machines) started as soon
//!    as guest RAM is mapped ([`Prefault::start`]): while the VMM still creates the VM, its
//!    devices and vCPUs, that thread faults the set into this process — the pages the guest wrote copied
//!    (`MADV_POPULATE_WRITE`, as the guest's first write would), the others mapped read-only
//!    from the page cache (`MADV_POPULATE_READ`, nothing copied, so restored VMs still share
//!    them).
//! 2. **The hypervisor's page tables**, on each vCPU thread after it loaded its state and
//!    before its first run ([`Prefault::apply`]): the hypervisor's pre-fault call takes a
//!    vCPU, and with several vCPUs the shares are mapped in parallel. The hypervisor then
//!    finds the host pages present and only fills its own tables.
//!
//! Stage 1 has a thread of its own only with a single vCPU, which waits, run by run, for that
//! thread to pass the run it is at: the two stages then pipeline on two threads. Doing the
//! host part itself instead was measured slower (x86 nested lane, alternating restores: first
//! exec 2 ms later than waiting or no thread at all; both threads then fault the same pages).
//! Several vCPUs each do both stages for their own, disjoint share, with no stage-1 thread:
//! one such thread would be their bottleneck, and a thread faulting the same pages as two vCPUs
//! (beside their KVM pre-faults) once left all three spinning in the L1 kernel of the x86
//! nested lane. A vCPU does not wait either once the stage-1 thread is gone (it could not
//! start, finished early, or panicked).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::hypervisor::HvVcpu;
use crate::snapshot::working_set::{PageRun, WorkingSet};

/// Runs the host stage finishes between two wake-ups of waiting vCPU threads: each wake-up is
/// a system call, and most runs are a page or two.
const PROGRESS_BATCH: usize = 16;

/// A working set to map, shared by the host stage's thread and the vCPU threads of one
/// restore.
pub(crate) struct Prefault {
    set: WorkingSet,
    memory: Arc<GuestMemoryMmap>,
    vcpus: u32,
    /// Runs whose host pages stage 1 has put in place, in order.
    host_done: AtomicUsize,
    /// Whether stage 1's thread is still at work: no vCPU waits for it otherwise.
    host_running: AtomicBool,
    /// Where a vCPU thread waits for `host_done` to pass its next run.
    wait: (Mutex<()>, Condvar),
}

impl Prefault {
    /// Starts stage 1 for `set` in `memory` (the restored machine's RAM) on a thread of its
    /// own when `vcpus` is 1 (see the module docs), and returns the handle the vCPU threads
    /// apply stage 2 with. The thread ends by itself once the set is done, or early once every handle is gone (the vCPUs are
    /// done, or the restore failed); if it cannot be spawned, the vCPU threads do stage 1
    /// themselves.
    pub(crate) fn start(set: WorkingSet, memory: Arc<GuestMemoryMmap>, vcpus: u32) -> Arc<Self> {
        let prefault = Arc::new(Prefault {
            set,
            memory,
            vcpus: vcpus.max(1),
            host_done: AtomicUsize::new(0),
            host_running: AtomicBool::new(true),
            wait: (Mutex::new(()), Condvar::new()),
        });
        if prefault.vcpus > 1 {
            // Several vCPUs map disjoint shares, host part included, and no thread overlaps
            // them. A stage-1 thread faulting the same pages as two vCPUs, beside their KVM
            // pre-faults, left all three spinning in the kernel for 20 minutes in the x86
            // nested lane (smp suite, L1 on Debian's 6.12 under TCG; the cause is not known).
            prefault.host_stopped();
            return prefault;
        }
        let weak = Arc::downgrade(&prefault);
        let spawned = std::thread::Builder::new()
            .name("sm-prefault".into())
            .spawn(move || host_stage(&weak));
        if let Err(error) = spawned {
            tracing::debug!(%error, "no thread for the working set's host stage; vCPUs do it");
            prefault.host_stopped();
        }
        prefault
    }

    /// Maps this vCPU's share into the hypervisor: every `vcpus`-th run, from its id. Never
    /// fails the restore: the set is an optimisation, so a hypervisor that cannot pre-fault,
    /// or an error, ends it with a log line and the guest faults those pages in itself.
    pub(crate) fn apply(&self, vcpu: &dyn HvVcpu) {
        let started = Instant::now();
        let id = vcpu.id();
        let mut pages = 0u64;
        let share = self
            .set
            .runs()
            .iter()
            .enumerate()
            .skip(id as usize)
            .step_by(self.vcpus as usize);
        for (index, run) in share {
            if !self.host_has(index) {
                self.map_in_host(run);
            }
            match vcpu.prefault(run.gpa(), run.bytes()) {
                Ok(true) => pages += u64::from(run.pages),
                Ok(false) => {
                    tracing::debug!(vcpu = id, "the hypervisor cannot pre-fault guest memory");
                    return;
                }
                Err(error) => {
                    tracing::warn!(
                        vcpu = id,
                        error = crate::error::flatten(&error),
                        "pre-faulting the working set failed; the guest faults it in instead"
                    );
                    return;
                }
            }
        }
        tracing::debug!(vcpu = id, pages, took = ?started.elapsed(), "working set pre-faulted");
    }

    /// Whether stage 1 has put run `index`'s host pages in place: waited for with a single
    /// vCPU while the stage-1 thread is at work (see the module docs); false means the caller
    /// does the host part itself.
    fn host_has(&self, index: usize) -> bool {
        // Most runs are passed long before a vCPU gets to them: no lock for those.
        if self.host_done.load(Ordering::Acquire) > index {
            return true;
        }
        let wait = self.vcpus == 1;
        let (lock, cvar) = &self.wait;
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.host_done.load(Ordering::Acquire) > index {
                return true;
            }
            if !wait || !self.host_running.load(Ordering::Acquire) {
                return false;
            }
            guard = cvar.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Publishes that stage 1 has done `runs` runs and wakes the vCPU threads waiting for it.
    fn host_progress(&self, runs: usize) {
        let (lock, cvar) = &self.wait;
        // Under the lock, so a vCPU thread between its check and its wait cannot miss this.
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.host_done.store(runs, Ordering::Release);
        cvar.notify_all();
    }

    /// Publishes that the stage-1 thread is gone (or never started) and wakes its waiters.
    fn host_stopped(&self) {
        let (lock, cvar) = &self.wait;
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.host_running.store(false, Ordering::Release);
        cvar.notify_all();
    }

    /// Stage 1 for one run: faults its pages into this process's page tables, copying those
    /// the guest wrote. Linux only (no other host's hypervisor pre-faults); failures are left
    /// to the guest's own faults.
    fn map_in_host(&self, run: &PageRun) {
        // The whole run inside one region (one host mapping): the madvise below must stay in it.
        let Some(region) = self.memory.find_region(GuestAddress(run.gpa())) else {
            return;
        };
        let offset = run.gpa() - region.start_addr().0;
        if !offset
            .checked_add(run.bytes())
            .is_some_and(|end| end <= region.len())
        {
            return;
        }
        let Ok(host) = region.get_host_address(MemoryRegionAddress(offset)) else {
            return;
        };
        #[cfg(not(target_os = "linux"))]
        let _ = host;
        #[cfg(target_os = "linux")]
        {
            let advice = if run.written {
                libc::MADV_POPULATE_WRITE
            } else {
                libc::MADV_POPULATE_READ
            };
            // SAFETY: `[host, host + len)` lies inside one region of the guest RAM mapping
            // (checked above), which `self.memory` keeps alive; MADV_POPULATE_* only fault pages
            // in as reads or writes would (a write copies a private file page), they change no
            // contents and no mapping.
            let rc = unsafe { libc::madvise(host.cast(), run.bytes() as usize, advice) };
            if rc != 0 {
                // Before Linux 5.14 (EINVAL): the hypervisor's pre-fault or the guest's own
                // access faults the page in.
                tracing::trace!(error = %std::io::Error::last_os_error(), "MADV_POPULATE");
            }
        }
    }
}

/// Stage 1's thread: every run in order, publishing progress in batches; stops early once no
/// one holds the [`Prefault`] any more (the vCPUs are done, or the restore failed).
fn host_stage(weak: &Weak<Prefault>) {
    /// Tells the vCPUs the thread is gone however it ends, a panic included, so none waits
    /// for it forever.
    struct Stopped<'a>(&'a Weak<Prefault>);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            if let Some(prefault) = self.0.upgrade() {
                prefault.host_stopped();
            }
        }
    }
    let _stopped = Stopped(weak);
    let started = Instant::now();
    let mut done = 0;
    loop {
        let Some(prefault) = weak.upgrade() else {
            tracing::debug!(runs = done, "working set's host stage ended early");
            return;
        };
        let runs = prefault.set.runs();
        let end = (done + PROGRESS_BATCH).min(runs.len());
        for run in &runs[done..end] {
            prefault.map_in_host(run);
        }
        done = end;
        prefault.host_progress(done);
        if done == runs.len() {
            tracing::debug!(
                runs = done,
                pages = prefault.set.pages(),
                took = ?started.elapsed(),
                "working set mapped in the host"
            );
            return;
        }
    }
}
