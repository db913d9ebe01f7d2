//! The IMAGE argument: `oci:DIR[:TAG]`, `docker-archive:FILE`, or a registry reference (from
//! the local cache when it is there, pulled otherwise).

use std::path::Path;

use supermachine::{Image, PullOptions};

use crate::failure::Failure;
use crate::progress;

/// Resolves `arg` to an image with its blobs in the cache.
pub async fn resolve(arg: &str) -> Result<Image, Failure> {
    if let Some(rest) = arg.strip_prefix("oci:") {
        let (dir, tag) = split_layout(rest);
        return Image::from_oci_layout(dir, tag)
            .await
            .map_err(|e| Failure::from(e).context(format!("cannot import {arg}")));
    }
    if let Some(file) = arg.strip_prefix("docker-archive:") {
        return Image::from_docker_archive(file)
            .await
            .map_err(|e| Failure::from(e).context(format!("cannot import {arg}")));
    }
    match Image::local(arg).await {
        Ok(Some(image)) => return Ok(image),
        Ok(None) => {}
        Err(e) => tracing::warn!(
            "looking {arg} up in the local cache: {}",
            supermachine::Report(&e)
        ),
    }
    pull(arg).await
}

/// Pulls `reference` with a progress display on stderr.
pub async fn pull(reference: &str) -> Result<Image, Failure> {
    let (options, display) = progress::attach(PullOptions::new());
    let pulled = Image::pull_with(reference, options).await;
    drop(display);
    pulled.map_err(|e| Failure::from(e).context(format!("cannot pull {reference}")))
}

/// `DIR` or `DIR:TAG`; a `DIR` that exists with its colon wins over reading it as a tag.
fn split_layout(rest: &str) -> (&str, Option<&str>) {
    if Path::new(rest).is_dir() {
        return (rest, None);
    }
    match rest.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') && !tag.is_empty() => (dir, Some(tag)),
        _ => (rest, None),
    }
}
