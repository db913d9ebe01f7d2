//! The on-disk cache (`~/.cache/supermachine`): where derived artefacts such as initramfs
//! archives are kept, keyed by content hash, and the digests of large host files
//! (`digests/`, see `file_digest`).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub(crate) mod file_digest;

/// Environment variable overriding the cache root.
pub const CACHE_DIR_ENV: &str = "SUPERMACHINE_CACHE_DIR";

/// The cache root: `$SUPERMACHINE_CACHE_DIR`, else the host's convention
/// ([`os`](crate::os): `$XDG_CACHE_HOME/supermachine` or `$HOME/.cache/supermachine` on Linux,
/// `$HOME/Library/Caches/supermachine` on macOS).
pub fn root() -> io::Result<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty(CACHE_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    match crate::os::default_cache_dir() {
        Some(dir) => Ok(dir),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no cache directory: set {CACHE_DIR_ENV} or HOME"),
        )),
    }
}

/// Environment variable overriding the install directory.
pub const INSTALL_DIR_ENV: &str = "SUPERMACHINE_INSTALL_DIR";

/// Where `setup.sh` installs the guest kernel (`vmlinux`) and agent (`supermachine-agent`),
/// which [`VmConfig`](crate::VmConfig) uses when neither a path nor `SUPERMACHINE_KERNEL` /
/// `SUPERMACHINE_AGENT_BIN` is given: `$SUPERMACHINE_INSTALL_DIR`, else the host's convention
/// ([`os`](crate::os): `$XDG_DATA_HOME/supermachine` or `$HOME/.local/share/supermachine` on
/// Linux, `$HOME/Library/Application Support/supermachine` on macOS).
pub fn install_dir() -> Option<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty(INSTALL_DIR_ENV) {
        return Some(PathBuf::from(dir));
    }
    crate::os::default_install_dir()
}

/// `root()/name`, created if missing.
pub(crate) fn dir(name: &str) -> io::Result<PathBuf> {
    let dir = root()?.join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `bytes` to `path` through a unique temp file in the same directory and a rename, so
/// readers never see a partial file and concurrent writers of the same content do not collide.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "cache path has no parent"))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
