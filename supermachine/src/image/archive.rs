//! Importing a `docker save` archive (also what `skopeo copy ... docker-archive:` writes): a tar
//! with `manifest.json` (`[{"Config": ..., "RepoTags": [...], "Layers": [...]}]`), the config
//! JSON and one tar per layer (legacy `<id>/layer.tar` or `blobs/sha256/<hex>`).
//!
//! The archive is read once, front to back: every config and layer file goes into the blob store
//! under the sha256 of its bytes (so it is verified by construction), then `manifest.json` names
//! which is which. The uncompressed layers are later checked against the config's `diff_ids`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::digest::Digest;
use super::error::ImageError;
use super::manifest;
use super::store::BlobStore;
use super::{Image, LayerInfo, Platform};

#[derive(Deserialize)]
struct ArchiveManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// Names that are archive metadata, not blobs.
fn is_blob_name(name: &str) -> bool {
    name.ends_with(".tar")
        || name.ends_with(".tar.gz")
        || name.starts_with("blobs/sha256/")
        || (name.ends_with(".json") && name != "manifest.json" && name != "index.json")
}

pub(crate) fn import(
    path: &Path,
    platform: &Platform,
    cache_root: PathBuf,
) -> Result<Image, ImageError> {
    let mut source = format!("docker-archive:{}", path.display());
    let file = File::open(path)
        .map_err(|e| ImageError::io(format!("cannot open {}", path.display()), e))?;
    let store = BlobStore::open(&cache_root)?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let read_err = |e: std::io::Error| ImageError::io(format!("cannot read {}", path.display()), e);
    let mut blobs: HashMap<String, (Digest, u64)> = HashMap::new();
    let mut manifest_json: Option<Vec<u8>> = None;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(read_err)?
            .to_string_lossy()
            .into_owned();
        let name = name.trim_start_matches("./").to_owned();
        if name == "manifest.json" {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(read_err)?;
            manifest_json = Some(bytes);
        } else if is_blob_name(&name) {
            let size = entry.size();
            let digest = store.import(&format!("{name} of {source}"), None, &mut entry)?;
            blobs.insert(name, (digest, size));
        }
    }
    let manifest_json = manifest_json
        .ok_or_else(|| ImageError::invalid(&source, "no manifest.json (not a docker archive?)"))?;
    let manifests: Vec<ArchiveManifest> = serde_json::from_slice(&manifest_json)
        .map_err(|e| ImageError::invalid(&source, format!("manifest.json: {e}")))?;
    let first = manifests
        .first()
        .ok_or_else(|| ImageError::invalid(&source, "manifest.json lists no image"))?;
    if let Some(tag) = first.repo_tags.as_ref().and_then(|t| t.first()) {
        source = format!("{source}:{tag}");
    }
    let find = |name: &str| {
        blobs
            .get(name.trim_start_matches("./"))
            .cloned()
            .ok_or_else(|| ImageError::NotFound {
                reference: source.clone(),
                detail: format!("manifest.json names {name}, which is not in the archive"),
            })
    };
    let (config_digest, _) = find(&first.config)?;
    let mut layers = Vec::with_capacity(first.layers.len());
    for name in &first.layers {
        let (digest, size) = find(name)?;
        let media_type = sniff_media_type(&store.path(&digest)).map_err(read_err)?;
        layers.push(LayerInfo {
            digest: digest.to_string(),
            media_type: media_type.to_owned(),
            size,
        });
    }
    let (config, diff_ids) =
        manifest::parse_config(&source, &config_digest, &store.read(&config_digest)?)?;
    manifest::check_config_platform(&source, &config, platform)?;
    manifest::check_diff_id_count(&source, diff_ids.len(), layers.len())?;
    // A docker archive has no registry manifest; identify it by an equivalent OCI manifest.
    let equivalent = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": {"digest": config.digest, "size": store.read(&config_digest)?.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_digest = Digest::of(equivalent.to_string().as_bytes());
    Ok(Image {
        source,
        manifest_digest: manifest_digest.to_string(),
        config,
        layers,
        diff_ids,
        cache_root,
    })
}

/// Docker layer media type from the blob's first bytes.
fn sniff_media_type(path: &Path) -> std::io::Result<&'static str> {
    let mut magic = [0u8; 4];
    let n = File::open(path)?.read(&mut magic)?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.docker.image.rootfs.diff.tar",
    })
}
