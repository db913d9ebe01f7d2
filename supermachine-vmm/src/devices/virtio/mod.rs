//! Virtio devices and the virtio-mmio transport that puts them on the MMIO bus.
//!
//! The machine (`machine.rs`) allocates an [`MmioSlot`] per device — base address, GSI, an irqfd
//! and one ioeventfd per queue, all registered with the hypervisor — and wraps the device in the
//! MMIO transport. Devices never see the hypervisor.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Size of one virtio-mmio register window.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;

/// Offset of the QueueNotify register in a virtio-mmio window (ioeventfd address).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// InterruptStatus bit: the device used buffers in a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// InterruptStatus bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Everything a virtio-mmio device slot gets from the machine.
#[derive(Debug)]
pub struct MmioSlot {
    /// Guest physical base address of the register window.
    pub base: u64,
    /// The interrupt line (GSI) announced on the kernel cmdline.
    pub gsi: u32,
    /// Registered as a KVM irqfd for `gsi`: writing 1 raises the interrupt.
    pub irq: EventFd,
    /// One per queue, registered as ioeventfds on `base + QUEUE_NOTIFY_OFFSET` with datamatch =
    /// queue index: the guest's queue notifications arrive here without a vCPU exit to userspace.
    pub notify: Vec<EventFd>,
}

impl MmioSlot {
    /// The kernel cmdline entry announcing this slot.
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.gsi)
    }
}

/// Raises a device's interrupt: sets InterruptStatus bits (shared with the transport, which the
/// guest reads and acknowledges) and signals the irqfd.
#[derive(Debug, Clone)]
pub struct IrqTrigger {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl IrqTrigger {
    /// A trigger over the transport's interrupt status and the slot's irqfd.
    pub fn new(status: Arc<AtomicU32>, irqfd: Arc<EventFd>) -> Self {
        IrqTrigger { status, irqfd }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}
