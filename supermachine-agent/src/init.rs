//! Guest init duties of PID 1: the early mounts, and powering off instead of exiting (PID 1
//! exiting panics the kernel).
//!
//! Everything here is best effort: a mount that fails is logged and the agent carries on, since
//! a guest without, say, /run can still serve execs, and a guest whose agent gives up cannot
//! even report why.

use std::path::Path;
use std::time::Duration;

use nix::mount::{mount, MsFlags};

/// One early mount.
struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// In order: /dev/pts needs /dev.
fn early_mounts() -> [Mount; 6] {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    [
        Mount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: hardened,
            data: None,
        },
        Mount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: hardened,
            data: None,
        },
        Mount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        Mount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620"),
        },
        Mount {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        Mount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
    ]
}

/// Mounts proc, sysfs, devtmpfs, devpts, /tmp and /run, and makes /dev/ptmx usable.
pub fn mount_early_filesystems() {
    for m in early_mounts() {
        if let Err(e) = std::fs::create_dir_all(m.target) {
            tracing::error!("creating {}: {e}", m.target);
        }
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) => tracing::debug!("mounted {} on {}", m.fstype, m.target),
            Err(e) => tracing::error!("mounting {} on {}: {e}", m.fstype, m.target),
        }
    }
    ptmx();
}

/// A `newinstance` devpts serves ptys through its own `pts/ptmx`; `/dev/ptmx` must lead there.
/// A devtmpfs `/dev/ptmx` node does on kernels since 4.7, but binding the instance's node over
/// it works everywhere; without any node, a symlink does.
fn ptmx() {
    let node = Path::new("/dev/ptmx");
    let result = if node.exists() {
        mount(
            Some("/dev/pts/ptmx"),
            node,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(std::io::Error::from)
    } else {
        std::os::unix::fs::symlink("pts/ptmx", node)
    };
    if let Err(e) = result {
        tracing::error!("making /dev/ptmx point at /dev/pts/ptmx: {e}");
    }
}

/// Brings the loopback interface up, so guest servers can listen on 127.0.0.1 and published
/// ports (`connect_tcp`) reach them.
pub fn loopback_up() {
    match crate::sys::interface_up("lo") {
        Ok(()) => tracing::debug!("loopback interface up"),
        Err(e) => tracing::error!("bringing the loopback interface up: {e}"),
    }
}

/// Configures `eth0` from the host's `supermachine.net=` flag: address, MTU, up, default route.
/// Failures are logged (the VM still serves execs, without a network).
pub fn network_up(net: &crate::boot_flags::NetSetup) {
    let result = crate::sys::configure_ipv4("eth0", net.address, net.prefix_len, net.mtu)
        .map_err(|e| format!("configuring eth0: {e}"))
        .and_then(|()| {
            crate::sys::add_default_route(net.gateway)
                .map_err(|e| format!("adding the default route via {}: {e}", net.gateway))
        });
    match result {
        Ok(()) => tracing::debug!(address = %net.address, "eth0 up"),
        Err(e) => tracing::error!("{e}"),
    }
}

/// Flushes filesystems and powers the VM off. Never returns: should the reboot call fail, PID 1
/// sleeps forever rather than exit.
pub fn power_off() -> ! {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => tracing::error!("power off failed: {e}; halting here"),
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
