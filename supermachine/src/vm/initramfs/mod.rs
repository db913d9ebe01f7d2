//! The guest's initramfs: an uncompressed newc cpio archive with the agent as `/init`.
//!
//! Written here rather than by the `cpio` tool so that a VM can start on a machine without it,
//! and so that the archive is byte-for-byte reproducible (fixed inode numbers, mtime 0, owner
//! root), which lets it be cached under its content hash. Uncompressed on purpose: on PVM hosts
//! the guest kernel's decompressor is far slower than reading more pages.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cache;

mod recipe;
pub(crate) use recipe::{Built, Recipe};

/// Mode bits of the file types the archive holds.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Directories the agent mounts filesystems on at boot.
const MOUNT_POINTS: [&str; 5] = ["/dev", "/proc", "/sys", "/tmp", "/run"];

/// One entry of the archive, keyed by its absolute guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Dir { mode: u32 },
    File { mode: u32, contents: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An initramfs being assembled. Parent directories are created implicitly (mode 0755).
#[derive(Debug, Default)]
pub(crate) struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

/// An initramfs file could not be read or placed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InitramfsError {
    #[error("guest path {path:?} must be absolute, without `.`, `..` or empty components")]
    BadGuestPath { path: String },
    #[error("guest path {path} is used twice")]
    Duplicate { path: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Initramfs {
    /// The base layout: `/init` is `agent`, `/dev/console` exists (the kernel opens it for
    /// init's stdio before anything is mounted), and the agent's mount points.
    pub(crate) fn with_agent(agent: Vec<u8>) -> Self {
        let mut fs = Initramfs::default();
        for dir in MOUNT_POINTS {
            fs.entries
                .insert(dir.to_owned(), Entry::Dir { mode: 0o755 });
        }
        fs.entries.insert(
            "/dev/console".to_owned(),
            Entry::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        );
        fs.entries.insert(
            "/init".to_owned(),
            Entry::File {
                mode: 0o755,
                contents: agent,
            },
        );
        fs
    }

    /// Adds `entry` at `path`, creating missing parent directories.
    pub(crate) fn add(&mut self, path: &str, entry: Entry) -> Result<(), InitramfsError> {
        let path = normalize(path)?;
        let mut parent = String::new();
        let components: Vec<&str> = path[1..].split('/').collect();
        for component in &components[..components.len() - 1] {
            parent.push('/');
            parent.push_str(component);
            self.entries
                .entry(parent.clone())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
        if self.entries.contains_key(&path) {
            return Err(InitramfsError::Duplicate { path });
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// The newc archive. Entries come in path order, so parents precede children.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            // Archive names are relative, as `find . | cpio` writes them.
            let name = &path[1..];
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir { mode } => (S_IFDIR | mode, &[], (0, 0)),
                Entry::File { mode, contents } => (S_IFREG | mode, contents, (0, 0)),
                Entry::Symlink { target } => (S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
                Entry::CharDev { mode, major, minor } => (S_IFCHR | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(entry, Entry::Dir { .. }) {
                2
            } else {
                1
            };
            write_record(&mut out, ino, mode, nlink, rdev, name, data);
        }
        write_record(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }

    /// Writes the archive into the cache under its content hash (once; concurrent writers race
    /// harmlessly through a temp file and rename). Returns its path, its SHA-256 in hex and its
    /// length.
    pub(crate) fn cached(&self) -> io::Result<(PathBuf, String, u64)> {
        let bytes = self.to_bytes();
        let sha256 = crate::image::digest::hex(&Sha256::digest(&bytes));
        let dir = cache::dir("initramfs")?;
        let path = dir.join(Self::cache_name(&sha256));
        let len = bytes.len() as u64;
        if !path.metadata().is_ok_and(|m| m.len() == len) {
            cache::write_atomically(&path, &bytes)?;
        }
        Ok((path, sha256, len))
    }

    /// The cache file name of the archive whose SHA-256 (hex) is `sha256`.
    pub(crate) fn cache_name(sha256: &str) -> String {
        format!("{}.cpio", &sha256[..sha256.len().min(32)])
    }
}

/// The mode an extra file gets: `mode` if given, else the host file's permission bits (0644
/// when they cannot be read).
pub(crate) fn host_file_mode(host: &Path, mode: Option<u32>) -> u32 {
    mode.unwrap_or_else(|| {
        std::fs::metadata(host)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
            .unwrap_or(0o644)
    })
}

/// Reads a host file for the archive.
pub(crate) fn read_host_file(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn normalize(path: &str) -> Result<String, InitramfsError> {
    let bad = || InitramfsError::BadGuestPath {
        path: path.to_owned(),
    };
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    let trimmed = rest.trim_end_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
    {
        return Err(bad());
    }
    Ok(format!("/{trimmed}"))
}

fn write_record(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rmajor, rminor): (u32, u32),
    name: &str,
    data: &[u8],
) {
    // newc stores sizes as 8 hex digits; files over 4 GiB cannot be represented (and would not
    // fit in guest RAM anyway).
    let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rmajor:08x}{rminor:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(&data[..size as usize]);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_reproducible_and_ordered() {
        let build = || {
            let mut fs = Initramfs::with_agent(b"AGENT".to_vec());
            fs.add(
                "/bin/busybox",
                Entry::File {
                    mode: 0o755,
                    contents: b"bb".to_vec(),
                },
            )
            .unwrap();
            fs.add(
                "/bin/sh",
                Entry::Symlink {
                    target: "busybox".into(),
                },
            )
            .unwrap();
            fs.to_bytes()
        };
        let a = build();
        assert_eq!(a, build());
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        let bin = text.find("bin\0").unwrap();
        assert!(bin < text.find("bin/busybox\0").unwrap());
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn bad_and_duplicate_paths_are_refused() {
        let mut fs = Initramfs::with_agent(Vec::new());
        for bad in ["relative", "/", "/a/../b", "/a//b", "/./x"] {
            assert!(
                matches!(
                    fs.add(bad, Entry::Dir { mode: 0o755 }),
                    Err(InitramfsError::BadGuestPath { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            fs.add("/init", Entry::Dir { mode: 0o755 }),
            Err(InitramfsError::Duplicate { .. })
        ));
    }

    /// The archive the system `cpio` tool reads back is the one we meant to write.
    #[test]
    fn cpio_tool_lists_and_extracts_it() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("cpio not installed; skipping the cross-check");
            return;
        }
        let mut fs = Initramfs::with_agent(b"#!agent".to_vec());
        fs.add(
            "/etc/deep/file",
            Entry::File {
                mode: 0o640,
                contents: b"hello".to_vec(),
            },
        )
        .unwrap();
        fs.add(
            "/bin/sh",
            Entry::Symlink {
                target: "busybox".into(),
            },
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, fs.to_bytes()).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("cpio -tv --quiet < \"$1\"")
            .arg("sh")
            .arg(&archive)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8_lossy(&out.stdout);
        for want in [
            "-rwxr-xr-x",
            "init",
            "crw-------",
            "dev/console",
            "-rw-r-----",
            "etc/deep/file",
            "bin/sh -> busybox",
        ] {
            assert!(listing.contains(want), "{want} missing from\n{listing}");
        }
        let extract = dir.path().join("x");
        std::fs::create_dir(&extract).unwrap();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && cpio -id --quiet --no-absolute-filenames < \"$2\" 2>/dev/null; test -f etc/deep/file")
            .arg("sh")
            .arg(&extract)
            .arg(&archive)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            std::fs::read(extract.join("etc/deep/file")).unwrap(),
            b"hello"
        );
    }
}
