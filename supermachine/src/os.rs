//! The library's OS glue: the one module of this crate where Linux and macOS differ (the VMM's
//! is `supermachine_vmm::os`; the hypervisor backends live in `supermachine-vmm`). Everything
//! else names only what this module exports.
//!
//! * Default directories: Linux follows XDG (`~/.cache/supermachine`, `$XDG_RUNTIME_DIR`,
//!   `~/.local/share/supermachine`); macOS follows its own conventions
//!   (`~/Library/Caches/supermachine`, `$TMPDIR`, `~/Library/Application Support/supermachine`).
//!   The `SUPERMACHINE_*` variables override both, as before.
//! * Applying image layers inside a root directory: Linux resolves paths with `openat2`
//!   (`RESOLVE_IN_ROOT`) and holds directories as `O_PATH` handles; macOS has neither, so a path
//!   is walked one component at a time, symlinks resolved with the root as `/`.
//! * Small type differences of `stat` and modes.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, Stat};

/// Flags for a directory handle used only as the base of `*at` calls.
#[cfg(target_os = "linux")]
pub(crate) const DIR_HANDLE: OFlags = OFlags::PATH;
/// Flags for a directory handle used only as the base of `*at` calls (no `O_PATH` on macOS).
#[cfg(not(target_os = "linux"))]
pub(crate) const DIR_HANDLE: OFlags = OFlags::RDONLY;

/// `(st_dev, st_ino)`: what identifies a file (hard links share it).
#[allow(clippy::unnecessary_cast)] // u64 on Linux, i32/u64 on macOS.
pub(crate) fn file_id(st: &Stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// A permission `Mode` from the 12 mode bits of an image entry.
#[allow(clippy::unnecessary_cast)] // RawMode is u32 on Linux, u16 on macOS.
pub(crate) fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate((bits & 0o7777) as rustix::fs::RawMode)
}

/// Opens directory `path` below `root`, resolving `..` and symlinks as if `root` were `/`.
#[cfg(target_os = "linux")]
pub(crate) fn open_dir_in_root(root: &OwnedFd, path: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(
        root,
        path,
        DIR_HANDLE | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        rustix::fs::ResolveFlags::IN_ROOT,
    )
}

/// Opens directory `path` below `root`, resolving `..` and symlinks as if `root` were `/`
/// (one component at a time: macOS has no `RESOLVE_IN_ROOT`).
#[cfg(not(target_os = "linux"))]
pub(crate) fn open_dir_in_root(root: &OwnedFd, path: &Path) -> rustix::io::Result<OwnedFd> {
    in_root::open_dir(root, path)
}

/// Creates a device node or FIFO `name` in `dir`.
pub(crate) fn mknodat(
    dir: &OwnedFd,
    name: &OsStr,
    file_type: rustix::fs::FileType,
    perm: Mode,
    major: u32,
    minor: u32,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::fs::mknodat(
        dir,
        name,
        file_type,
        perm,
        rustix::fs::makedev(major, minor),
    )?;
    #[cfg(not(target_os = "linux"))]
    in_root::mknodat(dir, name, file_type, perm, major, minor)?;
    Ok(())
}

/// A path naming `name` in the directory `dir` for the calls with no `*at` form (`lsetxattr`).
#[cfg(target_os = "linux")]
pub(crate) fn path_in_dir(dir: &OwnedFd, name: &OsStr) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    Ok(Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name))
}

/// A path naming `name` in the directory `dir` for the calls with no `*at` form (`lsetxattr`):
/// the directory's current path (`F_GETPATH`) joined with `name`.
#[cfg(not(target_os = "linux"))]
pub(crate) fn path_in_dir(dir: &OwnedFd, name: &OsStr) -> io::Result<PathBuf> {
    Ok(rustix::fs::getpath(std::os::fd::AsFd::as_fd(dir))?
        .into_string()
        .map(PathBuf::from)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a directory path is not UTF-8"))?
        .join(name))
}

/// Where cached images, rootfs and snapshots go unless `SUPERMACHINE_CACHE_DIR` says:
/// `$XDG_CACHE_HOME/supermachine` or `~/.cache/supermachine` on Linux,
/// `~/Library/Caches/supermachine` on macOS. `None` without the variables that decide it.
pub(crate) fn default_cache_dir() -> Option<PathBuf> {
    by_convention("Library/Caches", "XDG_CACHE_HOME", ".cache")
}

/// Where an installed guest kernel and agent are looked for unless `SUPERMACHINE_INSTALL_DIR`
/// says: `$XDG_DATA_HOME/supermachine` or `~/.local/share/supermachine` on Linux,
/// `~/Library/Application Support/supermachine` on macOS.
pub(crate) fn default_install_dir() -> Option<PathBuf> {
    by_convention(
        "Library/Application Support",
        "XDG_DATA_HOME",
        ".local/share",
    )
}

