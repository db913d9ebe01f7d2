//! One read-only ext4 image per image, cached as `<cache>/rootfs/<config hex>.ext4` with the
//! [`ImageConfig`](super::ImageConfig) as `<config hex>.json` beside it.
//!
//! The layers are applied (see [`super::layers`]) to a scratch directory in the cache, which
//! `mkfs.ext4 -d` copies into a new filesystem image. Why `mkfs.ext4 -d`: e2fsprogs is on every
//! Linux host, its `-d` copy keeps modes, owners, hardlinks, symlinks, xattrs and device nodes,
//! and its output is what the guest kernel's ext4 driver is tested against; no pure-Rust ext4
//! writer is maintained well enough to trust with that. As root the scratch tree holds the real
//! owners and device nodes and `-d` copies them; as any other user the tree holds this user's
//! files, the layers' owners, modes, xattrs and device nodes are recorded per inode, and
//! [`super::rootless`] writes them into the image with `debugfs` (a user namespace would map only
//! one uid). Both give the same image (`tests/image.rs` compares them).
//!
//! The image is sized from the tree (data blocks, directories, long symlinks, inodes) plus
//! headroom, made without a journal (it is never written), written to a temp file and renamed
//! into place; concurrent builds of one image are serialised by an `flock`.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::digest::Digest;
use super::error::ImageError;
use super::layers::{Ownership, Tree};
use super::store::{create_cache_dir, lock_file, BlobStore};
use super::{blocking, Image};

const BLOCK: u64 = 4096;

/// A built rootfs image.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rootfs {
    /// The ext4 image (read-only; attach it read-only).
    pub path: PathBuf,
    /// The image config as JSON ([`ImageConfig`](super::ImageConfig)).
    pub config_path: PathBuf,
    /// The file's size in bytes (the filesystem size).
    pub size: u64,
    /// The bytes it occupies on disk (it is sparse).
    pub allocated: u64,
    /// It came from the cache; nothing was built.
    pub reused: bool,
}

fn paths(image: &Image) -> Result<(PathBuf, PathBuf, PathBuf, String), ImageError> {
    let digest =
        Digest::parse(image.digest()).map_err(|e| ImageError::invalid(image.source(), e))?;
    let dir = image.cache_dir().join("rootfs");
    let hex = digest.hex().to_owned();
    Ok((
        dir.join(format!("{hex}.ext4")),
        dir.join(format!("{hex}.json")),
        dir,
        hex,
    ))
}

fn existing(ext4: &Path, json: &Path) -> Option<Rootfs> {
    let meta = fs::metadata(ext4).ok()?;
    if !json.is_file() {
        return None;
    }
    Some(Rootfs {
        path: ext4.to_owned(),
        config_path: json.to_owned(),
        size: meta.len(),
        allocated: meta.blocks() * 512,
        reused: true,
    })
}

pub(crate) fn cached(image: &Image) -> Option<Rootfs> {
    let (ext4, json, _, _) = paths(image).ok()?;
    existing(&ext4, &json)
}

pub(crate) async fn build(image: &Image) -> Result<Rootfs, ImageError> {
    let (ext4, json, dir, hex) = paths(image)?;
    if let Some(found) = existing(&ext4, &json) {
        return Ok(found);
    }
    create_cache_dir(&dir)?;
    let _lock = lock_file(dir.join(format!("{hex}.lock"))).await?;
    if let Some(found) = existing(&ext4, &json) {
        return Ok(found);
    }
    let image = image.clone();
    blocking(move || build_blocking(&image, &ext4, &json, &dir)).await
}

