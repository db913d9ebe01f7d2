//! Importing from an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/`):
//! the tagged manifest (through an index to the platform's, if need be), its config and layers
//! are copied into the blob store, each verified against its digest on the way.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::digest::Digest;
use super::error::ImageError;
use super::manifest::{self, Descriptor, Parsed, REF_NAME};
use super::store::BlobStore;
use super::{Image, Platform};

pub(crate) fn import(
    dir: &Path,
    tag: Option<&str>,
    platform: &Platform,
    cache_root: PathBuf,
) -> Result<Image, ImageError> {
    let source = format!(
        "oci:{}{}",
        dir.display(),
        tag.map(|t| format!(":{t}")).unwrap_or_default()
    );
    if !dir.join("oci-layout").is_file() {
        return Err(ImageError::invalid(
            &source,
            "not an OCI image layout (no oci-layout file)",
        ));
    }
    let index_path = dir.join("index.json");
    let index = std::fs::read(&index_path)
        .map_err(|e| ImageError::io(format!("cannot read {}", index_path.display()), e))?;
    let Parsed::Index(entries) = manifest::parse(&source, &index)? else {
        return Err(ImageError::invalid(
            &source,
            "index.json is not an image index",
        ));
    };
    let tags = || {
        entries
            .iter()
            .filter_map(|e| e.annotations.as_ref()?.get(REF_NAME).cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry: &Descriptor = match tag {
        Some(tag) => entries
            .iter()
            .find(|e| {
                e.annotations
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|name| name == tag)
            })
            .ok_or_else(|| ImageError::NotFound {
                reference: source.clone(),
                detail: format!("no image tagged {tag:?} in the layout (tags: {})", tags()),
            })?,
        None => match entries.as_slice() {
            [only] => only,
            [] => {
                return Err(ImageError::NotFound {
                    reference: source.clone(),
                    detail: "the layout holds no image".into(),
                })
            }
            _ => {
                return Err(ImageError::invalid(
                    &source,
                    format!(
                        "the layout holds {} images; name one by tag (tags: {})",
                        entries.len(),
                        tags()
                    ),
                ))
            }
        },
    };

    let store = BlobStore::open(&cache_root)?;
    let copy = |desc_digest: &str, what: &str| -> Result<Digest, ImageError> {
        let digest = Digest::parse(desc_digest).map_err(|e| ImageError::invalid(&source, e))?;
        let path = dir.join("blobs/sha256").join(digest.hex());
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ImageError::NotFound {
                reference: source.clone(),
                detail: format!("{what} blob {digest} is missing from the layout"),
            },
            _ => ImageError::io(format!("cannot read {}", path.display()), e),
        })?;
        store.import(&format!("{what} {digest} of {source}"), Some(&digest), file)?;
        Ok(digest)
    };

    let mut manifest_digest = copy(&entry.digest, "manifest")?;
    let mut parsed = manifest::parse(&source, &store.read(&manifest_digest)?)?;
    if let Parsed::Index(platforms) = &parsed {
        let chosen = manifest::select_platform(&source, platforms, platform)?;
        manifest_digest = copy(&chosen.digest, "manifest")?;
        parsed = manifest::parse(&source, &store.read(&manifest_digest)?)?;
    }
    let Parsed::Manifest { config, layers } = parsed else {
        return Err(ImageError::invalid(
            &source,
            "index entry points at another index",
        ));
    };
    let layer_infos = manifest::layer_infos(&source, &config, &layers)?;
    let config_digest = copy(&config.digest, "config")?;
    for layer in &layer_infos {
        copy(&layer.digest, "layer")?;
    }
    let (image_config, diff_ids) =
        manifest::parse_config(&source, &config_digest, &store.read(&config_digest)?)?;
    manifest::check_config_platform(&source, &image_config, platform)?;
    Ok(Image {
        source,
        manifest_digest: manifest_digest.to_string(),
        config: image_config,
        layers: layer_infos,
        diff_ids,
        cache_root,
    })
}
