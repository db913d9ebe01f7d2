//! The local image index: `<cache>/images/index.json`, which names every image pulled or
//! imported into a cache so that it can be listed, found again without the network, and removed.
//!
//! The index maps a *name* to what it takes to rebuild an [`Image`] from the blob store: the
//! source, manifest digest, config, layers and diff IDs. Names are the normalised reference for
//! registry pulls (`busybox` is `docker.io/library/busybox:latest`) and the source string for
//! local imports (`oci:DIR:TAG`, `docker-archive:PATH[:TAG]`).
//!
//! Writers take an `flock` on `<cache>/images/index.lock`, read the index, change it and replace
//! it with a temp file and a rename; readers take no lock (they always see a whole file).
//!
//! Removing an image garbage-collects what only it used: its blobs (config, manifest, layers)
//! that no other entry references, its rootfs (`rootfs/<id hex>.ext4` and `.json`) when no other
//! entry has the same image ID, and cached VM snapshots (`snapshots/<key>/`) made from that
//! rootfs.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::error::ImageError;
use super::reference::ImageReference;
use super::store::{create_cache_dir, lock_file_blocking, BlobStore, FileLock};
use super::{Image, ImageConfig, LayerInfo};

/// The index's layout version.
const INDEX_VERSION: u32 = 1;

/// Shortest image ID prefix accepted (hex digits), as Docker's short IDs.
const MIN_ID_PREFIX: usize = 12;

/// An image in the local index, as [`Image::list_local`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalImage {
    /// The name it is listed under (`docker.io/library/busybox:latest`, `oci:DIR:TAG`).
    pub name: String,
    /// The image ID: its config digest (`sha256:...`).
    pub image_id: String,
    /// The manifest digest (see [`Image::manifest_digest`]).
    pub manifest_digest: String,
    /// The sum of the layer blob sizes (compressed, as stored).
    pub compressed_size: u64,
    /// The bytes the built ext4 rootfs occupies on disk, if it was built.
    pub rootfs_size: Option<u64>,
    /// When it was last pulled or imported.
    pub added: SystemTime,
}

/// What [`Image::remove_local`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemovedImage {
    /// The name the removed entry was listed under.
    pub name: String,
    /// Its image ID (config digest).
    pub image_id: String,
    /// Disk space freed by deleting blobs, the rootfs and snapshots no other entry used.
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    #[serde(default)]
    images: BTreeMap<String, Record>,
}

