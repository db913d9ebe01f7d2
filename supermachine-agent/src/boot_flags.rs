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
                _ => {}
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
            }
        );
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
