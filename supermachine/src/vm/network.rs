//! [`Network`]: a VM's network, as [`VmConfig::network`](crate::VmConfig::network) takes it.
//!
//! A VM with a network has one NIC (`eth0`, virtio-net) whose other end is a user-mode network
//! inside this process (`supermachine_vmm::net`): the guest's TCP connections and UDP flows end
//! there and are made again from ordinary host sockets, after the egress policy said yes. No
//! root, no TAP device, nothing installed on the host. The guest is `10.0.2.15/24` with its
//! gateway at `10.0.2.2` and its DNS server at `10.0.2.3` (the VMM, forwarding to the host's
//! resolvers so the policy sees names); init sets the address, route and MTU, and
//! `/etc/resolv.conf` names the DNS server.
//!
//! The policy is host-side only: it is not part of snapshots or of the snapshot cache key, and
//! a restored VM uses the policy of the config it is restored with. Whether there is a NIC at
//! all is part of both.

use std::collections::BTreeSet;
use std::net::SocketAddr;

pub use supermachine_vmm::net::policy::{Action, Rule, RuleError};
pub use supermachine_vmm::net::Limits;
use supermachine_vmm::net::{addressing, policy::Policy, StackConfig};

/// A VM's network: [`none`](Self::none) (no NIC) or [`public`](Self::public) with ordered
/// allow/deny rules, host-loopback ports, limits and DNS upstreams.
///
/// ```
/// # fn demo() -> Result<(), supermachine::RuleError> {
/// use supermachine::{Network, VmConfig};
/// // Only 203.0.113.0/24 on port 80, and the host's 127.0.0.1:8080 as
/// // host.supermachine.internal:8080.
/// let network = Network::public()
///     .deny("any")?
///     .allow("203.0.113.0/24:80")?
///     .host_loopback([8080]);
/// let config = VmConfig::new().network(network);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    enabled: bool,
    rules: Vec<Rule>,
    host_loopback: BTreeSet<u16>,
    limits: Limits,
    dns_upstreams: Option<Vec<SocketAddr>>,
}

impl Default for Network {
    /// [`Network::public`].
    fn default() -> Self {
        Network::public()
    }
}

impl Network {
    /// No network: the VM has no NIC at all (only loopback).
    pub fn none() -> Self {
        Network {
            enabled: false,
            ..Network::public()
        }
    }

    /// The public internet: every destination allowed except loopback, private (RFC 1918,
    /// IPv6 ULA), shared (CGNAT 100.64/10), link-local (169.254.169.254 included), multicast,
    /// broadcast and reserved ranges, in IPv4 and IPv6
    /// (`supermachine_vmm::net::policy::DENIED_BY_DEFAULT`). Rules added after it refine it.
    pub fn public() -> Self {
        Network {
            enabled: true,
            rules: Vec::new(),
            host_loopback: BTreeSet::new(),
            limits: Limits::default(),
            dns_upstreams: None,
        }
    }

    /// Adds an allow rule, `TARGET[:PORTS][/PROTOCOL]` (`203.0.113.0/24`, `10.1.2.3:5432`,
    /// `example.com:443/tcp`, `*.example.com`, `any:53/udp`). An allow rule beats every deny
    /// rule and the default ranges. A domain rule matches the addresses that name resolved to
    /// through this VM's own DNS (the stack decides when the connection opens, before any
    /// payload, so it reads no TLS SNI or HTTP `Host`).
    pub fn allow(self, rule: &str) -> Result<Self, RuleError> {
        Ok(self.rule(Rule::parse(Action::Allow, rule)?))
    }

    /// Adds a deny rule (same syntax as [`allow`](Self::allow)); `deny("any")` with a few
    /// allow rules is an allow-list.
    pub fn deny(self, rule: &str) -> Result<Self, RuleError> {
        Ok(self.rule(Rule::parse(Action::Deny, rule)?))
    }

