//! [`PortMapping`]: which host address forwards to which guest port, and its `docker run -p`
//! spelling.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// Host address a mapping binds when the spelling names none.
///
/// Docker binds `0.0.0.0`; a sandbox should not expose a guest service to the network unless
/// asked, so the default here is the loopback address. Spell `0.0.0.0:8080:80` to listen on
/// every interface.
pub const DEFAULT_HOST_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One published TCP port: connections to `host` are carried to `127.0.0.1:guest_port` in the
/// guest.
///
/// Parses the `docker run -p` forms (TCP only): `GUEST` (an ephemeral host port),
/// `HOST:GUEST`, `IP:HOST:GUEST`, `[IPv6]:HOST:GUEST`, each optionally followed by `/tcp`.
/// A host port of 0 also means "any free port"; [`Vm::published_ports`](crate::Vm::published_ports)
/// tells which one was bound.
///
/// ```
/// use supermachine::PortMapping;
///
/// let m: PortMapping = "8080:80".parse().unwrap();
/// assert_eq!(m.host.to_string(), "127.0.0.1:8080");
/// assert_eq!(m.guest_port, 80);
/// assert!("8080:80/udp".parse::<PortMapping>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PortMapping {
    /// Where the host listens.
    pub host: SocketAddr,
    /// The TCP port on the guest's loopback address.
    pub guest_port: u16,
}

impl PortMapping {
    /// Connections to `host` go to guest port `guest_port`.
    pub fn new(host: SocketAddr, guest_port: u16) -> Self {
        PortMapping { host, guest_port }
    }

    /// Host port `host_port` on `127.0.0.1` (loopback) to guest port `guest_port`.
    pub fn tcp(host_port: u16, guest_port: u16) -> Self {
        PortMapping::new(SocketAddr::new(DEFAULT_HOST_IP, host_port), guest_port)
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}/tcp", self.host, self.guest_port)
    }
}

/// A port mapping that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid port mapping {spec:?}: {reason} (expected [IP:]HOST_PORT:GUEST_PORT, e.g. 8080:80)"
)]
pub struct PortMappingError {
    /// What was given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for PortMapping {
    type Err = PortMappingError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| PortMappingError {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let body = match spec.rsplit_once('/') {
            Some((body, "tcp")) => body,
            Some((_, proto)) => {
                return Err(fail(&format!(
                    "protocol {proto:?} is not supported, only tcp"
                )))
            }
            None => spec,
        };
        let port = |s: &str, what: &str| -> Result<u16, PortMappingError> {
            s.parse::<u16>()
                .map_err(|_| fail(&format!("{what} {s:?} is not a port number (0-65535)")))
        };
        // The guest port is after the last colon; what precedes it is `[IP:]HOST_PORT`.
        let (host_part, guest) = match body.rsplit_once(':') {
            Some((host, guest)) => (Some(host), guest),
            None => (None, body),
        };
        let guest_port = port(guest, "guest port")?;
        if guest_port == 0 {
            return Err(fail("guest port 0 is not a port anything listens on"));
        }
        let host = match host_part {
            None => SocketAddr::new(DEFAULT_HOST_IP, 0),
            Some(host) => match host.rsplit_once(':') {
                None => SocketAddr::new(DEFAULT_HOST_IP, port(host, "host port")?),
                Some((ip, host_port)) => {
                    let ip = ip
                        .strip_prefix('[')
                        .and_then(|i| i.strip_suffix(']'))
                        .unwrap_or(ip);
                    let ip: IpAddr = ip
                        .parse()
                        .map_err(|_| fail(&format!("{ip:?} is not an IP address")))?;
                    SocketAddr::new(ip, port(host_port, "host port")?)
                }
            },
        };
        Ok(PortMapping { host, guest_port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<(String, u16), PortMappingError> {
        s.parse::<PortMapping>()
            .map(|m| (m.host.to_string(), m.guest_port))
    }

    #[test]
    fn docker_spellings_parse() {
        assert_eq!(parse("80").unwrap(), ("127.0.0.1:0".into(), 80));
        assert_eq!(parse("8080:80").unwrap(), ("127.0.0.1:8080".into(), 80));
        assert_eq!(parse("8080:80/tcp").unwrap(), ("127.0.0.1:8080".into(), 80));
        assert_eq!(
            parse("0.0.0.0:8080:80").unwrap(),
            ("0.0.0.0:8080".into(), 80)
        );
        assert_eq!(parse("[::1]:8080:80").unwrap(), ("[::1]:8080".into(), 80));
        assert_eq!(parse("::1:8080:80").unwrap(), ("[::1]:8080".into(), 80));
    }

    #[test]
    fn bad_spellings_say_what_is_wrong() {
        for (spec, needle) in [
            ("", "guest port"),
            ("8080:", "guest port"),
            ("x:80", "host port"),
            ("8080:99999", "guest port"),
            ("8080:0", "guest port 0"),
            ("8080:80/udp", "only tcp"),
            ("nohost:8080:80", "not an IP address"),
            ("1.2.3:8080:80", "not an IP address"),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.to_string().contains(needle), "{spec:?}: {e}");
            assert!(e.to_string().contains("e.g. 8080:80"), "{spec:?}: {e}");
        }
    }
}
