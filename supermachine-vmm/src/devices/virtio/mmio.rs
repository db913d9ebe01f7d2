//! The virtio-mmio transport (virtio 1.x §4.2, "modern" register layout, version 2).
//!
//! [`MmioTransport`] is the [`BusDevice`] the guest's `virtio_mmio` driver talks to: it answers
//! the identification registers, runs the device-status state machine and feature negotiation,
//! collects the queue configuration, and on DRIVER_OK hands validated queues to the
//! [`VirtioDevice`]. Everything here runs on a vCPU thread during a register access, so it only
//! updates state; the device does its work on its own worker.
//!
//! The guest is not trusted: register accesses of the wrong width, writes out of order, queue
//! sizes that are not powers of two, misaligned or out-of-RAM ring addresses all end in a logged
//! warning and either an ignored write or DEVICE_NEEDS_RESET — never a panic.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::os::EventFd;
use tracing::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{IrqTrigger, MmioSlot, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG};
use super::{QUEUE_NOTIFY_OFFSET, VIRTIO_RING_F_EVENT_IDX};
use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;

/// "virt" in little endian: the MagicValue register.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The register layout version this transport implements (modern, non-legacy).
pub const MMIO_VERSION: u32 = 2;
/// VendorID reported to the guest ("SMCH"); Linux does not interpret it.
pub const MMIO_VENDOR_ID: u32 = 0x4843_4d53;

