//! The guest kernel and agent that `supermachine` boots, bundled for the architecture this crate
//! is compiled for, zstd-compressed, each checked against its recorded SHA-256 when unpacked.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! if let Some(kernel) = supermachine_guest::kernel() {
//!     let path = kernel.unpack(std::path::Path::new("/tmp/guest-cache"))?;
//!     println!("{} at {}", kernel.name(), path.display());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! A build without the artifacts (a fresh clone of the repository, before
//! `supermachine-guest/build-artifacts.sh`) bundles nothing: [`kernel`] and [`agent`] return
//! `None` and [`HOW_TO_BUILD`] says what to run.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[cfg(bundled)]
include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

#[cfg(all(bundled, target_arch = "x86_64"))]
mod files {
    pub(crate) const KERNEL_NAME: &str = "vmlinux";
    pub(crate) static KERNEL: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/artifacts/x86_64/kernel.zst"
    ));
    pub(crate) static AGENT: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/artifacts/x86_64/agent.zst"
    ));
}

#[cfg(all(bundled, target_arch = "aarch64"))]
mod files {
    pub(crate) const KERNEL_NAME: &str = "Image";
    pub(crate) static KERNEL: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/artifacts/aarch64/kernel.zst"
    ));
    pub(crate) static AGENT: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/artifacts/aarch64/agent.zst"
    ));
}

/// What to run to make the artifacts when this build has none.
pub const HOW_TO_BUILD: &str = "this build of supermachine-guest bundles no guest for this \
     architecture: run `supermachine-guest/build-artifacts.sh` in the supermachine repository \
     and rebuild, or point SUPERMACHINE_KERNEL / SUPERMACHINE_AGENT_BIN at your own";

/// One bundled file.
#[derive(Debug, Clone, Copy)]
pub struct Artifact {
    name: &'static str,
    sha256: &'static str,
    compressed: &'static [u8],
}

/// The guest kernel for this architecture (x86_64: ELF `vmlinux`; aarch64: `Image`), if bundled.
pub fn kernel() -> Option<Artifact> {
    #[cfg(all(bundled, any(target_arch = "x86_64", target_arch = "aarch64")))]
    return Some(Artifact {
        name: files::KERNEL_NAME,
        sha256: KERNEL_SHA256,
        compressed: files::KERNEL,
    });
    #[allow(unreachable_code)]
    None
}

/// The static in-guest agent for this architecture, if bundled.
pub fn agent() -> Option<Artifact> {
    #[cfg(all(bundled, any(target_arch = "x86_64", target_arch = "aarch64")))]
    return Some(Artifact {
        name: "supermachine-agent",
        sha256: AGENT_SHA256,
        compressed: files::AGENT,
    });
    #[allow(unreachable_code)]
    None
}

/// Unpacking an artifact failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The cache directory or the file could not be written.
    #[error("cannot unpack the bundled {name} into {dir}")]
    Io {
        /// The artifact.
        name: &'static str,
        /// Where it was going.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The unpacked bytes do not hash to the recorded SHA-256 (a damaged build).
    #[error("the bundled {name} is damaged: SHA-256 {actual}, recorded {expected}")]
    Checksum {
        /// The artifact.
        name: &'static str,
        /// Recorded.
        expected: &'static str,
        /// Found.
        actual: String,
    },
}

impl Artifact {
    /// The file name (`vmlinux`, `Image`, `supermachine-agent`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The SHA-256 of the uncompressed file, as lowercase hex.
    pub fn sha256(&self) -> &'static str {
        self.sha256
    }

    /// The compressed size in bytes.
    pub fn compressed_len(&self) -> usize {
        self.compressed.len()
    }

    /// The uncompressed file at `cache/<sha256>/<name>`: written (decompressed, checked, then
    /// renamed into place, mode 0755) the first time, found there afterwards. Blocking: tens of
    /// milliseconds for a kernel the first time.
    pub fn unpack(&self, cache: &Path) -> Result<PathBuf, UnpackError> {
        let dir = cache.join(self.sha256);
        let path = dir.join(self.name);
        if path.is_file() {
            return Ok(path);
        }
        let io_err = |source| UnpackError::Io {
            name: self.name,
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let mut file = tempfile::NamedTempFile::new_in(&dir).map_err(io_err)?;
        let mut decoder = zstd::stream::read::Decoder::new(self.compressed).map_err(io_err)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = decoder.read(&mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io_err)?;
        }
        let actual: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if actual != self.sha256 {
            return Err(UnpackError::Checksum {
                name: self.name,
                expected: self.sha256,
                actual,
            });
        }
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o755))
            .and_then(|()| file.as_file().sync_all())
            .map_err(io_err)?;
        // Another process may have unpacked the same bytes meanwhile: the rename replaces
        // them with identical ones.
        file.persist(&path).map_err(|e| io_err(e.error))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(data: &'static [u8], sha256: &'static str) -> Artifact {
        let compressed: &'static [u8] =
            Box::leak(zstd::encode_all(data, 3).unwrap().into_boxed_slice());
        Artifact {
            name: "file",
            sha256,
            compressed,
        }
    }

    /// The real bundled files, when this build has them: they unpack to their recorded hashes
    /// (checked by `unpack`). Prints the first-use unpack time.
    #[test]
    fn bundled_files_unpack_to_their_recorded_hashes() {
        let (Some(kernel), Some(agent)) = (kernel(), agent()) else {
            eprintln!("nothing bundled in this build: {HOW_TO_BUILD}");
            return;
        };
        let cache = tempfile::tempdir().unwrap();
        for artifact in [kernel, agent] {
            let started = std::time::Instant::now();
            let path = artifact.unpack(cache.path()).unwrap();
            let size = std::fs::metadata(&path).unwrap().len();
            println!(
                "{}: {} bytes compressed -> {size} bytes, unpacked and checked in {:.1} ms",
                artifact.name(),
                artifact.compressed_len(),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
    }

    #[test]
    fn unpacks_once_by_content_hash_and_checks_it() {
        let cache = tempfile::tempdir().unwrap();
        // sha256("hello\n")
        let good = artifact(
            b"hello\n",
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
        );
        let path = good.unpack(cache.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\n");
        assert!(path.starts_with(cache.path().join(good.sha256())));
        assert_eq!(good.unpack(cache.path()).unwrap(), path);

        let bad = artifact(
            b"tampered\n",
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be04",
        );
        let err = bad.unpack(cache.path()).unwrap_err();
        assert!(matches!(err, UnpackError::Checksum { .. }), "{err}");
        assert!(!cache.path().join(bad.sha256()).join("file").exists());
    }
}
