//! [`Snapshot`]: a booted VM saved to a directory, and what makes a snapshot trustworthy.
//!
//! A snapshot directory holds the VMM's `vmstate` and `memory` files (see
//! `supermachine_vmm::snapshot`) and this crate's `meta.json`: the format version and the
//! VM's identity — hashes of the kernel, the agent and the initramfs, vCPU count, memory size
//! and guest command line. [`Snapshot::open`] checks everything that is cheap to check
//! (metadata, the state's checksum and format version, the memory file's size) and never reads
//! the memory file, which restores map lazily; [`Snapshot::verify_memory`] is the explicit,
//! slow check of the memory file's contents.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use supermachine_vmm::snapshot::{format, MachineState, MEMORY_FILE, VMSTATE_FILE};

use super::config::VmConfig;
use crate::cache::file_digest;
use crate::error::Error;
use crate::image::digest::hex;
use crate::image::ImageConfig;

/// The metadata file's name in a snapshot directory.
pub const META_FILE: &str = "meta.json";
/// Version of `meta.json`'s layout, of what a snapshot directory contains, and of how a restore
/// talks to the snapshot's agent. 2: restores send the reseed as a preamble on the first
/// requests (SEMANTICS.md `restored`), which the agents in version 1 snapshots answered as an
/// exchange of its own, closing the connection the request was on.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;

/// What a snapshot was made from. Two VMs with the same identity boot to the same state, so
/// the identity is also the snapshot cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) kernel_sha256: String,
    pub(crate) agent_sha256: String,
    pub(crate) initramfs_sha256: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
    /// What the VM adds to the kernel command line (passed to the VMM).
    pub(crate) cmdline: String,
    /// What the VMM always adds on this host (base parameters, PVM workarounds).
    pub(crate) platform_cmdline: String,
    /// The root filesystem image, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rootfs: Option<RootfsIdentity>,
}

/// A root filesystem image: where it is, its content hash, and the file metadata that lets a
/// restore skip re-hashing it when nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RootfsIdentity {
    pub(crate) path: PathBuf,
    pub(crate) sha256: String,
    pub(crate) len: u64,
    pub(crate) mtime_ns: i64,
    pub(crate) ino: u64,
}

impl RootfsIdentity {
    /// Hashes the image at `path` (cached per process by file metadata).
    pub(crate) fn of(path: &Path) -> std::io::Result<RootfsIdentity> {
        use std::os::unix::fs::MetadataExt;
        let path = std::fs::canonicalize(path)?;
        let m = std::fs::metadata(&path)?;
        Ok(RootfsIdentity {
            sha256: file_digest::sha256_file_cached(&path)?,
            len: m.len(),
            mtime_ns: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            ino: m.ino(),
            path,
        })
    }

    /// Checks that the image is still the one hashed: by metadata when that is unchanged,
    /// else by hashing it again.
    pub(crate) fn check_unchanged(&self) -> Result<(), SnapshotError> {
        let now = Self::of_metadata(&self.path).map_err(SnapshotError::io(&self.path))?;
        if (now.0, now.1, now.2) == (self.len, self.mtime_ns, self.ino) {
            return Ok(());
        }
        let sha256 = file_digest::sha256_file(&self.path).map_err(SnapshotError::io(&self.path))?;
        if sha256 == self.sha256 {
            return Ok(());
        }
        Err(SnapshotError::Mismatch {
            what: "root filesystem image (sha256)",
            snapshot: self.sha256.clone(),
            requested: sha256,
        })
    }

    fn of_metadata(path: &Path) -> std::io::Result<(u64, i64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok((
            m.len(),
            m.mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            m.ino(),
        ))
    }
}

