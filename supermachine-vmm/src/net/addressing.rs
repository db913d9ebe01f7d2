//! The guest network's fixed addresses.
//!
//! QEMU's user-mode network (libslirp) layout: guest 10.0.2.15/24, gateway 10.0.2.2, DNS
//! 10.0.2.3. Guest images and people already know it, it is one /24 (the guest needs no DHCP:
//! the address, route and MTU are static), and 10.0.0.0/8 is refused by the default policy, so
//! nothing in the guest subnet is ever confused with a destination the host connects to. A
//! host whose own network is 10.0.2.0/24 cannot be reached from the guest (those addresses are
//! the guest subnet); an allow rule does not change that.

use smoltcp::wire::{EthernetAddress, Ipv4Address, Ipv4Cidr};

/// The guest's address.
pub const GUEST: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
/// The gateway (the VMM), the guest's default route.
pub const GATEWAY: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
/// The DNS server (the VMM), for the guest's `/etc/resolv.conf`.
pub const DNS: Ipv4Address = Ipv4Address::new(10, 0, 2, 3);
/// The address `host.supermachine.internal` resolves to: flows to it reach the host's
/// 127.0.0.1 on the ports `host_loopback` lists.
pub const HOST_LOOPBACK: Ipv4Address = Ipv4Address::new(10, 0, 2, 254);
/// The guest subnet's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The name the VMM's DNS answers with [`HOST_LOOPBACK`].
pub const HOST_LOOPBACK_NAME: &str = "host.supermachine.internal";
/// The gateway's MAC (slirp's: locally administered, 52:55 + the gateway's address).
pub const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);
/// The guest NIC's MAC (QEMU's default guest MAC, locally administered). Every guest has the
/// same one: each VM has a link of its own.
pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
/// The link MTU (the IP packet size; frames are 14 bytes longer): 65520, as slirp4netns and
/// passt use for the same reason. The link ends in the VMM, whose stack re-segments every flow
/// on the host's own sockets, so nothing on the guest link is bound by any wire's MTU, while
/// each frame costs the same queue kick, interrupt and stack pass whatever its size: with
/// 1500 a bulk transfer paid that per 1.5 kB (1.2 MiB/s down in the nested lane), with 65520
/// per 64 kB. The NIC offers it (`VIRTIO_NET_F_MTU`), which also makes Linux post receive
/// buffers that hold a whole frame.
pub const MTU: usize = 65520;

/// The guest subnet, 10.0.2.0/24.
pub fn guest_subnet() -> Ipv4Cidr {
    Ipv4Cidr::new(Ipv4Address::new(10, 0, 2, 0), PREFIX_LEN)
}
