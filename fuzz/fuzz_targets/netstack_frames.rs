//! Arbitrary Ethernet frames from the "guest" into the user-mode network (the packet
//! inspection, the flow table, smoltcp, the DNS server) never panic, and the stack keeps
//! answering: after the input, an ARP request for the gateway still gets its reply.
//!
//! No flow can leave the machine: the policy refuses every destination, there are no DNS
//! upstreams, and `host.supermachine.internal` (10.0.2.254) reaches only a listener this
//! target runs on 127.0.0.1 (it echoes), so the accept path and the flow table are exercised.
//!
//! Input layout: byte 0 is flags (bit 0: fix up checksums, so the fuzzer reaches past them;
//! bit 1: point TCP/UDP to 10.0.2.254 at the listener's port); then frames, each a 2-byte
//! big-endian length and that many bytes (the last one cut short by the end of the input).
#![no_main]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket, UdpPacket,
};
use supermachine_vmm::net::addressing::{GATEWAY, GUEST, HOST_LOOPBACK};
use supermachine_vmm::net::policy::{Action, Policy, Rule};
use supermachine_vmm::net::{Limits, NetStack, StackConfig};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

struct Harness {
    runtime: tokio::runtime::Runtime,
    port: u16,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        runtime.spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        Harness { runtime, port }
    })
}

fn fix_up(frame: &mut [u8], port: Option<u16>) {
    let Ok(mut ethernet) = EthernetFrame::new_checked(&mut *frame) else {
        return;
    };
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(ethernet.payload_mut()) else {
        return;
    };
    ip.fill_checksum();
    let (src, dst) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    let to_listener = ip.dst_addr() == HOST_LOOPBACK;
    let protocol = ip.next_header();
    let len = usize::from(ip.total_len())
        .saturating_sub(usize::from(ip.header_len()))
        .min(ip.payload_mut().len());
    let payload = &mut ip.payload_mut()[..len];
    match protocol {
        IpProtocol::Tcp => {
            if let Ok(mut tcp) = TcpPacket::new_checked(payload) {
                if let (Some(port), true) = (port, to_listener) {
                    tcp.set_dst_port(port);
                }
                tcp.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut udp) = UdpPacket::new_checked(payload) {
                if let (Some(port), true) = (port, to_listener) {
                    udp.set_dst_port(port);
                }
                udp.fill_checksum(&src, &dst);
            }
        }
        _ => {}
    }
}

fn arp_for_gateway() -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GATEWAY,
    };
    let mut frame = vec![0; 14 + arp.buffer_len()];
    let mut ethernet = EthernetFrame::new_unchecked(&mut frame[..]);
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut ethernet);
    arp.emit(&mut ArpPacket::new_unchecked(ethernet.payload_mut()));
    frame
}

fn is_arp_reply(frame: &[u8]) -> bool {
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    let Ok(arp) = ArpPacket::new_checked(ethernet.payload()) else {
        return false;
    };
    matches!(
        ArpRepr::parse(&arp),
        Ok(ArpRepr::EthernetIpv4 { operation: ArpOperation::Reply, source_protocol_addr, .. })
            if source_protocol_addr == Ipv4Address::from(GATEWAY)
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let harness = harness();
    let mut frames = Vec::new();
    while rest.len() >= 2 && frames.len() < 64 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let take = len.min(rest.len() - 2);
        let mut frame = rest[2..2 + take].to_vec();
        rest = &rest[2 + take..];
        if flags & 1 != 0 {
            fix_up(&mut frame, (flags & 2 != 0).then_some(harness.port));
        }
        frames.push(frame);
    }
    frames.push(arp_for_gateway());

    let config = StackConfig {
        policy: Policy::public().rule(Rule::parse(Action::Deny, "any").unwrap()),
        host_loopback: BTreeSet::from([harness.port]),
        limits: Limits {
            max_flows: 8,
            ..Limits::default()
        },
        dns_upstreams: Vec::new(),
    };
    harness.runtime.block_on(async {
        let (stack, mut link) = NetStack::spawn(config);
        let mut answered = false;
        for frame in frames {
            link.to_stack.send(frame).await.unwrap();
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            while let Ok(frame) = link.from_stack.try_recv() {
                answered |= is_arp_reply(&frame);
            }
        }
        for _ in 0..64 {
            if answered {
                break;
            }
            tokio::task::yield_now().await;
            while let Ok(frame) = link.from_stack.try_recv() {
                answered |= is_arp_reply(&frame);
            }
        }
        assert!(answered, "the stack stopped answering ARP");
        stack.shutdown().await;
    });
});
