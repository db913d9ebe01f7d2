//! SHA-256 of large host files — guest kernels, root filesystem images, agents — remembered
//! across processes, keyed by what `stat` says of the file.
//!
//! Every `Vm::start` needs these hashes for its snapshot cache key, and every CLI command is a
//! new process: hashing an 18 MiB kernel and a root filesystem image each time cost more than
//! the restore itself (native: tens of ms per 100 MiB; under emulation, hundreds). Build tools
//! do the same (git's index, ccache's direct mode, make): a file whose device, inode, size,
//! modification and change times are all unchanged is taken to hold the same bytes. The change
//! time (`ctime`) is set by the kernel on every write and `utimes`, so even a write that
//! restores the old modification time (`touch -d`) is noticed. That holds on local filesystems,
//! whose timestamps come from this kernel's clock; a FUSE or network filesystem reports what its
//! server says, and one that reports a stale or fixed `ctime` for changed contents defeats it.
//!
//! Only digests that can be trusted are remembered, in this process or on disk: the file was
//! read through one open descriptor whose stamp did not change while it was read, and its last
//! change was at least [`SETTLED`] before the read began (timestamps are coarse, so a second
//! write in the same tick, of the same size, would leave every stamp as it was: "racy git").
//! Files `stat` cannot describe — empty ones (`/proc` and `/sys` files report no size and keep
//! their stamp as their contents change), FIFOs, devices — are hashed every time.
//!
//! One entry per file path (`digests/<hash of the path>`), so a file rewritten in place
//! replaces its entry and the directory grows only with the number of distinct files hashed
//! (entries of files that are gone are pruned). An entry is only an optimisation: unreadable,
//! damaged or stale ones are hashed again.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

use crate::image::digest::{Digest, HashingReader};

/// How long before a read a file must have last changed for its digest to be remembered.
const SETTLED: Duration = Duration::from_secs(2);

/// What `stat` says of one version of a file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Stamp(String);

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp(format!(
            "v1 dev={} ino={} len={} mtime={}.{:09} ctime={}.{:09}",
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ))
    }
}

/// SHA-256 of the file at `path`, in hex: from this process's memory or the cache's `digests`
/// directory when the file's stamp is one recorded, else read and hashed (and remembered if
/// it can be trusted).
pub(crate) fn sha256_file_cached(path: &Path) -> std::io::Result<String> {
    static SEEN: Mutex<Option<HashMap<(PathBuf, Stamp), String>>> = Mutex::new(None);
    let path = std::fs::canonicalize(path)?;
    let meta = std::fs::metadata(&path)?;
    if !cacheable(&meta) {
        return sha256_file(&path);
    }
    let key = (path, Stamp::of(&meta));
    let remembered = SEEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|seen| seen.get(&key).cloned());
    if let Some(hex) = remembered {
        return Ok(hex);
    }
    let entries = super::dir("digests")
        .map_err(|error| tracing::debug!(%error, "no digest cache"))
        .ok();
    let (hex, trusted) = digest_via(entries.as_deref(), &key.0, &key.1)?;
    if trusted {
        SEEN.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(key, hex.clone());
    }
    Ok(hex)
}

/// Whether the digest of a file with this metadata may be remembered at all: a regular file
/// with contents (see the module docs).
pub(crate) fn cacheable(meta: &std::fs::Metadata) -> bool {
    meta.is_file() && meta.len() > 0
}

/// SHA-256 of the file at `path`, in hex, read now.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_reader(std::fs::File::open(path)?)
}

/// SHA-256 of everything `reader` yields, in hex (through the image store's hashing reader,
/// buffered in MiB reads: kernels and root filesystems are tens to hundreds of MiB).
fn sha256_reader(reader: impl Read) -> std::io::Result<String> {
    let buffered = std::io::BufReader::with_capacity(1 << 20, reader);
    let (digest, _len) = HashingReader::new(buffered).finish()?;
    Ok(digest.hex().to_owned())
}