/// `supermachine` under `$HOME/mac` on macOS; elsewhere under `$xdg_var`, else
/// `$HOME/xdg_default`.
fn by_convention(mac: &str, xdg_var: &str, xdg_default: &str) -> Option<PathBuf> {
    let home = || non_empty("HOME").map(PathBuf::from);
    let base = if cfg!(target_os = "macos") {
        home()?.join(mac)
    } else {
        match non_empty(xdg_var) {
            Some(dir) => PathBuf::from(dir),
            None => home()?.join(xdg_default),
        }
    };
    Some(base.join("supermachine"))
}

/// Where running VMs register (their muxer sockets) unless `SUPERMACHINE_RUNTIME_DIR` says:
/// `$XDG_RUNTIME_DIR/supermachine`, else `/tmp/supermachine-<uid>` on Linux;
/// `$TMPDIR/supermachine` (a per-user directory on macOS) there.
pub fn default_runtime_dir() -> PathBuf {
    if cfg!(target_os = "macos") {
        return std::env::temp_dir().join("supermachine");
    }
    match non_empty("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("supermachine"),
        None => PathBuf::from(format!(
            "/tmp/supermachine-{}",
            rustix::process::getuid().as_raw()
        )),
    }
}

fn non_empty(name: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// Path resolution inside a root without `openat2`, and `mknodat` through libc (rustix has none
/// on macOS). Plain POSIX: unit-tested on Linux.
#[cfg_attr(target_os = "linux", allow(dead_code))]
mod in_root {
    use std::ffi::{OsStr, OsString};
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Component, Path};

    use rustix::fs::{FileType, Mode, OFlags};
    use rustix::io::Errno;

    /// Symlinks followed before giving up (Linux's limit).
    const MAX_LINKS: usize = 40;

    /// Opens directory `path` below `root`, each component opened with `O_NOFOLLOW` and a
    /// symlink's target resolved again from `root` (absolute) or its directory (relative); `..`
    /// never climbs above `root`.
    pub(super) fn open_dir(root: &OwnedFd, path: &Path) -> rustix::io::Result<OwnedFd> {
        let flags = super::DIR_HANDLE | OFlags::DIRECTORY | OFlags::CLOEXEC;
        // The components still to walk, and the stack of directories walked (root first).
        let mut todo: Vec<OsString> = components(path).into_iter().rev().collect();
        let mut stack: Vec<OwnedFd> = vec![rustix::fs::openat(root, ".", flags, Mode::empty())?];
        let mut links = 0;
        while let Some(part) = todo.pop() {
            if part == ".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let here = stack.last().ok_or(Errno::NOENT)?;
            match rustix::fs::openat(here, &part, flags | OFlags::NOFOLLOW, Mode::empty()) {
                Ok(fd) => stack.push(fd),
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    let target = rustix::fs::readlinkat(here, &part, Vec::new())?;
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(Errno::LOOP);
                    }
                    let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                    if target.has_root() {
                        stack.truncate(1);
                    }
                    todo.extend(components(target).into_iter().rev());
                }
                Err(e) => return Err(e),
            }
        }
        stack.pop().ok_or(Errno::NOENT)
    }

    /// The normal and `..` components of `path` (root and `.` dropped).
    fn components(path: &Path) -> Vec<OsString> {
        path.components()
            .filter_map(|c| match c {
                Component::Normal(p) => Some(p.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect()
    }

    /// `mknodat(2)` through libc.
    pub(super) fn mknodat(
        dir: &OwnedFd,
        name: &OsStr,
        file_type: FileType,
        perm: Mode,
        major: u32,
        minor: u32,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let name = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mode = file_type.as_raw_mode() | perm.as_raw_mode();
        #[allow(clippy::unnecessary_cast)]
        let dev = libc::makedev(major as _, minor as _);
        // SAFETY: `name` is NUL-terminated and outlives the call; the descriptor is open.
        let rc = unsafe {
            libc::mknodat(
                dir.as_fd().as_raw_fd(),
                name.as_ptr(),
                mode as libc::mode_t,
                dev,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn symlinks_and_dotdot_resolve_inside_the_root() {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            std::fs::create_dir_all(root.join("usr/lib/x")).unwrap();
            std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
            std::os::unix::fs::symlink("/usr", root.join("usr/lib/up")).unwrap();
            std::os::unix::fs::symlink("../../../../..", root.join("usr/lib/x/escape")).unwrap();
            let fd =
                rustix::fs::open(root, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
            let ino = |p: &str| {
                let st = rustix::fs::stat(root.join(p)).unwrap();
                st.st_ino
            };
            let got = |p: &str| {
                rustix::fs::fstat(open_dir(&fd, Path::new(p)).unwrap())
                    .unwrap()
                    .st_ino
            };
            assert_eq!(got("lib/x"), ino("usr/lib/x"));
            assert_eq!(
                got("lib/up/lib"),
                ino("usr/lib"),
                "absolute targets start at the root"
            );
            assert_eq!(got("usr/lib/x/escape"), ino("."), "`..` stops at the root");
            assert_eq!(got("../../usr"), ino("usr"));
            assert_eq!(open_dir(&fd, Path::new("nope")).unwrap_err(), Errno::NOENT);
        }
    }
}
