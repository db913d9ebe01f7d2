//! virtio-net (device type 1) in front of the user-mode network ([`crate::net`]).
//!
//! Two queues, receive (0) and transmit (1), no control queue, no offloads: the guest
//! checksums and segments itself, every frame is at most one MTU plus its Ethernet header.
//! Offered features: `VERSION_1`, `EVENT_IDX`, `INDIRECT_DESC`, `MAC` (the guest's fixed MAC),
//! `STATUS` (link always up), `MTU` ([`MTU`](crate::net::addressing::MTU), 65520: the link
//! ends in the VMM, so large frames cost nothing and each frame saved is a kick and an
//! interrupt saved), `GUEST_CSUM` (see [`checksum`]: TCP segments to the guest carry no
//! checksum to verify) and `CSUM` (the guest leaves its TCP and UDP checksums partial: the
//! stack does not check them, [`crate::net::packet::guest_checksums`]). No segmentation
//! offload: with a 64 KiB MTU it would save little.
//!
//! # Receive buffers: not mergeable
//! Without `VIRTIO_NET_F_MRG_RXBUF`, a device MTU above 1500 makes Linux post "big" receive
//! buffers, each a chain of pages that holds a whole frame (12-byte header + MTU + 14), so
//! each frame from the stack goes into exactly one descriptor chain. The data path never holds
//! half a frame, which keeps the snapshot state to the queue positions. A frame too large for
//! a chain is dropped and counted as the guest would count a bad frame.
//!
//! # Data path
//! One tokio task per activation ([`worker`]): it waits on the two queue eventfds
//! (`AsyncFd`) and on the stack's channel, and does only non-blocking work (copies between
//! guest memory and frames), so it never blocks a runtime worker. Guest → stack frames go
//! through [`GuestLink::to_stack`]; when that channel is full the task stops taking transmit
//! descriptors (the guest's own backpressure) until the stack catches up.
//!
//! # Snapshots
//! See [`persist`]: the transport saves the queues; a restored machine builds a new device
//! and with it a new, empty [`NetStack`], so restored VMs share no flow and no DNS cache.

mod checksum;
mod persist;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::os::EventFd;
use tracing::debug;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::block::copy_config;
use super::virtio::worker_gate::WorkerGate;
use super::virtio::{
    ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::net::addressing::{GUEST_MAC, MTU};
use crate::net::{GuestLink, NetStack, StackConfig};

/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// Size of each queue offered to the driver.
pub const QUEUE_SIZE: u16 = 256;

/// Bytes of `struct virtio_net_config` the device exposes (up to and including `mtu`).
const CONFIG_LEN: usize = 12;
/// The MTU as the 16-bit config field holds it (checked at compile time).
const MTU_FIELD: u16 = {
    assert!(MTU <= u16::MAX as usize);
    MTU as u16
};

/// A virtio-net device whose other end is a [`NetStack`] of its own.
pub struct NetDevice {
    /// The stack; dropping the device drops it, which closes every host socket.
    _stack: NetStack,
    link: Arc<worker::Link>,
    runtime: tokio::runtime::Handle,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    acked_features: u64,
    worker: Option<(Arc<WorkerGate>, tokio::task::JoinHandle<()>)>,
    needs_reset: Arc<AtomicBool>,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl NetDevice {
    /// A NIC with a new user-mode network built from `config`, running on `runtime`.
    pub fn new(config: StackConfig, runtime: tokio::runtime::Handle) -> Self {
        let (stack, link) = {
            let _entered = runtime.enter();
            NetStack::spawn(config)
        };
        Self::with_link(stack, link, runtime)
    }

    fn with_link(stack: NetStack, link: GuestLink, runtime: tokio::runtime::Handle) -> Self {
        // struct virtio_net_config: mac[6] @0, status le16 @6, max_virtqueue_pairs le16 @8
        // (read only with VIRTIO_NET_F_MQ; one pair), mtu le16 @10.
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&GUEST_MAC.0);
        // The constant is 1; the field is 16 bits.
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&MTU_FIELD.to_le_bytes());
        NetDevice {
            _stack: stack,
            link: Arc::new(worker::Link::new(link)),
            runtime,
            config,
            queue_sizes: [QUEUE_SIZE; 2],
            acked_features: 0,
            worker: None,
            needs_reset: Arc::new(AtomicBool::new(false)),
        }
    }

    fn stop_worker(&mut self) {
        if let Some((gate, task)) = self.worker.take() {
            // Wait out the pass in flight; after this the task never touches guest memory.
            gate.close();
            task.abort();
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_CSUM)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR (not offered).
        debug!(offset, "virtio-net config write ignored");
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap<()>>,
        queues: Vec<Queue>,
        irq: IrqTrigger,
        notify: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let queues: [Queue; 2] = queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: 2, got })?;
        let got = notify.len();
        let notify: [EventFd; 2] = notify
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: 2, got })?;
        let gate = Arc::new(WorkerGate::new(&queues));
        let guest_csum = self.acked_features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        let worker = worker::Worker::new(
            mem,
            guest_csum,
            queues,
            irq,
            self.link.clone(),
            gate.clone(),
            self.needs_reset.clone(),
        );
        let task = self.runtime.spawn(worker::run(worker, notify));
        self.worker = Some((gate, task));
        debug!("virtio-net activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn pause(
        &mut self,
    ) -> Result<Option<Vec<virtio_queue::QueueState>>, crate::devices::virtio::DeviceStateError>
    {
        Ok(persist::pause(
            self.worker.as_ref().map(|(gate, _)| &**gate),
        ))
    }

    fn resume(&mut self) {
        if let Some((gate, _)) = &self.worker {
            gate.resume();
        }
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
