//! [`ImageError`]: everything that can go wrong while getting an image or building its rootfs.

use std::io;
use std::path::PathBuf;

/// Why an image could not be pulled, imported or turned into a rootfs.
///
/// Every variant names what was being done and, where a user can act on it, how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image reference does not parse (`registry/repo:tag` or `registry/repo@sha256:...`).
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry refused the credentials (or asked for some and none were given).
    #[error(
        "not authorized to pull {reference} from {registry}: {detail}; check the credentials \
         (PullOptions::credentials or `auths` in ~/.docker/config.json)"
    )]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The image reference.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The repository, tag, digest or blob does not exist (in the registry or the local layout).
    #[error("{reference} not found: {detail}")]
    NotFound {
        /// The image reference (or local source).
        reference: String,
        /// What was missing.
        detail: String,
    },
    /// A blob's content does not hash to its digest (corrupt or tampered). Nothing of it was
    /// kept in the cache.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}; nothing was cached")]
    DigestMismatch {
        /// Which blob (layer, config, manifest, uncompressed layer).
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// No manifest in the image index matches the requested platform.
    #[error("{reference} has no image for platform {platform}; it has: {available}")]
    NoMatchingPlatform {
        /// The image reference.
        reference: String,
        /// The platform asked for (`os/arch[/variant]`).
        platform: String,
        /// The platforms the index lists.
        available: String,
    },
    /// Talking to the registry failed (network, TLS, protocol, server error).
    #[error("registry error while pulling {reference}: {detail}")]
    Registry {
        /// The image reference.
        reference: String,
        /// What went wrong.
        detail: String,
    },
    /// A download broke off; what arrived is kept as a partial file (never trusted: it is
    /// verified against the digest once complete) and a later pull resumes it.
    #[error(
        "download of {digest} from {reference} was interrupted after {received} bytes: {detail}"
    )]
    Interrupted {
        /// The image reference.
        reference: String,
        /// The blob.
        digest: String,
        /// Bytes on disk so far.
        received: u64,
        /// What broke.
        detail: String,
    },
    /// The manifest, config, layout or archive is malformed or uses something unsupported.
    #[error("invalid image {source_name}: {reason}")]
    InvalidImage {
        /// Where the image came from.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer uses a media type this crate cannot unpack.
    #[error("unsupported layer media type {media_type} in {source_name}")]
    UnsupportedMediaType {
        /// Where the image came from.
        source_name: String,
        /// The media type.
        media_type: String,
    },
    /// `~/.docker/config.json` (or `$DOCKER_CONFIG/config.json`) could not be read.
    #[error("cannot use registry credentials from {path}: {reason}")]
    Credentials {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A layer could not be applied to the rootfs tree.
    #[error("cannot apply layer {layer} (entry {entry:?})")]
    Unpack {
        /// The layer digest.
        layer: String,
        /// The tar entry being applied.
        entry: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Writing the layers' owners, modes, xattrs or device nodes into a rootfs built without
    /// root (with `debugfs`) failed.
    #[error("cannot give the rootfs its owners and device nodes without root: {detail}")]
    Rootless {
        /// What failed.
        detail: String,
    },
    /// `mkfs.ext4` is missing or failed.
    #[error("mkfs.ext4 failed ({status}): {stderr}; install e2fsprogs >= 1.43 (`apt-get install e2fsprogs`)")]
    Mkfs {
        /// Exit status (or the spawn error).
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// No image in the local image index has this name or ID.
    #[error(
        "no local image named {reference} (see `supermachine images` for the local images, or \
         pull it)"
    )]
    NotLocal {
        /// The name or ID as given.
        reference: String,
    },
    /// An image ID prefix matches several local images, or an ID to remove is listed under
    /// several names.
    #[error(
        "{reference} matches more than one local image ({candidates}); give a name or a longer ID"
    )]
    AmbiguousImage {
        /// The name or ID as given.
        reference: String,
        /// The image IDs or names it matches.
        candidates: String,
    },
    /// The local image index (`<cache>/images/index.json`) cannot be parsed.
    #[error(
        "the local image index {path} is corrupt ({reason}); delete it to reset (cached blobs \
         stay; pull or import images again to list them)"
    )]
    CorruptIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file operation in the cache or on a local image source failed.
    #[error("{context}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(source_name: impl Into<String>, reason: impl Into<String>) -> Self {
        ImageError::InvalidImage {
            source_name: source_name.into(),
            reason: reason.into(),
        }
    }

    /// A copy for places that each need one; `io::Error` sources are flattened to their message.
    pub(crate) fn duplicate(&self) -> Self {
        let io_copy = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            ImageError::InvalidReference { reference, reason } => ImageError::InvalidReference {
                reference: reference.clone(),
                reason: reason.clone(),
            },
            ImageError::Unauthorized {
                registry,
                reference,
                detail,
            } => ImageError::Unauthorized {
                registry: registry.clone(),
                reference: reference.clone(),
                detail: detail.clone(),
            },
            ImageError::NotFound { reference, detail } => ImageError::NotFound {
                reference: reference.clone(),
                detail: detail.clone(),
            },
            ImageError::DigestMismatch {
                what,
                expected,
                actual,
            } => ImageError::DigestMismatch {
                what: what.clone(),
                expected: expected.clone(),
                actual: actual.clone(),
            },
            ImageError::NoMatchingPlatform {
                reference,
                platform,
                available,
            } => ImageError::NoMatchingPlatform {
                reference: reference.clone(),
                platform: platform.clone(),
                available: available.clone(),
            },
            ImageError::Registry { reference, detail } => ImageError::Registry {
                reference: reference.clone(),
                detail: detail.clone(),
            },
            ImageError::Interrupted {
                reference,
                digest,
                received,
                detail,
            } => ImageError::Interrupted {
                reference: reference.clone(),
                digest: digest.clone(),
                received: *received,
                detail: detail.clone(),
            },
            ImageError::InvalidImage {
                source_name,
                reason,
            } => ImageError::invalid(source_name.clone(), reason.clone()),
            ImageError::UnsupportedMediaType {
                source_name,
                media_type,
            } => ImageError::UnsupportedMediaType {
                source_name: source_name.clone(),
                media_type: media_type.clone(),
            },
            ImageError::Credentials { path, reason } => ImageError::Credentials {
                path: path.clone(),
                reason: reason.clone(),
            },
            ImageError::Unpack {
                layer,
                entry,
                source,
            } => ImageError::Unpack {
                layer: layer.clone(),
                entry: entry.clone(),
                source: io_copy(source),
            },
            ImageError::Rootless { detail } => ImageError::Rootless {
                detail: detail.clone(),
            },
            ImageError::Mkfs { status, stderr } => ImageError::Mkfs {
                status: status.clone(),
                stderr: stderr.clone(),
            },
            ImageError::NotLocal { reference } => ImageError::NotLocal {
                reference: reference.clone(),
            },
            ImageError::AmbiguousImage {
                reference,
                candidates,
            } => ImageError::AmbiguousImage {
                reference: reference.clone(),
                candidates: candidates.clone(),
            },
            ImageError::CorruptIndex { path, reason } => ImageError::CorruptIndex {
                path: path.clone(),
                reason: reason.clone(),
            },
            ImageError::Io { context, source } => ImageError::Io {
                context: context.clone(),
                source: io_copy(source),
            },
        }
    }
}
