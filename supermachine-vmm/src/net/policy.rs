//! The egress policy: which destinations a guest may open flows to.
//!
//! A flow is allowed when an **allow** rule matches it, or when the base policy allows it and no
//! **deny** rule matches it. So an allow rule is an exception that beats both the deny rules and
//! the base policy's refused ranges (`--allow 10.1.2.3:5432` reaches one private host), and
//! `--deny any` with a few `--allow` rules is an allow-list. The base policy
//! ([`Policy::public`]) allows the public internet and refuses [`DENIED_BY_DEFAULT`]: loopback,
//! private (RFC 1918, IPv6 ULA), shared (CGNAT), link-local (including the cloud metadata address
//! 169.254.169.254), multicast, broadcast and reserved ranges, in IPv4 and IPv6. An IPv4-mapped
//! IPv6 address (`::ffff:a.b.c.d`) is judged as the IPv4 address it carries.
//!
//! Domain rules match the names a destination address was resolved from through this VM's own
//! DNS (the VMM answers the guest's DNS, so it knows which names led to which addresses). The
//! stack decides at SYN time, before any payload, so it reads no TLS SNI or HTTP `Host`: a name
//! the guest never looked up through this VM's DNS matches no domain rule. [`Flow`] has a
//! `server_name` field for a future payload-peeking stack; the user-mode network leaves it
//! `None`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Ranges the base policy refuses; an allow rule still reaches them.
pub const DENIED_BY_DEFAULT: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\""),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Whether a rule admits or refuses what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Admit (beats deny rules and the base policy).
    Allow,
    /// Refuse (unless an allow rule matches).
    Deny,
}

/// What a rule matches by destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every destination (`any`).
    Any,
    /// An address range (`203.0.113.0/24`, `2001:db8::/32`; a bare address is a /32 or /128).
    Net(IpNet),
    /// A DNS name, lower case without a trailing dot: `example.com` matches that name only,
    /// `*.example.com` (`subdomains: true`) every name below it but not the name itself.
    Domain {
        /// The name.
        name: String,
        /// Whether it was written `*.name`.
        subdomains: bool,
    },
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// The first port.
    pub first: u16,
    /// The last port (equal to `first` for one port).
    pub last: u16,
}

impl Ports {
    fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// One allow or deny rule: `TARGET[:PORTS][/PROTOCOL]`, e.g. `203.0.113.0/24`,
/// `203.0.113.10:443`, `[2001:db8::/32]:8000-8080`, `example.com:443/tcp`, `*.example.com`,
/// `any:53/udp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// The destination it matches.
    pub target: Target,
    /// The destination ports it matches (all when `None`).
    pub ports: Option<Ports>,
    /// The protocol it matches (both when `None`).
    pub protocol: Option<Protocol>,
}

/// A rule that does not parse: the one-line reason says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network rule {rule:?}: {reason}")]
pub struct RuleError {
    /// The rule as written.
    pub rule: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Rule {
    /// Parses `TARGET[:PORTS][/PROTOCOL]` as an allow or deny rule.
    pub fn parse(action: Action, text: &str) -> Result<Rule, RuleError> {
        let error = |reason: String| RuleError {
            rule: text.to_owned(),
            reason,
        };
        let (rest, protocol) = match text.rsplit_once('/') {
            Some((rest, "tcp")) => (rest, Some(Protocol::Tcp)),
            Some((rest, "udp")) => (rest, Some(Protocol::Udp)),
            _ => (text, None),
        };
        let (target, ports) = split_ports(rest).map_err(error)?;
        let target = parse_target(target).map_err(error)?;
        let ports = ports.map(parse_ports).transpose().map_err(error)?;
        Ok(Rule {
            action,
            target,
            ports,
            protocol,
        })
    }

    fn matches(&self, flow: &Flow<'_>) -> bool {
        if self.protocol.is_some_and(|p| p != flow.protocol) {
            return false;
        }
        if self.ports.is_some_and(|p| !p.contains(flow.port)) {
            return false;
        }
        match &self.target {
            Target::Any => true,
            Target::Net(net) => net.contains(&canonical(flow.address)),
            Target::Domain { name, subdomains } => flow
                .names
                .iter()
                .copied()
                .chain(flow.server_name)
                .any(|candidate| domain_matches(name, *subdomains, candidate)),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.action {
            Action::Allow => "allow ",
            Action::Deny => "deny ",
        })?;
        let bracket = matches!(self.target, Target::Net(IpNet::V6(_))) && self.ports.is_some();
        match &self.target {
            Target::Any => f.write_str("any")?,
            Target::Net(net) if bracket => write!(f, "[{net}]")?,
            Target::Net(net) => write!(f, "{net}")?,
            Target::Domain { name, subdomains } => {
                if *subdomains {
                    f.write_str("*.")?;
                }
                f.write_str(name)?;
            }
        }
        match self.ports {
            Some(Ports { first, last }) if first == last => write!(f, ":{first}")?,
            Some(Ports { first, last }) => write!(f, ":{first}-{last}")?,
            None => {}
        }
        if let Some(protocol) = self.protocol {
            write!(f, "/{protocol}")?;
        }
        Ok(())
    }
}

/// Splits `TARGET[:PORTS]`, where an IPv6 target with ports is bracketed (`[2001:db8::1]:443`)
/// and an unbracketed one has no ports.
fn split_ports(text: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(inner) = text.strip_prefix('[') {
        let (target, after) = inner
            .split_once(']')
            .ok_or_else(|| "an opening '[' without its ']'".to_owned())?;
        return match after {
            "" => Ok((target, None)),
            _ => match after.strip_prefix(':') {
                Some(ports) => Ok((target, Some(ports))),
                None => Err(format!("unexpected {after:?} after ']'")),
            },
        };
    }
    match text.matches(':').count() {
        0 => Ok((text, None)),
        1 => {
            let (target, ports) = text.split_once(':').unwrap_or((text, ""));
            Ok((target, Some(ports)))
        }
        // An IPv6 address or range; with ports it must be bracketed.
        _ => Ok((text, None)),
    }
}

fn parse_target(text: &str) -> Result<Target, String> {
    if text.is_empty() {
        return Err("no destination (an address, a range, a domain or `any`)".to_owned());
    }
    if text == "any" || text == "*" {
        return Ok(Target::Any);
    }
    if let Ok(net) = IpNet::from_str(text) {
        if net.network() != net.addr() {
            return Err(format!(
                "{text} has host bits set; the range is {}",
                net.trunc()
            ));
        }
        return Ok(Target::Net(net));
    }
    if let Ok(addr) = IpAddr::from_str(text) {
        return Ok(Target::Net(IpNet::from(addr)));
    }
    if text.contains('/') || text.parse::<f64>().is_ok() || looks_like_ipv4(text) {
        return Err(format!("{text:?} is not an address or a CIDR range"));
    }
    let (name, subdomains) = match text.strip_prefix("*.") {
        Some(name) => (name, true),
        None => (text, false),
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    check_domain(&name)?;
    Ok(Target::Domain { name, subdomains })
}

/// Four dot-separated numbers: meant as an IPv4 address, never as a domain.
fn looks_like_ipv4(text: &str) -> bool {
    let text = text.split('/').next().unwrap_or(text);
    text.split('.').count() == 4
        && text
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A DNS name as RFC 1035 (with RFC 1123's leading digits) allows: labels of letters, digits and
/// inner hyphens, 1–63 bytes each, 253 in all, and not all numeric at the top.
fn check_domain(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!(
            "{name:?} is not a domain name (1 to 253 characters)"
        ));
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(format!(
                "{name:?} is not a domain name (label {label:?}); a wildcard is only `*.` in front"
            ));
        }
    }
    Ok(())
}

fn parse_ports(text: &str) -> Result<Ports, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("port {p:?} is not a number from 1 to 65535")),
            Ok(n) => Ok(n),
        }
    };
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (port(first)?, port(last)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!("port range {first}-{last} is empty"));
    }
    Ok(Ports { first, last })
}

