//! OCI / Docker images: pull from a registry or import from an OCI layout or a `docker save`
//! archive into a content-addressed blob store, then turn the layers into one read-only ext4
//! rootfs per image.
//!
//! ```no_run
//! # async fn demo() -> Result<(), supermachine::ImageError> {
//! use supermachine::{Image, PullOptions};
//!
//! let image = Image::pull_with(
//!     "127.0.0.1:5000/library/busybox:latest",
//!     PullOptions::new().on_progress(|event| eprintln!("{event:?}")),
//! )
//! .await?;
//! let rootfs = image.rootfs().await?; // <cache>/rootfs/<config hex>.ext4, built once
//! println!("{} -> {}", image.digest(), rootfs.path.display());
//! println!("default command: {:?}", image.config().default_command());
//! # Ok(()) }
//! ```
//!
//! Cache layout (`supermachine::cache::root()`, `SUPERMACHINE_CACHE_DIR` overrides it):
//! `blobs/sha256/<hex>` (verified blobs only), `blobs/tmp/` (partial downloads and locks),
//! `rootfs/<config hex>.ext4` + `rootfs/<config hex>.json` (the [`ImageConfig`]),
//! `images/index.json` (the local image index: [`Image::local`], [`Image::list_local`],
//! [`Image::remove_local`]).

mod archive;
mod auth;
pub(crate) mod digest;
mod error;
mod index;
mod layers;
mod layout;
mod manifest;
mod reference;
mod registry;
mod rootfs;
mod rootless;
mod store;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use auth::{docker_config_path, Credentials};
pub use error::ImageError;
pub use index::{LocalImage, RemovedImage};
pub use reference::ImageReference;
pub use rootfs::Rootfs;

/// An image whose manifest, config and layers are all in the local blob store.
#[derive(Debug, Clone)]
pub struct Image {
    source: String,
    manifest_digest: String,
    config: ImageConfig,
    layers: Vec<LayerInfo>,
    diff_ids: Vec<digest::Digest>,
    cache_root: PathBuf,
}

/// The run settings of an image (from its config blob), as the VM side needs them.
///
/// Also written as JSON next to the rootfs (`rootfs/<config hex>.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ImageConfig {
    /// The config blob digest: the image ID (`sha256:...`).
    pub digest: String,
    /// `os` (`linux`).
    pub os: String,
    /// `architecture` (`amd64`).
    pub architecture: String,
    /// `Env`: `NAME=value` strings.
    pub env: Vec<String>,
    /// `WorkingDir`, if set.
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`, `name:group`), if set.
    pub user: Option<String>,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `StopSignal`, if set.
    pub stop_signal: Option<String>,
}

impl ImageConfig {
    /// `Entrypoint` followed by `Cmd`: what the image runs when no command is given.
    pub fn default_command(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }
}

/// One layer blob of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerInfo {
    /// The blob digest (`sha256:...`), as the manifest lists it.
    pub digest: String,
    /// The media type (OCI or Docker; tar, gzip or zstd).
    pub media_type: String,
    /// The blob size in bytes (compressed, as stored).
    pub size: u64,
}

/// An OS/architecture(/variant) pair, used to pick an image out of a multi-platform index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v8`, `v7`, ... (matched only when set).
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from its parts.
    pub fn new(os: impl Into<String>, architecture: impl Into<String>) -> Self {
        Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// `linux/<this host's architecture>` in OCI's spelling (`amd64` on x86_64, `arm64` on
    /// aarch64): what VMs on this host run, since a guest has the host's architecture.
    pub fn host() -> Self {
        Platform::new("linux", oci_architecture(std::env::consts::ARCH))
    }
}

/// OCI's name (Go's `GOARCH`) for a Rust `target_arch`.
fn oci_architecture(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

impl Default for Platform {
    /// [`Platform::host`].
    fn default() -> Self {
        Platform::host()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;

    /// `os/arch[/variant]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform {
                    os: os.to_owned(),
                    architecture: arch.to_owned(),
                    variant: variant.filter(|v| !v.is_empty()).map(str::to_owned),
                })
            }
            _ => Err(format!("platform {s:?} is not os/arch[/variant]")),
        }
    }
}

/// Progress of a pull, for a progress bar. Events of different layers interleave (layers
/// download concurrently).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PullEvent {
    /// The manifest is known.
    Resolved {
        /// The image manifest digest (the platform's, for an index).
        manifest_digest: String,
        /// Number of layers.
        layers: usize,
        /// Sum of the layer sizes.
        total_bytes: u64,
    },
    /// A layer download starts (`resumed_from > 0` when a partial download is continued).
    LayerStarted {
        /// The layer digest.
        digest: String,
        /// Its size.
        size: u64,
        /// Bytes already on disk from an interrupted download.
        resumed_from: u64,
    },
    /// More bytes of a layer arrived.
    LayerProgress {
        /// The layer digest.
        digest: String,
        /// Bytes on disk so far.
        downloaded: u64,
        /// Its size.
        size: u64,
    },
    /// A layer is verified and in the store.
    LayerDone {
        /// The layer digest.
        digest: String,
        /// Its size.
        size: u64,
        /// It was already in the store; nothing was downloaded.
        cached: bool,
    },
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&PullEvent) + Send + Sync>;

