//! Applies image layers, in order, to a directory tree: OCI whiteouts (`.wh.<name>` deletes
//! `<name>` from the layers below, `.wh..wh..opq` hides everything the layers below put in its
//! directory), and every entry's mode, owner, xattrs (PAX `SCHILY.xattr.*`), symlinks, hardlinks
//! (also to files of earlier layers), device nodes and fifos.
//!
//! Every path is resolved inside the tree with `openat2(RESOLVE_IN_ROOT)`, so a symlink put there
//! by a layer (`etc -> /`) can never make a later entry write outside it; names with `..` are
//! refused.
//!
//! Owners, modes, xattrs and device nodes either go onto the tree itself ([`Ownership::Apply`],
//! root only: chown, mknod) or are recorded per inode ([`Ownership::Record`], any user) and
//! written into the filesystem image afterwards ([`super::rootless`]). Recording by inode, not
//! by path, keeps whiteouts, opaque directories and hard links free of bookkeeping: whatever the
//! tree still holds at the end is what gets its metadata.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

use super::digest::{Digest, HashingReader};
use super::error::ImageError;
use crate::os;

/// A tree being built from layers.
pub(crate) struct Tree {
    root: OwnedFd,
    /// Directory mtimes, set once all layers are applied (children change them meanwhile).
    dir_times: Vec<(PathBuf, i64)>,
    ownership: Ownership,
    /// [`Ownership::Record`]: what each inode of the tree must be in the image.
    recorded: Recorded,
}

/// Where the entries' owners, modes, xattrs and device nodes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// Onto the tree (chown, chmod, setxattr, mknod): needs root.
    Apply,
    /// Into a per-inode record (the tree keeps this user's owner and owner-usable modes, device
    /// nodes are empty regular files): any user.
    Record,
}

/// Metadata recorded per inode of the tree (`(st_dev, st_ino)`).
pub(crate) type Recorded = HashMap<(u64, u64), InodeMeta>;

/// What an inode must be in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InodeMeta {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Permission bits (`0o7777`); `None` for a symlink, whose mode is fixed.
    pub(crate) mode: Option<u32>,
    /// The layer's mtime; `None` where the layers gave none (the root directory).
    pub(crate) mtime: Option<i64>,
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A device node or fifo, which the tree holds as an empty regular file.
    pub(crate) node: Option<Node>,
}

/// A special file the tree cannot hold without root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    /// A character device.
    Char { major: u32, minor: u32 },
    /// A block device.
    Block { major: u32, minor: u32 },
    /// A named pipe.
    Fifo,
}

/// Counts for logs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LayerStats {
    pub(crate) entries: u64,
    pub(crate) whiteouts: u64,
    pub(crate) uncompressed_bytes: u64,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

