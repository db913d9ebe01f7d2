use super::*;
use crate::net::addressing::{GATEWAY_MAC, GUEST};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

fn end(text: &str) -> SocketAddrV4 {
    text.parse().unwrap()
}

#[test]
fn a_udp_frame_round_trips_through_inspect() {
    // A frame "from the guest" is one the stack would send the other way round.
    let mut frame = udp_to_guest(
        GUEST_MAC,
        end("10.0.2.15:5000"),
        end("203.0.113.10:53"),
        b"query",
    )
    .unwrap();
    // Swap the MACs so it looks sent by the guest.
    frame[..6].copy_from_slice(&GATEWAY_MAC.0);
    frame[6..12].copy_from_slice(&GUEST_MAC.0);
    let Inspected::Udp(datagram) = inspect(&frame) else {
        panic!("not seen as UDP")
    };
    assert_eq!(datagram.guest, end("10.0.2.15:5000"));
    assert_eq!(datagram.destination, end("203.0.113.10:53"));
    assert_eq!(datagram.payload, b"query");
    assert_eq!(datagram.guest_mac, GUEST_MAC);

    // Refusing it quotes its header and 8 bytes: 14 + 20 + 8 + 20 + 8.
    let icmp = icmp_unreachable(&datagram, true).unwrap();
    assert_eq!(icmp.len(), 70);
    // It comes from the refused destination, not from the guest.
    assert_eq!(inspect(&icmp), Inspected::Foreign);
}

/// A one-byte UDP datagram between the guest and a test host, as `udp_to_guest` frames it.
fn guest_udp_x() -> Vec<u8> {
    udp_to_guest(
        GUEST_MAC,
        end("10.0.2.15:5000"),
        end("203.0.113.10:53"),
        b"x",
    )
    .unwrap()
}

#[test]
fn udp_checksums_are_not_checked() {
    // With VIRTIO_NET_F_CSUM the guest leaves a partial sum there.
    let mut frame = guest_udp_x();
    frame[14 + 20 + 6] ^= 0xff;
    assert!(matches!(inspect(&frame), Inspected::Udp(_)));
}

#[test]
fn corrupt_ip_headers_and_fragments_are_not_taken() {
    let mut frame = guest_udp_x();
    // The IPv4 header checksum.
    frame[14 + 10] ^= 0xff;
    assert_eq!(inspect(&frame), Inspected::Other);
    let mut fragment = guest_udp_x();
    fragment[14 + 6] |= 0x20; // more fragments
    assert_eq!(inspect(&fragment), Inspected::Other);
}

#[test]
fn the_rst_acknowledges_the_syn() {
    let syn = Syn {
        guest_mac: GUEST_MAC,
        guest: SocketAddrV4::new(GUEST, 40000),
        destination: end("203.0.113.10:80"),
        seq: TcpSeqNumber(1000),
        seq_len: 1,
    };
    let frame = tcp_rst(&syn);
    let ethernet = EthernetFrame::new_checked(&frame[..]).unwrap();
    assert_eq!(ethernet.dst_addr(), GUEST_MAC);
    let ip = Ipv4Packet::new_checked(ethernet.payload()).unwrap();
    assert_eq!(ip.src_addr(), *syn.destination.ip());
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    assert!(tcp.rst() && tcp.ack());
    assert_eq!(tcp.ack_number(), TcpSeqNumber(1001));
    assert_eq!((tcp.src_port(), tcp.dst_port()), (80, 40000));
    assert!(tcp.verify_checksum(
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr())
    ));
}

#[test]
fn garbage_is_other() {
    for len in 0..80 {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
        assert_eq!(inspect(&bytes), Inspected::Other);
    }
    assert!(udp_to_guest(
        GUEST_MAC,
        end("1.2.3.4:1"),
        end("10.0.2.15:2"),
        &[0; MAX_UDP_PAYLOAD + 1]
    )
    .is_none());
}

#[test]
fn frames_from_another_source_address_are_foreign() {
    // The fuzz target's find: a SYN from 0.0.0.0, which smoltcp would answer to 0.0.0.0.
    for source in ["0.0.0.0:40000", "10.0.2.16:40000", "255.255.255.255:68"] {
        let frame = udp_to_guest(GUEST_MAC, end(source), end("203.0.113.10:53"), b"x").unwrap();
        assert_eq!(inspect(&frame), Inspected::Foreign, "{source}");
    }
}
