//! The content-addressed blob store: `<cache>/blobs/sha256/<hex>`, shared by every image source.
//!
//! Only verified content ever appears under `sha256/`: a blob is written to a file in
//! `blobs/tmp/` while its sha256 is computed, compared with the expected digest, synced, and
//! renamed into place (same filesystem, so the rename is atomic). Concurrent writers of one blob
//! are serialised by an `flock` on `blobs/locks/<hex>.lock`; the second one finds the blob present
//! and does nothing. Interrupted downloads leave `blobs/tmp/<hex>.partial`, which a later pull
//! resumes (HTTP range request) and which is trusted only once the whole blob hashes to its
//! digest; a mismatch deletes it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::digest::{Digest, Hasher, HashingWriter};
use super::error::ImageError;

/// The blob store under one cache root.
#[derive(Debug, Clone)]
pub(crate) struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    locks: PathBuf,
}

/// An exclusive `flock`, released on drop.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting off the async threads.
pub(crate) async fn lock_file(path: PathBuf) -> Result<FileLock, ImageError> {
    let what = format!("cannot lock {}", path.display());
    tokio::task::spawn_blocking(move || lock_file_blocking(&path))
        .await
        .map_err(|e| ImageError::io(what, io::Error::other(e)))?
}

/// Takes an exclusive `flock` on `path` (created if missing), blocking the calling thread.
pub(crate) fn lock_file_blocking(path: &Path) -> Result<FileLock, ImageError> {
    let locked = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .and_then(|file| {
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
            Ok(FileLock { _file: file })
        });
    locked.map_err(|e| ImageError::io(format!("cannot lock {}", path.display()), e))
}

/// Creates a directory of the cache (and its parents); the error names the setting that moves
/// the cache, as that is the usual fix.
pub(crate) fn create_cache_dir(dir: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(dir).map_err(|e| {
        ImageError::io(
            format!(
                "cannot create {} (see SUPERMACHINE_CACHE_DIR)",
                dir.display()
            ),
            e,
        )
    })
}

impl BlobStore {
    /// The store under `cache_root`, creating its directories.
    pub(crate) fn open(cache_root: &Path) -> Result<Self, ImageError> {
        let blobs = cache_root.join("blobs").join("sha256");
        let tmp = cache_root.join("blobs").join("tmp");
        let locks = cache_root.join("blobs").join("locks");
        for dir in [&blobs, &tmp, &locks] {
            create_cache_dir(dir)?;
        }
        Ok(BlobStore { blobs, tmp, locks })
    }

    /// Where the verified blob lives.
    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Whether the verified blob is present.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Where an interrupted download of `digest` is kept.
    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.tmp.join(format!("{}.partial", digest.hex()))
    }

    /// Serialises writers of one blob (across threads and processes).
    pub(crate) async fn lock(&self, digest: &Digest) -> Result<FileLock, ImageError> {
        lock_file(self.locks.join(format!("{}.lock", digest.hex()))).await
    }

    /// Reads a (small) verified blob: a config or a manifest.
    pub(crate) fn read(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        let path = self.path(digest);
        fs::read(&path)
            .map_err(|e| ImageError::io(format!("cannot read blob {}", path.display()), e))
    }

    /// Moves a fully downloaded and verified partial file into place.
    pub(crate) fn commit_partial(&self, digest: &Digest) -> Result<(), ImageError> {
        let partial = self.partial_path(digest);
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::rename(&partial, self.path(digest)))
            .map_err(|e| ImageError::io(format!("cannot store blob {digest}"), e))
    }

    /// Copies `reader` into the store, hashing it on the way, and returns its digest. With
    /// `expected`, a different digest is a [`ImageError::DigestMismatch`] and nothing is kept.
    /// Blocking: call from a blocking context.
    pub(crate) fn import(
        &self,
        what: &str,
        expected: Option<&Digest>,
        mut reader: impl Read,
    ) -> Result<Digest, ImageError> {
        if let Some(d) = expected {
            if self.contains(d) {
                // Content-addressed: the bytes are the same; drain nothing, keep the verified copy.
                return Ok(d.clone());
            }
        }
        let ctx =
            |e: io::Error| ImageError::io(format!("cannot store {what} in the blob store"), e);
        let tmp = tempfile::NamedTempFile::new_in(&self.tmp).map_err(ctx)?;
        let mut writer = HashingWriter {
            inner: io::BufWriter::with_capacity(1 << 20, tmp),
            hasher: Hasher::default(),
        };
        io::copy(&mut reader, &mut writer).map_err(ctx)?;
        writer.flush().map_err(ctx)?;
        let actual = writer.hasher.finish();
        if let Some(expected) = expected {
            if *expected != actual {
                // The temp file is deleted when dropped.
                return Err(ImageError::DigestMismatch {
                    what: what.to_owned(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        let tmp = writer.inner.into_inner().map_err(|e| ctx(e.into_error()))?;
        tmp.as_file().sync_all().map_err(ctx)?;
        tmp.persist(self.path(&actual)).map_err(|e| ctx(e.error))?;
        Ok(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_verifies_and_leaves_nothing_on_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let good = Digest::of(b"hello");
        let got = store
            .import("test blob", Some(&good), &b"hello"[..])
            .unwrap();
        assert_eq!(got, good);
        assert_eq!(store.read(&good).unwrap(), b"hello");

        let other = Digest::of(b"other");
        let err = store
            .import("test blob", Some(&other), &b"tampered"[..])
            .unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&other));
        assert!(!store.contains(&Digest::of(b"tampered")));
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("blobs/tmp"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