/// The digest of `path` (canonical, at `stamp`) from its entry in `entries` if that records
/// this stamp, else read and hashed now, and recorded there if it can be trusted. Returns
/// whether it can (a recorded digest can).
fn digest_via(
    entries: Option<&Path>,
    path: &Path,
    stamp: &Stamp,
) -> std::io::Result<(String, bool)> {
    let entry = entries.map(|dir| entry_path(dir, path));
    if let Some(hex) = entry.as_deref().and_then(|entry| read_entry(entry, stamp)) {
        return Ok((hex, true));
    }
    let began = SystemTime::now();
    let mut file = std::fs::File::open(path)?;
    let before = file.metadata()?;
    let hex = sha256_reader(&mut file)?;
    let after = Stamp::of(&file.metadata()?);
    let trusted = Stamp::of(&before) == *stamp && after == *stamp && settled(&before, began);
    if let Some(entry) = entry.as_deref().filter(|_| trusted) {
        record(entry, path, stamp, &hex);
    }
    Ok((hex, trusted))
}

/// Whether the file last changed at least [`SETTLED`] before `began` (a change time in the
/// future, from a skewed clock, is not settled).
fn settled(meta: &std::fs::Metadata, began: SystemTime) -> bool {
    let changed = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(meta.ctime()).unwrap_or(0),
            u32::try_from(meta.ctime_nsec()).unwrap_or(0),
        );
    began
        .duration_since(changed)
        .is_ok_and(|age| age >= SETTLED)
}

/// The entry of `path` in `entries`: named by a hash of the path, one per file.
fn entry_path(entries: &Path, path: &Path) -> PathBuf {
    let name = Sha256::digest(path.as_os_str().as_encoded_bytes());
    entries.join(crate::image::digest::hex(&name[..16]))
}

/// The digest an entry records for `stamp`, if it is well formed and for that stamp.
fn read_entry(entry: &Path, stamp: &Stamp) -> Option<String> {
    let text = std::fs::read_to_string(entry).ok()?;
    let mut lines = text.lines();
    let (recorded, hex) = (lines.next()?, lines.next()?);
    let valid = recorded == stamp.0 && Digest::parse(&format!("sha256:{hex}")).is_ok();
    valid.then(|| hex.to_owned())
}

/// Records `hex` as the digest of `path` at `stamp`. Failing to record is only logged.
fn record(entry: &Path, path: &Path, stamp: &Stamp, hex: &str) {
    let text = format!("{}\n{hex}\n{}\n", stamp.0, path.display());
    if let Err(error) = super::write_atomically(entry, text.as_bytes()) {
        tracing::debug!(%error, entry = %entry.display(), "digest not remembered");
    }
    if let Some(entries) = entry.parent() {
        prune(entries);
    }
}

/// Entries kept before [`prune`] looks for dead ones.
const PRUNE_ABOVE: usize = 512;

