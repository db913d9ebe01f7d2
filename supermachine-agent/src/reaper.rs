//! The one owner of every child's exit status.
//!
//! A single task waits for SIGCHLD and reaps every exited child. Exec tasks register the pid of a
//! leader they spawned and get its status and rusage through a oneshot. Nothing else in the agent
//! may wait for children (no `tokio::process`, no `std::process::Child::wait`), or the two would
//! race for statuses.
//!
//! Before reaping a registered leader, the reaper SIGKILLs what is left of its process group.
//! Doing it while the leader is still a zombie matters: the zombie pins the group id, so the
//! signal cannot reach an unrelated group that reused the id after the leader was reaped.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::sys::{self, Reaped};

/// How long the status of an unregistered child is kept in case its registration is late.
const ORPHAN_TTL: Duration = Duration::from_secs(5);
/// At most this many unclaimed statuses are kept (orphans re-parented to us are never claimed).
const MAX_ORPHANS: usize = 1024;

/// Handle to the reaper task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    waiting: HashMap<i32, Registration>,
    unclaimed: HashMap<i32, (Reaped, Instant)>,
}

#[derive(Debug)]
struct Registration {
    kill_group: bool,
    alive: LeaderAlive,
    tx: oneshot::Sender<Reaped>,
}

/// Whether a registered leader is still unreaped, i.e. whether its pid (and so its process
/// group id) is still ours to signal. Cleared by the reaper just before it reaps the leader.
#[derive(Debug, Clone)]
pub struct LeaderAlive(Arc<AtomicBool>);

impl LeaderAlive {
    /// True until the leader is reaped.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// A flag with the given value, for tests that need no real child.
    #[cfg(test)]
    pub fn fixed(alive: bool) -> LeaderAlive {
        LeaderAlive(Arc::new(AtomicBool::new(alive)))
    }
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaper task on the current runtime.
    ///
    /// Must run before the first child is spawned, so no SIGCHLD can be missed.
    pub fn start() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            state: Arc::default(),
        };
        let task = reaper.clone();
        tokio::spawn(async move {
            loop {
                // Reap first: children may have exited before the handler was installed, and
                // one SIGCHLD can stand for many exits.
                task.reap_all();
                if sigchld.recv().await.is_none() {
                    tracing::error!("SIGCHLD stream ended; children will no longer be reaped");
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Registers interest in `pid`'s exit. With `kill_group`, the reaper SIGKILLs the process
    /// group `pid` leads just before reaping it.
    ///
    /// Call it right after spawning, with no `.await` in between: on the current-thread runtime
    /// the reaper cannot run in that window, so the status cannot be reaped unclaimed. (Should
    /// it happen anyway, the status is kept for a few seconds and handed over here.)
    pub fn register(&self, pid: i32, kill_group: bool) -> (oneshot::Receiver<Reaped>, LeaderAlive) {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        let alive = LeaderAlive(Arc::new(AtomicBool::new(true)));
        if let Some((reaped, _)) = state.unclaimed.remove(&pid) {
            alive.0.store(false, Ordering::Release);
            let _ = tx.send(reaped);
        } else {
            let registration = Registration {
                kill_group,
                alive: alive.clone(),
                tx,
            };
            state.waiting.insert(pid, registration);
        }
        (rx, alive)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked mid-way (each operation is a
        // single map insert/remove), so a poisoned lock is safe to keep using.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reaps every exited child and delivers the statuses.
    fn reap_all(&self) {
        loop {
            let pid = match sys::peek_exited_child() {
                Ok(Some(pid)) => pid,
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!("waitid failed: {e}");
                    break;
                }
            };
            let registration = self.lock().waiting.remove(&pid);
            if let Some(registration) = &registration {
                if registration.kill_group {
                    // ESRCH (the group is already empty but for the zombie) is the common case.
                    let _ = sys::killpg(pid, libc::SIGKILL);
                }
                registration.alive.0.store(false, Ordering::Release);
            }
            let reaped = match sys::reap(pid) {
                Ok(Some(reaped)) => reaped,
                Ok(None) => {
                    tracing::error!(pid, "peeked child could not be reaped");
                    break;
                }
                Err(e) => {
                    tracing::error!(pid, "wait4 failed: {e}");
                    break;
                }
            };
            tracing::debug!(pid, status = reaped.status, "reaped");
            match registration {
                // The receiver may be gone (its exec was torn down); nothing to do then.
                Some(registration) => drop(registration.tx.send(reaped)),
                None => self.keep_unclaimed(pid, reaped),
            }
        }
    }

    fn keep_unclaimed(&self, pid: i32, reaped: Reaped) {
        let now = Instant::now();
        let mut state = self.lock();
        state
            .unclaimed
            .retain(|_, (_, at)| now.duration_since(*at) < ORPHAN_TTL);
        if state.unclaimed.len() < MAX_ORPHANS {
            state.unclaimed.insert(pid, (reaped, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    // One test only: two reapers in one process would steal each other's children.
    // The reaper under test is what waits for the children (hence the lint exemption).
    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn delivers_statuses_registered_early_or_late() {
        let reaper = Reaper::start().expect("reaper");

        let child = Command::new("sh")
            .args(["-c", "exit 5"])
            .spawn()
            .expect("spawn sh");
        let (exit, alive) = reaper.register(child.id() as i32, false);
        let reaped = tokio::time::timeout(Duration::from_secs(5), exit)
            .await
            .expect("reaped in time")
            .expect("status delivered");
        assert_eq!(reaped.code(), 5);
        assert!(reaped.max_rss_kib > 0);
        assert!(!alive.get());

        // Registered only after the reaper has reaped it unclaimed.
        let child = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .expect("spawn sh");
        let pid = child.id() as i32;
        let start = Instant::now();
        while !reaper.lock().unclaimed.contains_key(&pid) {
            assert!(start.elapsed() < Duration::from_secs(5), "never reaped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (exit, alive) = reaper.register(pid, false);
        assert!(!alive.get());
        let reaped = exit.await.expect("status handed over");
        assert_eq!(reaped.code(), 137);
    }
}
