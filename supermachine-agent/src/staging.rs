//! Atomic file writes, shared by an exec's `stage_files` and the `write_file` control action.
//!
//! A file is written under a temporary name in its target directory and then renamed over the
//! target, so a reader sees either the old file or the complete new one, never a partial one.
//! No fsync: the guest's writable layer is a tmpfs overlay, and atomicity against concurrent
//! readers is what is promised, not durability.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use nix::unistd::{Gid, Uid};

/// Mode of a file written without an explicit one.
pub const DEFAULT_MODE: u32 = 0o644;

/// Permission bits a caller may set (with setuid/setgid/sticky).
const MODE_MASK: u32 = 0o7777;

/// Makes temp names unique within this process; the pid makes them unique across processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Checks that `path` names a file by absolute path; returns it as a `PathBuf`.
pub fn file_path(path: &str) -> Result<PathBuf, String> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err("path is not absolute".into());
    }
    if path.file_name().is_none() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return Err("path does not name a file".into());
    }
    Ok(path.to_owned())
}

/// Writes `contents` to `path` atomically, creating missing parent directories.
///
/// The file gets exactly `mode` (not reduced by the umask) and, with `owner`, that uid/gid.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(Uid, Gid)>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    fs::create_dir_all(dir)?;

    let (temp, mut file) = loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.{n}.tmp", std::process::id()));
        let temp = dir.join(temp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
        {
            Ok(file) => break (temp, file),
            // Left over from a crashed agent with a recycled pid: try the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };

    let written = (|| {
        file.write_all(contents)?;
        if let Some((uid, gid)) = owner {
            nix::unistd::fchown(&file, Some(uid), Some(gid))?;
        }
        // After fchown, which may clear setuid/setgid bits.
        file.set_permissions(Permissions::from_mode(mode & MODE_MASK))?;
        drop(file);
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// [`write_atomic`] on the blocking pool, so a large file does not stall every other exec on
/// the runtime thread.
pub async fn write_atomic_async(
    path: PathBuf,
    contents: Bytes,
    mode: u32,
    owner: Option<(Uid, Gid)>,
) -> io::Result<()> {
    tokio::task::spawn_blocking(move || write_atomic(&path, &contents, mode, owner))
        .await
        .map_err(|e| io::Error::other(format!("file writer task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_creates_parents_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/c.sh");
        write_atomic(&path, b"echo hi\n", 0o750, None).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"echo hi\n");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o750);
    }

    #[test]
    fn replaces_atomically_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"old contents").unwrap();
        // Keep the old inode open: an atomic replace leaves it untouched.
        let old = fs::File::open(&path).unwrap();
        let old_ino = old.metadata().unwrap().ino();
        write_atomic(&path, b"new", DEFAULT_MODE, None).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let new_meta = fs::metadata(&path).unwrap();
        assert_ne!(new_meta.ino(), old_ino, "the file was rewritten in place");
        assert_eq!(new_meta.mode() & 0o7777, 0o644);
        assert_eq!(
            io::read_to_string(old).unwrap(),
            "old contents",
            "a reader of the old file saw a partial write"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }

    #[test]
    fn failure_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: rename must fail.
        let target = dir.path().join("d");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"").unwrap();
        assert!(write_atomic(&target, b"data", DEFAULT_MODE, None).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn validates_paths() {
        assert!(file_path("relative/x").is_err());
        assert!(file_path("/").is_err());
        assert!(file_path("/tmp/dir/").is_err());
        assert_eq!(file_path("/tmp/x").unwrap(), PathBuf::from("/tmp/x"));
    }
}
