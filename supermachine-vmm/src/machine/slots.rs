//! virtio-mmio slots: each device gets the next register window above the platform's
//! [`MMIO_BASE`], the platform's interrupt line for that slot (as an object from the
//! hypervisor), and one queue-notification eventfd per queue that the hypervisor binds to the
//! window's QueueNotify register.

use crate::os::EventFd;

use super::builder::MachineBuilder;
use crate::arch::{self, VirtioMmioDevice, MMIO_BASE};
use crate::bus::SharedDevice;
use crate::devices::virtio::{MmioSlot, MMIO_SLOT_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::error::Error;

impl MachineBuilder {
    /// Allocates the next virtio-mmio slot for `device`: creates its interrupt line and one
    /// queue-notification eventfd per queue (bound to `QueueNotify`, datamatch = queue index),
    /// puts `device` on the MMIO bus at the slot's base, and announces it to the guest. The
    /// returned [`MmioSlot`] carries the line and eventfds for the device.
    pub fn add_virtio_mmio(
        &mut self,
        device: SharedDevice,
        num_queues: u16,
    ) -> Result<MmioSlot, Error> {
        let slot = self.allocate_slot(num_queues)?;
        self.mmio.insert(slot.base, MMIO_SLOT_SIZE, device)?;
        self.announce(slot.base, slot.irq_line);
        self.opaque_devices
            .push(format!("virtio-mmio device at {:#x}", slot.base));
        Ok(slot)
    }

    /// Like [`add_virtio_mmio`](Self::add_virtio_mmio), for a device that is built from its slot
    /// (e.g. a transport that owns the eventfds): `build` gets the slot and returns the device
    /// to put at its base. Returns the slot's base address and interrupt line.
    pub fn add_virtio_mmio_with(
        &mut self,
        num_queues: u16,
        build: impl FnOnce(MmioSlot) -> SharedDevice,
    ) -> Result<(u64, u32), Error> {
        let slot = self.allocate_slot(num_queues)?;
        let (base, irq) = (slot.base, slot.irq_line);
        let device = build(slot);
        self.mmio.insert(base, MMIO_SLOT_SIZE, device)?;
        self.opaque_devices
            .push(format!("virtio-mmio device at {base:#x}"));
        self.announce(base, irq);
        Ok((base, irq))
    }

    /// Takes the next slot and sets up its interrupt line and notifications. The slot index is
    /// consumed even if a later step fails: what was registered with the VM cannot be reused.
    pub(super) fn allocate_slot(&mut self, num_queues: u16) -> Result<MmioSlot, Error> {
        let index = self.next_slot;
        let irq_line = arch::virtio_irq(index).ok_or(Error::NoFreeMmioSlot { max: index })?;
        self.next_slot += 1;
        let base = MMIO_BASE + u64::from(index) * MMIO_SLOT_SIZE;
        let irq = self.vm.interrupt_line(irq_line)?;
        let mut notify = Vec::with_capacity(usize::from(num_queues));
        for queue in 0..num_queues {
            let fd = new_eventfd()?;
            self.vm
                .bind_queue_notify(&fd, base + QUEUE_NOTIFY_OFFSET, u32::from(queue))?;
            notify.push(fd);
        }
        Ok(MmioSlot {
            base,
            irq_line,
            irq,
            notify,
        })
    }

    /// Records the device in the slot at `base`, for the platform to announce at boot.
    pub(super) fn announce(&mut self, base: u64, irq: u32) {
        self.devices.push(VirtioMmioDevice {
            base,
            size: MMIO_SLOT_SIZE,
            irq,
        });
    }
}

/// A non-blocking eventfd that is not inherited by child processes the embedding program spawns.
fn new_eventfd() -> Result<EventFd, Error> {
    EventFd::new(crate::os::EFD_NONBLOCK | crate::os::EFD_CLOEXEC).map_err(Error::EventFd)
}