impl Identity {
    /// The cache key: a hash over every field and the format versions.
    pub(crate) fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "supermachine-snapshot meta={SNAPSHOT_FORMAT_VERSION} vmstate={}\n",
            format::FORMAT_VERSION
        ));
        for field in [
            &self.kernel_sha256,
            &self.agent_sha256,
            &self.initramfs_sha256,
            &self.vcpus.to_string(),
            &self.memory_mib.to_string(),
            &self.cmdline,
            &self.platform_cmdline,
            &self
                .rootfs
                .as_ref()
                .map_or_else(String::new, |r| r.sha256.clone()),
        ] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        hex(&h.finalize()[..16])
    }

    /// The first field in which `self` (the snapshot) differs from `wanted`.
    fn mismatch(&self, wanted: &Identity) -> Option<SnapshotError> {
        let diff = |what: &'static str, snapshot: String, requested: String| {
            Some(SnapshotError::Mismatch {
                what,
                snapshot,
                requested,
            })
        };
        if self.kernel_sha256 != wanted.kernel_sha256 {
            return diff(
                "kernel (sha256)",
                self.kernel_sha256.clone(),
                wanted.kernel_sha256.clone(),
            );
        }
        if self.agent_sha256 != wanted.agent_sha256 {
            return diff(
                "agent (sha256)",
                self.agent_sha256.clone(),
                wanted.agent_sha256.clone(),
            );
        }
        if self.vcpus != wanted.vcpus {
            return diff("vCPUs", self.vcpus.to_string(), wanted.vcpus.to_string());
        }
        if self.memory_mib != wanted.memory_mib {
            return diff(
                "memory (MiB)",
                self.memory_mib.to_string(),
                wanted.memory_mib.to_string(),
            );
        }
        if self.initramfs_sha256 != wanted.initramfs_sha256 {
            return diff(
                "initramfs contents (sha256; extra files)",
                self.initramfs_sha256.clone(),
                wanted.initramfs_sha256.clone(),
            );
        }
        let rootfs_hash = |r: &Option<RootfsIdentity>| {
            r.as_ref()
                .map_or_else(|| "none".to_owned(), |r| r.sha256.clone())
        };
        if rootfs_hash(&self.rootfs) != rootfs_hash(&wanted.rootfs) {
            return diff(
                "root filesystem image (sha256)",
                rootfs_hash(&self.rootfs),
                rootfs_hash(&wanted.rootfs),
            );
        }
        if self.platform_cmdline != wanted.platform_cmdline {
            return diff(
                "host kernel parameters (VMM base and PVM workarounds)",
                self.platform_cmdline.clone(),
                wanted.platform_cmdline.clone(),
            );
        }
        if self.cmdline != wanted.cmdline {
            return diff(
                "guest kernel command line",
                self.cmdline.clone(),
                wanted.cmdline.clone(),
            );
        }
        None
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format_version: u32,
    supermachine_version: String,
    created_unix: u64,
    /// Digest of the memory file as written (SHA-256 over its non-zero pages and their
    /// offsets), for [`Snapshot::verify_memory`].
    memory_sha256: String,
    #[serde(flatten)]
    identity: Identity,
    /// The OCI image config the VM runs (its exec defaults), when it runs an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<ImageConfig>,
}

/// A snapshot could not be taken, opened or restored: the VMM's error type, shared so that
/// nothing is lost between the layers.
pub use supermachine_vmm::snapshot::SnapshotError;

impl From<SnapshotError> for Error {
    fn from(e: SnapshotError) -> Self {
        Error::Snapshot(e)
    }
}

/// A snapshot directory that passed [`Snapshot::open`]'s checks; restore it with
/// [`Vm::restore`](crate::Vm::restore).
#[derive(Debug, Clone)]
pub struct Snapshot {
    dir: PathBuf,
    meta: Meta,
    /// The checked `vmstate`, kept so a restore does not read and hash it again.
    state: std::sync::Arc<MachineState>,
}

impl Snapshot {
    /// Opens the snapshot in `dir` and checks it: `meta.json` readable and of this format
    /// version, `vmstate` intact (magic, version, checksum) and consistent with the metadata,
    /// and `memory` exactly the VM's RAM size. The memory file's contents are not read (see
    /// [`verify_memory`](Self::verify_memory)). The files are read on the blocking pool.
    pub async fn open(dir: impl AsRef<Path>) -> Result<Snapshot, Error> {
        let dir = dir.as_ref().to_owned();
        super::blocking(move || Self::open_blocking(&dir)).await
    }

    /// [`open`](Self::open) on the calling thread.
    pub(crate) fn open_blocking(dir: &Path) -> Result<Snapshot, Error> {
        Ok(Self::open_inner(dir)?)
    }