impl Tree {
    /// Starts a tree in the existing, empty directory `dir` (`0755 root:root` in the image).
    pub(crate) fn new(dir: &Path, ownership: Ownership) -> io::Result<Self> {
        let root = rustix::fs::open(
            dir,
            os::DIR_HANDLE | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut tree = Tree {
            root,
            dir_times: Vec::new(),
            ownership,
            recorded: Recorded::new(),
        };
        match ownership {
            Ownership::Apply => rustix::fs::chmodat(
                &tree.root,
                ".",
                Mode::from_raw_mode(0o755),
                AtFlags::empty(),
            )?,
            Ownership::Record => {
                let st = rustix::fs::fstat(&tree.root)?;
                tree.recorded.insert(
                    os::file_id(&st),
                    InodeMeta {
                        uid: 0,
                        gid: 0,
                        mode: Some(0o755),
                        mtime: None,
                        xattrs: Vec::new(),
                        node: None,
                    },
                );
            }
        }
        Ok(tree)
    }

    /// Applies the layer blob at `blob` (tar, gzip or zstd, told apart by their magic bytes). With
    /// `diff_id`, the uncompressed tar must hash to it.
    pub(crate) fn apply_layer(
        &mut self,
        blob: &Path,
        layer: &str,
        diff_id: Option<&Digest>,
    ) -> Result<LayerStats, ImageError> {
        let file = File::open(blob)
            .map_err(|e| ImageError::io(format!("cannot open layer {}", blob.display()), e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let magic = reader
            .fill_buf()
            .map_err(|e| ImageError::io(format!("cannot read layer {}", blob.display()), e))?;
        let decoded: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(reader))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(reader).map_err(|e| {
                    ImageError::io(format!("cannot start zstd decoding of layer {layer}"), e)
                })?,
            )
        } else {
            Box::new(reader)
        };
        let mut archive = tar::Archive::new(HashingReader::new(decoded));
        let mut stats = LayerStats::default();
        let mut created: HashSet<PathBuf> = HashSet::new();
        let entries = archive
            .entries()
            .map_err(|e| unpack_err(layer, "<archive>", e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| unpack_err(layer, "<next entry>", e))?;
            let raw_path = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw_path).into_owned();
            self.apply_entry(&mut entry, &mut created, &mut stats)
                .map_err(|e| unpack_err(layer, &shown, e))?;
        }
        let (actual, len) = archive
            .into_inner()
            .finish()
            .map_err(|e| unpack_err(layer, "<end of archive>", e))?;
        stats.uncompressed_bytes = len;
        if let Some(expected) = diff_id {
            if *expected != actual {
                return Err(ImageError::DigestMismatch {
                    what: format!("uncompressed layer {layer} (config rootfs.diff_ids)"),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(stats)
    }

    /// Sets the directory mtimes recorded while applying layers; returns the per-inode record
    /// ([`Ownership::Record`]; empty otherwise).
    pub(crate) fn finish(self) -> Recorded {
        for (rel, mtime) in self.dir_times.iter().rev() {
            let times = timestamps(*mtime);
            let result = match split(rel) {
                None => rustix::fs::utimensat(&self.root, ".", &times, AtFlags::empty())
                    .map_err(io::Error::from),
                Some((parent, name)) => open_dir(&self.root, parent, false).and_then(|fd| {
                    rustix::fs::utimensat(&fd, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(io::Error::from)
                }),
            };
            if let Err(e) = result {
                tracing::trace!(path = %rel.display(), error = %e, "directory mtime not set");
            }
        }
        self.recorded
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        created: &mut HashSet<PathBuf>,
        stats: &mut LayerStats,
    ) -> io::Result<()> {
        stats.entries += 1;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            return Ok(());
        }
        let rel = sanitize(&entry.path()?)?;
        let meta = Meta::read(entry)?;

        let Some((parent_rel, name)) = split(&rel) else {
            // The root directory itself (`./`): only its metadata.
            if kind.is_dir() {
                let root = self.root.try_clone()?;
                self.set_meta_at(&root, OsStr::new("."), &meta, None, true)?;
                self.dir_times.push((PathBuf::new(), meta.mtime));
            }
            return Ok(());
        };

        // Whiteouts.
        if let Some(hidden) = name.to_str().and_then(|n| n.strip_prefix(WHITEOUT_PREFIX)) {
            stats.whiteouts += 1;
            let Ok(dir) = open_dir(&self.root, parent_rel, false) else {
                return Ok(()); // nothing below to hide
            };
            if name == OPAQUE_MARKER {
                clear_except(&dir, parent_rel, created)?;
            } else if !hidden.is_empty() && hidden != "." && hidden != ".." {
                remove_all_at(&dir, OsStr::new(hidden))?;
            }
            return Ok(());
        }

        let parent = open_dir(&self.root, parent_rel, true)?;
        created.insert(rel.clone());
        if kind.is_dir() {
            match lstat_at(&parent, name)? {
                Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                Some(_) => {
                    remove_all_at(&parent, name)?;
                    rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))?;
                }
                None => rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))?,
            }
            self.set_meta_at(&parent, name, &meta, None, true)?;
            self.dir_times.push((rel, meta.mtime));
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()?
                .ok_or_else(|| io::Error::other("hard link without a target"))?;
            let target = sanitize(&target)?;
            let (t_parent, t_name) = split(&target)
                .ok_or_else(|| io::Error::other("hard link to the root directory"))?;
            if target == rel {
                return Ok(());
            }
            let t_dir = open_dir(&self.root, t_parent, false).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("hard link target {} is missing: {e}", target.display()),
                )
            })?;
            remove_all_at(&parent, name)?;
            rustix::fs::linkat(&t_dir, t_name, &parent, name, AtFlags::empty()).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot hard link to {}: {e}", target.display()),
                )
            })?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| io::Error::other("symlink without a target"))?
                .into_owned();
            remove_all_at(&parent, name)?;
            rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, name)?;
            self.set_meta_at(&parent, name, &meta, None, false)?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let major = entry.header().device_major()?.unwrap_or(0);
            let minor = entry.header().device_minor()?.unwrap_or(0);
            let (file_type, node) = if kind.is_character_special() {
                (FileType::CharacterDevice, Node::Char { major, minor })
            } else if kind.is_block_special() {
                (FileType::BlockDevice, Node::Block { major, minor })
            } else {
                (FileType::Fifo, Node::Fifo)
            };
            remove_all_at(&parent, name)?;
            match self.ownership {
                Ownership::Apply => os::mknodat(
                    &parent,
                    name,
                    file_type,
                    Mode::from_raw_mode(0o600),
                    major,
                    minor,
                )?,
                // The image gets the node (super::rootless); the tree an empty stand-in.
                Ownership::Record => drop(rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?),
            }
            self.set_meta_at(&parent, name, &meta, Some(node), true)?;
        } else {
            // Regular files, and (as POSIX asks) any type flag we do not know.
            remove_all_at(&parent, name)?;
            let fd = rustix::fs::openat(
                &parent,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            let mut file = File::from(fd);
            io::copy(entry, &mut file)?;
            match self.ownership {
                Ownership::Apply => meta.apply_fd(&file)?,
                Ownership::Record => {
                    rustix::fs::futimens(&file, &timestamps(meta.mtime))?;
                    let st = rustix::fs::fstat(&file)?;
                    self.recorded
                        .insert(os::file_id(&st), meta.recorded(None, true));
                }
            }
        }
        Ok(())
    }

    /// Gives `dir/name` the entry's metadata: onto the tree, or into the record (the mtime goes
    /// onto the tree either way: `mkfs.ext4 -d` copies it).
    fn set_meta_at(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        node: Option<Node>,
        has_mode: bool,
    ) -> io::Result<()> {
        match self.ownership {
            Ownership::Apply => meta.apply_at(dir, name, has_mode),
            Ownership::Record => {
                rustix::fs::utimensat(
                    dir,
                    name,
                    &timestamps(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
                let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                self.recorded
                    .insert(os::file_id(&st), meta.recorded(node, has_mode));
                Ok(())
            }
        }
    }
}

/// Owner, mode, mtime and xattrs of an entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Self> {
        let header = entry.header();
        let to_u32 = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| io::Error::other(format!("{what} {v} is out of range")))
        };
        let mut uid = to_u32(header.uid()?, "uid")?;
        let mut gid = to_u32(header.gid()?, "gid")?;
        let mode = header.mode()? & 0o7777;
        let mut mtime = i64::try_from(header.mtime().unwrap_or(0)).unwrap_or(0);
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions()? {
            for ext in pax {
                let ext = ext?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if key == b"uid" || key == b"gid" || key == b"mtime" {
                    let value = std::str::from_utf8(ext.value_bytes()).unwrap_or("");
                    // PAX mtime may carry a fraction: keep the seconds.
                    let int = value.split('.').next().unwrap_or("");
                    match (key, int.parse::<i64>()) {
                        (b"mtime", Ok(v)) => mtime = v,
                        (b"uid", Ok(v)) => uid = to_u32(v as u64, "uid")?,
                        (b"gid", Ok(v)) => gid = to_u32(v as u64, "gid")?,
                        _ => {}
                    }
                }
            }
        }
        Ok(Meta {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        })
    }

    /// This metadata as a record for the image.
    fn recorded(&self, node: Option<Node>, has_mode: bool) -> InodeMeta {
        InodeMeta {
            uid: self.uid,
            gid: self.gid,
            mode: has_mode.then_some(self.mode),
            mtime: Some(self.mtime),
            xattrs: self.xattrs.clone(),
            node,
        }
    }

    /// Owner first (chown clears set-id bits), then mode, xattrs, mtime; for a symlink
    /// (`has_mode == false`) no mode.
    fn apply_at(&self, dir: &OwnedFd, name: &OsStr, has_mode: bool) -> io::Result<()> {
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(self.uid)),
            Some(rustix::fs::Gid::from_raw(self.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if has_mode {
            rustix::fs::chmodat(dir, name, os::mode(self.mode), AtFlags::empty())?;
        }
        if !self.xattrs.is_empty() {
            let path = os::path_in_dir(dir, name)?;
            for (key, value) in &self.xattrs {
                if let Err(e) = rustix::fs::lsetxattr(
                    &path,
                    OsStr::from_bytes(key),
                    value,
                    rustix::fs::XattrFlags::empty(),
                ) {
                    // Symlinks and device nodes cannot carry user.* xattrs on Linux.
                    tracing::debug!(name = ?name, xattr = %String::from_utf8_lossy(key), error = %e,
                        "xattr not set");
                }
            }
        }
        rustix::fs::utimensat(
            dir,
            name,
            &timestamps(self.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    }

    fn apply_fd(&self, file: &File) -> io::Result<()> {
        rustix::fs::fchown(
            file,
            Some(rustix::fs::Uid::from_raw(self.uid)),
            Some(rustix::fs::Gid::from_raw(self.gid)),
        )?;
        rustix::fs::fchmod(file, os::mode(self.mode))?;
        for (key, value) in &self.xattrs {
            rustix::fs::fsetxattr(
                file,
                OsStr::from_bytes(key),
                value,
                rustix::fs::XattrFlags::empty(),
            )?;
        }
        rustix::fs::futimens(file, &timestamps(self.mtime))?;
        Ok(())
    }
}

fn timestamps(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// The entry path relative to the root: leading `/` and `.` dropped, `..` refused.
fn sanitize(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("path {} leaves the image root", path.display()),
                ))
            }
        }
    }
    Ok(out)
}

