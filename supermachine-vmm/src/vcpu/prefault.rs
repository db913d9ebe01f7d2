//! A restored vCPU's share of its snapshot's working set
//! ([`WorkingSet`](crate::snapshot::working_set::WorkingSet)), mapped into the hypervisor's page
//! tables on the vCPU's thread before its first run: the hypervisor's pre-fault call takes a
//! vCPU, and with several vCPUs the shares are mapped in parallel.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::hypervisor::HvVcpu;
use crate::snapshot::working_set::{PageRun, WorkingSet};

/// A working set to map, shared by the vCPU threads of one restore.
pub(crate) struct Prefault {
    set: WorkingSet,
    memory: Arc<GuestMemoryMmap>,
    vcpus: u32,
}

impl Prefault {
    pub(crate) fn new(set: WorkingSet, memory: Arc<GuestMemoryMmap>, vcpus: u32) -> Self {
        Prefault {
            set,
            memory,
            vcpus: vcpus.max(1),
        }
    }

    /// Maps this vCPU's share: every `vcpus`-th run, from its id. Never fails the restore: the
    /// set is an optimisation, so a hypervisor that cannot pre-fault, or an error, ends it with
    /// a log line and the guest faults those pages in itself.
    pub(crate) fn apply(&self, vcpu: &dyn HvVcpu) {
        let started = Instant::now();
        let id = vcpu.id();
        let mut pages = 0u64;
        let share = self
            .set
            .runs()
            .iter()
            .skip(id as usize)
            .step_by(self.vcpus as usize);
        for run in share {
            if run.written {
                self.copy_ahead(run);
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

    /// Makes the private copies of pages the guest will write (as its first write would), so
    /// the pre-fault maps them writable and the guest's write does not exit a second time.
    /// Linux only: no other host's hypervisor pre-faults.
    fn copy_ahead(&self, run: &PageRun) {
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
            // SAFETY: `[host, host + len)` lies inside one region of the guest RAM mapping (checked
            // above), which `self.memory` keeps alive; MADV_POPULATE_WRITE only faults pages in as writes would (copying a
            // private file page), it changes no contents and no mapping.
            let rc = unsafe {
                libc::madvise(host.cast(), run.bytes() as usize, libc::MADV_POPULATE_WRITE)
            };
            if rc != 0 {
                // Before Linux 5.14 (EINVAL): the guest's own write copies the page.
                tracing::trace!(error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE");
            }
        }
    }
}
