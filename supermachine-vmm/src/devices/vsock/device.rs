//! [`VsockDevice`]: the virtio side of the vsock device (what the transport talks to).

use std::sync::Arc;

use crate::os::EventFd;
use tokio::runtime::Handle as RuntimeHandle;
use tokio::task::JoinHandle;
use tracing::debug;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::handle::VsockHandle;
use super::shared::Shared;
use super::worker::Worker;
use super::{VsockConfig, VsockError, QUEUE_SIZE};
use crate::devices::block::copy_config;
use crate::devices::virtio::worker_gate::WorkerGate;
use crate::devices::virtio::{
    ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// A virtio-vsock device (type 19) whose host side is in-process: see [`VsockHandle`].
///
/// Its data path runs as a task on the tokio runtime given to [`VsockDevice::new`], which
/// must have I/O and time drivers enabled (`Builder::enable_all`, as `#[tokio::main]` does).
#[derive(Debug)]
pub struct VsockDevice {
    shared: Arc<Shared>,
    runtime: RuntimeHandle,
    config_space: [u8; 8],
    queue_sizes: [u16; 3],
    acked_features: u64,
    worker: Option<(Arc<WorkerGate>, JoinHandle<()>)>,
}

impl VsockDevice {
    /// A device for a guest with `config.guest_cid`, running its worker on `runtime`.
    pub fn new(config: VsockConfig, runtime: RuntimeHandle) -> Result<Self, VsockError> {
        // 0, 1 and 2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
        if config.guest_cid < 3 || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        if config.host_buf_alloc == 0 || config.host_tx_buf == 0 {
            return Err(VsockError::ZeroBuffer);
        }
        Ok(VsockDevice {
            config_space: config.guest_cid.to_le_bytes(),
            shared: Arc::new(Shared::new(config)),
            runtime,
            queue_sizes: [QUEUE_SIZE; 3],
            acked_features: 0,
            worker: None,
        })
    }

    /// The host side: connect, muxer, transport reset. Handles stay valid across guest
    /// resets; after the device is dropped they fail every call.
    pub fn handle(&self) -> VsockHandle {
        VsockHandle {
            shared: self.shared.clone(),
        }
    }

    fn stop_worker(&mut self) {
        if let Some((gate, task)) = self.worker.take() {
            // Wait out the pass in flight; after this the worker never touches guest memory.
            gate.close();
            task.abort();
        }
        let mut inner = self.shared.lock();
        inner.active_gen = None;
        inner.events_due = 0;
        inner.fail_all(std::io::ErrorKind::ConnectionAborted);
        self.shared
            .needs_reset
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        // Stream sockets only (no SEQPACKET). No INDIRECT_DESC on purpose: Linux would then
        // kmalloc an indirect table for every two-descriptor packet, which is guest kernel
        // work, and guest kernel work is what is slow here.
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        copy_config(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!(offset, "vsock config is read-only; write ignored");
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
        let queues: [Queue; 3] = queues
            .try_into()
            .map_err(|_| ActivateError::QueueCount { expected: 3, got })?;
        if notify.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: notify.len(),
            });
        }
        let gate = Arc::new(WorkerGate::new(&queues));
        let generation = {
            let mut inner = self.shared.lock();
            let generation = inner.next_gen;
            inner.next_gen += 1;
            inner.active_gen = Some(generation);
            generation
        };
        let worker = Worker::new(
            mem,
            queues,
            irq,
            self.shared.clone(),
            gate.clone(),
            generation,
        );
        let task = self.runtime.spawn(worker.run(notify));
        self.worker = Some((gate, task));
        debug!(cid = self.shared.config.guest_cid, "vsock device activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }

    fn needs_reset(&self) -> bool {
        self.shared
            .needs_reset
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn pause(
        &mut self,
    ) -> Result<Option<Vec<virtio_queue::QueueState>>, crate::devices::virtio::DeviceStateError>
    {
        // Connections stay as they are: a paused worker only stops touching the rings.
        Ok(self.worker.as_ref().and_then(|(gate, _)| gate.pause()))
    }

    fn resume(&mut self) {
        if let Some((gate, _)) = &self.worker {
            gate.resume();
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.stop_worker();
        self.shared.lock().device_gone = true;
    }
}
