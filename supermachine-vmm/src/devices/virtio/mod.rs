//! Virtio devices and the virtio-mmio transport that puts them on the MMIO bus.
//!
//! The machine (`machine/slots.rs`) allocates an [`MmioSlot`] per device — base address, the
//! platform's interrupt line with its [`InterruptLine`] object from the hypervisor, and one
//! queue-notification eventfd per queue, which the hypervisor binds to the QueueNotify register
//! where it can — and wraps the device in the MMIO transport. Devices never see the hypervisor.
//! The transport's saved state is in `mmio/persist.rs`; the devices keep no state of their own
//! beyond their queues', which the transport saves.

pub(crate) mod kick;
pub mod mmio;
pub(crate) mod ring;
#[cfg(test)]
pub(crate) mod test_driver;
pub(crate) mod worker_gate;

pub use mmio::{DeviceStateError, MmioTransport};

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::os::EventFd;
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;

use crate::interrupt::InterruptLine;

/// Size of one virtio-mmio register window.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;

/// Offset of the QueueNotify register in a virtio-mmio window (ioeventfd address).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// InterruptStatus bit: the device used buffers in a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// InterruptStatus bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Everything a virtio-mmio device slot gets from the machine.
pub struct MmioSlot {
    /// Guest physical base address of the register window.
    pub base: u64,
    /// The slot's interrupt-line number (x86: its GSI), as announced to the guest.
    pub irq_line: u32,
    /// The interrupt line: triggering it raises the device interrupt.
    pub irq: Arc<dyn InterruptLine>,
    /// One per queue. The hypervisor signals them on guest writes of the queue index to
    /// `base + QUEUE_NOTIFY_OFFSET` without a vCPU exit to userspace where it can (KVM: an
    /// ioeventfd); writes that reach the MMIO bus instead are forwarded by the transport.
    pub notify: Vec<EventFd>,
}

impl std::fmt::Debug for MmioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioSlot")
            .field("base", &format_args!("{:#x}", self.base))
            .field("irq_line", &self.irq_line)
            .field("notify", &self.notify.len())
            .finish_non_exhaustive()
    }
}

/// Raises a device's interrupt: sets InterruptStatus bits (shared with the transport, which the
/// guest reads and acknowledges) and triggers the interrupt line.
#[derive(Clone)]
pub struct IrqTrigger {
    status: Arc<AtomicU32>,
    line: Arc<dyn InterruptLine>,
}

impl std::fmt::Debug for IrqTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqTrigger")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl IrqTrigger {
    /// A trigger over the transport's interrupt status and the slot's interrupt line.
    pub fn new(status: Arc<AtomicU32>, line: Arc<dyn InterruptLine>) -> Self {
        IrqTrigger { status, line }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.line.trigger()
    }
}

/// Feature bit: the device complies with virtio 1.0+ (the only mode this VMM speaks).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: `used_event` / `avail_event` notification suppression (virtio 1.x §2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// `VIRTIO_RING_F_INDIRECT_DESC`: a descriptor may point at a table of descriptors, so one
/// chain of many buffers takes one ring entry.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// A device could not start with the queues the driver set up.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device needs.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// A queue-notification EventFd could not be prepared (dup, non-blocking mode).
    #[error("cannot create the queue notification eventfd")]
    Notify(#[source] std::io::Error),
    /// The device's worker (task or thread) could not be started.
    #[error("starting the device worker failed")]
    Worker(#[source] std::io::Error),
    /// The device was activated twice without a reset in between.
    #[error("device is already active")]
    AlreadyActive,
}

/// A virtio device behind a transport ([`MmioTransport`]).
///
/// The transport owns the register state machine (status, feature negotiation, queue setup) and
/// calls into the device only at the points the virtio spec defines: feature negotiation,
/// config-space accesses, activation (DRIVER_OK) and reset. All calls come from vCPU threads, so
/// they must be quick; the device's data path runs on its own worker (a tokio task or a thread).
pub trait VirtioDevice: Send {
    /// Virtio device type (`VIRTIO_ID_*`, e.g. 2 = block, 19 = vsock).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues the device has.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers. Must include [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;

    /// The driver accepted `features` (already checked by the transport to be a subset of
    /// [`Self::features`] that includes [`VIRTIO_F_VERSION_1`]).
    fn ack_features(&mut self, features: u64);

    /// The driver reads `data.len()` bytes of the device config space at `offset`. Bytes past
    /// the end of the config space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// The driver writes the device config space. Read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: start processing. `queues` are validated (ready, sized, inside
    /// guest memory) and carry the negotiated event-idx setting; `notify[i]` is signalled when
    /// the guest kicks queue `i` (through an ioeventfd or a QueueNotify write on the bus); `irq`
    /// raises the device interrupt.
    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap<()>>,
        queues: Vec<Queue>,
        irq: IrqTrigger,
        notify: Vec<EventFd>,
    ) -> Result<(), ActivateError>;

    /// The driver wrote 0 to Status: stop the worker and forget the queues. When this returns
    /// the device no longer touches guest memory.
    fn reset(&mut self);

    /// The device hit an unrecoverable error (e.g. a corrupt ring) and wants the driver to reset
    /// it; the transport reports DEVICE_NEEDS_RESET in Status while this is true.
    fn needs_reset(&self) -> bool {
        false
    }

    /// ConfigGeneration: changes whenever the device changes its config space on its own.
    fn config_generation(&self) -> u32 {
        0
    }

    /// Holds the device's worker back between two batches (for a snapshot) and returns where
    /// its queues stand, or `None` when it is not active. Until [`resume`](Self::resume) the
    /// device does not touch guest memory. Devices that cannot be snapshotted say why.
    fn pause(&mut self) -> Result<Option<Vec<QueueState>>, DeviceStateError> {
        Err(DeviceStateError::Unsupported(self.device_type()))
    }

    /// Ends a [`pause`](Self::pause): the worker carries on where it stopped.
    fn resume(&mut self) {}
}
