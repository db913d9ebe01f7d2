//! A fake guest driver for unit tests: plays Linux's `virtio_mmio` driver against an
//! [`MmioTransport`] over real guest memory, with split virtqueues laid out by hand.
//!
//! Nothing here trusts the device: rings are read back from guest memory exactly as a guest
//! would, so a device bug shows up as a wrong used ring, a missing interrupt or wrong data.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{MmioSlot, MmioTransport, VirtioDevice};
use crate::bus::BusDevice;

/// Guest RAM size for tests.
pub(crate) const MEM_SIZE: u64 = 64 << 20;
/// Where queue rings are placed (each queue gets 64 KiB).
const RING_BASE: u64 = 0x10_0000;
/// Where data buffers are allocated from.
const BUF_BASE: u64 = 0x100_0000;

/// One split virtqueue as the driver sees it.
#[derive(Debug)]
pub(crate) struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

/// One descriptor of a chain the test wants to post: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    pub(crate) fn ro(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: false,
        }
    }
    pub(crate) fn wo(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// The fake driver: owns guest memory, the transport and the irqfd.
pub(crate) struct GuestDriver {
    pub mem: Arc<GuestMemoryMmap<()>>,
    pub transport: MmioTransport,
    pub irq: EventFd,
    pub queues: Vec<DriverQueue>,
    next_buf: u64,
}

impl GuestDriver {
    /// Plugs `device` into a fresh transport over 64 MiB of guest RAM.
    pub(crate) fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
        );
        let nq = device.queue_max_sizes().len();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let slot = MmioSlot {
            base: 0xd000_0000,
            irq_line: 5,
            irq: Arc::new(irq.try_clone().unwrap()),
            notify: (0..nq)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
        };
        let transport = MmioTransport::new(device, mem.clone(), slot).unwrap();
        GuestDriver {
            mem,
            transport,
            irq,
            queues: Vec::new(),
            next_buf: BUF_BASE,
        }
    }

    pub(crate) fn read32(&mut self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn write32(&mut self, offset: u32, v: u32) {
        self.transport.write(u64::from(offset), &v.to_le_bytes());
    }

    pub(crate) fn status(&mut self) -> u32 {
        self.read32(reg::VIRTIO_MMIO_STATUS)
    }

    fn add_status(&mut self, bits: u32) {
        let s = self.status();
        self.write32(reg::VIRTIO_MMIO_STATUS, s | bits);
    }

    /// The device's 64 offered feature bits, read the way Linux does (two selected words).
    pub(crate) fn device_features(&mut self) -> u64 {
        self.write32(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = self.read32(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        self.write32(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = self.read32(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    pub(crate) fn write_driver_features(&mut self, f: u64) {
        self.write32(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write32(reg::VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        self.write32(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write32(reg::VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
    }

    /// Linux's probe up to FEATURES_OK: identify, reset, ACK, DRIVER, negotiate `features &
    /// offered`. Returns whether the device kept FEATURES_OK set.
    pub(crate) fn negotiate(&mut self, features: u64) -> bool {
        assert_eq!(self.read32(reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read32(reg::VIRTIO_MMIO_VERSION), 2);
        self.write32(reg::VIRTIO_MMIO_STATUS, 0);
        self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.add_status(VIRTIO_CONFIG_S_DRIVER);
        let offered = self.device_features();
        self.write_driver_features(features & offered);
        self.add_status(VIRTIO_CONFIG_S_FEATURES_OK);
        self.status() & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Sets up queue `index` with `size` entries the way `vm_setup_vq` does, placing its rings
    /// at fixed addresses; returns false if the device has no such queue.
    pub(crate) fn setup_queue(&mut self, index: u16, size: u16) -> bool {
        self.write32(reg::VIRTIO_MMIO_QUEUE_SEL, u32::from(index));
        assert_eq!(self.read32(reg::VIRTIO_MMIO_QUEUE_READY), 0);
        let max = self.read32(reg::VIRTIO_MMIO_QUEUE_NUM_MAX);
        if max == 0 {
            return false;
        }
        assert!(
            u32::from(size) <= max,
            "queue {index}: size {size} > max {max}"
        );
        let base = RING_BASE + u64::from(index) * 0x1_0000;
        let q = DriverQueue {
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            // Used ring aligned to 4 (virtio 1.x); leave room after the avail ring.
            used: (base + 16 * u64::from(size) + 6 + 2 * u64::from(size) + 3) & !3,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        };
        // Fresh rings start zeroed, as a guest's freshly allocated ones are.
        let zeros = vec![0u8; 0x1_0000];
        self.mem.write_slice(&zeros, GuestAddress(base)).unwrap();
        self.write32(reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        self.write_queue_addrs(q.desc, q.avail, q.used);
        self.write32(reg::VIRTIO_MMIO_QUEUE_READY, 1);
        let i = usize::from(index);
        if self.queues.len() <= i {
            self.queues.resize_with(i + 1, || DriverQueue {
                size: 0,
                desc: 0,
                avail: 0,
                used: 0,
                free: Vec::new(),
                chains: HashMap::new(),
                avail_idx: 0,
                last_used: 0,
            });
        }
        self.queues[i] = q;
        true
    }

    pub(crate) fn write_queue_addrs(&mut self, desc: u64, avail: u64, used: u64) {
        self.write32(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        self.write32(reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write32(reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        self.write32(reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.write32(reg::VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        self.write32(reg::VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
    }

    pub(crate) fn driver_ok(&mut self) {
        self.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// Full bring-up with `features` and every queue at `sizes[i]`; panics if the device
    /// refuses. Returns the negotiated features.
    pub(crate) fn init(&mut self, features: u64, sizes: &[u16]) -> u64 {
        assert!(
            self.negotiate(features),
            "device refused features {features:#x}"
        );
        for (i, &size) in sizes.iter().enumerate() {
            assert!(self.setup_queue(i as u16, size));
        }
        self.driver_ok();
        assert_ne!(
            self.status() & VIRTIO_CONFIG_S_DRIVER_OK,
            0,
            "DRIVER_OK refused"
        );
        let offered = self.device_features();
        features & offered
    }

    /// Allocates `len` bytes of guest memory for buffers (16-byte aligned, never reused).
    pub(crate) fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (addr + u64::from(len.max(1)) + 15) & !15;
        assert!(self.next_buf <= MEM_SIZE, "test guest memory exhausted");
        addr
    }

    pub(crate) fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub(crate) fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Posts a descriptor chain on queue `q` (without notifying); returns its head index.
    pub(crate) fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let mem = self.mem.clone();
        let queue = &mut self.queues[q];
        assert!(
            queue.free.len() >= bufs.len(),
            "queue {q} out of descriptors"
        );
        let ids: Vec<u16> = (0..bufs.len()).map(|_| queue.free.pop().unwrap()).collect();
        for (i, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if b.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = GuestAddress(queue.desc + 16 * u64::from(id));
            mem.write_obj(b.addr.to_le(), at).unwrap();
            mem.write_obj(b.len.to_le(), GuestAddress(at.0 + 8))
                .unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
                .unwrap();
            mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
                .unwrap();
        }
        let head = ids[0];
        let slot = queue.avail_idx % queue.size;
        mem.write_obj(
            head.to_le(),
            GuestAddress(queue.avail + 4 + 2 * u64::from(slot)),
        )
        .unwrap();
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(queue.avail_idx.to_le(), GuestAddress(queue.avail + 2))
            .unwrap();
        queue.chains.insert(head, ids);
        head
    }

    /// Writes a raw descriptor-table entry (for hostile-chain tests).
    pub(crate) fn write_raw_desc(
        &self,
        q: usize,
        id: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.queues[q].desc + 16 * u64::from(id);
        self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), GuestAddress(at + 14))
            .unwrap();
    }

    /// Publishes a raw head index in the avail ring (for hostile-chain tests).
    pub(crate) fn publish_raw_head(&mut self, q: usize, head: u16) {
        let queue = &mut self.queues[q];
        let slot = queue.avail_idx % queue.size;
        self.mem
            .write_obj(
                head.to_le(),
                GuestAddress(queue.avail + 4 + 2 * u64::from(slot)),
            )
            .unwrap();
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(queue.avail_idx.to_le(), GuestAddress(queue.avail + 2))
            .unwrap();
    }

    /// Writes QueueNotify for `q` through the bus path (no ioeventfd in tests).
    pub(crate) fn kick(&mut self, q: u16) {
        self.write32(reg::VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(q));
    }

    pub(crate) fn used_idx(&self, q: usize) -> u16 {
        let v: u16 = self
            .mem
            .read_obj(GuestAddress(self.queues[q].used + 2))
            .unwrap();
        u16::from_le(v)
    }

    /// Next used element of queue `q` (head, len), freeing its descriptors.
    pub(crate) fn pop_used(&mut self, q: usize) -> Option<(u16, u32)> {
        let used_idx = self.used_idx(q);
        let queue = &mut self.queues[q];
        if used_idx == queue.last_used {
            return None;
        }
        let slot = queue.last_used % queue.size;
        let at = queue.used + 4 + 8 * u64::from(slot);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        queue.last_used = queue.last_used.wrapping_add(1);
        let head = u32::from_le(id) as u16;
        if let Some(ids) = queue.chains.remove(&head) {
            queue.free.extend(ids);
        }
        Some((head, u32::from_le(len)))
    }

    /// Number of chains the device has returned that the test has not popped yet.
    pub(crate) fn pending_used(&self, q: usize) -> u16 {
        self.used_idx(q).wrapping_sub(self.queues[q].last_used)
    }

    /// Sets `used_event` (the driver's interrupt threshold, event-idx mode).
    pub(crate) fn set_used_event(&self, q: usize, v: u16) {
        let queue = &self.queues[q];
        let at = queue.avail + 4 + 2 * u64::from(queue.size);
        self.mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
    }

    /// Reads `avail_event` (the device's notification threshold, event-idx mode).
    pub(crate) fn avail_event(&self, q: usize) -> u16 {
        let queue = &self.queues[q];
        let at = queue.used + 4 + 8 * u64::from(queue.size);
        u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
    }

    /// The driver's current avail index of queue `q`.
    pub(crate) fn avail_idx(&self, q: usize) -> u16 {
        self.queues[q].avail_idx
    }

    /// Interrupts raised since the last call (reads and clears the irqfd counter).
    pub(crate) fn take_irqs(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    /// Reads and acknowledges InterruptStatus, as the guest's interrupt handler does.
    pub(crate) fn ack_interrupt(&mut self) -> u32 {
        let s = self.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS);
        self.write32(reg::VIRTIO_MMIO_INTERRUPT_ACK, s);
        s
    }

    /// Waits (polling, real time) until queue `q` has at least `n` unpopped used entries.
    pub(crate) async fn wait_used(&self, q: usize, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pending_used(q) < n {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} used entries on queue {q} (have {})",
                self.pending_used(q)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Blocking variant of [`Self::wait_used`] for devices with their own threads.
    pub(crate) fn wait_used_blocking(&self, q: usize, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pending_used(q) < n {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} used entries on queue {q} (have {})",
                self.pending_used(q)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Reads `len` bytes of device config space at `offset` (as 4-byte accesses where aligned).
    pub(crate) fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.transport
            .read(u64::from(reg::VIRTIO_MMIO_CONFIG) + offset, &mut out);
        out
    }
}
