//! What a user-mode network is built from: the policy, the host-loopback ports, the limits and
//! the upstream DNS resolvers.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::policy::Policy;

/// Limits a guest cannot exceed. Hitting one refuses the new flow (TCP RST, ICMP unreachable)
/// and logs it; flows already open are not touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open TCP and UDP flows at once (each holds one host socket). Default 256.
    pub max_flows: usize,
    /// DNS queries forwarded at once (each holds one host socket for up to `dns_timeout`).
    /// Default 32.
    pub max_dns_queries: usize,
    /// How long a TCP flow may take to open: the host's connect, then the guest's handshake.
    /// Default 20 s.
    pub connect_timeout: Duration,
    /// A TCP flow with no bytes either way for this long is reset. Default 1 hour.
    pub tcp_idle_timeout: Duration,
    /// A UDP flow with no datagram either way for this long is closed. Default 60 s.
    pub udp_idle_timeout: Duration,
    /// How long a forwarded DNS query waits for each upstream resolver. Default 5 s.
    pub dns_timeout: Duration,
    /// The guest-facing TCP window per flow and direction: bytes the stack buffers between
    /// the guest and the host socket (plus at most 512 KiB per direction in flight to or from
    /// that socket). Default 1 MiB: the guest link's round trip is short but each 64 KiB frame
    /// takes a VM exit and an interrupt, and a smaller window left bulk transfers window-bound
    /// (256 KiB: 18 MiB/s down in the nested lane, 1 MiB: 36). Memory is touched only as
    /// bytes pass, so an idle flow costs little; the worst case per VM is about
    /// `max_flows * 2 * (tcp_buffer + 512 KiB)`.
    pub tcp_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: 256,
            max_dns_queries: 32,
            connect_timeout: Duration::from_secs(20),
            tcp_idle_timeout: Duration::from_secs(3600),
            udp_idle_timeout: Duration::from_secs(60),
            dns_timeout: Duration::from_secs(5),
            tcp_buffer: 1024 * 1024,
        }
    }
}

/// A user-mode network's configuration.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Which destinations guest flows may reach.
    pub policy: Policy,
    /// The host 127.0.0.1 ports that `host.supermachine.internal` reaches (none by default).
    pub host_loopback: BTreeSet<u16>,
    /// The limits.
    pub limits: Limits,
    /// Where the guest's DNS queries are forwarded, tried in order.
    pub dns_upstreams: Vec<SocketAddr>,
}

impl Default for StackConfig {
    /// The public policy, no host loopback, default limits, the host's resolvers.
    fn default() -> Self {
        StackConfig {
            policy: Policy::public(),
            host_loopback: BTreeSet::new(),
            limits: Limits::default(),
            dns_upstreams: host_resolvers(Path::new("/etc/resolv.conf")),
        }
    }
}

/// The `nameserver` lines of a resolv.conf as port-53 addresses; none when it cannot be read
/// (the guest's DNS queries then get SERVFAIL).
pub fn host_resolvers(path: &Path) -> Vec<SocketAddr> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_resolv_conf(&text),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "no DNS resolvers for guests");
            Vec::new()
        }
    }
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                // A scoped IPv6 address (fe80::1%eth0) does not parse and is skipped.
                (Some("nameserver"), Some(address)) => address.parse::<IpAddr>().ok(),
                _ => None,
            }
        })
        .map(|address| SocketAddr::new(address, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver  2001:db8::53\n\
                    nameserver fe80::1%eth0\nnameserver\noptions ndots:2\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }
}
