//! Pulling from a registry with `oci-client`: auth, manifest (and index → platform), config and
//! layers, each verified against its digest and stored in the blob store; layers download
//! concurrently and report [`PullEvent`]s.
//!
//! Resume: an interrupted download keeps `blobs/tmp/<hex>.partial`; the next pull asks for the
//! rest with an HTTP range request (`Client::pull_blob_stream_partial`), hashes the bytes already
//! on disk first, and trusts the file only if the whole blob then matches its digest. A server
//! that ignores the range gets a full download; a resumed blob that does not verify is discarded
//! and downloaded once more from the start.

use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use tokio::io::AsyncWriteExt;

use super::auth::{docker_config_path, from_docker_config, Credentials};
use super::digest::{Digest, Hasher};
use super::error::ImageError;
use super::manifest::{self, Parsed};
use super::reference::ImageReference;
use super::store::BlobStore;
use super::{Image, LayerInfo, PullEvent, PullOptions};

const DEFAULT_CONCURRENT_DOWNLOADS: usize = 3;
/// Progress events are sent at most once per this many bytes of a layer.
const PROGRESS_STEP: u64 = 256 * 1024;

/// reqwest (under oci-client) is built with rustls but no bundled crypto provider, so that the
/// build needs no aws-lc; it uses the process default, which we set to ring unless the
/// application installed one already.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

struct Puller<'a> {
    client: Client,
    reference: &'a ImageReference,
    auth: RegistryAuth,
    store: BlobStore,
    options: &'a PullOptions,
}

pub(crate) async fn pull(
    reference: &ImageReference,
    options: &PullOptions,
    cache_root: PathBuf,
) -> Result<Image, ImageError> {
    let registry = reference.resolved_registry().to_owned();
    let plain_http = reference.is_loopback_registry()
        || options
            .insecure
            .iter()
            .any(|r| r == reference.registry() || *r == registry);
    let given_credentials = options.credentials.clone();
    let docker_config = options.docker_config.clone();
    let auth_registry = reference.registry().to_owned();
    let store_root = cache_root.clone();
    // Opening the store (directories), reading the Docker config and building the HTTP client
    // (which loads and parses the system's root certificates: ~0.1-0.2 s) block: off the
    // runtime.
    let (store, credentials, client) = super::blocking(move || {
        let store = BlobStore::open(&store_root)?;
        let credentials = match given_credentials {
            Some(c) => c,
            None => match docker_config.or_else(docker_config_path) {
                Some(path) => from_docker_config(&path, &auth_registry)?.unwrap_or_default(),
                None => Credentials::Anonymous,
            },
        };
        install_crypto_provider();
        let client = Client::new(ClientConfig {
            protocol: if plain_http {
                ClientProtocol::HttpsExcept(vec![registry])
            } else {
                ClientProtocol::Https
            },
            // Index entries are resolved here, to report what platforms there are.
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        });
        Ok((store, credentials, client))
    })
    .await?;
    tracing::debug!(%reference, plain_http, credentials = ?credentials, "pulling image");
    let puller = Puller {
        client,
        reference,
        auth: credentials.to_oci(),
        store,
        options,
    };
    puller.run(cache_root).await
}

