//! Flags the host passes on the guest kernel command line (`/proc/cmdline`), read once at
//! startup.
//!
//! * `supermachine.pvm=1` — the host is PVM (nested, software-assisted KVM), where the CPU
//!   advertises AVX that does not work (GUEST-KERNEL.md): every exec gets
//!   [`PVM_GLIBC_TUNABLES`] so glibc programs do not pick AVX string functions.
//! * `supermachine.test_hooks=1` — allows test-only control actions (`crash_guest`).
//! * `supermachine.rootfs=1` — the first virtio-blk disk (`/dev/vda`) is an image's root
//!   filesystem: init mounts it read-only under a tmpfs overlay and makes that the root every
//!   exec runs in (see `init::enter_image_rootfs`).
//! * `supermachine.net=ADDRESS/PREFIX,GATEWAY,DNS,MTU` — the VM has a NIC (`eth0`) on the
//!   host's user-mode network: init gives it the address, prefix length and MTU, adds the
//!   default route via the gateway, and names the DNS server in `/etc/resolv.conf`. Without the
//!   flag there is no NIC and nothing is configured. The host sends its own addresses
//!   (`supermachine_vmm::net::addressing`), so they are defined in one place.
//!
//! Only read in guest mode: in host mode the host's own command line means nothing to us, so the
//! flags are all off.

/// `GLIBC_TUNABLES` for execs on PVM hosts (unless the request sets its own).
pub const PVM_GLIBC_TUNABLES: &str =
    "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX_Fast_Unaligned_Load";

/// The flags the agent understands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootFlags {
    /// `supermachine.pvm=1`.
    pub pvm: bool,
    /// `supermachine.test_hooks=1`.
    pub test_hooks: bool,
    /// `supermachine.rootfs=1`.
    pub rootfs: bool,
    /// `supermachine.net=...`: how to configure `eth0`.
    pub net: Option<NetSetup>,
}

/// The guest's IPv4 configuration from `supermachine.net=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSetup {
    /// The guest's address.
    pub address: std::net::Ipv4Addr,
    /// Its subnet's prefix length (0..=32).
    pub prefix_len: u8,
    /// The default route's gateway.
    pub gateway: std::net::Ipv4Addr,
    /// The DNS server for `/etc/resolv.conf`.
    pub dns: std::net::Ipv4Addr,
    /// The link MTU.
    pub mtu: u32,
}

impl NetSetup {
    /// Parses `ADDRESS/PREFIX,GATEWAY,DNS,MTU`; `None` if any part is malformed.
    fn parse(value: &str) -> Option<NetSetup> {
        let mut parts = value.split(',');
        let (cidr, gateway, dns, mtu) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (address, prefix_len) = cidr.split_once('/')?;
        let prefix_len: u8 = prefix_len.parse().ok().filter(|p| *p <= 32)?;
        Some(NetSetup {
            address: address.parse().ok()?,
            prefix_len,
            gateway: gateway.parse().ok()?,
            dns: dns.parse().ok()?,
            mtu: mtu.parse().ok().filter(|m| (68..=65535).contains(m))?,
        })
    }
}

impl BootFlags {
    /// Parses a kernel command line: exact whitespace-separated tokens, so
    /// `xsupermachine.pvm=1` or `supermachine.pvm=10` do not count.
    pub fn parse(cmdline: &str) -> BootFlags {
        let mut flags = BootFlags::default();
        for token in cmdline.split_whitespace() {
            match token {
                "supermachine.pvm=1" => flags.pvm = true,
                "supermachine.test_hooks=1" => flags.test_hooks = true,
                "supermachine.rootfs=1" => flags.rootfs = true,
                _ => {
                    if let Some(value) = token.strip_prefix("supermachine.net=") {
                        flags.net = NetSetup::parse(value);
                        if flags.net.is_none() {
                            tracing::error!("malformed {token}; no network configured");
                        }
                    }
                }
            }
        }
        flags
    }
}

/// Reads the guest's flags from `/proc/cmdline` (none if it cannot be read). Called once at
/// startup in guest mode, after init has mounted /proc.
pub fn read() -> BootFlags {
    match std::fs::read_to_string("/proc/cmdline") {
        Ok(cmdline) => BootFlags::parse(&cmdline),
        Err(e) => {
            tracing::warn!("cannot read /proc/cmdline: {e}; no boot flags");
            BootFlags::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_tokens_only() {
        assert_eq!(BootFlags::parse(""), BootFlags::default());
        assert_eq!(
            BootFlags::parse("console=ttyS0 supermachine.pvm=1 quiet"),
            BootFlags {
                pvm: true,
                ..BootFlags::default()
            }
        );
        assert_eq!(
            BootFlags::parse(
                "supermachine.test_hooks=1\tsupermachine.pvm=1 supermachine.rootfs=1\n"
            ),
            BootFlags {
                pvm: true,
                test_hooks: true,
                rootfs: true,
                net: None,
            }
        );
        assert_eq!(
            BootFlags::parse("supermachine.net=10.0.2.15/24,10.0.2.2,10.0.2.3,1500").net,
            Some(NetSetup {
                address: [10, 0, 2, 15].into(),
                prefix_len: 24,
                gateway: [10, 0, 2, 2].into(),
                dns: [10, 0, 2, 3].into(),
                mtu: 1500,
            })
        );
        for bad in [
            "supermachine.net=1",
            "supermachine.net=10.0.2.15/33,10.0.2.2,10.0.2.3,1500",
            "supermachine.net=10.0.2.15/24,10.0.2.2,10.0.2.3",
            "supermachine.net=10.0.2.15/24,10.0.2.2,10.0.2.3,1500,x",
            "supermachine.net=10.0.2.15/24,10.0.2.2,10.0.2.3,0",
        ] {
            assert_eq!(BootFlags::parse(bad).net, None, "{bad}");
        }
        for near_miss in [
            "supermachine.pvm=0",
            "supermachine.pvm=10",
            "xsupermachine.pvm=1",
            "supermachine.test_hooks",
            "supermachine.test_hooks=yes",
        ] {
            assert_eq!(
                BootFlags::parse(near_miss),
                BootFlags::default(),
                "{near_miss}"
            );
        }
    }
}
