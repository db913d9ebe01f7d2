//! [`ImageReference`]: `[registry/]repository[:tag][@sha256:digest]`, normalised the way Docker
//! does (`busybox` is `docker.io/library/busybox:latest`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::error::ImageError;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    inner: oci_client::Reference,
}

impl ImageReference {
    /// Parses a reference; a missing registry means Docker Hub, a missing tag `latest`.
    pub fn parse(reference: &str) -> Result<Self, ImageError> {
        let inner = oci_client::Reference::from_str(reference).map_err(|e| {
            ImageError::InvalidReference {
                reference: reference.to_owned(),
                reason: e.to_string(),
            }
        })?;
        if let Some(digest) = inner.digest() {
            super::digest::Digest::parse(digest).map_err(|reason| {
                ImageError::InvalidReference {
                    reference: reference.to_owned(),
                    reason,
                }
            })?;
        }
        Ok(ImageReference { inner })
    }

    /// The registry as written (`docker.io`, `127.0.0.1:5000`, `ghcr.io`).
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The repository (`library/busybox`).
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// Whether the registry is on this machine (`localhost`, 127.0.0.0/8, `::1`): Docker talks
    /// plain HTTP to those without being told, and so do we.
    pub fn is_loopback_registry(&self) -> bool {
        is_loopback_host(registry_host(self.registry()))
    }

    pub(crate) fn oci(&self) -> &oci_client::Reference {
        &self.inner
    }

    /// The host the client actually talks to (`index.docker.io` for `docker.io`).
    pub(crate) fn resolved_registry(&self) -> &str {
        self.inner.resolve_registry()
    }
}

impl FromStr for ImageReference {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageReference::parse(s)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

/// `host` from `host[:port]` or `[v6]:port`.
pub(crate) fn registry_host(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        // A bare IPv6 address has more than one colon; `host:port` has one.
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => registry,
    }
}

pub(crate) fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        let r = ImageReference::parse("busybox").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(r.tag(), Some("latest"));
        assert!(!r.is_loopback_registry());

        let r = ImageReference::parse("127.0.0.1:5000/test/busybox:v1").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "test/busybox");
        assert!(r.is_loopback_registry());

        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageReference::parse(&format!("localhost:5000/x@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d.as_str()));
        assert!(r.is_loopback_registry());

        assert!(ImageReference::parse("Bad//ref").is_err());
        assert!(ImageReference::parse("x@sha256:zz").is_err());
    }

    #[test]
    fn loopback_hosts() {
        assert_eq!(registry_host("[::1]:5000"), "::1");
        assert!(is_loopback_host("::1"));
        assert!(is_loopback_host("127.9.9.9"));
        assert!(is_loopback_host("LOCALHOST"));
        assert!(!is_loopback_host("10.0.0.1"));
        assert!(!is_loopback_host("localhost.example.com"));
        assert_eq!(registry_host("ghcr.io"), "ghcr.io");
    }
}