impl Default for IndexFile {
    fn default() -> Self {
        IndexFile {
            version: INDEX_VERSION,
            images: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    name: String,
    source: String,
    manifest_digest: String,
    /// Whether the manifest is a blob in the store (a Docker archive's derived one is not).
    #[serde(default)]
    manifest_stored: bool,
    config: ImageConfig,
    layers: Vec<LayerRecord>,
    diff_ids: Vec<String>,
    added_unix_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerRecord {
    digest: String,
    media_type: String,
    size: u64,
}

impl Record {
    fn of(image: &Image, manifest_stored: bool) -> Record {
        let added_unix_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Record {
            name: name_for(image.source()),
            source: image.source().to_owned(),
            manifest_digest: image.manifest_digest().to_owned(),
            manifest_stored,
            config: image.config().clone(),
            layers: image
                .layers()
                .iter()
                .map(|l| LayerRecord {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                })
                .collect(),
            diff_ids: image.diff_ids.iter().map(|d| d.to_string()).collect(),
            added_unix_secs,
        }
    }

    fn image(&self, cache_root: &Path) -> Result<Image, ImageError> {
        let diff_ids = self
            .diff_ids
            .iter()
            .map(|d| Digest::parse(d).map_err(|e| ImageError::invalid(&self.source, e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Image {
            source: self.source.clone(),
            manifest_digest: self.manifest_digest.clone(),
            config: self.config.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| LayerInfo {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                })
                .collect(),
            diff_ids,
            cache_root: cache_root.to_owned(),
        })
    }

    /// Every blob of the store this entry needs (unparsable digests are skipped).
    fn blobs(&self) -> Vec<Digest> {
        let manifest = self.manifest_stored.then_some(&self.manifest_digest);
        std::iter::once(&self.config.digest)
            .chain(manifest)
            .chain(self.layers.iter().map(|l| &l.digest))
            .filter_map(|d| Digest::parse(d).ok())
            .collect()
    }

    /// Whether the config, the manifest (when it is a blob) and every layer are in `store`.
    fn blobs_present(&self, store: &BlobStore) -> bool {
        let manifest = self.manifest_stored.then_some(&self.manifest_digest);
        std::iter::once(&self.config.digest)
            .chain(manifest)
            .chain(self.layers.iter().map(|l| &l.digest))
            .all(|d| Digest::parse(d).is_ok_and(|d| store.contains(&d)))
    }

    fn local_image(&self, cache_root: &Path) -> LocalImage {
        let rootfs_size = Digest::parse(&self.config.digest)
            .ok()
            .and_then(|d| rootfs_allocated(cache_root, &d));
        LocalImage {
            name: self.name.clone(),
            image_id: self.config.digest.clone(),
            manifest_digest: self.manifest_digest.clone(),
            compressed_size: self.layers.iter().map(|l| l.size).sum(),
            rootfs_size,
            added: UNIX_EPOCH + Duration::from_secs(self.added_unix_secs),
        }
    }
}

/// The index name of an image from `source`: the normalised reference for registry references,
/// the source itself for local imports (and anything that does not parse as a reference).
fn name_for(source: &str) -> String {
    if is_local_source(source) {
        return source.to_owned();
    }
    ImageReference::parse(source)
        .map(|r| r.to_string())
        .unwrap_or_else(|_| source.to_owned())
}

fn is_local_source(s: &str) -> bool {
    s.starts_with("oci:") || s.starts_with("docker-archive:")
}

fn images_dir(cache_root: &Path) -> PathBuf {
    cache_root.join("images")
}

fn index_path(cache_root: &Path) -> PathBuf {
    images_dir(cache_root).join("index.json")
}

fn rootfs_paths(cache_root: &Path, id: &Digest) -> (PathBuf, PathBuf, PathBuf) {
    let dir = cache_root.join("rootfs");
    (
        dir.join(format!("{}.ext4", id.hex())),
        dir.join(format!("{}.json", id.hex())),
        dir.join(format!("{}.lock", id.hex())),
    )
}

/// Allocated bytes of a built rootfs (as [`super::rootfs`] considers it built: both files).
fn rootfs_allocated(cache_root: &Path, id: &Digest) -> Option<u64> {
    let (ext4, json, _) = rootfs_paths(cache_root, id);
    let meta = fs::metadata(ext4).ok()?;
    json.is_file().then(|| meta.blocks() * 512)
}

/// Takes the index lock (blocking).
fn lock(cache_root: &Path) -> Result<FileLock, ImageError> {
    let dir = images_dir(cache_root);
    create_cache_dir(&dir)?;
    lock_file_blocking(&dir.join("index.lock"))
}

/// Reads the index; a missing file is an empty index.
fn load(cache_root: &Path) -> Result<IndexFile, ImageError> {
    let path = index_path(cache_root);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(IndexFile::default()),
        Err(e) => return Err(ImageError::io(format!("cannot read {}", path.display()), e)),
    };
    let corrupt = |reason: String| ImageError::CorruptIndex {
        path: path.clone(),
        reason,
    };
    let index: IndexFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if index.version != INDEX_VERSION {
        return Err(corrupt(format!(
            "format version {} is not {INDEX_VERSION} (written by another supermachine version?)",
            index.version
        )));
    }
    Ok(index)
}

fn save(cache_root: &Path, index: &IndexFile) -> Result<(), ImageError> {
    let path = index_path(cache_root);
    let bytes = serde_json::to_vec_pretty(index)
        .map_err(|e| ImageError::io("cannot encode the image index", e.into()))?;
    crate::cache::write_atomically(&path, &bytes)
        .map_err(|e| ImageError::io(format!("cannot write {}", path.display()), e))
}

/// Records (or updates) `image` under its name in its cache's index. Blocking.
pub(crate) fn record(image: &Image) -> Result<(), ImageError> {
    let cache_root = image.cache_dir();
    let manifest_stored = Digest::parse(image.manifest_digest())
        .ok()
        .and_then(|d| BlobStore::open(cache_root).ok().map(|s| s.contains(&d)))
        .unwrap_or(false);
    let entry = Record::of(image, manifest_stored);
    let _lock = lock(cache_root)?;
    let mut index = load(cache_root)?;
    index.images.insert(entry.name.clone(), entry);
    save(cache_root, &index)
}

/// [`record`], logging a failure instead of returning it (a pull that worked stays worked).
/// Blocking.
pub(crate) fn record_or_warn(image: &Image) {
    if let Err(e) = record(image) {
        tracing::warn!(
            image = image.source(),
            "cannot record the image in the local image index: {}",
            crate::Report(&e)
        );
    }
}

/// The entries `reference` names: by exact name, by normalised reference, by a pinned manifest
/// digest, or by image ID (`sha256:<hex>` or a hex prefix of at least 12 digits). Several entries
/// come back only when they share one image ID; several IDs are [`ImageError::AmbiguousImage`].
fn resolve<'a>(index: &'a IndexFile, reference: &str) -> Result<Vec<&'a Record>, ImageError> {
    if let Some(r) = index.images.get(reference) {
        return Ok(vec![r]);
    }
    if !is_local_source(reference) {
        if let Ok(parsed) = ImageReference::parse(reference) {
            if let Some(r) = index.images.get(&parsed.to_string()) {
                return Ok(vec![r]);
            }
            if let Some(digest) = parsed.digest() {
                let same_repo = |name: &str| {
                    ImageReference::parse(name).is_ok_and(|n| {
                        n.registry() == parsed.registry() && n.repository() == parsed.repository()
                    })
                };
                let found: Vec<&Record> = index
                    .images
                    .values()
                    .filter(|r| r.manifest_digest == digest && same_repo(&r.name))
                    .collect();
                if !found.is_empty() {
                    return Ok(found);
                }
            }
        }
    }
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    let is_id = hex.len() >= MIN_ID_PREFIX
        && hex.len() <= 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !is_id {
        return Ok(Vec::new());
    }
    let found: Vec<&Record> = index
        .images
        .values()
        .filter(|r| {
            r.config
                .digest
                .strip_prefix("sha256:")
                .is_some_and(|id| id.starts_with(hex))
        })
        .collect();
    let ids: HashSet<&str> = found.iter().map(|r| r.config.digest.as_str()).collect();
    if ids.len() > 1 {
        let mut ids: Vec<&str> = ids.into_iter().collect();
        ids.sort_unstable();
        return Err(ImageError::AmbiguousImage {
            reference: reference.to_owned(),
            candidates: ids.join(", "),
        });
    }
    Ok(found)
}

/// See [`Image::local_in`].
pub(crate) fn local(reference: &str, cache_root: &Path) -> Result<Option<Image>, ImageError> {
    let index = load(cache_root)?;
    let found = resolve(&index, reference)?;
    let store = BlobStore::open(cache_root)?;
    for entry in found {
        if entry.blobs_present(&store) {
            match entry.image(cache_root) {
                Ok(image) => return Ok(Some(image)),
                Err(e) => tracing::warn!(
                    name = entry.name,
                    "unusable local index entry: {}",
                    crate::Report(&e)
                ),
            }
        } else {
            tracing::debug!(
                name = entry.name,
                "local image entry is stale (blobs missing)"
            );
        }
    }
    Ok(None)
}

/// See [`Image::list_local_in`].
pub(crate) fn list(cache_root: &Path) -> Result<Vec<LocalImage>, ImageError> {
    let index = load(cache_root)?;
    // BTreeMap order: sorted by name.
    Ok(index
        .images
        .values()
        .map(|r| r.local_image(cache_root))
        .collect())
}

/// See [`Image::remove_local_in`].
pub(crate) fn remove(reference: &str, cache_root: &Path) -> Result<RemovedImage, ImageError> {
    let _lock = lock(cache_root)?;
    let mut index = load(cache_root)?;
    let names: Vec<String> = resolve(&index, reference)?
        .iter()
        .map(|r| r.name.clone())
        .collect();
    let name = match names.as_slice() {
        [] => {
            return Err(ImageError::NotLocal {
                reference: reference.to_owned(),
            })
        }
        [one] => one.clone(),
        several => {
            return Err(ImageError::AmbiguousImage {
                reference: reference.to_owned(),
                candidates: several.join(", "),
            })
        }
    };
    let removed = index
        .images
        .remove(&name)
        .expect("resolved names are in the index");
    // The entry goes first: a crash below leaves unreferenced files, never a dangling entry.
    save(cache_root, &index)?;

    let still_used: HashSet<Digest> = index.images.values().flat_map(Record::blobs).collect();
    let mut freed = 0;
    let store = BlobStore::open(cache_root)?;
    for digest in removed.blobs() {
        if !still_used.contains(&digest) {
            freed += delete_file(&store.path(&digest));
        }
    }
    let id_used = index
        .images
        .values()
        .any(|r| r.config.digest == removed.config.digest);
    if !id_used {
        if let Ok(id) = Digest::parse(&removed.config.digest) {
            freed += remove_rootfs(cache_root, &id)?;
        }
    }
    Ok(RemovedImage {
        name: removed.name,
        image_id: removed.config.digest,
        freed_bytes: freed,
    })
}

/// Deletes the rootfs of image `id` and the snapshots made from it; returns the bytes freed.
fn remove_rootfs(cache_root: &Path, id: &Digest) -> Result<u64, ImageError> {
    let (ext4, json, lock_path) = rootfs_paths(cache_root, id);
    if !ext4.exists() && !json.exists() {
        return Ok(0);
    }
    // Wait for a build of this rootfs in progress (rootfs.rs holds this lock while building).
    let _build = lock_file_blocking(&lock_path)?;
    let canonical = fs::canonicalize(&ext4).ok();
    let mut freed = delete_file(&ext4) + delete_file(&json);
    if let Some(rootfs) = canonical {
        freed += remove_snapshots_of(cache_root, &rootfs);
    }
    Ok(freed)
}

/// Deletes `<cache>/snapshots/<key>/` directories whose `meta.json` names `rootfs` as the root
/// filesystem; a snapshot in use (its lock held by a starting VM) is left alone.
fn remove_snapshots_of(cache_root: &Path, rootfs: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(cache_root.join("snapshots")) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(bytes) = fs::read(dir.join("meta.json")) else {
            continue;
        };
        let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let uses = meta
            .get("rootfs")
            .and_then(|r| r.get("path"))
            .and_then(|p| p.as_str())
            .is_some_and(|p| Path::new(p) == rootfs);
        if !uses {
            continue;
        }
        // The VM side locks `<dir>.lock` while it boots, snapshots or restores into `<dir>`.
        let mut lock_name = dir.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_name);
        let locked = lock.as_ref().is_ok_and(|f| {
            rustix::fs::flock(f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
        });
        if !locked {
            tracing::warn!(dir = %dir.display(), "snapshot is in use; not removing it");
            continue;
        }
        let size = dir_allocated(&dir);
        match fs::remove_dir_all(&dir) {
            Ok(()) => freed += size,
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot remove the snapshot: {e}"),
        }
    }
    freed
}

