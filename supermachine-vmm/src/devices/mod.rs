//! Emulated devices: the virtio-mmio transport and virtio devices (vsock, block), and the serial
//! console.

pub mod virtio;
