//! Saving and restoring a virtio-mmio transport (registers, queue configuration and positions)
//! for snapshots. The device behind it is rebuilt from the machine's configuration; only its
//! negotiated features and queue positions come from here.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::MmioTransport;

/// A transport's (or its device's) state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceStateError {
    /// The device type has no snapshot support.
    #[error("virtio device type {0} does not support snapshots")]
    Unsupported(u32),
    /// A restore needs a fresh transport; this one was already set up by a driver.
    #[error("the transport is already in use")]
    InUse,
    /// The saved state belongs to another kind of device.
    #[error("saved state is for virtio device type {saved}, this is type {device}")]
    DeviceType {
        /// The saved state's device type.
        saved: u32,
        /// This device's type.
        device: u32,
    },
    /// The saved state has another number of queues than the device.
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount {
        /// Queues in the saved state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// The driver's saved features are not all offered by this device.
    #[error("saved driver features {saved:#x} are not a subset of the device's {offered:#x}")]
    Features {
        /// The saved (negotiated) features.
        saved: u64,
        /// What this device offers.
        offered: u64,
    },
    /// A saved queue's configuration is invalid.
    #[error("saved queue {index} is invalid")]
    Queue {
        /// The queue index.
        index: usize,
        /// What `virtio-queue` found wrong.
        #[source]
        source: virtio_queue::Error,
    },
    /// Activating the device with the saved queues failed.
    #[error("the device could not be activated with the saved queues")]
    Activation,
}

/// One virtqueue's configuration and position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    max_size: u16,
    size: u16,
    ready: bool,
    event_idx: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        SavedQueue {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            event_idx: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }
}

impl SavedQueue {
    fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Everything a transport holds that the guest driver has set up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    device_type: u32,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    activated: bool,
    needs_reset: bool,
    bogus_driver_features: bool,
    queue_invalid: Vec<bool>,
    queues: Vec<SavedQueue>,
}

impl TransportState {
    /// The virtio device type this state belongs to.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }
}

impl MmioTransport {
    /// Holds the device back between two batches and returns the transport's state. The guest
    /// must not run until [`resume`](Self::resume) (its vCPUs are paused first).
    pub fn pause(&mut self) -> Result<TransportState, DeviceStateError> {
        let live = if self.activated {
            self.device.pause()?
        } else {
            None
        };
        let queues = match live {
            Some(states) => states.into_iter().map(SavedQueue::from).collect(),
            None => self.queues.iter().map(|q| q.state().into()).collect(),
        };
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            activated: self.activated,
            needs_reset: self.needs_reset,
            bogus_driver_features: self.bogus_driver_features,
            queue_invalid: self.queue_invalid.clone(),
            queues,
        })
    }

    /// Lets the device carry on after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        if self.activated {
            self.device.resume();
        }
    }

    /// Loads `state` into this fresh transport (same device type and queue count, device
    /// never activated) and, if the driver had activated the device, activates it with the
    /// saved queue positions.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), DeviceStateError> {
        if self.activated || self.status != 0 {
            return Err(DeviceStateError::InUse);
        }
        let device_type = self.device.device_type();
        if state.device_type != device_type {
            return Err(DeviceStateError::DeviceType {
                saved: state.device_type,
                device: device_type,
            });
        }
        if state.queues.len() != self.queues.len() || state.queue_invalid.len() != self.queues.len()
        {
            return Err(DeviceStateError::QueueCount {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        let offered = self.device.features();
        if state.driver_features & !offered != 0 {
            return Err(DeviceStateError::Features {
                saved: state.driver_features,
                offered,
            });
        }
        self.queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                q.to_queue()
                    .map_err(|source| DeviceStateError::Queue { index, source })
            })
            .collect::<Result<_, _>>()?;
        self.queue_invalid = state.queue_invalid.clone();
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.bogus_driver_features = state.bogus_driver_features;
        self.needs_reset = state.needs_reset;
        self.interrupt_status
            .store(state.interrupt_status, Ordering::SeqCst);
        if state.activated {
            self.device.ack_features(state.driver_features);
            self.status = state.status & !virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
            self.activate();
            if !self.activated {
                return Err(DeviceStateError::Activation);
            }
        } else {
            if state.status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                self.device.ack_features(state.driver_features);
            }
            self.status = state.status;
        }
        Ok(())
    }
}