fn dir_allocated(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_allocated(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Deletes a file if it is there; returns the bytes it occupied.
fn delete_file(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    match fs::remove_file(path) {
        Ok(()) => meta.blocks() * 512,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), "cannot delete: {e}");
            }
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::ImportOptions;
    use super::*;

    /// A one-layer OCI layout at `dir` tagged `tag`, whose layer holds `/file` with `content`.
    fn write_layout(dir: &Path, tag: &str, shared: &[u8], content: &[u8]) -> Vec<String> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let d = Digest::of(bytes);
            fs::write(blobs.join(d.hex()), bytes).unwrap();
            d.to_string()
        };
        let tar = |name: &str, data: &[u8]| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
            b.into_inner().unwrap()
        };
        let layers = [tar("shared", shared), tar("file", content)];
        let layer_digests: Vec<String> = layers.iter().map(|l| put(l)).collect();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/file", tag]},
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = put(&config_bytes);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_bytes.len()},
            "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                "size": l.len(),
            })).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = put(&manifest_bytes);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let mut all = vec![manifest_digest, config_digest];
        all.extend(layer_digests);
        all
    }

    async fn import(cache: &Path, layout: &Path, tag: &str, content: &[u8]) -> Image {
        write_layout(layout, tag, b"shared layer", content);
        Image::from_oci_layout_with(layout, Some(tag), &ImportOptions::new().cache_dir(cache))
            .await
            .unwrap()
    }

    fn blob_path(cache: &Path, digest: &str) -> PathBuf {
        BlobStore::open(cache)
            .unwrap()
            .path(&Digest::parse(digest).unwrap())
    }

    #[tokio::test]
    async fn records_and_finds_by_name_source_and_id() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let image = import(&cache, &tmp.path().join("a"), "v1", b"one").await;

        // The import recorded itself under its source.
        let found = Image::local_in(image.source(), &cache)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.digest(), image.digest());
        assert_eq!(found.layers(), image.layers());
        assert_eq!(found.diff_ids, image.diff_ids);
        assert_eq!(found.config(), image.config());

        // A registry pull is named by the normalised reference.
        let mut pulled = image.clone();
        pulled.source = "127.0.0.1:5000/busybox:latest".into();
        record(&pulled).unwrap();
        let mut hub = image.clone();
        hub.source = "docker.io/library/busybox:latest".into();
        record(&hub).unwrap();
        for name in [
            "127.0.0.1:5000/busybox",
            "127.0.0.1:5000/busybox:latest",
            "busybox",
            "docker.io/busybox:latest",
        ] {
            let found = Image::local_in(name, &cache).await.unwrap();
            assert!(found.is_some(), "{name}");
        }
        let by_digest = format!("127.0.0.1:5000/busybox@{}", image.manifest_digest());
        assert!(Image::local_in(&by_digest, &cache).await.unwrap().is_some());
        assert!(Image::local_in("127.0.0.1:5000/busybox:v2", &cache)
            .await
            .unwrap()
            .is_none());

        // By ID: full, `sha256:`-prefixed short, bare 12-digit prefix; shorter is no ID.
        let hex = &image.digest()["sha256:".len()..];
        for id in [
            image.digest().to_owned(),
            format!("sha256:{}", &hex[..12]),
            hex[..12].to_owned(),
        ] {
            let found = Image::local_in(&id, &cache).await.unwrap().unwrap();
            assert_eq!(found.digest(), image.digest(), "{id}");
        }
        assert!(Image::local_in(&hex[..11], &cache).await.unwrap().is_none());

        let list = Image::list_local_in(&cache).await.unwrap();
        let names: Vec<&str> = list.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "127.0.0.1:5000/busybox:latest",
                "docker.io/library/busybox:latest",
                image.source(),
            ]
        );
        assert!(list.iter().all(|l| l.image_id == image.digest()
            && l.compressed_size == image.compressed_size()
            && l.rootfs_size.is_none()));

        // Removing by an ID three names share is ambiguous; by name it works and keeps blobs.
        let err = Image::remove_local_in(&hex[..12], &cache)
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::AmbiguousImage { .. }), "{err}");
        let removed = Image::remove_local_in("busybox", &cache).await.unwrap();
        assert_eq!(removed.name, "docker.io/library/busybox:latest");
        assert_eq!(removed.freed_bytes, 0);
        assert!(Image::local_in(image.source(), &cache)
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn stale_entry_is_none_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let image = import(&cache, &tmp.path().join("a"), "v1", b"one").await;
        fs::remove_file(blob_path(&cache, &image.layers()[1].digest)).unwrap();
        assert!(Image::local_in(image.source(), &cache)
            .await
            .unwrap()
            .is_none());
        // Still listed, and removable.
        assert_eq!(Image::list_local_in(&cache).await.unwrap().len(), 1);
        Image::remove_local_in(image.source(), &cache)
            .await
            .unwrap();
        assert!(Image::list_local_in(&cache).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn remove_collects_only_unshared_files() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let a = import(&cache, &tmp.path().join("a"), "a", b"one").await;
        let b = import(&cache, &tmp.path().join("b"), "b", b"two").await;
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.layers()[0], b.layers()[0], "the first layer is shared");

        // A fake built rootfs of `a`, and a snapshot made from it (and one from another rootfs).
        let rootfs = cache.join("rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        let a_hex = &a.digest()["sha256:".len()..];
        let ext4 = rootfs.join(format!("{a_hex}.ext4"));
        fs::write(&ext4, vec![1u8; 8192]).unwrap();
        fs::write(rootfs.join(format!("{a_hex}.json")), b"{}").unwrap();
        let snap = |key: &str, path: &Path| {
            let dir = cache.join("snapshots").join(key);
            fs::create_dir_all(&dir).unwrap();
            let meta = serde_json::json!({"format_version": 1, "rootfs": {"path": path}});
            fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
            fs::write(dir.join("memory"), vec![2u8; 4096]).unwrap();
            dir
        };
        let snap_a = snap("a", &fs::canonicalize(&ext4).unwrap());
        let snap_other = snap("other", Path::new("/elsewhere/rootfs.ext4"));
        let listed = Image::list_local_in(&cache).await.unwrap();
        let rootfs_size = listed.iter().find(|l| l.image_id == a.digest()).unwrap();
        assert!(rootfs_size.rootfs_size.unwrap() >= 8192);

        let removed = Image::remove_local_in(a.source(), &cache).await.unwrap();
        assert_eq!(removed.name, a.source());
        assert_eq!(removed.image_id, a.digest());
        assert!(removed.freed_bytes >= 8192 + 4096, "{removed:?}");

        // Shared layer kept; `a`'s own layer, config and manifest gone.
        assert!(blob_path(&cache, &a.layers()[0].digest).is_file());
        for gone in [&a.layers()[1].digest, a.digest(), a.manifest_digest()] {
            assert!(!blob_path(&cache, gone).exists(), "{gone}");
        }
        assert!(!ext4.exists());
        assert!(!snap_a.exists());
        assert!(snap_other.exists());
        assert!(Image::local_in(b.source(), &cache).await.unwrap().is_some());
        assert!(Image::local_in(a.source(), &cache).await.unwrap().is_none());

        // Absent: a typed error naming it.
        let err = Image::remove_local_in(a.source(), &cache)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ImageError::NotLocal { reference } if reference == a.source()),
            "{err}"
        );

        // The last entry takes the shared layer with it.
        Image::remove_local_in(b.source(), &cache).await.unwrap();
        let left: Vec<_> = fs::read_dir(cache.join("blobs/sha256"))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn corrupt_index_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path();
        // A missing index is an empty one.
        assert!(Image::list_local_in(cache).await.unwrap().is_empty());
        assert!(Image::local_in("busybox", cache).await.unwrap().is_none());

        fs::create_dir_all(cache.join("images")).unwrap();
        fs::write(index_path(cache), b"{not json").unwrap();
        let err = Image::list_local_in(cache).await.unwrap_err();
        assert!(matches!(err, ImageError::CorruptIndex { .. }), "{err}");
        assert!(err.to_string().contains("delete it to reset"), "{err}");
        assert!(err.to_string().contains("index.json"), "{err}");
        assert!(Image::local_in("busybox", cache).await.is_err());
        assert!(Image::remove_local_in("busybox", cache).await.is_err());

        // An import still works (the index failure is only logged) and leaves the file alone.
        let image = import(cache, &tmp.path().join("a"), "v1", b"one").await;
        assert!(image.layers().len() == 2);
        assert_eq!(fs::read(index_path(cache)).unwrap(), b"{not json");
    }

    #[tokio::test]
    async fn concurrent_records_all_land() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let image = Arc::new(import(&cache, &tmp.path().join("a"), "v1", b"one").await);
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let image = Arc::clone(&image);
                std::thread::spawn(move || {
                    for i in 0..20 {
                        let mut copy = (*image).clone();
                        copy.source = format!("127.0.0.1:5000/t{t}:v{i}");
                        record(&copy).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let list = Image::list_local_in(&cache).await.unwrap();
        assert_eq!(list.len(), 41, "{list:?}");
    }
}
