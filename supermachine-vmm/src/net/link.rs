//! The stack's link to the guest: Ethernet frames in and out over two bounded channels.
//!
//! The (future) virtio-net device holds a [`GuestLink`]: it sends each frame the guest
//! transmits into `to_stack` and writes each frame from `from_stack` into the guest's receive
//! queue. Both channels hold [`LINK_QUEUE`] frames. When `to_stack` is full the device awaits
//! (leaving descriptors in the guest's transmit ring: the guest's own backpressure); when the
//! guest does not take frames and `from_stack` is full, the stack stops sending: smoltcp keeps
//! the TCP data and retransmits, and replies the stack makes itself (RST, ICMP, UDP, DNS) wait
//! or are dropped as a congested link would.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use tokio::sync::mpsc;

use super::addressing::MTU;

/// One Ethernet frame, without the FCS.
pub type Frame = Vec<u8>;

/// Frames each direction's channel holds: at most 8 MiB of 64 KiB frames per direction and
/// VM, held only while the other side is slower.
pub const LINK_QUEUE: usize = 128;

/// An Ethernet header's length.
pub const ETHERNET_HEADER: usize = 14;

/// The guest's end of the link, for its network device.
#[derive(Debug)]
pub struct GuestLink {
    /// Frames the guest sent, to the stack.
    pub to_stack: mpsc::Sender<Frame>,
    /// Frames for the guest, from the stack.
    pub from_stack: mpsc::Receiver<Frame>,
}

/// The stack's end: frames taken from the guest and queued for smoltcp, and the sender toward
/// the guest. smoltcp's [`Device`].
pub(crate) struct Wire {
    /// Frames smoltcp reads next.
    pub(crate) rx: VecDeque<Frame>,
    /// Frames to the guest.
    pub(crate) tx: mpsc::Sender<Frame>,
    /// Set when a frame could not be sent because the guest's queue was full.
    pub(crate) blocked: bool,
}

impl Wire {
    pub(crate) fn new(tx: mpsc::Sender<Frame>) -> Self {
        Wire {
            rx: VecDeque::new(),
            tx,
            blocked: false,
        }
    }
}

pub(crate) struct RxToken(Frame);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub(crate) struct TxToken<'a> {
    tx: &'a mpsc::Sender<Frame>,
    blocked: &'a mut bool,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        // A reply to an incoming frame is sent even when `transmit` would have said no: it is
        // dropped here if the queue filled meanwhile, as a congested link drops it.
        if self.tx.try_send(frame).is_err() {
            *self.blocked = true;
        }
        result
    }
}

impl Device for Wire {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((
            RxToken(frame),
            TxToken {
                tx: &self.tx,
                blocked: &mut self.blocked,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.capacity() == 0 {
            self.blocked = true;
            return None;
        }
        Some(TxToken {
            tx: &self.tx,
            blocked: &mut self.blocked,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + ETHERNET_HEADER;
        // TCP checksums are neither checked nor computed, each a pass over every byte: the
        // guest's are partial sums (its NIC offloads them, see `packet::guest_checksums`), and
        // the NIC marks the stack's valid or fills them in (`devices/net/checksum.rs`).
        // (UDP: the stack has no smoltcp UDP socket; the guest's are partial sums too. IPv4
        // headers and ICMP are small and nobody offloads them: checked and computed.)
        caps.checksum.tcp = Checksum::None;
        caps.checksum.udp = Checksum::None;
        caps
    }
}