    fn open_inner(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let meta_path = dir.join(META_FILE);
        let bytes = std::fs::read(&meta_path).map_err(SnapshotError::io(&meta_path))?;
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let version: Version =
            serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Corrupt {
                path: meta_path.clone(),
                why: e.to_string(),
            })?;
        if version.format_version != SNAPSHOT_FORMAT_VERSION {
            return Err(SnapshotError::FormatVersion {
                found: version.format_version,
                supported: SNAPSHOT_FORMAT_VERSION,
            });
        }
        let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Corrupt {
            path: meta_path.clone(),
            why: e.to_string(),
        })?;

        let state_path = dir.join(VMSTATE_FILE);
        let state_bytes = std::fs::read(&state_path).map_err(SnapshotError::io(&state_path))?;
        let state = format::decode(&state_bytes, &state_path)?;
        if state.config.vcpus != meta.identity.vcpus
            || state.config.memory_mib != meta.identity.memory_mib
        {
            return Err(SnapshotError::Corrupt {
                path: state_path,
                why: format!(
                    "it describes {} vCPUs and {} MiB, {META_FILE} {} vCPUs and {} MiB",
                    state.config.vcpus,
                    state.config.memory_mib,
                    meta.identity.vcpus,
                    meta.identity.memory_mib
                ),
            });
        }

        let memory_path = dir.join(MEMORY_FILE);
        let found = std::fs::metadata(&memory_path)
            .map_err(SnapshotError::io(&memory_path))?
            .len();
        let expected = u64::from(meta.identity.memory_mib) << 20;
        if found != expected {
            return Err(SnapshotError::MemoryTruncated {
                path: memory_path,
                expected,
                found,
            });
        }
        Ok(Snapshot {
            dir: dir.to_owned(),
            meta,
            state: std::sync::Arc::new(state),
        })
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VM's vCPU count.
    pub fn vcpus(&self) -> u32 {
        self.meta.identity.vcpus
    }

    /// The VM's RAM in MiB.
    pub fn memory_mib(&self) -> u32 {
        self.meta.identity.memory_mib
    }

    pub(crate) fn state(&self) -> &MachineState {
        &self.state
    }

    pub(crate) fn identity(&self) -> &Identity {
        &self.meta.identity
    }

    /// The config of the OCI image the VM runs, if it runs one (digest, `Env`, `WorkingDir`,
    /// `User`, `Entrypoint`, `Cmd`, ...); restored VMs keep using it as their exec defaults.
    pub fn image_config(&self) -> Option<&ImageConfig> {
        self.meta.image.as_ref()
    }

    /// Checks that this snapshot is of the VM `config` describes: same kernel and agent
    /// (by content hash), vCPUs, memory, extra files and guest command line. Fails with
    /// [`SnapshotError::Mismatch`] naming the first difference. Reads and hashes the kernel
    /// and agent (hashes are cached per process) on the blocking pool.
    pub async fn check_matches(&self, config: &VmConfig) -> Result<(), Error> {
        let config = config.clone();
        let wanted = super::blocking(move || super::identity_of(&config)).await?;
        match self.meta.identity.mismatch(&wanted) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Reads the whole memory file and checks it against the hash taken when the snapshot was
    /// written ([`SnapshotError::MemoryChanged`] otherwise). Slow (it reads all of RAM, on
    /// the blocking pool), so restores never do it.
    pub async fn verify_memory(&self) -> Result<(), Error> {
        let path = self.dir.join(MEMORY_FILE);
        let expected = self.meta.memory_sha256.clone();
        super::blocking(move || {
            let digest =
                supermachine_vmm::memory::sparse_digest(&path).map_err(SnapshotError::io(&path))?;
            if hex(&digest) != expected {
                return Err(SnapshotError::MemoryChanged { path }.into());
            }
            Ok(())
        })
        .await
    }
}

/// Writes `meta.json` for a snapshot just taken into `dir`, whose memory file has the digest
/// `memory_sha256`.
pub(crate) fn write_meta(
    dir: &Path,
    identity: &Identity,
    image: Option<&ImageConfig>,
    memory_sha256: &[u8; 32],
) -> Result<(), SnapshotError> {
    let memory_sha256 = hex(memory_sha256);
    let meta = Meta {
        format_version: SNAPSHOT_FORMAT_VERSION,
        supermachine_version: env!("CARGO_PKG_VERSION").to_owned(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        memory_sha256,
        identity: identity.clone(),
        image: image.cloned(),
    };
    let path = dir.join(META_FILE);
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| SnapshotError::Encode(Box::new(e)))?;
    std::fs::write(&path, json).map_err(SnapshotError::io(&path))
}

/// SHA-256 of bytes, in hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            kernel_sha256: "k".into(),
            agent_sha256: "a".into(),
            initramfs_sha256: "i".into(),
            vcpus: 1,
            memory_mib: 256,
            cmdline: "quiet".into(),
            platform_cmdline: "console=ttyS0".into(),
            rootfs: None,
        }
    }

    #[test]
    fn key_covers_every_field() {
        let base = identity();
        let mut keys = vec![base.key()];
        let mut changed = base.clone();
        changed.kernel_sha256 = "k2".into();
        keys.push(changed.key());
        let mut changed = base.clone();
        changed.agent_sha256 = "a2".into();
        keys.push(changed.key());
        let mut changed = base.clone();
        changed.memory_mib = 512;
        keys.push(changed.key());
        let mut changed = base.clone();
        changed.cmdline = "quiet x".into();
        keys.push(changed.key());
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 5);
    }

    #[test]
    fn mismatch_names_the_field() {
        let mut other = identity();
        other.agent_sha256 = "b".into();
        let err = identity().mismatch(&other).expect("differs");
        assert!(err.to_string().contains("agent"), "{err}");
        assert!(identity().mismatch(&identity()).is_none());
    }
}