    /// Adds a parsed rule; rules are checked in the order added.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Lets the guest reach the host's `127.0.0.1` on `ports` as `host.supermachine.internal`
    /// (the VMM's DNS answers that name; other ports of it are refused).
    pub fn host_loopback(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.host_loopback.extend(ports);
        self
    }

    /// Limits the guest cannot exceed (open flows, timeouts, buffers).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Where the guest's DNS queries are forwarded (tried in order), instead of the
    /// `nameserver`s of the host's `/etc/resolv.conf`.
    ///
    /// An empty list turns forwarding off: every name but `host.supermachine.internal` gets
    /// SERVFAIL at once. Forwarding is the VMM's own traffic, not a guest flow, so a deny-all
    /// policy alone does not stop it (a guest could still move data out in the names it asks
    /// for); with deny-all and no upstreams nothing the guest sends gets past the VMM.
    pub fn dns_upstreams(mut self, upstreams: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.dns_upstreams = Some(upstreams.into_iter().collect());
        self
    }

    /// Whether the VM gets a NIC.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The user-mode network to build for one VM; `None` without a NIC. Reads the host's
    /// `/etc/resolv.conf` when no upstreams are set (blocking: call it off the runtime).
    pub(crate) fn stack_config(&self) -> Option<StackConfig> {
        if !self.enabled {
            return None;
        }
        let policy = self
            .rules
            .iter()
            .cloned()
            .fold(Policy::public(), Policy::rule);
        let dns_upstreams = match &self.dns_upstreams {
            Some(upstreams) => upstreams.clone(),
            None => supermachine_vmm::net::config::host_resolvers(std::path::Path::new(
                "/etc/resolv.conf",
            )),
        };
        Some(StackConfig {
            policy,
            host_loopback: self.host_loopback.clone(),
            limits: self.limits,
            dns_upstreams,
        })
    }
}

/// The kernel parameter that tells the agent to configure `eth0` (see the agent's
/// `boot_flags`): the guest's address, gateway, DNS server and MTU from the VMM's addressing.
pub(crate) fn guest_flag() -> String {
    format!(
        "{}{}/{},{},{},{}",
        NET_FLAG_PREFIX,
        addressing::GUEST,
        addressing::PREFIX_LEN,
        addressing::GATEWAY,
        addressing::DNS,
        addressing::MTU
    )
}

/// How the flag starts; a snapshot whose command line has it has a NIC.
pub(crate) const NET_FLAG_PREFIX: &str = "supermachine.net=";

/// Whether a guest command line (a snapshot's) is that of a VM with a NIC.
pub(crate) fn cmdline_has_nic(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|token| token.starts_with(NET_FLAG_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_has_no_stack_and_public_refuses_private_ranges() {
        assert!(Network::none().stack_config().is_none());
        let config = Network::public().dns_upstreams([]).stack_config().unwrap();
        assert!(config.policy.rules().is_empty());
        assert!(config.dns_upstreams.is_empty());
    }

    #[test]
    fn rules_keep_their_order_and_bad_ones_say_why() {
        let network = Network::public()
            .deny("any")
            .unwrap()
            .allow("203.0.113.0/24:80")
            .unwrap();
        let actions: Vec<Action> = network.rules().iter().map(|r| r.action).collect();
        assert_eq!(actions, [Action::Deny, Action::Allow]);
        let error = Network::public().allow("203.0.113.0/33").unwrap_err();
        assert!(!error.to_string().contains('\n'), "{error}");
    }

    #[test]
    fn the_flag_carries_the_vmm_addressing() {
        let flag = guest_flag();
        assert_eq!(
            flag,
            "supermachine.net=10.0.2.15/24,10.0.2.2,10.0.2.3,65520"
        );
        assert!(cmdline_has_nic(&format!("quiet {flag}")));
        assert!(!cmdline_has_nic("quiet supermachine.rootfs=1"));
    }
}
