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
use std::sync::OnceLock;

use sha2::{Digest as _, Sha256};

use super::Initramfs;
use crate::cache::{self, file_digest};
use crate::image::digest::{hex, Digest};
use crate::vm::config::GuestFile;

/// Bumped whenever what a recipe stands for changes in a way [`format_digest`] cannot see.
const RECIPE_VERSION: &str = "v2";

/// SHA-256 (hex) of a sample archive: the base layout plus a nested file with its own mode and
/// a symlink. Its bytes stand for this build's archive format (the layout, how parents are
/// made, how paths are normalised, how each kind of entry is written), so a build that packs
/// archives differently gets different recipes and does not reuse older builds' archives.
/// Computed once per process.
fn format_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(sample_digest)
}

fn sample_digest() -> String {
    let mut sample = Initramfs::with_agent(b"agent".to_vec());
    let added = sample
        .add(
            "/sample/dir/file",
            super::Entry::File {
                mode: 0o640,
                contents: b"file".to_vec(),
            },
        )
        .and_then(|()| {
            sample.add(
                "/sample/link",
                super::Entry::Symlink {
                    target: "dir/file".into(),
                },
            )
        });
    if added.is_err() {
        // Cannot happen with these fixed paths; a distinct digest keeps recipes apart anyway.
        return "sample-refused".into();
    }
    hex(&Sha256::digest(sample.to_bytes()))
}

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
    /// digests ([`file_digest`]); `None` if an input cannot be read, or is not a regular file
    /// with contents (a FIFO read here would be empty when the build reads it): the build then
    /// reads each input once and reports what is wrong.
    pub(crate) fn of(agent: &Path, files: &[GuestFile]) -> Option<Recipe> {
        let digest = |path: &Path| {
            let meta = std::fs::metadata(path).ok()?;
            if !file_digest::cacheable(&meta) {
                return None;
            }
            file_digest::sha256_file_cached(path).ok()
        };
        let agent_sha256 = digest(agent)?;
        let copied = files
            .iter()
            .map(|file| match file {
                GuestFile::Copy { host, mode, .. } => {
                    let mode = super::host_file_mode(host, *mode);
                    digest(host).map(|sha| Some((mode, sha)))
                }
                GuestFile::Symlink { .. } => Some(None),
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self::from_digests(agent_sha256, files, &copied))
    }

    /// The recipe with the agent's digest and, for each of `files` that is a copy, the mode it
    /// gets and the digest of its contents (`copied`, one per file, `None` for symlinks).
    pub(crate) fn from_digests(
        agent_sha256: String,
        files: &[GuestFile],
        copied: &[Option<(u32, String)>],
    ) -> Recipe {
        let mut text = format!(
            "initramfs recipe {RECIPE_VERSION}\nformat {}\nagent {agent_sha256}\n",
            format_digest()
        );
        for (file, copy) in files.iter().zip(copied) {
            match (file, copy) {
                (GuestFile::Copy { guest, .. }, Some((mode, sha))) => {
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
        Digest::parse(&format!("sha256:{sha256}")).ok()?;
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

    fn files() -> Vec<GuestFile> {
        vec![
            GuestFile::Copy {
                guest: "/etc/app.conf".into(),
                host: "/nonexistent/app.conf".into(),
                mode: None,
            },
            GuestFile::Symlink {
                guest: "/bin/sh".into(),
                target: "busybox".into(),
            },
        ]
    }

    #[test]
    fn a_recipe_names_every_input() {
        let files = files();
        let copied = |mode: u32, sha: &str| [Some((mode, sha.repeat(64))), None];
        let base = Recipe::from_digests("a".repeat(64), &files, &copied(0o644, "c"));
        assert_eq!(
            base,
            Recipe::from_digests("a".repeat(64), &files, &copied(0o644, "c")),
            "deterministic"
        );
        let others = [
            Recipe::from_digests("b".repeat(64), &files, &copied(0o644, "c")),
            Recipe::from_digests("a".repeat(64), &files, &copied(0o600, "c")),
            Recipe::from_digests("a".repeat(64), &files, &copied(0o644, "d")),
            Recipe::from_digests("a".repeat(64), &[], &[]),
        ];
        for other in others {
            assert_ne!(base.digest, other.digest);
        }
    }

    #[test]
    fn inputs_that_are_not_regular_files_with_contents_have_no_recipe() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"agent").unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let copy = |host: &Path| {
            vec![GuestFile::Copy {
                guest: "/etc/x".into(),
                host: host.to_owned(),
                mode: None,
            }]
        };
        assert!(Recipe::of(&agent, &[]).is_some());
        assert!(Recipe::of(&empty, &[]).is_none(), "empty agent");
        assert!(Recipe::of(&agent, &copy(&empty)).is_none(), "empty file");
        assert!(
            Recipe::of(&agent, &copy(dir.path())).is_none(),
            "a directory"
        );
        assert!(Recipe::of(&agent, &copy(&dir.path().join("missing"))).is_none());
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