/// Offset of the device-specific configuration space.
const CONFIG_SPACE_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// The device-status bits a driver may set, in the order it must set them (§3.1.1).
const STATUS_ORDER: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap<()>>,
    base: u64,
    /// Shared with the device's [`IrqTrigger`]: the device sets bits, the guest acks them here.
    interrupt_status: Arc<AtomicU32>,
    irq: Arc<dyn InterruptLine>,
    /// One per queue; the device gets duplicates at activation, the transport keeps these to
    /// forward QueueNotify writes that reach the bus instead of an ioeventfd.
    notify: Vec<EventFd>,
    /// Queue configuration as written by the driver (handed to the device as copies, so
    /// QueueReady & co. can still be read back after activation).
    queues: Vec<Queue>,
    /// The driver wrote an invalid value for this queue (bad size or alignment); activating
    /// with it would make device and driver disagree about the ring layout.
    queue_invalid: Vec<bool>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// The driver set feature bits beyond the 64 this transport knows (never acceptable).
    bogus_driver_features: bool,
    activated: bool,
    /// Set when the transport itself decided the device needs a reset (failed activation).
    needs_reset: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("base", &format_args!("{:#x}", self.base))
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device` for the register window described by `slot`.
    ///
    /// `slot.notify` must hold one EventFd per device queue; missing ones are replaced by fresh
    /// EventFds (so a machine without ioeventfd support still works through bus writes), extra
    /// ones are dropped.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap<()>>,
        slot: MmioSlot,
    ) -> std::io::Result<Self> {
        let max_sizes = device.queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        for &max in &max_sizes {
            let q = Queue::new(max).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("device queue max size {max}: {e}"),
                )
            })?;
            queues.push(q);
        }
        let mut notify = slot.notify;
        if notify.len() != queues.len() {
            warn!(
                base = slot.base,
                got = notify.len(),
                want = queues.len(),
                "MmioSlot queue notify count mismatch; filling with plain EventFds"
            );
        }
        notify.truncate(queues.len());
        while notify.len() < queues.len() {
            notify.push(EventFd::new(crate::os::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            queue_invalid: vec![false; queues.len()],
            device,
            mem,
            base: slot.base,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            irq: slot.irq,
            notify,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            bogus_driver_features: false,
            activated: false,
            needs_reset: false,
        })
    }

    /// The Status register as the guest sees it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.needs_reset || (self.activated && self.device.needs_reset()) {
            s |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        s
    }

    /// Whether the device is running (DRIVER_OK accepted and no reset since).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The InterruptStatus bits shared with the device.
    pub fn interrupt_status(&self) -> Arc<AtomicU32> {
        self.interrupt_status.clone()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written only between FEATURES_OK and DRIVER_OK, and only while
    /// the selected queue is not ready (§4.2.3.2).
    fn queue_writable(&self, offset: u64) -> bool {
        let phase_ok = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        if !phase_ok {
            warn!(
                base = self.base,
                offset,
                status = self.status,
                "queue register written outside queue setup"
            );
            return false;
        }
        match self.queues.get(self.queue_sel as usize) {
            Some(q) if q.ready() && offset != u64::from(reg::VIRTIO_MMIO_QUEUE_READY) => {
                warn!(
                    base = self.base,
                    queue = self.queue_sel,
                    "queue reconfigured while ready"
                );
                false
            }
            Some(_) => true,
            None => {
                warn!(
                    base = self.base,
                    queue = self.queue_sel,
                    "write to a queue that does not exist"
                );
                false
            }
        }
    }

    fn mark_queue_invalid(&mut self, what: &str, err: virtio_queue::Error) {
        warn!(base = self.base, queue = self.queue_sel, %err, "invalid {what}");
        if let Some(flag) = self.queue_invalid.get_mut(self.queue_sel as usize) {
            *flag = true;
        }
    }

    fn set_queue_addr(&mut self, offset: u64, value: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        let (current, high) = match offset as u32 {
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => (q.desc_table(), false),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => (q.desc_table(), true),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => (q.avail_ring(), false),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (q.avail_ring(), true),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => (q.used_ring(), false),
            _ => (q.used_ring(), true),
        };
        let addr = if high {
            (current & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (current & !0xffff_ffff) | u64::from(value)
        };
        let addr = GuestAddress(addr);
        let result = match offset as u32 {
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => q
                .try_set_desc_table_address(addr)
                .map_err(|e| ("descriptor table address", e)),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q
                .try_set_avail_ring_address(addr)
                .map_err(|e| ("driver area address", e)),
            _ => q
                .try_set_used_ring_address(addr)
                .map_err(|e| ("device area address", e)),
        };
        if let Err((what, e)) = result {
            self.mark_queue_invalid(what, e);
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_writable(offset) {
            return;
        }
        match offset as u32 {
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    if let Err(e) = q.try_set_size(value.try_into().unwrap_or(0)) {
                        self.mark_queue_invalid("queue size", e);
                    }
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            _ => self.set_queue_addr(offset, value),
        }
    }

    fn reset(&mut self) {
        if self.activated {
            debug!(base = self.base, "virtio device reset by driver");
            self.device.reset();
        }
        self.activated = false;
        self.needs_reset = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.bogus_driver_features = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_invalid.iter_mut().for_each(|f| *f = false);
        self.interrupt_status.store(0, Ordering::SeqCst);
    }

    /// Flags DEVICE_NEEDS_RESET and tells the driver through a config-change interrupt (§2.1.2).
    fn fail_device(&mut self, why: &str) {
        warn!(
            base = self.base,
            device_type = self.device.device_type(),
            "{why}; device needs reset"
        );
        self.needs_reset = true;
        let irq = IrqTrigger::new(self.interrupt_status.clone(), self.irq.clone());
        if let Err(e) = irq.trigger(VIRTIO_MMIO_INT_CONFIG) {
            warn!(base = self.base, %e, "raising config interrupt");
        }
    }

    fn negotiate_features(&mut self) -> bool {
        let offered = self.device.features();
        let wanted = self.driver_features;
        if wanted & !offered != 0 || self.bogus_driver_features {
            warn!(
                base = self.base,
                offered, wanted, "driver accepted features the device never offered"
            );
            return false;
        }
        if wanted & VIRTIO_F_VERSION_1 == 0 {
            warn!(
                base = self.base,
                "legacy (pre-1.0) driver; only virtio 1.x is supported"
            );
            return false;
        }
        self.device.ack_features(wanted);
        true
    }

    fn activate(&mut self) {
        let mem = &*self.mem;
        for (i, q) in self.queues.iter().enumerate() {
            if self.queue_invalid[i] {
                return self.fail_device(&format!("queue {i} was configured with invalid values"));
            }
            if !q.is_valid(mem) {
                return self.fail_device(&format!(
                    "queue {i} not ready or its rings are outside guest memory"
                ));
            }
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => return self.fail_device(&format!("copying queue state: {e}")),
            }
        }
        let mut notify = Vec::with_capacity(self.notify.len());
        for fd in &self.notify {
            match fd.try_clone() {
                Ok(fd) => notify.push(fd),
                Err(e) => return self.fail_device(&format!("duplicating notify eventfd: {e}")),
            }
        }
        let irq = IrqTrigger::new(self.interrupt_status.clone(), self.irq.clone());
        match self.device.activate(self.mem.clone(), queues, irq, notify) {
            Ok(()) => {
                self.activated = true;
                self.status |= VIRTIO_CONFIG_S_DRIVER_OK;
                debug!(
                    base = self.base,
                    device_type = self.device.device_type(),
                    "virtio device activated"
                );
            }
            Err(e) => self.fail_device(&format!("activation failed: {e}")),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        let old = self.status;
        if value & old != old {
            warn!(
                base = self.base,
                old, value, "driver cleared status bits without a reset"
            );
            return;
        }
        let added = value & !old;
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            debug!(base = self.base, "driver gave up on the device (FAILED)");
            self.status |= VIRTIO_CONFIG_S_FAILED;
        }
        // Walk the init sequence: each bit needs its predecessor.
        let mut have = old;
        for (i, &bit) in STATUS_ORDER.iter().enumerate() {
            if added & bit == 0 {
                continue;
            }
            let prev = if i == 0 { 0 } else { STATUS_ORDER[i - 1] };
            if have & prev != prev {
                warn!(base = self.base, old, value, "status bits set out of order");
                return;
            }
            match bit {
                VIRTIO_CONFIG_S_FEATURES_OK => {
                    if !self.negotiate_features() {
                        // Leave FEATURES_OK clear: the driver reads it back and gives up.
                        return;
                    }
                    self.status |= bit;
                }
                VIRTIO_CONFIG_S_DRIVER_OK => {
                    if self.status & VIRTIO_CONFIG_S_FAILED != 0 || self.needs_reset {
                        return;
                    }
                    self.activate();
                }
                _ => self.status |= bit,
            }
            have |= bit;
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            reg::VIRTIO_MMIO_STATUS => self.status(),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table() as u32),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.map_or(0, |q| q.avail_ring() as u32),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => queue.map_or(0, |q| q.used_ring() as u32),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => queue.map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: their length reads as all ones (§4.2.2).
            reg::VIRTIO_MMIO_SHM_LEN_LOW | reg::VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            reg::VIRTIO_MMIO_SHM_BASE_LOW | reg::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.device.config_generation(),
            _ => {
                debug!(
                    base = self.base,
                    offset, "read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                let writable = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if !writable {
                    warn!(
                        base = self.base,
                        status = self.status,
                        "DriverFeatures written outside negotiation"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    // Higher words hold no defined bits; a driver setting any is asking for
                    // something we never offered.
                    _ if value != 0 => self.bogus_driver_features = true,
                    _ => {}
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.queue_notify(value),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            // No shared memory regions to select; every selection reads as absent.
            reg::VIRTIO_MMIO_SHM_SEL => {}
            _ => warn!(
                base = self.base,
                offset, value, "write to a read-only or unknown register"
            ),
        }
    }

    /// A QueueNotify write reached the bus (no ioeventfd matched): forward it to the same
    /// EventFd the ioeventfd would have signalled.
    fn queue_notify(&self, queue: u32) {
        if !self.activated {
            debug!(
                base = self.base,
                queue, "queue notify before DRIVER_OK ignored"
            );
            return;
        }
        match self.notify.get(queue as usize) {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    warn!(base = self.base, queue, %e, "signalling queue notify eventfd");
                }
            }
            None => warn!(
                base = self.base,
                queue, "notify for a queue that does not exist"
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            return self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        }
        // Registers are 32 bits wide and must be accessed as such (§4.2.2.2).
        let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) else {
            warn!(
                base = self.base,
                offset,
                len = data.len(),
                "non-32-bit register read"
            );
            data.fill(0);
            return;
        };
        if offset % 4 != 0 {
            warn!(base = self.base, offset, "misaligned register read");
            *bytes = [0; 4];
            return;
        }
        *bytes = self.read_register(offset).to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            return self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                base = self.base,
                offset,
                len = data.len(),
                "non-32-bit register write ignored"
            );
            return;
        };
        if offset % 4 != 0 {
            warn!(
                base = self.base,
                offset, "misaligned register write ignored"
            );
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// QueueNotify's offset must match what the machine registers its ioeventfds on.
const _: () = assert!(QUEUE_NOTIFY_OFFSET == reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64);

mod persist;
#[cfg(test)]
mod tests;

pub use persist::{DeviceStateError, TransportState};
