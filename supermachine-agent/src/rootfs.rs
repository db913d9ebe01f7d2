//! Entering an image's root filesystem (boot flag `supermachine.rootfs=1`).
//!
//! The host attaches the image as a read-only ext4 disk, `/dev/vda`. PID 1, after the early
//! mounts, stacks an overlay on it whose upper layer lives in a tmpfs (so every write stays in
//! this VM's RAM and the shared image is never touched), moves `/proc`, `/sys`, `/dev`, `/tmp`
//! and `/run` into it, gives it `/etc/hosts` and `/etc/resolv.conf`, and makes it the root
//! (the `switch_root` way: move the mount onto `/` and `chroot` — `pivot_root` does not work
//! out of an initramfs). From then on the agent, and every exec it starts, sees the image.

use std::io;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// The image disk.
const IMAGE_DEVICE: &str = "/dev/vda";
/// Where the pieces are assembled (in the initramfs).
const LOWER: &str = "/mnt/image";
const RW: &str = "/mnt/rw";
const NEW_ROOT: &str = "/mnt/root";
/// Mounts made by init that move into the image root, in an order that keeps parents first.
const CARRIED_MOUNTS: [&str; 5] = ["/proc", "/sys", "/dev", "/tmp", "/run"];

/// What went wrong entering the image rootfs, with the step.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct RootfsError {
    step: String,
    #[source]
    source: io::Error,
}

fn step(step: impl Into<String>) -> impl FnOnce(io::Error) -> RootfsError {
    let step = step.into();
    move |source| RootfsError { step, source }
}

fn mount_err(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// Mounts the image disk under a tmpfs overlay and makes it the root. Call once, as PID 1,
/// after the early mounts and before serving.
pub fn enter_image_rootfs(dns: Option<std::net::Ipv4Addr>) -> Result<(), RootfsError> {
    // Read while /proc is still where it was mounted.
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty() && h != "(none)")
        .unwrap_or_else(|| "supermachine".to_owned());
    for dir in [LOWER, RW, NEW_ROOT] {
        std::fs::create_dir_all(dir).map_err(step(format!("creating {dir}")))?;
    }
    mount(
        Some(IMAGE_DEVICE),
        LOWER,
        Some("ext4"),
        MsFlags::MS_RDONLY,
        Some("noload"),
    )
    .map_err(mount_err)
    .map_err(step(format!(
        "mounting the image disk {IMAGE_DEVICE} (ext4, read-only)"
    )))?;
    mount(
        Some("tmpfs"),
        RW,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(mount_err)
    .map_err(step("mounting the overlay's tmpfs"))?;
    for dir in ["upper", "work"] {
        let path = Path::new(RW).join(dir);
        std::fs::create_dir_all(&path).map_err(step(format!("creating {}", path.display())))?;
    }
    let options = format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work");
    mount(
        Some("overlay"),
        NEW_ROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(mount_err)
    .map_err(step("mounting the overlay"))?;

    for src in CARRIED_MOUNTS {
        let target = format!("{NEW_ROOT}{src}");
        std::fs::create_dir_all(&target).map_err(step(format!("creating {target}")))?;
        mount(
            Some(src),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(mount_err)
        .map_err(step(format!("moving {src} into the image root")))?;
    }
    write_network_files(Path::new(NEW_ROOT), &hostname, dns)
        .map_err(step("writing /etc/hosts and /etc/resolv.conf"))?;

    // switch_root: the new root replaces `/`, and this process (and everything it starts)
    // resolves paths inside it.
    std::env::set_current_dir(NEW_ROOT).map_err(step(format!("entering {NEW_ROOT}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(mount_err)
        .map_err(step("moving the image root onto /"))?;
    nix::unistd::chroot(".")
        .map_err(mount_err)
        .map_err(step("chroot into the image root"))?;
    std::env::set_current_dir("/").map_err(step("entering /"))?;
    tracing::info!("running in the image rootfs ({IMAGE_DEVICE}, overlay on tmpfs)");
    Ok(())
}

/// The name resolution files a container runtime provides: `/etc/hosts` always (localhost and
/// the guest's hostname); `/etc/resolv.conf` naming the VMM's DNS server when the VM has a
/// network (replacing the image's, as a container runtime does: the image's resolvers are not
/// reachable from here), else a comment-only one when the image has none. Written to the
/// overlay's upper layer; the image itself is untouched.
fn write_network_files(
    root: &Path,
    hostname: &str,
    dns: Option<std::net::Ipv4Addr>,
) -> io::Result<()> {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    replace_file(
        &etc.join("hosts"),
        &format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    )?;
    let resolv = etc.join("resolv.conf");
    if let Some(dns) = dns {
        return write_resolv_conf(&etc, dns);
    }
    // A dangling symlink (to systemd-resolved's file, say) counts as missing.
    if !resolv.exists() {
        replace_file(
            &resolv,
            "# supermachine: this VM has no network beyond loopback, so no nameserver.\n",
        )?;
    }
    Ok(())
}

/// Writes `etc/resolv.conf` naming `dns` (the VMM's DNS server) as the only resolver.
pub fn write_resolv_conf(etc: &Path, dns: std::net::Ipv4Addr) -> io::Result<()> {
    std::fs::create_dir_all(etc)?;
    replace_file(
        &etc.join("resolv.conf"),
        &format!("# supermachine: the VMM answers DNS.\nnameserver {dns}\n"),
    )
}

/// Writes `contents` to `path`, replacing a file or a (dangling) symlink there.
fn replace_file(path: &Path, contents: &str) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.is_dir() => std::fs::remove_file(path)?,
        _ => {}
    }
    std::fs::write(path, contents)
}