/// How to pull: credentials, platform, insecure registries, concurrency, progress, cache.
#[derive(Clone, Default)]
pub struct PullOptions {
    credentials: Option<Credentials>,
    platform: Platform,
    insecure: Vec<String>,
    max_concurrent_downloads: Option<usize>,
    progress: Option<ProgressFn>,
    cache_root: Option<PathBuf>,
    docker_config: Option<PathBuf>,
}

impl fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullOptions")
            .field("credentials", &self.credentials)
            .field("platform", &self.platform)
            .field("insecure", &self.insecure)
            .field("max_concurrent_downloads", &self.max_concurrent_downloads)
            .field("progress", &self.progress.is_some())
            .field("cache_root", &self.cache_root)
            .field("docker_config", &self.docker_config)
            .finish()
    }
}

impl PullOptions {
    /// Defaults: credentials from the Docker config file, the host's platform ([`Platform::host`]), TLS except for
    /// loopback registries, 3 concurrent layer downloads, the default cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses these credentials instead of looking in the Docker config file.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Reads credentials from this Docker `config.json` instead of the default one
    /// ([`docker_config_path`]).
    pub fn docker_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.docker_config = Some(path.into());
        self
    }

    /// Picks this platform out of multi-platform indexes, and refuses a single-platform image
    /// built for another one (default [`Platform::host`]).
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Talks plain HTTP to `registry` (`host[:port]`, as in the reference). Loopback registries
    /// get plain HTTP without this; every other registry gets verified TLS unless named here.
    pub fn insecure_registry(mut self, registry: impl Into<String>) -> Self {
        self.insecure.push(registry.into());
        self
    }

    /// How many layers download at once (default 3, at least 1).
    pub fn max_concurrent_downloads(mut self, n: usize) -> Self {
        self.max_concurrent_downloads = Some(n.max(1));
        self
    }

    /// Calls `f` with every [`PullEvent`] (from the pulling task; keep it quick).
    pub fn on_progress(mut self, f: impl Fn(&PullEvent) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Uses `dir` as the cache root instead of `supermachine::cache::root()`.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_root = Some(dir.into());
        self
    }
}

/// How to import from a local OCI layout or Docker archive.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    platform: Platform,
    cache_root: Option<PathBuf>,
}

impl ImportOptions {
    /// Defaults: the host's platform ([`Platform::host`]), the default cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks this platform out of a multi-platform index, and refuses a single-platform image
    /// built for another one (default [`Platform::host`]).
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Uses `dir` as the cache root instead of `supermachine::cache::root()`.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_root = Some(dir.into());
        self
    }
}

fn resolve_cache_root(explicit: &Option<PathBuf>) -> Result<PathBuf, ImageError> {
    match explicit {
        Some(dir) => Ok(dir.clone()),
        None => {
            crate::cache::root().map_err(|e| ImageError::io("cannot find the cache directory", e))
        }
    }
}

impl Image {
    /// Pulls `reference` (`registry/repo:tag` or `registry/repo@sha256:...`) with the default
    /// [`PullOptions`]: every blob is verified and stored; nothing is unpacked yet (see
    /// [`Image::rootfs`]).
    pub async fn pull(reference: &str) -> Result<Image, ImageError> {
        Self::pull_with(reference, PullOptions::default()).await
    }

    /// Pulls `reference` with `options`.
    pub async fn pull_with(reference: &str, options: PullOptions) -> Result<Image, ImageError> {
        // The first parse in a process compiles the reference grammar (a regex: ~0.1 s in a
        // debug build), so it runs on the blocking pool with the cache lookup.
        let (reference, cache_root) = {
            let (reference, cache_root) = (reference.to_owned(), options.cache_root.clone());
            blocking(move || {
                Ok((
                    ImageReference::parse(&reference)?,
                    resolve_cache_root(&cache_root)?,
                ))
            })
            .await?
        };
        let image = registry::pull(&reference, &options, cache_root).await?;
        let recorded = image.clone();
        if let Err(e) = blocking(move || {
            index::record_or_warn(&recorded);
            Ok(())
        })
        .await
        {
            tracing::warn!(
                "cannot record the image in the local image index: {}",
                crate::Report(&e)
            );
        }
        Ok(image)
    }

    /// Imports the image tagged `tag` from the OCI image layout in `dir` (`oci-layout`,
    /// `index.json`, `blobs/`); without a tag the layout must hold exactly one image.
    pub async fn from_oci_layout(
        dir: impl AsRef<Path>,
        tag: Option<&str>,
    ) -> Result<Image, ImageError> {
        Self::from_oci_layout_with(dir, tag, &ImportOptions::default()).await
    }

