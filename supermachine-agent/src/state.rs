//! State shared by every connection: how the agent runs, the reaper, and the registry of running
//! exec process groups (for `signal_workload` and for shutdown).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::boot_flags::BootFlags;
use crate::reaper::{LeaderAlive, Reaper};
use crate::sys;

/// Where the agent runs, which decides a few defaults and which control actions are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On a developer/test host, on a Unix socket: execs inherit the agent's environment, and
    /// actions that would change the host (clock, RNG) are refused.
    Host,
    /// Inside the VM (vsock): execs get a minimal default environment, and the clock and RNG
    /// belong to us.
    Guest,
}

/// Everything a connection handler needs; shared through an `Arc`.
#[derive(Debug)]
pub struct Agent {
    /// Host or guest.
    pub mode: Mode,
    /// Flags from the guest kernel command line (all off in host mode).
    pub boot_flags: BootFlags,
    /// The child reaper.
    pub reaper: Reaper,
    /// Running exec process groups.
    pub workload: Workload,
    /// The restore the last `restored` preamble named, and the newest host time (ns since the
    /// epoch) a preamble of it set the clock to: the preambles of one restore's concurrent
    /// first connections may be served out of order, and an older one must not step the clock
    /// back; a new restore's first preamble always sets it.
    pub restored_clock: Mutex<(u64, u64)>,
}

impl Agent {
    /// Agent state for `mode` with `boot_flags`, using `reaper`.
    pub fn new(mode: Mode, boot_flags: BootFlags, reaper: Reaper) -> Arc<Agent> {
        Arc::new(Agent {
            mode,
            boot_flags,
            reaper,
            workload: Workload::default(),
            restored_clock: Mutex::new((0, 0)),
        })
    }
}

/// The process groups of running execs.
#[derive(Debug, Default)]
pub struct Workload {
    groups: Mutex<HashMap<u64, (i32, LeaderAlive)>>,
    next_id: AtomicU64,
}

/// Keeps a process group in the [`Workload`] registry; removes it on drop.
#[derive(Debug)]
pub struct GroupRegistration<'a> {
    workload: &'a Workload,
    id: u64,
}

impl Drop for GroupRegistration<'_> {
    fn drop(&mut self) {
        self.workload.lock().remove(&self.id);
    }
}

impl Workload {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (i32, LeaderAlive)>> {
        // Single inserts and removes only: the map is consistent even after a panic.
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `pgid` as a running exec's group until the returned guard is dropped; it is
    /// signalled only while its leader (`alive`) is unreaped.
    pub fn register(&self, pgid: i32, alive: LeaderAlive) -> GroupRegistration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (pgid, alive));
        GroupRegistration { workload: self, id }
    }

    /// Sends `signal` to every registered group; returns how many groups were signalled, or the
    /// first error other than "no such process".
    pub fn signal_all(&self, signal: i32) -> std::io::Result<usize> {
        let groups: Vec<i32> = self
            .lock()
            .values()
            .filter(|(_, alive)| alive.get())
            .map(|(pgid, _)| *pgid)
            .collect();
        let mut signalled = 0;
        for pgid in groups {
            match sys::killpg(pgid, signal) {
                Ok(()) => signalled += 1,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(signalled)
    }

    /// How many groups are registered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_is_scoped_and_skips_reaped_leaders() {
        let workload = Workload::default();
        // Leaders already reaped: their ids may belong to someone else now, so no signal is
        // sent (killpg on these made-up groups would fail with ESRCH and be counted as 0
        // anyway, but a reused id would be hit).
        let alive = LeaderAlive::fixed(false);
        {
            let _a = workload.register(12345, alive.clone());
            let _b = workload.register(12346, alive);
            assert_eq!(workload.len(), 2);
            assert_eq!(workload.signal_all(0).unwrap(), 0);
        }
        assert_eq!(workload.len(), 0);
    }
}
