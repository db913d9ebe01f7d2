//! A gate between a device worker and the vCPU thread that resets the device.
//!
//! The virtio spec says a device must not touch the rings once the driver has reset it. A worker
//! running on another thread (a tokio task, a block I/O thread) could be in the middle of a batch
//! when the reset arrives, so every batch runs while holding the gate, and [`WorkerGate::close`]
//! waits for the batch in flight to finish before returning. Batches are short (one pass over a
//! queue), so the vCPU thread waits at most that long.

use std::sync::{Mutex, MutexGuard};

/// Open while the device is active; closed (for good) by reset or drop.
#[derive(Debug)]
pub(crate) struct WorkerGate {
    open: Mutex<bool>,
}

/// Held by a worker for the duration of one processing batch.
pub(crate) type GatePass<'a> = MutexGuard<'a, bool>;

impl WorkerGate {
    /// A new, open gate.
    pub(crate) fn new() -> Self {
        WorkerGate {
            open: Mutex::new(true),
        }
    }

    /// Enters the gate for one batch; `None` once it is closed (the worker should exit).
    pub(crate) fn enter(&self) -> Option<GatePass<'_>> {
        // A worker that panicked mid-batch poisons the lock; the flag itself is still
        // meaningful, so keep going rather than propagating the panic to a vCPU thread.
        let pass = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if *pass {
            Some(pass)
        } else {
            None
        }
    }

    /// Closes the gate, waiting for the batch in flight (if any) to finish.
    pub(crate) fn close(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn close_waits_for_the_batch_in_flight() {
        let gate = Arc::new(WorkerGate::new());
        let g2 = gate.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let pass = g2.enter().expect("open");
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            drop(pass);
        });
        rx.recv().unwrap();
        let start = Instant::now();
        gate.close();
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(gate.enter().is_none());
        worker.join().unwrap();
    }
}