/// `(parent, name)`, or `None` for the root itself.
fn split(rel: &Path) -> Option<(&Path, &OsStr)> {
    Some((rel.parent()?, rel.file_name()?))
}

fn unpack_err(layer: &str, entry: &str, source: io::Error) -> ImageError {
    ImageError::Unpack {
        layer: layer.to_owned(),
        entry: entry.to_owned(),
        source,
    }
}

/// Opens directory `rel` inside the tree (symlinks resolved within it); with `create`, missing
/// directories are made (`0755 root:root`, as tar does for parents it was not given).
fn open_dir(root: &OwnedFd, rel: &Path, create: bool) -> io::Result<OwnedFd> {
    let path: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let open = || os::open_dir_in_root(root, path);
    let mut tries = 0;
    loop {
        match open() {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
            Err(rustix::io::Errno::NOENT) if create => {
                let (parent, name) = split(rel).ok_or_else(|| io::Error::other("no root"))?;
                let parent = open_dir(root, parent, true)?;
                match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                rustix::fs::chmodat(&parent, name, Mode::from_raw_mode(0o755), AtFlags::empty())?;
                return open().map_err(Into::into);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn lstat_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` in `dir` (recursively for a directory, never following symlinks); absent is
/// fine.
fn remove_all_at(dir: &impl AsFd, name: &OsStr) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        for child in children(&sub)? {
            remove_all_at(&sub, &child)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// The names in directory `dir` (an `O_RDONLY` fd), without `.` and `..`.
fn children(dir: &OwnedFd) -> io::Result<Vec<std::ffi::OsString>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            out.push(OsStr::from_bytes(bytes).to_owned());
        }
    }
    Ok(out)
}

/// For an opaque directory: removes everything under `dir_rel` that this layer did not create.
fn clear_except(dir: &OwnedFd, dir_rel: &Path, created: &HashSet<PathBuf>) -> io::Result<()> {
    let readable = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for name in children(&readable)? {
        let child_rel = dir_rel.join(&name);
        if !created.contains(&child_rel) {
            remove_all_at(&readable, &name)?;
        } else if let Some(st) = lstat_at(&readable, &name)? {
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                let sub = rustix::fs::openat(
                    &readable,
                    &name,
                    os::DIR_HANDLE | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                clear_except(&sub, &child_rel, created)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_refuses_parent_dirs() {
        assert_eq!(sanitize(Path::new("/a/./b")).unwrap(), PathBuf::from("a/b"));
        assert_eq!(sanitize(Path::new("./")).unwrap(), PathBuf::new());
        assert!(sanitize(Path::new("a/../../etc")).is_err());
    }
}