    /// [`Image::from_oci_layout`] with options.
    pub async fn from_oci_layout_with(
        dir: impl AsRef<Path>,
        tag: Option<&str>,
        options: &ImportOptions,
    ) -> Result<Image, ImageError> {
        let cache_root = resolve_cache_root(&options.cache_root)?;
        let dir = dir.as_ref().to_owned();
        let tag = tag.map(str::to_owned);
        let platform = options.platform.clone();
        blocking(move || {
            let image = layout::import(&dir, tag.as_deref(), &platform, cache_root)?;
            index::record_or_warn(&image);
            Ok(image)
        })
        .await
    }

    /// Imports the (first) image of a `docker save` / `skopeo copy docker-archive:` tar file.
    pub async fn from_docker_archive(path: impl AsRef<Path>) -> Result<Image, ImageError> {
        Self::from_docker_archive_with(path, &ImportOptions::default()).await
    }

    /// [`Image::from_docker_archive`] with options.
    pub async fn from_docker_archive_with(
        path: impl AsRef<Path>,
        options: &ImportOptions,
    ) -> Result<Image, ImageError> {
        let cache_root = resolve_cache_root(&options.cache_root)?;
        let path = path.as_ref().to_owned();
        let options = options.clone();
        blocking(move || {
            let image = archive::import(&path, &options.platform, cache_root)?;
            index::record_or_warn(&image);
            Ok(image)
        })
        .await
    }

    /// The image recorded in the local image index under `reference`, rebuilt from the blob
    /// store without the network; `None` if there is no such entry or its blobs are gone.
    ///
    /// Every pull and import records its image, under the normalised reference for a registry
    /// (`busybox` finds `docker.io/library/busybox:latest`) and under [`Image::source`] for a
    /// local import (`oci:DIR:TAG`). `reference` may also be an image ID (`sha256:<hex>`, or a
    /// prefix of at least 12 hex digits). The index is read on the blocking pool.
    pub async fn local(reference: &str) -> Result<Option<Image>, ImageError> {
        Self::local_in(reference, &resolve_cache_root(&None)?).await
    }

    /// [`Image::local`] in the cache rooted at `cache_dir`.
    pub async fn local_in(reference: &str, cache_dir: &Path) -> Result<Option<Image>, ImageError> {
        let (reference, cache_dir) = (reference.to_owned(), cache_dir.to_owned());
        blocking(move || index::local(&reference, &cache_dir)).await
    }

    /// Every image in the local image index, sorted by name (entries whose blobs are gone
    /// included). The index is read on the blocking pool.
    pub async fn list_local() -> Result<Vec<LocalImage>, ImageError> {
        Self::list_local_in(&resolve_cache_root(&None)?).await
    }

    /// [`Image::list_local`] in the cache rooted at `cache_dir`.
    pub async fn list_local_in(cache_dir: &Path) -> Result<Vec<LocalImage>, ImageError> {
        let cache_dir = cache_dir.to_owned();
        blocking(move || index::list(&cache_dir)).await
    }

    /// Removes the local image named `reference` (a name or ID as for [`Image::local`]) from the
    /// index, then deletes what no remaining image uses: its blobs, its rootfs, and snapshots
    /// made from that rootfs. [`ImageError::NotLocal`] if there is no such image;
    /// [`ImageError::AmbiguousImage`] if an ID names several. Runs on the blocking pool (it
    /// waits for the index lock and for a build of that rootfs in progress).
    pub async fn remove_local(reference: &str) -> Result<RemovedImage, ImageError> {
        Self::remove_local_in(reference, &resolve_cache_root(&None)?).await
    }

    /// [`Image::remove_local`] in the cache rooted at `cache_dir`.
    pub async fn remove_local_in(
        reference: &str,
        cache_dir: &Path,
    ) -> Result<RemovedImage, ImageError> {
        let (reference, cache_dir) = (reference.to_owned(), cache_dir.to_owned());
        blocking(move || index::remove(&reference, &cache_dir)).await
    }

    /// Where the image came from (`127.0.0.1:5000/busybox:latest`, `oci:DIR:TAG`,
    /// `docker-archive:PATH`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The image ID: the digest of its config blob. Also the rootfs cache key.
    pub fn digest(&self) -> &str {
        &self.config.digest
    }

    /// The digest of the (platform) manifest; for a Docker archive, which has none, the digest
    /// of the manifest JSON this crate derives from it.
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }

    /// The run settings: Env, WorkingDir, User, Entrypoint, Cmd.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// The layer blobs, bottom first.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// The sum of the layer blob sizes (compressed, as stored).
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// The cache root this image's blobs and rootfs live under.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_root
    }

    /// The read-only ext4 rootfs of this image: built from the layers the first time (by any
    /// user: without root the layers' owners, modes, xattrs and device nodes are written into
    /// the image with `debugfs`), then reused from the cache.
    pub async fn rootfs(&self) -> Result<Rootfs, ImageError> {
        rootfs::build(self).await
    }

    /// The rootfs, if it was already built; never builds.
    pub fn cached_rootfs(&self) -> Option<Rootfs> {
        rootfs::cached(self)
    }
}

/// Runs blocking image work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::io("image task failed", std::io::Error::other(e)))?
}
