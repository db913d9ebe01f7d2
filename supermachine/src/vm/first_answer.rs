//! A restored VM's watcher: makes sure the guest gets its reseed soon after the restore even
//! when nobody asks it anything, and stops a guest that never answers (see [`watch`]).

use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use supermachine_vmm::devices::serial::ConsoleLog;
use supermachine_vmm::{Machine, PausedFlag};
use tracing::{debug, warn};

use super::{lock, CONSOLE_TAIL_BYTES};
use crate::agent::Agent;

/// How long a restored guest that has answered nothing has to answer before its VM is stopped
/// ([`watch`]); time spent paused does not count.
const RESTORE_AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How soon after a restore the host sends the reseed itself (a ping) if no request is on
/// its way with it: processes that were running when the snapshot was taken run on the
/// snapshot's RNG state and clock until then. Short, but long enough that a caller who asks for
/// something right after the restore goes first, alone. Also the watcher's polling interval.
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(20);

/// Watches a restored VM until the guest has applied its reseed. After [`FIRST_REQUEST_GRACE`]
/// it leaves the reseed to requests that carry it (connecting, or waiting for their answer);
/// once none does and none has sent it, it sends it itself (a ping). A VM that answers nothing
/// within [`RESTORE_AGENT_TIMEOUT`] of running time is stopped, so that requests to it fail
/// ([`Error::VmExited`](crate::Error::VmExited) with
/// [`VmExitReason::Unresponsive`](crate::VmExitReason::Unresponsive)) instead of waiting forever. Holds the machine
/// weakly: a VM dropped meanwhile is left alone.
pub(super) async fn watch(
    agent: Agent,
    machine: Weak<Mutex<Machine>>,
    paused: PausedFlag,
    console: ConsoleLog,
) {
    let Some(reseed) = agent.reseed().cloned() else {
        return;
    };
    tokio::time::sleep(FIRST_REQUEST_GRACE).await;
    // While requests carry the reseed (connecting, or waiting for their answer), leave it to
    // them; ping once none does and none has sent it, or after a minute without an answer.
    let passive = Instant::now();
    loop {
        if reseed.answered() || machine.strong_count() == 0 {
            return;
        }
        if (reseed.in_flight() == 0 && !reseed.sent()) || passive.elapsed() >= RESTORE_AGENT_TIMEOUT
        {
            break;
        }
        tokio::select! {
            () = reseed.wait_answered() => return,
            () = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
        }
    }
    let ping = agent.ensure_reseeded();
    tokio::pin!(ping);
    loop {
        match tokio::time::timeout(RESTORE_AGENT_TIMEOUT, &mut ping).await {
            Ok(Ok(())) => return,
            // A VM that ended says why on its own; any other failure shows on the next request.
            Ok(Err(e)) => {
                debug!("checking on the restored VM: {}", crate::Report(&e));
                return;
            }
            // A paused guest cannot answer: keep waiting.
            Err(_) if paused.get() => continue,
            Err(_) => break,
        }
    }
    let Some(machine) = machine.upgrade() else {
        return;
    };
    let message =
        format!("the restored VM's agent answered nothing within {RESTORE_AGENT_TIMEOUT:?}");
    warn!(
        "{message}; stopping the VM. Console: {}",
        console.tail(CONSOLE_TAIL_BYTES)
    );
    let _ = tokio::task::spawn_blocking(move || lock(&machine).stop_unresponsive(message)).await;
}
