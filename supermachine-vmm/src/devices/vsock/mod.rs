//! virtio-vsock (device type 19) with an in-process host side.
//!
//! The host connects to ports in the guest with [`VsockHandle::connect`] and gets a
//! [`VsockStream`] (`AsyncRead + AsyncWrite`) — no socket between the caller and the device —
//! or serves Firecracker's Unix-socket protocol with [`VsockHandle::serve_unix`]. Connections
//! the guest initiates towards the host are refused (RST).
//!
//! # Performance design
//! On this project's hosts every guest interrupt and every guest kick of a virtqueue is
//! expensive (milliseconds under PVM), so the device is built to do as much as possible per
//! round trip (see `worker.rs` for the pass structure):
//! * **Many rx buffers in flight**: queues are 256 entries; Linux fills the whole rx ring
//!   (stock 6.1 posts 4 KiB buffers, our guest kernel 16 KiB: `guest/patches/0005`), and one
//!   pass fills as many of them as there is data and credit for.
//! * **Batching**: each pass drains *all* available tx chains and fills *all* the rx buffers
//!   it can, then raises at most **one** interrupt for the whole pass. Interrupts that would
//!   only return tx buffers wait up to [`VsockConfig::tx_interrupt_delay`] (250 ms) to share
//!   the reply's rx interrupt (a request/response round trip costs the guest one interrupt,
//!   not two).
//! * **`VIRTIO_RING_F_EVENT_IDX`**: we re-arm tx notifications (`avail_event`) only once the
//!   ring is empty, and rx notifications only while data waits for buffers, so the guest does
//!   not kick while we are busy or when we have nothing to send; interrupts are raised only
//!   when the guest's `used_event` asks for one. The event queue is the exception: the guest
//!   keeps buffers posted there, so the kick that reports a handled transport reset is armed
//!   at the guest's avail index (`ring::arm_kick_after`).
//! * **Lazy credit updates**: every header carries our `fwd_cnt`; a standalone CREDIT_UPDATE is
//!   sent only when the guest may be about to stall (see [`conn`]). CREDIT_REQUEST goes out
//!   once per stall, not per packet.
//! * **No per-packet allocation**: headers are encoded on the stack, payloads are copied
//!   between guest memory and per-connection `BytesMut` buffers that are reused.

mod conn;
mod device;
mod handle;
mod muxer;
pub mod packet;
mod shared;
mod stream;
mod worker;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use device::VsockDevice;
pub use handle::VsockHandle;
pub use muxer::ClientGate;
pub use stream::VsockStream;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

/// Configuration of a vsock device.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context ID (≥ 3).
    pub guest_cid: u64,
    /// Receive buffer per connection announced to the guest (`buf_alloc`): how much the guest
    /// may send before the host reads it.
    pub host_buf_alloc: u32,
    /// How many bytes the host may write ahead of what the guest's credit allows before
    /// `poll_write` waits.
    pub host_tx_buf: usize,
    /// After the host drops a stream and sends SHUTDOWN, how long to wait for the guest's RST
    /// before resetting the connection ourselves.
    pub close_timeout: Duration,
    /// How long an interrupt that only reports consumed tx buffers may wait for an rx
    /// interrupt to share (zero: raise it at once). It is raised earlier once a quarter of
    /// the tx ring waits to be reclaimed. The guest only frees packet memory on it (Linux
    /// sends a CREDIT_UPDATE after draining a socket, so a request/response round trip has
    /// one more tx packet than it seems). See the performance notes above.
    ///
    /// The default (250 ms) is longer than a round trip through guest userspace on a PVM host
    /// (20–120 ms measured), so an interactive exchange never pays for a tx-only interrupt:
    /// with 10 ms, every reply slower than that (all of them through the exec agent) cost the
    /// guest one extra interrupt, and there the guest's vCPU is busy for the whole round trip,
    /// so guest kernel work saved is latency saved. Nothing in the guest waits for it: Linux's
    /// vsock only reclaims skbs and ring slots there, and the quarter-ring rule bounds both.
    pub tx_interrupt_delay: Duration,
}

impl Default for VsockConfig {
    fn default() -> Self {
        VsockConfig {
            guest_cid: 3,
            host_buf_alloc: 512 * 1024,
            host_tx_buf: 256 * 1024,
            close_timeout: Duration::from_secs(2),
            tx_interrupt_delay: Duration::from_millis(250),
        }
    }
}

/// A vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0–2 and `u32::MAX` and above are reserved.
    #[error("invalid guest CID {0}: must be at least 3 and below 2^32 - 1")]
    InvalidCid(u64),
    /// A buffer size of zero would deadlock every connection.
    #[error("vsock buffer sizes must be non-zero")]
    ZeroBuffer,
}
