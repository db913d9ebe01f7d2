//! Recording a snapshot's working set: right after a snapshot is written, where the hypervisor
//! can map guest memory ahead of the guest, one VM is restored from it, answers the requests a
//! restored VM answers first (an exec, the reseed in front of it), and the guest pages it touched are saved
//! beside the snapshot. Every later restore maps exactly those pages before its vCPUs run, so
//! the guest does not exit to the host once per page it touches while it answers them
//! (`supermachine_vmm::snapshot::working_set`).

use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{blocking, lock, Snapshot, Vm, VmConfig};
use crate::error::Error;

/// How long recording may take in all (a restore and an exec, ~0.1 s on hardware KVM and under
/// a second in the nested lane) before the snapshot goes on without a working set.
const RECORD_LIMIT: Duration = Duration::from_secs(20);

impl Vm {
    /// Records `snapshot`'s working set if this VM's hypervisor can use one. Never fails the
    /// snapshot: without a working set restores are correct, only slower, so a failure is
    /// logged.
    pub(super) async fn record_working_set(&self, snapshot: &Snapshot) {
        let machine = std::sync::Arc::clone(&self.machine);
        let can = blocking(move || Ok(lock(&machine).can_prefault())).await;
        if !matches!(can, Ok(true)) {
            return;
        }
        let started = Instant::now();
        let dir = snapshot.dir().display();
        match tokio::time::timeout(RECORD_LIMIT, Self::record_from_restore(snapshot)).await {
            Ok(Ok(())) => debug!(
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "working set recorded"
            ),
            Ok(Err(e)) => {
                warn!(%dir, "could not record the snapshot's working set: {}", crate::Report(&e))
            }
            Err(_) => warn!(
                %dir,
                "recording the snapshot's working set took longer than {RECORD_LIMIT:?}; gave up"
            ),
        }
    }

    async fn record_from_restore(snapshot: &Snapshot) -> Result<(), Error> {
        let vm = Self::restore_inner(snapshot, &VmConfig::new(), Instant::now()).await?;
        // Stopped on every path (a timeout above drops this future, and with it `vm`, which
        // then stops on the dropping thread).
        let recorded = Self::record_answers(&vm, snapshot).await;
        vm.stop().await;
        recorded
    }

    /// Lets the restored `vm` answer an exec, then saves the pages it touched.
    async fn record_answers(vm: &Vm, snapshot: &Snapshot) -> Result<(), Error> {
        // `true` may be missing from an image (distroless): the agent's exec path is still
        // walked, and what it touched is recorded all the same.
        let _ = vm.exec(["true"]).output().await;
        let machine = std::sync::Arc::clone(&vm.machine);
        let dir = snapshot.dir().to_owned();
        let set = blocking(move || {
            lock(&machine)
                .record_working_set(&dir)
                .map_err(Error::from_vmm)
        })
        .await?;
        debug!(
            pages = set.pages(),
            written = set.written_pages(),
            runs = set.runs().len(),
            "working set"
        );
        Ok(())
    }
}