fn domain_matches(rule: &str, subdomains: bool, candidate: &str) -> bool {
    let candidate = candidate.strip_suffix('.').unwrap_or(candidate);
    if !subdomains {
        return candidate.eq_ignore_ascii_case(rule);
    }
    candidate.len() > rule.len() + 1
        && candidate.as_bytes()[candidate.len() - rule.len() - 1] == b'.'
        && candidate[candidate.len() - rule.len()..].eq_ignore_ascii_case(rule)
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; anything else unchanged.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// A flow the guest opens, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The destination address.
    pub address: IpAddr,
    /// The destination port.
    pub port: u16,
    /// The names this VM's DNS resolved to `address` (most recent first), for domain rules.
    pub names: &'a [&'a str],
    /// The TLS SNI or HTTP `Host` the flow named, where it was read.
    pub server_name: Option<&'a str>,
}

/// Why a flow was refused, for the log and the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A deny rule matched (and no allow rule did).
    Rule(String),
    /// The base policy refuses this range.
    DefaultRange {
        /// The range.
        range: IpNet,
        /// What it is.
        what: &'static str,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Rule(rule) => write!(f, "refused by rule `{rule}`"),
            Refusal::DefaultRange { range, what } => {
                write!(
                    f,
                    "{range} ({what}) is refused by default; allow it with a rule"
                )
            }
        }
    }
}

/// An egress policy: the base policy's refused ranges, then the allow and deny rules.
#[derive(Debug, Clone)]
pub struct Policy {
    denied_by_default: Vec<(IpNet, &'static str)>,
    rules: Vec<Rule>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::public()
    }
}

impl Policy {
    /// The public internet: every destination but [`DENIED_BY_DEFAULT`].
    pub fn public() -> Self {
        let denied_by_default = DENIED_BY_DEFAULT
            .iter()
            .filter_map(|(net, what)| IpNet::from_str(net).ok().map(|net| (net, *what)))
            .collect();
        Policy {
            denied_by_default,
            rules: Vec::new(),
        }
    }

    /// Adds a rule (allow rules win over deny rules whatever their order).
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// The rules, in the order they were added.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `flow` may be opened: `Ok(())`, or why not.
    pub fn check(&self, flow: &Flow<'_>) -> Result<(), Refusal> {
        let matching = |action| {
            self.rules
                .iter()
                .find(|rule| rule.action == action && rule.matches(flow))
        };
        if matching(Action::Allow).is_some() {
            return Ok(());
        }
        if let Some(rule) = matching(Action::Deny) {
            return Err(Refusal::Rule(rule.to_string()));
        }
        let address = canonical(flow.address);
        match self
            .denied_by_default
            .iter()
            .find(|(net, _)| net.contains(&address))
        {
            Some((range, what)) => Err(Refusal::DefaultRange {
                range: *range,
                what,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
