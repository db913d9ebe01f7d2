//! Receive checksums: the stack leaves the TCP checksum of the segments it sends to the guest
//! unset (computing it is a pass over every byte, and the link is guest memory, which no
//! checksum protects better), so the NIC either tells the guest the checksum needs no check
//! (`VIRTIO_NET_F_GUEST_CSUM` accepted: `VIRTIO_NET_HDR_F_DATA_VALID` in every header) or, for
//! a driver that did not accept that, fills it in here.

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
};

/// `VIRTIO_NET_HDR_F_DATA_VALID`: the packet's checksums are known good.
pub(super) const HDR_F_DATA_VALID: u8 = 2;

/// Computes the TCP checksum of `frame` if it is an unfragmented IPv4 TCP segment; leaves any
/// other frame alone. Never panics, whatever the bytes.
pub(super) fn fill_tcp(frame: &mut [u8]) {
    let Ok(mut ethernet) = EthernetFrame::new_checked(&mut *frame) else {
        return;
    };
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(ethernet.payload_mut()) else {
        return;
    };
    if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
        return;
    }
    let (src, dst) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
        tcp.fill_checksum(&src, &dst);
    }
}

#[cfg(test)]
mod tests {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetRepr, Ipv4Address, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber,
    };

    use super::*;

    fn segment(payload: &[u8]) -> Vec<u8> {
        let (src, dst) = (
            Ipv4Address::new(203, 0, 113, 10),
            Ipv4Address::new(10, 0, 2, 15),
        );
        let tcp = TcpRepr {
            src_port: 80,
            dst_port: 40000,
            control: TcpControl::Psh,
            seq_number: TcpSeqNumber(7),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 100,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut frame = vec![0; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        let mut e = EthernetFrame::new_unchecked(&mut frame);
        eth.emit(&mut e);
        let mut i = Ipv4Packet::new_unchecked(e.payload_mut());
        ip.emit(&mut i, &caps);
        let mut t = TcpPacket::new_unchecked(i.payload_mut());
        tcp.emit(&mut t, &src.into(), &dst.into(), &caps);
        frame
    }

    fn tcp_checksum_ok(frame: &[u8]) -> bool {
        let e = EthernetFrame::new_checked(frame).unwrap();
        let i = Ipv4Packet::new_checked(e.payload()).unwrap();
        let t = TcpPacket::new_checked(i.payload()).unwrap();
        t.verify_checksum(&i.src_addr().into(), &i.dst_addr().into())
    }

    #[test]
    fn a_zeroed_tcp_checksum_is_filled() {
        let mut frame = segment(b"hello");
        assert!(tcp_checksum_ok(&frame));
        // Where the stack leaves it: unset.
        let at = 14 + 20 + 16;
        frame[at..at + 2].copy_from_slice(&[0, 0]);
        assert!(!tcp_checksum_ok(&frame));
        fill_tcp(&mut frame);
        assert!(tcp_checksum_ok(&frame));
    }

    #[test]
    fn other_and_malformed_frames_are_left_alone() {
        let arp = vec![0xffu8; 42];
        let mut copy = arp.clone();
        fill_tcp(&mut copy);
        assert_eq!(copy, arp);
        let mut short = segment(b"x");
        short.truncate(40);
        let before = short.clone();
        fill_tcp(&mut short);
        assert_eq!(short, before);
        for len in 0..60 {
            fill_tcp(&mut vec![0x45; len]);
        }
    }
}
