//! SHA-256 of large host files — guest kernels, root filesystem images, agents — remembered
//! across processes, keyed by what `stat` says of the file.
//!
//! Every `Vm::start` needs these hashes for its snapshot cache key, and every CLI command is a
//! new process: hashing an 18 MiB kernel and a root filesystem image each time cost more than
//! the restore itself (native: tens of ms per 100 MiB; under emulation, hundreds). Build tools
//! do the same (git's index, ccache's direct mode): a file whose device, inode, size,
//! modification and change times are all unchanged is taken to hold the same bytes. The change
//! time (`ctime`) cannot be set from user space, so even a write that restores the old
//! modification time (`touch -d`) is noticed.
//!
//! One entry per file path (`digests/<hash of the path>`), so a file rewritten in place
//! replaces its entry and the directory grows only with the number of distinct files hashed.
//! An entry is only an optimisation: unreadable, damaged or stale ones are hashed again.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Files changed less than this long before they were hashed are not remembered: timestamps
/// are coarse (a kernel tick on many filesystems), so a second write in the same tick, of the
/// same size, would leave every stamp as it was ("racy git").
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
/// directory when the file's stamp is the one recorded, else read and hashed (and recorded).
pub(crate) fn sha256_file_cached(path: &Path) -> std::io::Result<String> {
    static SEEN: Mutex<Option<HashMap<(PathBuf, Stamp), String>>> = Mutex::new(None);
    let path = std::fs::canonicalize(path)?;
    let stamp = Stamp::of(&std::fs::metadata(&path)?);
    let key = (path, stamp);
    let remembered = SEEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|seen| seen.get(&key).cloned());
    if let Some(hex) = remembered {
        return Ok(hex);
    }
    let (path, stamp) = &key;
    let entries = super::dir("digests")
        .map_err(|error| tracing::debug!(%error, "no digest cache"))
        .ok();
    let hex = digest_via(entries.as_deref(), path, stamp)?;
    SEEN.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key.clone(), hex.clone());
    Ok(hex)
}

/// SHA-256 of the file at `path`, in hex, read now.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::image::digest::hex(&h.finalize()))
}

/// The digest of `path` (canonical, at `stamp`) from its entry in `entries` if that records
/// this stamp, else read and hashed now and recorded there.
fn digest_via(entries: Option<&Path>, path: &Path, stamp: &Stamp) -> std::io::Result<String> {
    let entry = entries.map(|dir| entry_path(dir, path));
    if let Some(hex) = entry.as_deref().and_then(|entry| read_entry(entry, stamp)) {
        return Ok(hex);
    }
    let hex = sha256_file(path)?;
    if let Some(entry) = &entry {
        record(entry, path, stamp, &hex);
    }
    Ok(hex)
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
    let valid = recorded == stamp.0
        && hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    valid.then(|| hex.to_owned())
}

/// Records `hex` as the digest of `path` at `stamp`, if the file did not change while it was
/// hashed and has been settled long enough ([`SETTLED`]). Failing to record is only logged.
fn record(entry: &Path, path: &Path, stamp: &Stamp, hex: &str) {
    let Ok(now) = std::fs::metadata(path) else {
        return;
    };
    let changed = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(now.ctime()).unwrap_or(0),
            u32::try_from(now.ctime_nsec()).unwrap_or(0),
        );
    let settled = SystemTime::now()
        .duration_since(changed)
        .is_ok_and(|age| age >= SETTLED);
    if Stamp::of(&now) != *stamp || !settled {
        return;
    }
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
    let list: Vec<PathBuf> = list.flatten().map(|e| e.path()).collect();
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

    #[test]
    fn a_settled_file_is_remembered_and_a_rewrite_is_hashed_again() {
        let entries = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::canonicalize(dir.path()).unwrap().join("kernel");
        std::fs::write(&file, b"first").unwrap();
        settle();
        let first = stamp(&file);
        assert_eq!(
            digest_via(Some(entries.path()), &file, &first).unwrap(),
            sha(b"first")
        );
        assert_eq!(std::fs::read_dir(entries.path()).unwrap().count(), 1);
        // The entry answers for that stamp without reading the file: a file that is gone
        // still gets its recorded digest.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            digest_via(Some(entries.path()), &file, &first).unwrap(),
            sha(b"first")
        );

        // Same size, new bytes: the stamp differs (ctime at least), so it is hashed again.
        std::fs::write(&file, b"again").unwrap();
        let again = stamp(&file);
        assert_ne!(again, first);
        assert_eq!(
            digest_via(Some(entries.path()), &file, &again).unwrap(),
            sha(b"again")
        );
        // Through the public entry point too (the real cache directory is not touched: the
        // file is too fresh to be recorded).
        assert_eq!(sha256_file_cached(&file).unwrap(), sha(b"again"));
    }

    #[test]
    fn a_fresh_file_is_not_recorded_and_a_damaged_entry_is_ignored() {
        let entries = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("rootfs.ext4");
        std::fs::write(&file, b"fresh").unwrap();
        digest_via(Some(entries.path()), &file, &stamp(&file)).unwrap();
        assert_eq!(
            std::fs::read_dir(entries.path()).unwrap().count(),
            0,
            "too fresh"
        );

        settle();
        let settled = stamp(&file);
        let entry = entry_path(entries.path(), &file);
        std::fs::write(&entry, format!("{}\nnot-a-digest\n", settled.0)).unwrap();
        assert_eq!(read_entry(&entry, &settled), None, "damaged");
        assert_eq!(
            digest_via(Some(entries.path()), &file, &settled).unwrap(),
            sha(b"fresh")
        );
        assert_eq!(
            read_entry(&entry, &settled),
            Some(sha(b"fresh")),
            "rewritten"
        );
        let other = Stamp(format!("{}x", settled.0));
        assert_eq!(read_entry(&entry, &other), None, "another version's stamp");
        // Without a cache directory it still hashes.
        assert_eq!(digest_via(None, &file, &settled).unwrap(), sha(b"fresh"));
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
        write("kept".into(), &live);
        for i in 0..PRUNE_ABOVE {
            write(format!("dead-{i}"), &files.path().join(format!("gone-{i}")));
        }
        prune(entries.path());
        let left: Vec<String> = std::fs::read_dir(entries.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["kept"]);
    }
}
