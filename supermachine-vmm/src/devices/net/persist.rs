//! What a snapshot keeps of the NIC, and what a restore makes new.
//!
//! Kept (by the virtio-mmio transport, `virtio/mmio/persist.rs`): the negotiated features and
//! both queues' configuration and positions. The device itself has nothing else worth saving:
//! receive buffers are not mergeable, so between two passes no frame is half written into guest
//! memory, and the MAC and link status are constants of the device.
//!
//! Not kept: the user-mode network. Its flows are host sockets of the machine that took the
//! snapshot and its DNS cache belongs to that machine's guest; neither may be shared by the
//! machines restored from the snapshot. A restore builds a new [`NetDevice`](super::NetDevice)
//! from the machine's configuration, and with it a new, empty `NetStack`: each restored VM has
//! its own flows and names. The guest's TCP connections from before the snapshot are unknown to
//! the new stack, which answers their next segment with an RST, so the guest sees them reset
//! and can connect again at once. Frames that were queued between the stack and the device at
//! snapshot time are lost, as on a link that went down for a moment.

use virtio_queue::QueueState;

use crate::devices::virtio::worker_gate::WorkerGate;

/// Holds the data path between two passes and returns where the queues stand (`None` while the
/// driver has not activated the device).
pub(super) fn pause(gate: Option<&WorkerGate>) -> Option<Vec<QueueState>> {
    gate.and_then(WorkerGate::pause)
}
