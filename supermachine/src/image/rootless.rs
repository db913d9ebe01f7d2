//! Rootless rootfs images: the owners, modes, xattrs and device nodes that an unprivileged user
//! cannot give the unpacked tree (see [`super::layers::Ownership::Record`]) are written straight
//! into the finished ext4 image with `debugfs -w`, which edits the filesystem file as data and
//! needs no privilege.
//!
//! Why `debugfs`: it ships with `mkfs.ext4` in every e2fsprogs (so nothing new to install), it
//! sets 32-bit owners, full modes, any xattr namespace (`security.capability` included) and makes
//! device nodes, and its edits are the library's own ext4 code. The alternatives were an
//! in-process ext4 or EROFS writer (no maintained Rust crate writes ext4; EROFS would need a
//! guest kernel change and a second rootfs format) and `mkfs.ext4 -d TARBALL` (e2fsprogs >= 1.47.1
//! only, and it drops PAX xattrs).
//!
//! The script names each path once per inode (hard links share the inode, so one name is enough),
//! in double quotes (a `"` doubled, as debugfs' parser reads it). A name with a newline cannot be
//! written in a debugfs script and is refused ([`ImageError::Rootless`]).

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use super::error::ImageError;
use super::layers::{InodeMeta, Node, Recorded};

/// The file-type bits of `st_mode`.
const S_IFMT: u32 = 0o170000;

/// Writes `recorded` (what each inode of `tree` must be) into `image`, the ext4 image
/// `mkfs.ext4 -d tree` made. `work` is a scratch directory for the script and xattr values.
pub(crate) fn apply(
    tree: &Path,
    image: &Path,
    recorded: &Recorded,
    work: &Path,
    path_env: &str,
) -> Result<(), ImageError> {
    let script = script(tree, recorded, work)?;
    let script_path = work.join("debugfs.script");
    fs::write(&script_path, &script)
        .map_err(|e| ImageError::io(format!("cannot write {}", script_path.display()), e))?;
    let output = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(image)
        .env("PATH", path_env)
        .output()
        .map_err(|e| ImageError::Rootless {
            detail: format!(
                "cannot run debugfs: {e}; install e2fsprogs (`apt-get install e2fsprogs`)"
            ),
        })?;
    // debugfs exits 0 whatever its commands did; each failure is a line on stderr. The only
    // other line there is its version banner.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failures: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !output.status.success() || !failures.is_empty() {
        return Err(ImageError::Rootless {
            detail: format!(
                "debugfs ({}): {}",
                output.status,
                failures
                    .iter()
                    .take(5)
                    .copied()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        });
    }
    Ok(())
}

/// The debugfs commands for every inode of `tree` that has a record. xattr values go into files
/// under `work` (`ea_set -f`), as they may be binary.
fn script(tree: &Path, recorded: &Recorded, work: &Path) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut values = 0usize;
    let mut stack = vec![(tree.to_owned(), Vec::<u8>::from(&b"/"[..]))];
    while let Some((dir, image_dir)) = stack.pop() {
        let meta = fs::symlink_metadata(&dir)
            .map_err(|e| ImageError::io(format!("cannot stat {}", dir.display()), e))?;
        if seen.insert((meta.dev(), meta.ino())) {
            if let Some(record) = recorded.get(&(meta.dev(), meta.ino())) {
                inode_commands(
                    &mut out,
                    meta.mode() & S_IFMT,
                    &image_dir,
                    &image_dir,
                    None,
                    record,
                    work,
                    &mut values,
                )?;
            }
        }
        let entries = fs::read_dir(&dir)
            .map_err(|e| ImageError::io(format!("cannot list {}", dir.display()), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| ImageError::io(format!("cannot list {}", dir.display()), e))?;
            let name = entry.file_name();
            let mut path = image_dir.clone();
            if path.last() != Some(&b'/') {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
            let meta = entry.metadata().map_err(|e| {
                ImageError::io(format!("cannot stat {}", entry.path().display()), e)
            })?;
            if meta.is_dir() {
                stack.push((entry.path(), path));
                continue;
            }
            let key = (meta.dev(), meta.ino());
            let Some(record) = recorded.get(&key) else {
                continue;
            };
            // A stand-in for a device node is replaced by a node per name; any other inode is
            // described once, through whichever name comes first.
            if record.node.is_none() && !seen.insert(key) {
                continue;
            }
            inode_commands(
                &mut out,
                meta.mode() & S_IFMT,
                &path,
                &image_dir,
                Some(name.as_bytes()),
                record,
                work,
                &mut values,
            )?;
        }
    }
    Ok(out)
}