impl Puller<'_> {
    async fn run(&self, cache_root: PathBuf) -> Result<Image, ImageError> {
        let source = self.reference.to_string();
        let (bytes, digest) = self.manifest(self.reference.oci()).await?;
        let (manifest_digest, config_desc, layer_descs) = match manifest::parse(&source, &bytes)? {
            Parsed::Manifest { config, layers } => (digest, config, layers),
            Parsed::Index(entries) => {
                let entry = manifest::select_platform(&source, &entries, &self.options.platform)?;
                let by_digest = self.reference.oci().clone_with_digest(entry.digest.clone());
                let (bytes, digest) = self.manifest(&by_digest).await?;
                match manifest::parse(&source, &bytes)? {
                    Parsed::Manifest { config, layers } => (digest, config, layers),
                    Parsed::Index(_) => {
                        return Err(ImageError::invalid(
                            &source,
                            "index entry points at another index",
                        ))
                    }
                }
            }
        };
        let layers = manifest::layer_infos(&source, &config_desc, &layer_descs)?;
        self.emit(&PullEvent::Resolved {
            manifest_digest: manifest_digest.to_string(),
            layers: layers.len(),
            total_bytes: layers.iter().map(|l| l.size).sum(),
        });

        let config_digest =
            Digest::parse(&config_desc.digest).map_err(|e| ImageError::invalid(&source, e))?;
        self.fetch_blob(
            &config_digest,
            "config",
            u64::try_from(config_desc.size).unwrap_or(0),
            false,
        )
        .await?;
        let config_path = self.store.path(&config_digest);
        let config_bytes = tokio::fs::read(&config_path).await.map_err(|e| {
            ImageError::io(format!("cannot read blob {}", config_path.display()), e)
        })?;
        let (config, diff_ids) = manifest::parse_config(&source, &config_digest, &config_bytes)?;
        manifest::check_config_platform(&source, &config, &self.options.platform)?;
        manifest::check_diff_id_count(&source, diff_ids.len(), layers.len())?;

        let concurrency = self
            .options
            .max_concurrent_downloads
            .unwrap_or(DEFAULT_CONCURRENT_DOWNLOADS);
        futures::stream::iter(layers.iter().map(Ok))
            .try_for_each_concurrent(concurrency, |layer: &LayerInfo| async move {
                let digest = Digest::parse(&layer.digest)
                    .map_err(|e| ImageError::invalid(self.reference.to_string(), e))?;
                self.fetch_blob(&digest, "layer", layer.size, true).await
            })
            .await?;

        Ok(Image {
            source,
            manifest_digest: manifest_digest.to_string(),
            config,
            layers,
            diff_ids,
            cache_root,
        })
    }

    /// Fetches a manifest, checks its digest (against the reference's, when it pins one) and
    /// keeps it in the store.
    async fn manifest(
        &self,
        reference: &oci_client::Reference,
    ) -> Result<(Vec<u8>, Digest), ImageError> {
        let (bytes, reported) = self
            .client
            .pull_manifest_raw(reference, &self.auth, manifest::ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.map_err(e, "manifest"))?;
        let actual = Digest::of(&bytes);
        for expected in [reference.digest(), Some(reported.as_str())]
            .into_iter()
            .flatten()
        {
            if expected != actual.as_str() {
                return Err(ImageError::DigestMismatch {
                    what: format!("manifest of {reference}"),
                    expected: expected.to_owned(),
                    actual: actual.to_string(),
                });
            }
        }
        let store = self.store.clone();
        let (bytes_copy, expected) = (bytes.to_vec(), actual.clone());
        super::blocking(move || store.import("manifest", Some(&expected), &bytes_copy[..])).await?;
        Ok((bytes.to_vec(), actual))
    }

    fn emit(&self, event: &PullEvent) {
        if let Some(progress) = &self.options.progress {
            progress(event);
        }
    }

    /// Downloads one blob into the store (resuming a partial download), unless it is there.
    async fn fetch_blob(
        &self,
        digest: &Digest,
        what: &str,
        size: u64,
        report: bool,
    ) -> Result<(), ImageError> {
        let emit = |event: PullEvent| {
            if report {
                self.emit(&event);
            }
        };
        let done_cached = || PullEvent::LayerDone {
            digest: digest.to_string(),
            size,
            cached: true,
        };
        if self.store.contains(digest) {
            emit(done_cached());
            return Ok(());
        }
        let _lock = self.store.lock(digest).await?;
        if self.store.contains(digest) {
            emit(done_cached());
            return Ok(());
        }
        let partial = self.store.partial_path(digest);
        let io_err =
            |e: std::io::Error| ImageError::io(format!("cannot write {}", partial.display()), e);
        for attempt in 0..2 {
            let mut offset = tokio::fs::metadata(&partial)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
            if size > 0 && offset >= size {
                offset = 0; // cannot be a prefix of the blob: start over
            }
            let mut hasher = Hasher::default();
            if offset > 0 {
                hasher = hash_prefix(&partial, offset).await.map_err(io_err)?;
            }
            let stream = if offset > 0 {
                match self
                    .client
                    .pull_blob_stream_partial(self.reference.oci(), digest.as_str(), offset, None)
                    .await
                    .map_err(|e| self.map_err(e, what))?
                {
                    BlobResponse::Partial(s) => s,
                    BlobResponse::Full(s) => {
                        tracing::debug!(%digest, "registry ignored the range request");
                        offset = 0;
                        hasher = Hasher::default();
                        s
                    }
                }
            } else {
                self.client
                    .pull_blob_stream(self.reference.oci(), digest.as_str())
                    .await
                    .map_err(|e| self.map_err(e, what))?
            };
            let resumed = offset > 0;
            emit(PullEvent::LayerStarted {
                digest: digest.to_string(),
                size,
                resumed_from: offset,
            });
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(!resumed)
                .append(resumed)
                .open(&partial)
                .await
                .map_err(io_err)?;
            let mut stream = stream.stream;
            let mut last_report = offset;
            let mut failure = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(bytes) => {
                        hasher.update(&bytes);
                        file.write_all(&bytes).await.map_err(io_err)?;
                        let downloaded = hasher.len();
                        if downloaded - last_report >= PROGRESS_STEP {
                            last_report = downloaded;
                            emit(PullEvent::LayerProgress {
                                digest: digest.to_string(),
                                downloaded,
                                size,
                            });
                        }
                    }
                    // oci-client's own check at the end of the stream; ours below decides.
                    Err(e) if is_verification_error(&e) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            file.flush().await.map_err(io_err)?;
            file.sync_all().await.map_err(io_err)?;
            drop(file);
            if let Some(e) = failure {
                return Err(ImageError::Interrupted {
                    reference: self.reference.to_string(),
                    digest: digest.to_string(),
                    received: hasher.len(),
                    detail: e.to_string(),
                });
            }
            let received = hasher.len();
            let actual = hasher.finish();
            if actual != *digest {
                let _ = tokio::fs::remove_file(&partial).await;
                if resumed && attempt == 0 {
                    tracing::warn!(%digest, "resumed download did not verify; downloading again");
                    continue;
                }
                return Err(ImageError::DigestMismatch {
                    what: format!("{what} {digest} of {} ({received} bytes)", self.reference),
                    expected: digest.to_string(),
                    actual: actual.to_string(),
                });
            }
            self.store.commit_partial(digest)?;
            emit(PullEvent::LayerProgress {
                digest: digest.to_string(),
                downloaded: received,
                size,
            });
            emit(PullEvent::LayerDone {
                digest: digest.to_string(),
                size,
                cached: false,
            });
            return Ok(());
        }
        unreachable!("the second attempt always returns")
    }

    fn map_err(&self, error: OciDistributionError, what: &str) -> ImageError {
        let reference = self.reference.to_string();
        let unauthorized = |detail: String| ImageError::Unauthorized {
            registry: self.reference.registry().to_owned(),
            reference: reference.clone(),
            detail,
        };
        let not_found = |detail: String| ImageError::NotFound {
            reference: reference.clone(),
            detail,
        };
        match error {
            OciDistributionError::UnauthorizedError { url } => {
                unauthorized(format!("HTTP 401 for {url}"))
            }
            OciDistributionError::AuthenticationFailure(m) => unauthorized(m),
            OciDistributionError::ImageManifestNotFoundError(m) => not_found(m),
            OciDistributionError::RegistryError { envelope, url } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let detail = format!("{what}: {envelope} ({url})");
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    not_found(detail)
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    unauthorized(detail)
                } else {
                    ImageError::Registry { reference, detail }
                }
            }
            OciDistributionError::ServerError { code, url, message } => {
                let detail = format!("{what}: HTTP {code} for {url}: {message}");
                match code {
                    404 => not_found(detail),
                    401 | 403 => unauthorized(detail),
                    _ => ImageError::Registry { reference, detail },
                }
            }
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { expected, actual },
            ) => ImageError::DigestMismatch {
                what: format!("{what} of {reference}"),
                expected,
                actual,
            },
            OciDistributionError::UnsupportedMediaTypeError(media_type) => {
                ImageError::UnsupportedMediaType {
                    source_name: reference,
                    media_type,
                }
            }
            other => ImageError::Registry {
                reference,
                detail: format!("{what}: {}", crate::Report(&other)),
            },
        }
    }
}

fn is_verification_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>())
        .is_some_and(|d| matches!(d, oci_client::errors::DigestError::VerificationError { .. }))
}

/// The sha256 state after the first `len` bytes of `path`.
async fn hash_prefix(path: &std::path::Path, len: u64) -> std::io::Result<Hasher> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let file = std::fs::File::open(&path)?;
        let mut reader = file.take(len);
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hasher.len() != len {
            return Err(std::io::Error::other("partial file shrank while hashing"));
        }
        Ok(hasher)
    })
    .await
    .map_err(std::io::Error::other)?
}