/// Removes the entries of files that no longer exist once there are more than
/// [`PRUNE_ABOVE`] (temporary root filesystems, old kernels), so the directory stays small.
fn prune(entries: &Path) {
    let Ok(list) = std::fs::read_dir(entries) else {
        return;
    };
    // Entries only: not another process's temp file on its way to becoming one.
    let is_entry = |name: &std::ffi::OsStr| {
        name.to_str()
            .is_some_and(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let list: Vec<PathBuf> = list
        .flatten()
        .filter(|e| is_entry(&e.file_name()))
        .map(|e| e.path())
        .collect();
    if list.len() <= PRUNE_ABOVE {
        return;
    }
    for entry in list {
        let Ok(text) = std::fs::read_to_string(&entry) else {
            continue;
        };
        // The third line is the file's path (as `Path::display` wrote it).
        let dead = !text
            .lines()
            .nth(2)
            .is_some_and(|path| Path::new(path).exists());
        if dead {
            let _ = std::fs::remove_file(&entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        crate::image::digest::hex(&Sha256::digest(bytes))
    }

    fn stamp(path: &Path) -> Stamp {
        Stamp::of(&std::fs::metadata(path).unwrap())
    }

    /// Waits until a file just written counts as settled.
    fn settle() {
        std::thread::sleep(SETTLED + Duration::from_millis(100));
    }

    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn a_settled_file_is_remembered_and_a_rewrite_is_hashed_again() {
        let entries = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::canonicalize(dir.path()).unwrap().join("kernel");
        std::fs::write(&file, b"first").unwrap();
        settle();
        let first = stamp(&file);
        let digest = |stamp: &Stamp| digest_via(Some(entries.path()), &file, stamp).unwrap();
        assert_eq!(digest(&first), (sha(b"first"), true));
        assert_eq!(count(entries.path()), 1);
        // The entry answers for that stamp without reading the file: a file that is gone
        // still gets its recorded digest.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(digest(&first), (sha(b"first"), true));

        // Same size, new bytes: the stamp differs (ctime at least), so it is hashed again,
        // and not trusted while it is fresh.
        std::fs::write(&file, b"again").unwrap();
        let again = stamp(&file);
        assert_ne!(again, first);
        assert_eq!(digest(&again), (sha(b"again"), false));
        // A stamp taken before a change that the read then sees: hashed, neither trusted
        // nor recorded.
        settle();
        let elsewhere = tempfile::tempdir().unwrap();
        assert_eq!(
            digest_via(Some(elsewhere.path()), &file, &first).unwrap(),
            (sha(b"again"), false)
        );
        assert_eq!(count(elsewhere.path()), 0);
    }

    #[test]
    fn a_fresh_file_is_not_recorded_and_a_damaged_entry_is_ignored() {
        let entries = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("rootfs.ext4");
        std::fs::write(&file, b"fresh").unwrap();
        let fresh = digest_via(Some(entries.path()), &file, &stamp(&file)).unwrap();
        assert_eq!(fresh, (sha(b"fresh"), false));
        assert_eq!(count(entries.path()), 0, "too fresh");

        settle();
        let settled = stamp(&file);
        let entry = entry_path(entries.path(), &file);
        std::fs::write(&entry, format!("{}\nnot-a-digest\n", settled.0)).unwrap();
        assert_eq!(read_entry(&entry, &settled), None, "damaged");
        assert_eq!(
            digest_via(Some(entries.path()), &file, &settled).unwrap(),
            (sha(b"fresh"), true)
        );
        assert_eq!(
            read_entry(&entry, &settled),
            Some(sha(b"fresh")),
            "rewritten"
        );
        let other = Stamp(format!("{}x", settled.0));
        assert_eq!(read_entry(&entry, &other), None, "another version's stamp");
        // Without a cache directory it still hashes.
        assert_eq!(
            digest_via(None, &file, &settled).unwrap(),
            (sha(b"fresh"), true)
        );
    }

    #[test]
    fn only_regular_files_with_contents_are_cacheable() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let full = dir.path().join("full");
        std::fs::write(&full, b"x").unwrap();
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        assert!(cacheable(&meta(&full)));
        assert!(!cacheable(&meta(&empty)));
        assert!(!cacheable(&meta(dir.path())));
        assert!(!cacheable(&meta(Path::new("/dev/null"))));
    }

    #[test]
    fn pruning_keeps_the_entries_of_files_that_exist() {
        let entries = tempfile::tempdir().unwrap();
        let files = tempfile::tempdir().unwrap();
        let live = files.path().join("live-file");
        std::fs::write(&live, b"x").unwrap();
        let write = |name: String, path: &Path| {
            let text = format!("v1 stamp\n{}\n{}\n", "0".repeat(64), path.display());
            std::fs::write(entries.path().join(name), text).unwrap();
        };
        let entry_name = |i: usize| format!("{i:032x}");
        write(entry_name(0), &live);
        for i in 1..=PRUNE_ABOVE {
            write(entry_name(i), &files.path().join(format!("gone-{i}")));
        }
        // Not an entry's name (another process's temp file): left alone.
        std::fs::write(entries.path().join(".tmpXYZ"), b"partial").unwrap();
        prune(entries.path());
        let mut left: Vec<String> = std::fs::read_dir(entries.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".tmpXYZ".to_owned(), entry_name(0)]);
    }
}
