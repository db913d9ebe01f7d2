//! The virtio-vsock wire header and protocol constants (virtio 1.2 §5.10.6).
//!
//! Parsing and bounds-checking of descriptor chains is done by the `virtio-vsock` crate's
//! `VsockPacket`; this module only encodes and decodes the 44-byte header, which we keep as a
//! plain copy so that a guest rewriting its buffer after we looked cannot change what we act on.

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;

/// The host's context ID (well known).
pub const HOST_CID: u64 = 2;
/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = virtio_vsock::packet::PKT_HEADER_SIZE;
/// Largest payload a guest may put in one tx packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;

/// `type` field: stream socket (the only type this device supports).
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset / refused.
pub const OP_RST: u16 = 3;
/// Half or full close; `flags` carries [`SHUTDOWN_RCV`] / [`SHUTDOWN_SEND`].
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Unsolicited credit announcement.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Ask the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Event queue: all connections were reset (e.g. after snapshot restore); re-read the CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A decoded `struct virtio_vsock_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// Sender's total receive buffer space for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Little-endian wire encoding.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes the wire encoding.
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The header of a parsed packet (the crate's own copy, read once from guest memory).
    pub fn of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Header {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_matches_the_crate_layout() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 0xdead_beef,
            len: 4096,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 77,
        };
        let mut raw = h.encode();
        assert_eq!(Header::decode(&raw), h);
        let mut data = [0u8; 8];
        // SAFETY: both slices live until the end of this test and are accessed only here.
        let pkt = unsafe { VsockPacket::new(&mut raw, Some(&mut data)) }.unwrap();
        // `new` leaves the cached header zeroed; re-read it from the raw bytes.
        let mut pkt = pkt;
        pkt.set_header_from_raw(&h.encode()).unwrap();
        assert_eq!(Header::of(&pkt), h);
    }
}
