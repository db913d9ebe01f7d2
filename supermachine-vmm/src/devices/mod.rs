//! Emulated devices: the virtio-mmio transport and virtio devices (vsock, block, net), and the serial
//! console.

pub mod block;
pub mod net;
pub mod serial;
pub mod virtio;
pub mod vsock;