/// The commands for the inode at `path` (in `dir`, under `name`; `None` for a directory itself),
/// whose file type in the tree is `tree_type` (`S_IFMT` bits).
#[allow(clippy::too_many_arguments)]
fn inode_commands(
    out: &mut Vec<u8>,
    tree_type: u32,
    path: &[u8],
    dir: &[u8],
    name: Option<&[u8]>,
    record: &InodeMeta,
    work: &Path,
    values: &mut usize,
) -> Result<(), ImageError> {
    let quoted = quote(path)?;
    if let (Some(node), Some(name)) = (record.node, name) {
        let kind = match node {
            Node::Char { major, minor } => format!("c {major} {minor}"),
            Node::Block { major, minor } => format!("b {major} {minor}"),
            Node::Fifo => "p".to_owned(),
        };
        // mknod links its new inode into the current directory under a plain name.
        line(out, &[b"rm ", &quoted]);
        line(out, &[b"cd ", &quote(dir)?]);
        line(out, &[b"mknod ", &quote(name)?, b" ", kind.as_bytes()]);
    }
    line(
        out,
        &[b"sif ", &quoted, format!(" uid {}", record.uid).as_bytes()],
    );
    line(
        out,
        &[b"sif ", &quoted, format!(" gid {}", record.gid).as_bytes()],
    );
    if let Some(mode) = record.mode {
        // `sif mode` replaces the whole field, file type included: the node's type, or the type
        // of what mkfs copied from the tree.
        let file_type = match record.node {
            Some(Node::Char { .. }) => 0o020000,
            Some(Node::Block { .. }) => 0o060000,
            Some(Node::Fifo) => 0o010000,
            None => tree_type,
        };
        let mode = file_type | mode;
        line(
            out,
            &[b"sif ", &quoted, format!(" mode 0{mode:o}").as_bytes()],
        );
    }
    if record.node.is_some() {
        if let Some(mtime) = record.mtime {
            line(
                out,
                &[b"sif ", &quoted, format!(" mtime @{mtime}").as_bytes()],
            );
        }
    }
    for (key, value) in &record.xattrs {
        let file = work.join(format!("xattr-{values}"));
        *values += 1;
        let mut f = fs::File::create(&file)
            .map_err(|e| ImageError::io(format!("cannot create {}", file.display()), e))?;
        f.write_all(value)
            .map_err(|e| ImageError::io(format!("cannot write {}", file.display()), e))?;
        line(
            out,
            &[
                b"ea_set -f ",
                &quote(file.as_os_str().as_bytes())?,
                b" ",
                &quoted,
                b" ",
                &quote(key)?,
            ],
        );
    }
    Ok(())
}

fn line(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(part);
    }
    out.push(b'\n');
}

/// `bytes` as one debugfs argument: in double quotes, a `"` doubled.
fn quote(bytes: &[u8]) -> Result<Vec<u8>, ImageError> {
    if bytes.contains(&b'\n') {
        return Err(ImageError::Rootless {
            detail: format!(
                "the name {:?} has a newline, which a debugfs script cannot carry; \
                 build this image as root",
                String::from_utf8_lossy(bytes)
            ),
        });
    }
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.push(b'"');
    for &b in bytes {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_double_a_quote_and_refuse_a_newline() {
        assert_eq!(quote(b"a b").unwrap(), b"\"a b\"");
        assert_eq!(quote(b"q\"x").unwrap(), b"\"q\"\"x\"");
        assert!(quote(b"a\nb").is_err());
    }
}
