//! What an initramfs is made of, by digest — the layout, the agent, each extra file — so a VM
//! whose recipe was built before finds its archive in the cache without reading and packing
//! the agent again (and without hashing the archive: at every CLI start that cost more than
//! the restore, under emulation hundreds of ms).
//!
//! The recipe's digest names `initramfs/<digest>.recipe`, which records the archive's SHA-256
//! and length; the archive itself stays named by its content (`Initramfs::cached`). File
//! digests come from [`file_digest`], which trusts unchanged `stat` stamps. A recipe entry is
//! only an optimisation: a missing, damaged or dangling one means the archive is built.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Initramfs;
use crate::cache::{self, file_digest};
use crate::image::digest::hex;
use crate::vm::config::GuestFile;

/// One initramfs's inputs, by digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recipe {
    /// The agent's SHA-256, in hex.
    pub(crate) agent_sha256: String,
    /// SHA-256 (hex) of the whole recipe text.
    digest: String,
}

/// An archive a recipe was built into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Built {
    /// The archive in the cache.
    pub(crate) path: PathBuf,
    /// Its SHA-256, in hex.
    pub(crate) sha256: String,
}

impl Recipe {
    /// The recipe of an initramfs with `agent` as `/init` and `files` added, from the files'
    /// digests ([`file_digest`]); `None` if an input cannot be read (building the archive then
    /// reports why).
    pub(crate) fn of(agent: &Path, files: &[GuestFile]) -> Option<Recipe> {
        let agent_sha256 = file_digest::sha256_file_cached(agent).ok()?;
        let copied = files
            .iter()
            .map(|file| match file {
                GuestFile::Copy { host, .. } => {
                    file_digest::sha256_file_cached(host).ok().map(Some)
                }
                GuestFile::Symlink { .. } => Some(None),
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self::from_digests(agent_sha256, files, &copied))
    }

    /// The recipe with the agent's digest and, for each of `files` that is a copy, the
    /// digest of its contents (`copied`, one per file, `None` for symlinks).
    pub(crate) fn from_digests(
        agent_sha256: String,
        files: &[GuestFile],
        copied: &[Option<String>],
    ) -> Recipe {
        // The base layout's own bytes stand for this build's archive format: a change to
        // the layout or the writer changes every recipe.
        let layout = hex(&Sha256::digest(
            Initramfs::with_agent(Vec::new()).to_bytes(),
        ));
        let mut text = format!("initramfs recipe v1\nlayout {layout}\nagent {agent_sha256}\n");
        for (file, sha) in files.iter().zip(copied) {
            match (file, sha) {
                (GuestFile::Copy { guest, host, mode }, Some(sha)) => {
                    let mode = super::host_file_mode(host, *mode);
                    let _ = writeln!(text, "file {guest:?} {mode:o} {sha}");
                }
                (GuestFile::Copy { guest, .. }, None) => {
                    let _ = writeln!(text, "file {guest:?} unknown");
                }
                (GuestFile::Symlink { guest, target }, _) => {
                    let _ = writeln!(text, "symlink {guest:?} {target:?}");
                }
            }
        }
        Recipe {
            agent_sha256,
            digest: hex(&Sha256::digest(text.as_bytes())),
        }
    }

    /// The archive this recipe was built into before, if the cache still holds it.
    pub(crate) fn lookup(&self) -> Option<Built> {
        self.lookup_in(&cache::dir("initramfs").ok()?)
    }

    /// Records that this recipe built `built` (`len` bytes). Failing is only logged.
    pub(crate) fn record(&self, built: &Built, len: u64) {
        let recorded = cache::dir("initramfs").and_then(|dir| self.record_in(&dir, built, len));
        if let Err(error) = recorded {
            tracing::debug!(%error, "initramfs recipe not recorded");
        }
    }

    fn lookup_in(&self, dir: &Path) -> Option<Built> {
        let text = std::fs::read_to_string(self.entry(dir)).ok()?;
        let mut lines = text.lines();
        let (sha256, len) = (lines.next()?, lines.next()?.parse::<u64>().ok()?);
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let path = dir.join(Initramfs::cache_name(sha256));
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.len() == len)
            .then(|| Built {
                path,
                sha256: sha256.to_owned(),
            })
    }

    fn record_in(&self, dir: &Path, built: &Built, len: u64) -> std::io::Result<()> {
        let text = format!("{}\n{len}\n", built.sha256);
        cache::write_atomically(&self.entry(dir), text.as_bytes())
    }

    fn entry(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.recipe", &self.digest[..32]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(mode: Option<u32>) -> Vec<GuestFile> {
        vec![
            GuestFile::Copy {
                guest: "/etc/app.conf".into(),
                host: "/nonexistent/app.conf".into(),
                mode,
            },
            GuestFile::Symlink {
                guest: "/bin/sh".into(),
                target: "busybox".into(),
            },
        ]
    }

    #[test]
    fn a_recipe_names_every_input() {
        let copied = [Some("c".repeat(64)), None];
        let base = Recipe::from_digests("a".repeat(64), &files(Some(0o644)), &copied);
        assert_eq!(
            base,
            Recipe::from_digests("a".repeat(64), &files(Some(0o644)), &copied),
            "deterministic"
        );
        let other_agent = Recipe::from_digests("b".repeat(64), &files(Some(0o644)), &copied);
        let other_mode = Recipe::from_digests("a".repeat(64), &files(Some(0o600)), &copied);
        let other_file = Recipe::from_digests(
            "a".repeat(64),
            &files(Some(0o644)),
            &[Some("d".repeat(64)), None],
        );
        let no_files = Recipe::from_digests("a".repeat(64), &[], &[]);
        for other in [other_agent, other_mode, other_file, no_files] {
            assert_ne!(base.digest, other.digest);
        }
    }

    #[test]
    fn a_recorded_recipe_finds_its_archive_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = Recipe::from_digests("a".repeat(64), &[], &[]);
        assert_eq!(recipe.lookup_in(dir.path()), None, "nothing recorded");

        let sha256 = "e".repeat(64);
        let path = dir.path().join(Initramfs::cache_name(&sha256));
        let built = Built {
            path: path.clone(),
            sha256,
        };
        recipe.record_in(dir.path(), &built, 5).unwrap();
        assert_eq!(recipe.lookup_in(dir.path()), None, "the archive is missing");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(recipe.lookup_in(dir.path()), Some(built.clone()));
        std::fs::write(&path, b"123456").unwrap();
        assert_eq!(
            recipe.lookup_in(dir.path()),
            None,
            "the archive has another length"
        );

        std::fs::write(recipe.entry(dir.path()), "not a digest\n5\n").unwrap();
        assert_eq!(recipe.lookup_in(dir.path()), None, "a damaged entry");
        let other = Recipe::from_digests("b".repeat(64), &[], &[]);
        assert_eq!(other.lookup_in(dir.path()), None);
    }
}