fn build_blocking(
    image: &Image,
    ext4: &Path,
    json: &Path,
    dir: &Path,
) -> Result<Rootfs, ImageError> {
    let started = Instant::now();
    let store = BlobStore::open(image.cache_dir())?;
    let scratch = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(dir)
        .map_err(|e| {
            ImageError::io(
                format!("cannot create a scratch dir in {}", dir.display()),
                e,
            )
        })?;
    let tree_dir = scratch.path().join("tree");
    fs::create_dir(&tree_dir)
        .map_err(|e| ImageError::io(format!("cannot create {}", tree_dir.display()), e))?;
    let ownership = if rustix::process::geteuid().is_root() {
        Ownership::Apply
    } else {
        Ownership::Record
    };
    let mut tree = Tree::new(&tree_dir, ownership)
        .map_err(|e| ImageError::io(format!("cannot open {}", tree_dir.display()), e))?;
    for (i, layer) in image.layers().iter().enumerate() {
        let digest =
            Digest::parse(&layer.digest).map_err(|e| ImageError::invalid(image.source(), e))?;
        let blob = store.path(&digest);
        if !blob.is_file() {
            return Err(ImageError::NotFound {
                reference: image.source().to_owned(),
                detail: format!("layer {digest} is no longer in the blob store; pull again"),
            });
        }
        let stats = tree.apply_layer(&blob, &layer.digest, image.diff_ids.get(i))?;
        tracing::debug!(layer = %layer.digest, ?stats, "layer applied");
    }
    let recorded = tree.finish();
    let unpacked = started.elapsed();

    let usage = measure(&tree_dir)
        .map_err(|e| ImageError::io(format!("cannot measure {}", tree_dir.display()), e))?;
    let config_json = serde_json::to_vec_pretty(image.config())
        .map_err(|e| ImageError::io("cannot encode the image config", e.into()))?;
    let mut size = usage.image_bytes();
    let mut attempt = 0;
    let tmp = loop {
        let tmp = tempfile::Builder::new()
            .prefix(".rootfs-")
            .suffix(".ext4")
            .tempfile_in(dir)
            .map_err(|e| {
                ImageError::io(format!("cannot create a temp file in {}", dir.display()), e)
            })?;
        tmp.as_file()
            .set_len(size)
            .map_err(|e| ImageError::io("cannot size the rootfs image", e))?;
        match mkfs(&tree_dir, tmp.path(), usage.inodes) {
            Ok(()) => break tmp,
            Err(MkfsFailure::NoSpace(stderr)) if attempt < 3 => {
                tracing::debug!(size, stderr, "rootfs image too small; retrying larger");
                attempt += 1;
                size *= 2;
            }
            Err(MkfsFailure::NoSpace(stderr)) | Err(MkfsFailure::Other(stderr)) => {
                return Err(ImageError::Mkfs {
                    status: "failed".into(),
                    stderr,
                })
            }
            Err(MkfsFailure::Spawn(e)) => {
                return Err(ImageError::Mkfs {
                    status: format!("cannot run mkfs.ext4: {e}"),
                    stderr: String::new(),
                })
            }
        }
    };
    if ownership == Ownership::Record {
        super::rootless::apply(
            &tree_dir,
            tmp.path(),
            &recorded,
            scratch.path(),
            &path_with_sbin(),
        )?;
    }
    tmp.as_file()
        .sync_all()
        .and_then(|()| fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o444)))
        .map_err(|e| ImageError::io("cannot finish the rootfs image", e))?;
    crate::cache::write_atomically(json, &config_json)
        .map_err(|e| ImageError::io(format!("cannot write {}", json.display()), e))?;
    tmp.persist(ext4)
        .map_err(|e| ImageError::io(format!("cannot write {}", ext4.display()), e.error))?;
    let meta = fs::metadata(ext4)
        .map_err(|e| ImageError::io(format!("cannot stat {}", ext4.display()), e))?;
    tracing::info!(
        image = image.digest(),
        rootless = ownership == Ownership::Record,
        unpack_ms = unpacked.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        tree_bytes = usage.data_blocks * BLOCK,
        image_bytes = meta.len(),
        "rootfs built"
    );
    // `scratch` (the unpacked tree) is removed when dropped.
    Ok(Rootfs {
        path: ext4.to_owned(),
        config_path: json.to_owned(),
        size: meta.len(),
        allocated: meta.blocks() * 512,
        reused: false,
    })
}

/// What the tree needs in an ext4 filesystem.
#[derive(Debug, Default)]
struct Usage {
    data_blocks: u64,
    inodes: u64,
}

impl Usage {
    /// Blocks for data and metadata, 256-byte inodes, plus 10% and 16 MiB of headroom for the
    /// filesystem's own structures (group descriptors, bitmaps, extent trees).
    fn image_bytes(&self) -> u64 {
        let bytes = self.data_blocks * BLOCK + self.inodes * 256;
        let size = bytes + bytes / 10 + 16 * 1024 * 1024;
        size.div_ceil(BLOCK) * BLOCK
    }
}

fn measure(root: &Path) -> std::io::Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        usage.inodes += 1;
        let mut dir_bytes = 0u64;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            dir_bytes += entry.file_name().len() as u64 + 12;
            if meta.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if !seen.insert(meta.ino()) {
                continue; // another name of a hardlinked inode
            }
            usage.inodes += 1;
            if meta.is_file() || (meta.file_type().is_symlink() && meta.len() >= 60) {
                usage.data_blocks += meta.len().div_ceil(BLOCK);
            }
        }
        usage.data_blocks += dir_bytes.div_ceil(BLOCK).max(1);
    }
    Ok(usage)
}

enum MkfsFailure {
    NoSpace(String),
    Other(String),
    Spawn(std::io::Error),
}

fn mkfs(tree: &Path, image: &Path, inodes: u64) -> Result<(), MkfsFailure> {
    let inodes = inodes + inodes / 10 + 256;
    let output = Command::new("mkfs.ext4")
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "rootfs",
        ])
        .args(["-O", "^has_journal,^resize_inode"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(image)
        .env("PATH", path_with_sbin())
        .output()
        .map_err(MkfsFailure::Spawn)?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = format!(
        "{} ({})",
        String::from_utf8_lossy(&output.stderr).trim(),
        output.status
    );
    let lower = stderr.to_lowercase();
    if lower.contains("no space")
        || lower.contains("could not allocate")
        || lower.contains("no free space")
    {
        Err(MkfsFailure::NoSpace(stderr))
    } else {
        Err(MkfsFailure::Other(stderr))
    }
}

/// `$PATH` plus the sbin directories, where `mkfs.ext4` lives but which a non-login shell may not
/// have.
fn path_with_sbin() -> String {
    let mut path = std::env::var("PATH").unwrap_or_default();
    for dir in ["/usr/sbin", "/sbin"] {
        if !path.split(':').any(|p| p == dir) {
            if !path.is_empty() {
                path.push(':');
            }
            path.push_str(dir);
        }
    }
    path
}
