//! Frames the stack looks at before smoltcp does (a guest's TCP SYN, its UDP datagrams), and
//! the frames it makes itself (TCP RST, ICMP unreachable, UDP datagrams to the guest).

use std::net::SocketAddrV4;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable,
    Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

use super::addressing::{GATEWAY_MAC, MTU};
use super::link::{Frame, ETHERNET_HEADER};

const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
/// The largest UDP payload one unfragmented frame to the guest carries.
pub const MAX_UDP_PAYLOAD: usize = MTU - IPV4_HEADER - UDP_HEADER;

/// What the stack needs to know about a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Inspected<'a> {
    /// A TCP SYN (without ACK): the guest opens a connection.
    TcpSyn(Syn),
    /// A UDP datagram (not fragmented, IPv4 header checksum valid).
    Udp(Datagram<'a>),
    /// Anything else (ARP, other TCP segments, ICMP, malformed frames): smoltcp's business.
    Other,
    /// An IPv4 packet whose source is not the guest's address (spoofed, or `0.0.0.0`): dropped.
    /// smoltcp would answer it, and an answer to `0.0.0.0` trips its assertion (the fuzz target
    /// found a SYN from `0.0.0.0`).
    Foreign,
}

/// A guest's TCP SYN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syn {
    /// The guest's MAC, for a reply.
    pub guest_mac: EthernetAddress,
    /// The guest's end.
    pub guest: SocketAddrV4,
    /// Where it connects.
    pub destination: SocketAddrV4,
    /// Its sequence number.
    pub seq: TcpSeqNumber,
    /// Its length in sequence space (1 for the SYN, plus any payload).
    pub seq_len: usize,
}

/// A guest's UDP datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The guest's MAC, for replies.
    pub guest_mac: EthernetAddress,
    /// The guest's end.
    pub guest: SocketAddrV4,
    /// Where it goes.
    pub destination: SocketAddrV4,
    /// The payload.
    pub payload: &'a [u8],
    /// The IPv4 packet it came in (header and all), for an ICMP error quoting it.
    pub ip_packet: &'a [u8],
}

/// Which checksums of a guest frame are checked: the IPv4 header's only. The guest's NIC
/// offloads TCP and UDP checksums (`VIRTIO_NET_F_CSUM`), so those fields may hold a partial
/// sum; the link is guest memory, so a checksum would only catch what the guest wrote on
/// purpose, and the stack re-originates every flow on host sockets, which checksum afresh.
pub fn guest_checksums() -> ChecksumCapabilities {
    let mut checksums = ChecksumCapabilities::ignored();
    checksums.ipv4 = smoltcp::phy::Checksum::Both;
    checksums
}

/// Looks at a frame from the guest. Never panics, whatever the bytes.
pub fn inspect(frame: &[u8]) -> Inspected<'_> {
    inspect_ipv4(frame).unwrap_or(Inspected::Other)
}

fn inspect_ipv4(frame: &[u8]) -> Option<Inspected<'_>> {
    let checksums = guest_checksums();
    let ethernet = EthernetFrame::new_checked(frame).ok()?;
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let guest_mac = ethernet.src_addr();
    let ip_bytes = ethernet.payload();
    let ip = Ipv4Packet::new_checked(ip_bytes).ok()?;
    if ip.src_addr() != super::addressing::GUEST {
        return Some(Inspected::Foreign);
    }
    let ip_repr = Ipv4Repr::parse(&ip, &checksums).ok()?;
    if ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    // The packet without any Ethernet padding after it.
    let ip_packet = ip_bytes.get(..usize::from(ip.total_len()))?;
    let (src, dst) = (
        IpAddress::Ipv4(ip_repr.src_addr),
        IpAddress::Ipv4(ip_repr.dst_addr),
    );
    let payload = ip.payload();
    match ip_repr.next_header {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(payload).ok()?;
            let repr = TcpRepr::parse(&tcp, &src, &dst, &checksums).ok()?;
            if repr.control != TcpControl::Syn || repr.ack_number.is_some() {
                return None;
            }
            Some(Inspected::TcpSyn(Syn {
                guest_mac,
                guest: SocketAddrV4::new(ip_repr.src_addr, repr.src_port),
                destination: SocketAddrV4::new(ip_repr.dst_addr, repr.dst_port),
                seq: repr.seq_number,
                seq_len: tcp.segment_len(),
            }))
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(payload).ok()?;
            let repr = UdpRepr::parse(&udp, &src, &dst, &checksums).ok()?;
            Some(Inspected::Udp(Datagram {
                guest_mac,
                guest: SocketAddrV4::new(ip_repr.src_addr, repr.src_port),
                destination: SocketAddrV4::new(ip_repr.dst_addr, repr.dst_port),
                payload: udp.payload(),
                ip_packet,
            }))
        }
        _ => None,
    }
}

