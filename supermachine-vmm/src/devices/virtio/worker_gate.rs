//! A gate between a device worker and the threads that reset, pause or snapshot the device.
//!
//! The virtio spec says a device must not touch the rings once the driver has reset it. A worker
//! running on another thread (a tokio task, a block I/O thread) could be in the middle of a batch
//! when the reset arrives, so every batch runs while holding the gate, and [`WorkerGate::close`]
//! waits for the batch in flight to finish before returning. Batches are short (one pass over a
//! queue), so the caller waits at most that long.
//!
//! Snapshots need the same guarantee without ending the worker: [`WorkerGate::pause`] waits out
//! the batch in flight and holds every later one back until [`WorkerGate::resume`]. At the end of
//! each batch the worker records its queues' positions in the gate ([`GatePass::record`]), so a
//! paused gate knows exactly where the device stands without asking the worker.

use std::sync::{Condvar, Mutex, MutexGuard};

use tokio::sync::watch;
use virtio_queue::{Queue, QueueState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Paused,
    Closed,
}

#[derive(Debug)]
pub(crate) struct GateState {
    mode: Mode,
    queues: Vec<QueueState>,
}

/// Open while the device is active; paused around a snapshot; closed (for good) by reset or
/// drop.
#[derive(Debug)]
pub(crate) struct WorkerGate {
    state: Mutex<GateState>,
    /// Wakes blocking workers (threads) waiting for a resume.
    changed: Condvar,
    /// Wakes async workers (tasks) waiting for a resume: `true` while paused.
    paused: watch::Sender<bool>,
}

/// Held by a worker for the duration of one processing batch.
pub(crate) struct GatePass<'a>(MutexGuard<'a, GateState>);

impl GatePass<'_> {
    /// Records where the worker's queues stand (call at the end of every batch that may have
    /// moved them).
    pub(crate) fn record<'q>(&mut self, queues: impl IntoIterator<Item = &'q Queue>) {
        let saved = &mut self.0.queues;
        saved.clear();
        saved.extend(queues.into_iter().map(|q| q.state()));
    }
}

/// What [`WorkerGate::enter`] found.
pub(crate) enum Entry<'a> {
    /// Go ahead with one batch.
    Pass(GatePass<'a>),
    /// Paused: wait for [`WorkerGate::resumed`] / [`WorkerGate::wait_resumed`], then retry.
    Paused,
    /// Closed: the worker should exit.
    Closed,
}

impl WorkerGate {
    /// A new, open gate for a worker starting with `queues`.
    pub(crate) fn new<'q>(queues: impl IntoIterator<Item = &'q Queue>) -> Self {
        WorkerGate {
            state: Mutex::new(GateState {
                mode: Mode::Open,
                queues: queues.into_iter().map(|q| q.state()).collect(),
            }),
            changed: Condvar::new(),
            paused: watch::Sender::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // A worker that panicked mid-batch poisons the lock; the state itself is still
        // meaningful, so keep going rather than propagating the panic to a vCPU thread.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters the gate for one batch.
    pub(crate) fn enter(&self) -> Entry<'_> {
        let state = self.lock();
        match state.mode {
            Mode::Open => Entry::Pass(GatePass(state)),
            Mode::Paused => Entry::Paused,
            Mode::Closed => Entry::Closed,
        }
    }

    /// Closes the gate, waiting for the batch in flight (if any) to finish.
    pub(crate) fn close(&self) {
        self.lock().mode = Mode::Closed;
        self.changed.notify_all();
        self.paused.send_replace(false);
    }

    /// Holds the worker back (after the batch in flight) and returns where its queues stand.
    /// `None` if the gate is closed.
    pub(crate) fn pause(&self) -> Option<Vec<QueueState>> {
        let mut state = self.lock();
        if state.mode == Mode::Closed {
            return None;
        }
        state.mode = Mode::Paused;
        self.paused.send_replace(true);
        Some(state.queues.clone())
    }

    /// Lets a paused worker go on.
    pub(crate) fn resume(&self) {
        let mut state = self.lock();
        if state.mode == Mode::Paused {
            state.mode = Mode::Open;
        }
        drop(state);
        self.changed.notify_all();
        self.paused.send_replace(false);
    }

    /// Waits (async) until the gate is no longer paused.
    pub(crate) async fn resumed(&self) {
        let mut rx = self.paused.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|paused| !paused).await;
    }

    /// Waits (blocking the thread) until the gate is no longer paused.
    pub(crate) fn wait_resumed(&self) {
        let mut state = self.lock();
        while state.mode == Mode::Paused {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use virtio_queue::QueueT;

    fn queue(size: u16) -> Queue {
        Queue::new(size).unwrap()
    }

    #[test]
    fn close_waits_for_the_batch_in_flight() {
        // Ordered by a flag, not by elapsed time: a descheduled test thread (TCG, a loaded
        // host) must not make a correct gate look wrong.
        let gate = Arc::new(WorkerGate::new(&[queue(16)]));
        let g2 = gate.clone();
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = finished.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let Entry::Pass(pass) = g2.enter() else {
                panic!("gate should be open")
            };
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            f2.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(pass);
        });
        rx.recv().unwrap();
        gate.close();
        assert!(
            finished.load(std::sync::atomic::Ordering::SeqCst),
            "close returned while a batch was in flight"
        );
        assert!(matches!(gate.enter(), Entry::Closed));
        worker.join().unwrap();
    }

    #[test]
    fn pause_returns_the_last_recorded_positions_and_holds_workers_back() {
        let mut q = queue(16);
        let gate = Arc::new(WorkerGate::new([&q]));
        assert_eq!(gate.pause().unwrap()[0].next_avail, 0);
        gate.resume();
        q.set_next_avail(5);
        match gate.enter() {
            Entry::Pass(mut pass) => pass.record([&q]),
            _ => panic!("gate should be open"),
        }
        assert_eq!(gate.pause().unwrap()[0].next_avail, 5);
        assert!(matches!(gate.enter(), Entry::Paused));

        let g2 = gate.clone();
        let waiter = std::thread::spawn(move || {
            g2.wait_resumed();
            matches!(g2.enter(), Entry::Pass(_))
        });
        std::thread::sleep(Duration::from_millis(20));
        gate.resume();
        assert!(waiter.join().unwrap());
        gate.close();
        assert!(gate.pause().is_none());
    }
}
