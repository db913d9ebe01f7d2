//! Whether a new guest flow may open, and where the host connects it: the policy, the
//! host-loopback ports, the guest subnet, and the reasons a flow is refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use super::addressing::{guest_subnet, HOST_LOOPBACK};
use super::config::StackConfig;
use super::names::NameTable;
use super::policy::{Flow, Protocol, Refusal};

/// Why the stack refused a guest flow (logged through `tracing` with the flow).
#[derive(Debug)]
pub enum Refused {
    /// The policy refuses the destination.
    Policy(Refusal),
    /// The destination is in the guest subnet (the gateway, the DNS address, a neighbour):
    /// nothing there is reachable through the host.
    GuestSubnet,
    /// `host.supermachine.internal` on a port `host_loopback` does not list.
    HostLoopbackPort(u16),
    /// The VM already has this many flows open.
    FlowLimit(usize),
    /// The host could not connect (refused, unreachable, ...).
    Connect(std::io::Error),
    /// The connection did not open within the connect timeout.
    ConnectTimeout,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Policy(refusal) => write!(f, "{refusal}"),
            Refused::GuestSubnet => f.write_str("the guest subnet is not reachable"),
            Refused::HostLoopbackPort(port) => {
                write!(f, "host loopback port {port} is not in the allowed list")
            }
            Refused::FlowLimit(max) => write!(f, "the VM already has {max} flows open"),
            Refused::Connect(error) => write!(f, "the host's connect failed: {error}"),
            Refused::ConnectTimeout => f.write_str("the connection timed out"),
        }
    }
}

/// Where the host opens a flow the policy admitted, or why it is refused.
pub fn admit(
    config: &StackConfig,
    names: &NameTable,
    protocol: Protocol,
    destination: SocketAddrV4,
) -> Result<SocketAddr, Refused> {
    let (address, port) = (*destination.ip(), destination.port());
    if address == HOST_LOOPBACK {
        return match config.host_loopback.contains(&port) {
            true => Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
            false => Err(Refused::HostLoopbackPort(port)),
        };
    }
    if guest_subnet().contains_addr(&address) {
        return Err(Refused::GuestSubnet);
    }
    let address = IpAddr::V4(address);
    let known = names.names(address);
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    let flow = Flow {
        protocol,
        address,
        port,
        names: &known,
        server_name: None,
    };
    config
        .policy
        .check(&flow)
        .map(|()| SocketAddr::V4(destination))
        .map_err(Refused::Policy)
}

/// Logs a refused flow.
pub fn log_refusal(
    protocol: Protocol,
    guest: SocketAddrV4,
    destination: SocketAddrV4,
    why: &Refused,
) {
    tracing::info!(%protocol, %guest, %destination, reason = %why, "guest flow refused");
}
