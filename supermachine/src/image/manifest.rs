//! Parsing of manifests, indexes and image configs (OCI and Docker v2 schema 2 media types), and
//! platform selection in an index. Shared by every image source.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::digest::Digest;
use super::error::ImageError;
use super::{ImageConfig, LayerInfo, Platform};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The manifest media types a registry is asked for.
pub(crate) const ACCEPTED_MANIFESTS: &[&str] =
    &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// The annotation that names a manifest's tag in an OCI layout's `index.json`.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    #[serde(default)]
    pub(crate) size: i64,
    #[serde(default)]
    pub(crate) platform: Option<PlatformJson>,
    #[serde(default)]
    pub(crate) annotations: Option<HashMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PlatformJson {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

impl PlatformJson {
    fn describe(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// A manifest or an index, as read from JSON.
pub(crate) enum Parsed {
    Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index(Vec<Descriptor>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Parses a manifest or an index (told apart by `mediaType`, or by `manifests` vs `layers`).
pub(crate) fn parse(source: &str, bytes: &[u8]) -> Result<Parsed, ImageError> {
    let any: AnyManifest = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::invalid(source, format!("manifest is not valid JSON: {e}")))?;
    if let Some(v) = any.schema_version {
        if v != 2 {
            return Err(ImageError::invalid(
                source,
                format!("manifest schema version {v} is not supported (only 2)"),
            ));
        }
    }
    match (
        any.media_type.as_deref(),
        any.manifests,
        any.config,
        any.layers,
    ) {
        (Some(OCI_INDEX | DOCKER_LIST) | None, Some(manifests), _, _) => {
            Ok(Parsed::Index(manifests))
        }
        (Some(OCI_MANIFEST | DOCKER_MANIFEST) | None, None, Some(config), layers) => {
            Ok(Parsed::Manifest {
                config,
                layers: layers.unwrap_or_default(),
            })
        }
        (Some(other), _, _, _) => Err(ImageError::UnsupportedMediaType {
            source_name: source.to_owned(),
            media_type: other.to_owned(),
        }),
        _ => Err(ImageError::invalid(
            source,
            "JSON is neither an image manifest nor an index",
        )),
    }
}

/// The index entry for `platform`.
pub(crate) fn select_platform<'a>(
    source: &str,
    entries: &'a [Descriptor],
    platform: &Platform,
) -> Result<&'a Descriptor, ImageError> {
    let matches = |p: &PlatformJson| {
        p.os == platform.os
            && p.architecture == platform.architecture
            && match (&platform.variant, &p.variant) {
                (None, _) => true,
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
            }
    };
    entries
        .iter()
        .find(|e| e.platform.as_ref().is_some_and(matches))
        .ok_or_else(|| ImageError::NoMatchingPlatform {
            reference: source.to_owned(),
            platform: platform.to_string(),
            available: entries
                .iter()
                .filter_map(|e| e.platform.as_ref().map(PlatformJson::describe))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A single-platform image must be built for `platform`: its config's `os`/`architecture`
/// (when it names them; some old configs do not) must match, or the image could not run there.
pub(crate) fn check_config_platform(
    source: &str,
    config: &ImageConfig,
    platform: &Platform,
) -> Result<(), ImageError> {
    let differs = |have: &str, want: &str| !have.is_empty() && have != want;
    if differs(&config.os, &platform.os) || differs(&config.architecture, &platform.architecture) {
        return Err(ImageError::NoMatchingPlatform {
            reference: source.to_owned(),
            platform: platform.to_string(),
            available: format!("{}/{}", config.os, config.architecture),
        });
    }
    Ok(())
}

/// Checks a config descriptor's media type and the layers', and turns layers into [`LayerInfo`].
pub(crate) fn layer_infos(
    source: &str,
    config: &Descriptor,
    layers: &[Descriptor],
) -> Result<Vec<LayerInfo>, ImageError> {
    if !config.media_type.is_empty()
        && config.media_type != OCI_CONFIG
        && config.media_type != DOCKER_CONFIG
    {
        return Err(ImageError::invalid(
            source,
            format!(
                "not a container image: config media type {} (an OCI artifact?)",
                config.media_type
            ),
        ));
    }
    Digest::parse(&config.digest).map_err(|e| ImageError::invalid(source, e))?;
    layers
        .iter()
        .map(|l| {
            Digest::parse(&l.digest).map_err(|e| ImageError::invalid(source, e))?;
            if !is_layer_media_type(&l.media_type) {
                return Err(ImageError::UnsupportedMediaType {
                    source_name: source.to_owned(),
                    media_type: l.media_type.clone(),
                });
            }
            Ok(LayerInfo {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: u64::try_from(l.size).unwrap_or(0),
            })
        })
        .collect()
}

/// OCI (`...layer.v1.tar[+gzip|+zstd]`, non-distributable too) and Docker
/// (`...rootfs.diff.tar[.gzip]`, `...rootfs.foreign.diff.tar.gzip`) layer types; the
/// compression is read from the blob's magic bytes when unpacking.
fn is_layer_media_type(media_type: &str) -> bool {
    media_type.is_empty()
        || media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

#[derive(Deserialize, Default)]
struct ConfigJson {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootfsJson>,
}

#[derive(Deserialize, Default)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "StopSignal", default)]
    stop_signal: Option<String>,
}

#[derive(Deserialize, Default)]
struct RootfsJson {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// A config's `diff_ids` must match the manifest's layers one to one (an empty list is
/// tolerated: some old configs omit it, and layers are then only checked by blob digest).
pub(crate) fn check_diff_id_count(
    source: &str,
    diff_ids: usize,
    layers: usize,
) -> Result<(), ImageError> {
    if diff_ids != 0 && diff_ids != layers {
        return Err(ImageError::invalid(
            source,
            format!("config lists {diff_ids} diff_ids for {layers} layers"),
        ));
    }
    Ok(())
}

/// Reads an image config blob: the run settings, and the uncompressed layer digests.
pub(crate) fn parse_config(
    source: &str,
    digest: &Digest,
    bytes: &[u8],
) -> Result<(ImageConfig, Vec<Digest>), ImageError> {
    let json: ConfigJson = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::invalid(source, format!("image config is not valid JSON: {e}")))?;
    let run = json.config.unwrap_or_default();
    let diff_ids = json
        .rootfs
        .unwrap_or_default()
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| ImageError::invalid(source, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let config = ImageConfig {
        digest: digest.to_string(),
        os: json.os,
        architecture: json.architecture,
        env: run.env.unwrap_or_default(),
        working_dir: non_empty(run.working_dir),
        user: non_empty(run.user),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        labels: run.labels.unwrap_or_default(),
        stop_signal: non_empty(run.stop_signal),
    };
    Ok((config, diff_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_index_and_selects_platform() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d('a'),
            d('b')
        );
        let Parsed::Index(entries) = parse("t", json.as_bytes()).unwrap() else {
            panic!("not an index")
        };
        let amd = select_platform("t", &entries, &Platform::default()).unwrap();
        assert_eq!(amd.digest, d('b'));
        let arm = select_platform("t", &entries, &"linux/arm64/v8".parse().unwrap()).unwrap();
        assert_eq!(arm.digest, d('a'));
        let err = select_platform("t", &entries, &"linux/s390x".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("linux/arm64/v8, linux/amd64"),
            "{err}"
        );
    }

    #[test]
    fn parses_config() {
        let digest = Digest::of(b"x");
        let (config, diff_ids) = parse_config(
            "t",
            &digest,
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],
                "WorkingDir":"/w","User":"1000:1000","Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"]},
                "rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}}"#,
        )
        .unwrap();
        assert_eq!(config.env, ["PATH=/bin"]);
        assert_eq!(config.working_dir.as_deref(), Some("/w"));
        assert_eq!(config.user.as_deref(), Some("1000:1000"));
        assert_eq!(config.default_command(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(diff_ids.len(), 1);
    }
}
