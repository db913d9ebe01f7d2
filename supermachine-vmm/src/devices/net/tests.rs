//! virtio-net driven by the fake guest driver over real guest memory, against a real
//! user-mode network (with a deny-all policy and no DNS upstreams: nothing leaves the host).

use std::collections::BTreeSet;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};

use super::worker::NET_HDR_LEN;
use super::{NetDevice, QUEUE_SIZE, RX, TX};
use crate::devices::virtio::test_driver::{Buf, GuestDriver};
use crate::devices::virtio::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::net::addressing::{GATEWAY, GATEWAY_MAC, GUEST, GUEST_MAC, MTU};
use crate::net::policy::{Action, Policy, Rule};
use crate::net::{Limits, StackConfig};

const ALL: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_MTU);

fn sealed_config() -> StackConfig {
    StackConfig {
        policy: Policy::public().rule(Rule::parse(Action::Deny, "any").unwrap()),
        host_loopback: BTreeSet::new(),
        limits: Limits::default(),
        dns_upstreams: Vec::new(),
    }
}

fn driver() -> GuestDriver {
    let dev = NetDevice::new(sealed_config(), tokio::runtime::Handle::current());
    let mut d = GuestDriver::new(Box::new(dev));
    assert_eq!(d.init(ALL, &[QUEUE_SIZE, QUEUE_SIZE]), ALL);
    d
}

/// An ARP request from the guest for the gateway's address.
fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC.0);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC.0);
    f.extend_from_slice(&GUEST.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GATEWAY.octets());
    f
}

fn send(d: &mut GuestDriver, frame: &[u8]) {
    let at = d.alloc((NET_HDR_LEN + frame.len()) as u32);
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes.extend_from_slice(frame);
    d.write_mem(at, &bytes);
    // Header and frame in two descriptors, as Linux posts them.
    d.add_chain(
        TX,
        &[
            Buf::ro(at, NET_HDR_LEN as u32),
            Buf::ro(at + NET_HDR_LEN as u64, frame.len() as u32),
        ],
    );
    d.kick(TX as u16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_space_has_the_mac_link_up_and_the_mtu() {
    let mut d = driver();
    assert_eq!(d.read_config(0, 6), GUEST_MAC.0.to_vec());
    assert_eq!(d.read_config(6, 2), vec![1, 0]);
    let mtu = d.read_config(10, 2);
    assert_eq!(usize::from(u16::from_le_bytes([mtu[0], mtu[1]])), MTU);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_arp_through_the_rings() {
    let mut d = driver();
    let buf = d.alloc(2048);
    d.add_chain(RX, &[Buf::wo(buf, 2048)]);
    d.kick(RX as u16);
    send(&mut d, &arp_request());
    d.wait_used(TX, 1).await;
    d.wait_used(RX, 1).await;
    let (_, len) = d.pop_used(RX).unwrap();
    let bytes = d.read_mem(buf, len as usize);
    assert_eq!(&bytes[10..12], &[1, 0], "num_buffers = 1");
    let frame = &bytes[NET_HDR_LEN..];
    assert_eq!(&frame[0..6], &GUEST_MAC.0, "to the guest");
    assert_eq!(&frame[6..12], &GATEWAY_MAC.0, "from the gateway");
    assert_eq!(&frame[12..14], &[0x08, 0x06], "ARP");
    assert_eq!(&frame[20..22], &[0, 2], "a reply");
    assert_eq!(
        &frame[28..32],
        &GATEWAY.octets(),
        "for the gateway's address"
    );
    assert!(d.take_irqs() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chains_are_returned_and_the_device_goes_on() {
    let mut d = driver();
    // Shorter than the header; writable where readable belongs; then a good one.
    let at = d.alloc(64);
    d.add_chain(TX, &[Buf::ro(at, 4)]);
    d.add_chain(TX, &[Buf::wo(at, 64)]);
    d.kick(TX as u16);
    d.wait_used(TX, 2).await;
    // A receive buffer too small for any frame gets nothing written.
    let small = d.alloc(16);
    d.add_chain(RX, &[Buf::wo(small, 16)]);
    let good = d.alloc(2048);
    d.add_chain(RX, &[Buf::wo(good, 2048)]);
    d.kick(RX as u16);
    send(&mut d, &arp_request());
    send(&mut d, &arp_request());
    d.wait_used(RX, 2).await;
    let (_, first) = d.pop_used(RX).unwrap();
    let (_, second) = d.pop_used(RX).unwrap();
    assert_eq!(first, 0);
    assert!(second as usize > NET_HDR_LEN + 28);
    assert_eq!(d.status() & 0x40, 0, "no DEVICE_NEEDS_RESET");
}
