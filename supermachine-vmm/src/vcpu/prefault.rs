//! A restore's working set ([`WorkingSet`](crate::snapshot::working_set::WorkingSet)) mapped
//! before the guest runs, in two stages that overlap:
//!
//! 1. **The host's page tables**, on a thread of its own started as soon as guest RAM is
//!    mapped ([`Prefault::start`]): while the VMM still creates the VM, its devices and vCPUs,
//!    that thread faults the set into this process — the pages the guest wrote copied
//!    (`MADV_POPULATE_WRITE`, as the guest's first write would), the others mapped read-only
//!    from the page cache (`MADV_POPULATE_READ`, nothing copied, so restored VMs still share
//!    them).
//! 2. **The hypervisor's page tables**, on each vCPU thread after it loaded its state and
//!    before its first run ([`Prefault::apply`]): the hypervisor's pre-fault call takes a
//!    vCPU, and with several vCPUs the shares are mapped in parallel. A run stage 1 has passed
//!    needs only the hypervisor's tables filled (the host pages are present); a run it has not
//!    reached yet the vCPU thread faults into the host itself rather than wait (faulting a
//!    present page again is cheap), so no vCPU ever waits on that thread, and several vCPUs
//!    share the host work when there is much of it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::hypervisor::HvVcpu;
use crate::snapshot::working_set::{PageRun, WorkingSet};

/// A working set to map, shared by the host stage's thread and the vCPU threads of one
/// restore.
pub(crate) struct Prefault {
    set: WorkingSet,
    memory: Arc<GuestMemoryMmap>,
    vcpus: u32,
    /// Runs whose host pages stage 1 has put in place, in order.
    host_done: AtomicUsize,
}

impl Prefault {
    /// Starts stage 1 for `set` in `memory` (the restored machine's RAM) on a thread of its
    /// own, and returns the handle its `vcpus` vCPU threads apply stage 2 with. The thread
    /// ends by itself once the set is done, or early once every handle is gone (the vCPUs are
    /// done, or the restore failed); if it cannot be spawned, the vCPU threads do stage 1
    /// themselves.
    pub(crate) fn start(set: WorkingSet, memory: Arc<GuestMemoryMmap>, vcpus: u32) -> Arc<Self> {
        let prefault = Arc::new(Prefault {
            set,
            memory,
            vcpus: vcpus.max(1),
            host_done: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&prefault);
        let spawned = std::thread::Builder::new()
            .name("sm-prefault".into())
            .spawn(move || host_stage(&weak));
        if let Err(error) = spawned {
            tracing::debug!(%error, "no thread for the working set's host stage; vCPUs do it");
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
            if self.host_done.load(Ordering::Acquire) <= index {
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

/// Stage 1's thread: every run in order, publishing its progress after each; stops early once
/// no one holds the [`Prefault`] any more.
fn host_stage(weak: &Weak<Prefault>) {
    let started = Instant::now();
    let mut done = 0;
    loop {
        let Some(prefault) = weak.upgrade() else {
            tracing::debug!(runs = done, "working set's host stage ended early");
            return;
        };
        let Some(run) = prefault.set.runs().get(done) else {
            tracing::debug!(
                runs = done,
                pages = prefault.set.pages(),
                took = ?started.elapsed(),
                "working set mapped in the host"
            );
            return;
        };
        prefault.map_in_host(run);
        done += 1;
        prefault.host_done.store(done, Ordering::Release);
    }
}