/// The RST that refuses `syn`: from the destination, acknowledging the SYN, so the guest's
/// connect fails at once with "connection refused".
pub fn tcp_rst(syn: &Syn) -> Frame {
    let repr = TcpRepr {
        src_port: syn.destination.port(),
        dst_port: syn.guest.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(syn.seq + syn.seq_len),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (*syn.destination.ip(), *syn.guest.ip());
    ipv4_frame(
        syn.guest_mac,
        src,
        dst,
        IpProtocol::Tcp,
        repr.buffer_len(),
        |buf| {
            repr.emit(
                &mut TcpPacket::new_unchecked(buf),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                &ChecksumCapabilities::default(),
            )
        },
    )
}

/// The ICMP "destination unreachable" that refuses `datagram`: port unreachable, or
/// communication administratively prohibited when `prohibited`.
pub fn icmp_unreachable(datagram: &Datagram<'_>, prohibited: bool) -> Option<Frame> {
    let checksums = ChecksumCapabilities::default();
    let original = Ipv4Packet::new_checked(datagram.ip_packet).ok()?;
    let header = Ipv4Repr::parse(&original, &checksums).ok()?;
    // RFC 792: the original header and the first 8 bytes of its payload.
    let data = original.payload().get(..UDP_HEADER)?;
    let reason = if prohibited {
        Icmpv4DstUnreachable::CommProhibited
    } else {
        Icmpv4DstUnreachable::PortUnreachable
    };
    let repr = Icmpv4Repr::DstUnreachable {
        reason,
        header,
        data,
    };
    let (src, dst) = (*datagram.destination.ip(), *datagram.guest.ip());
    Some(ipv4_frame(
        datagram.guest_mac,
        src,
        dst,
        IpProtocol::Icmp,
        repr.buffer_len(),
        |buf| repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &checksums),
    ))
}

/// A UDP datagram to the guest, or `None` when `payload` does not fit one frame (the stack
/// does not fragment).
pub fn udp_to_guest(
    guest_mac: EthernetAddress,
    from: SocketAddrV4,
    to: SocketAddrV4,
    payload: &[u8],
) -> Option<Frame> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return None;
    }
    let repr = UdpRepr {
        src_port: from.port(),
        dst_port: to.port(),
    };
    let (src, dst) = (*from.ip(), *to.ip());
    Some(ipv4_frame(
        guest_mac,
        src,
        dst,
        IpProtocol::Udp,
        UDP_HEADER + payload.len(),
        |buf| {
            repr.emit(
                &mut UdpPacket::new_unchecked(buf),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                payload.len(),
                |out| out.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            )
        },
    ))
}

/// An Ethernet frame from the gateway carrying one IPv4 packet, its payload written by `emit`.
fn ipv4_frame(
    guest_mac: EthernetAddress,
    src: smoltcp::wire::Ipv4Address,
    dst: smoltcp::wire::Ipv4Address,
    protocol: IpProtocol,
    payload_len: usize,
    emit: impl FnOnce(&mut [u8]),
) -> Frame {
    let mut frame = vec![0; ETHERNET_HEADER + IPV4_HEADER + payload_len];
    let mut ethernet = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: GATEWAY_MAC,
        dst_addr: guest_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut ethernet);
    let ip_repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: 64,
    };
    let mut ip = Ipv4Packet::new_unchecked(ethernet.payload_mut());
    ip_repr.emit(&mut ip, &ChecksumCapabilities::default());
    emit(ip.payload_mut());
    frame
}

#[cfg(test)]
#[path = "packet_tests.rs"]
mod tests;
