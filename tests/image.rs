//! The image pipeline against a real registry (`docker-registry` on 127.0.0.1, started by the
//! tests, with and without basic auth) and real images pushed with `skopeo`: pull by tag and by
//! digest, auth failures, missing tags, tampered blobs, resumed downloads, whiteouts and metadata
//! in the built ext4 rootfs (read with `debugfs` through [`Ext4Image`], no mount), OCI layout and
//! docker-archive imports, and the Debian minbase figures.
//!
//! Runs as any user (CI runs it as root and as `nobody`); only the two tests that compare a root
//! build with one as `nobody` need root, and skip with a message without it. Needs
//! `docker-registry skopeo apache2-utils debootstrap busybox-static e2fsprogs`. Each test uses
//! its own cache dir; the Debian rootfs tarball is made once under `cache::root()/test-images`
//! (`debootstrap` needs root: a user without it needs the tarball there already).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use supermachine::{Credentials, Image, ImageError, ImportOptions, PullEvent, PullOptions};
use supermachine_e2e::ext4::{Entry, Ext4Image, Kind};
use supermachine_e2e::images::{self, LAYERED_TREE};
use supermachine_e2e::registry::{docker_archive_from_layout, Registry};

fn options(cache: &Path) -> PullOptions {
    PullOptions::new()
        .cache_dir(cache)
        // Never read the developer's own ~/.docker/config.json.
        .docker_config(cache.join("no-docker-config.json"))
}

/// The built rootfs image, read through `debugfs`.
fn open(image: &Path) -> Ext4Image {
    Ext4Image::open(image).unwrap()
}

/// Every path of `image` with its kind letter, sorted (`lost+found` left out).
fn tree(image: &Ext4Image) -> Vec<(String, char)> {
    without_lost_found(image.walk().unwrap())
        .map(|e| (e.path, e.inode.kind.letter()))
        .collect()
}

/// `entries` less mkfs' `lost+found`, which no layer made.
fn without_lost_found(entries: Vec<Entry>) -> impl Iterator<Item = Entry> {
    entries
        .into_iter()
        .filter(|e| e.path != "lost+found" && !e.path.starts_with("lost+found/"))
}

fn layer_progress_recorder() -> (PullOptions, Arc<Mutex<Vec<PullEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let opts = PullOptions::new().on_progress(move |e| sink.lock().unwrap().push(e.clone()));
    (opts, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_and_digest_then_build_rootfs() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = images::busybox_layout(&work.path().join("layout"), "v1").unwrap();
    registry
        .push_layout(&layout.dir, "v1", "test/busybox:oci", false)
        .unwrap();
    registry
        .push_layout(&layout.dir, "v1", "test/busybox:v2s2", true)
        .unwrap();
    let cache = work.path().join("cache");

    // Two pulls of one image into one empty cache at the same time: both succeed, one copy.
    let shared = work.path().join("shared-cache");
    let reference = registry.reference("test/busybox:oci");
    let (a, b) = tokio::join!(
        Image::pull_with(&reference, options(&shared)),
        Image::pull_with(&reference, options(&shared)),
    );
    assert_eq!(a.unwrap().digest(), b.unwrap().digest());
    assert!(std::fs::read_dir(shared.join("blobs/tmp"))
        .unwrap()
        .next()
        .is_none());

    // OCI media types, by tag, with progress events.
    let (opts, events) = layer_progress_recorder();
    let opts = opts
        .cache_dir(&cache)
        .docker_config(cache.join("none.json"));
    let image = Image::pull_with(&registry.reference("test/busybox:oci"), opts)
        .await
        .unwrap();
    assert_eq!(image.digest(), layout.config_digest);
    assert_eq!(image.layers().len(), 1);
    assert_eq!(image.config().env, ["PATH=/bin", "GREETING=hello"]);
    assert_eq!(image.config().working_dir.as_deref(), Some("/root"));
    assert_eq!(image.config().default_command(), ["sh"]);
    {
        let events = events.lock().unwrap();
        assert!(
            matches!(events.first(), Some(PullEvent::Resolved { layers: 1, .. })),
            "{events:?}"
        );
        assert!(events.iter().any(|e| matches!(
            e,
            PullEvent::LayerStarted {
                resumed_from: 0,
                ..
            }
        )));
        assert!(
            matches!(
                events.last(),
                Some(PullEvent::LayerDone { cached: false, .. })
            ),
            "{events:?}"
        );
    }

    // By digest: the same manifest.
    let pinned = format!(
        "{}@{}",
        registry.reference("test/busybox"),
        image.manifest_digest()
    );
    let by_digest = Image::pull_with(&pinned, options(&cache)).await.unwrap();
    assert_eq!(by_digest.manifest_digest(), image.manifest_digest());

    // Docker v2s2 media types: other manifest, same config, blobs already cached.
    let (opts, events) = layer_progress_recorder();
    let v2s2 = Image::pull_with(
        &registry.reference("test/busybox:v2s2"),
        opts.cache_dir(&cache)
            .docker_config(cache.join("none.json")),
    )
    .await
    .unwrap();
    assert_ne!(v2s2.manifest_digest(), image.manifest_digest());
    assert_eq!(v2s2.digest(), image.digest());
    assert!(
        v2s2.layers()[0].media_type.contains("docker"),
        "{:?}",
        v2s2.layers()
    );
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, PullEvent::LayerDone { cached: true, .. })));
    let v2s2_by_digest = Image::pull_with(
        &format!(
            "{}@{}",
            registry.reference("test/busybox"),
            v2s2.manifest_digest()
        ),
        options(&cache),
    )
    .await
    .unwrap();
    assert_eq!(v2s2_by_digest.digest(), image.digest());

    // Rootfs: built once, then reused for the other manifest of the same image.
    assert!(image.cached_rootfs().is_none());
    let rootfs = image.rootfs().await.unwrap();
    assert!(!rootfs.reused);
    assert!(rootfs.path.ends_with(format!(
        "rootfs/{}.ext4",
        image.digest().trim_start_matches("sha256:")
    )));
    let again = v2s2.rootfs().await.unwrap();
    assert!(again.reused);
    assert_eq!(again.path, rootfs.path);
    let saved: supermachine::ImageConfig =
        serde_json::from_slice(&std::fs::read(&rootfs.config_path).unwrap()).unwrap();
    assert_eq!(&saved, image.config());

    let img = open(&rootfs.path);
    let busybox = img.stat("bin/busybox").unwrap();
    assert_eq!(
        (busybox.kind, busybox.mode, busybox.uid, busybox.gid),
        (Kind::File, 0o755, 0, 0)
    );
    assert_eq!(
        img.read("bin/busybox").unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(img.read_link("bin/sh").unwrap(), Path::new("busybox"));
    let root_dir = img.stat("root").unwrap();
    assert_eq!((root_dir.kind, root_dir.mode), (Kind::Dir, 0o700));
    assert_eq!(img.stat("tmp").unwrap().mode, 0o1777);
    assert_eq!(img.stat("/").unwrap().mode, 0o755);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry() {
    let registry = Registry::start_with_auth("alice", "s3cret-pw").unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = images::busybox_layout(&work.path().join("layout"), "v1").unwrap();
    registry
        .push_layout(&layout.dir, "v1", "private/busybox:v1", false)
        .unwrap();
    let cache = work.path().join("cache");
    let reference = registry.reference("private/busybox:v1");

    // Explicit credentials, by tag and by digest.
    let image = Image::pull_with(
        &reference,
        options(&cache).credentials(Credentials::basic("alice", "s3cret-pw")),
    )
    .await
    .unwrap();
    assert_eq!(image.digest(), layout.config_digest);
    let pinned = format!(
        "{}@{}",
        registry.reference("private/busybox"),
        image.manifest_digest()
    );
    let by_digest = Image::pull_with(
        &pinned,
        options(&cache).credentials(Credentials::basic("alice", "s3cret-pw")),
    )
    .await
    .unwrap();
    assert_eq!(by_digest.digest(), image.digest());

    // From a Docker config.json (`auths` with base64 user:password), into an empty cache.
    let docker_config = work.path().join("config.json");
    let auth = base64_encode(b"alice:s3cret-pw");
    std::fs::write(
        &docker_config,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.addr()
        ),
    )
    .unwrap();
    let from_config = Image::pull_with(
        &reference,
        PullOptions::new()
            .cache_dir(work.path().join("cache2"))
            .docker_config(&docker_config),
    )
    .await
    .unwrap();
    assert_eq!(from_config.digest(), image.digest());

    // Wrong password, and none at all.
    let wrong = Image::pull_with(
        &reference,
        options(&work.path().join("cache3")).credentials(Credentials::basic("alice", "wrong")),
    )
    .await
    .unwrap_err();
    assert!(matches!(wrong, ImageError::Unauthorized { .. }), "{wrong}");
    let anonymous = Image::pull_with(&reference, options(&work.path().join("cache3")))
        .await
        .unwrap_err();
    assert!(
        matches!(anonymous, ImageError::Unauthorized { .. }),
        "{anonymous}"
    );
    // The error converts into the crate's error type.
    let top: supermachine::Error = anonymous.into();
    assert!(matches!(
        top,
        supermachine::Error::Image(ImageError::Unauthorized { .. })
    ));
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tag_or_repository_is_not_found() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = images::busybox_layout(&work.path().join("layout"), "v1").unwrap();
    registry
        .push_layout(&layout.dir, "v1", "test/busybox:v1", false)
        .unwrap();
    let cache = work.path().join("cache");
    for reference in ["test/busybox:nope", "test/nothing:v1"] {
        let err = Image::pull_with(&registry.reference(reference), options(&cache))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ImageError::NotFound { .. }),
            "{reference}: {err}"
        );
    }
    let missing_digest = format!(
        "{}@sha256:{}",
        registry.reference("test/busybox"),
        "0".repeat(64)
    );
    let err = Image::pull_with(&missing_digest, options(&cache))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    let err = Image::pull_with("not a reference!", options(&cache))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::InvalidReference { .. }), "{err}");
}

/// Blob files in the cache (verified ones and partial downloads).
fn cached_files(cache: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["blobs/sha256", "blobs/tmp"] {
        if let Ok(dir) = std::fs::read_dir(cache.join(sub)) {
            for entry in dir {
                out.push(format!(
                    "{sub}/{}",
                    entry.unwrap().file_name().to_string_lossy()
                ));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_blob_is_a_digest_mismatch_and_not_cached() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = images::busybox_layout(&work.path().join("layout"), "v1").unwrap();
    registry
        .push_layout(&layout.dir, "v1", "test/busybox:v1", false)
        .unwrap();
    // Same length, one byte flipped, in the registry's own storage.
    let layer = &layout.layer_digests[0];
    let data = registry.blob_data_path(layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let cache = work.path().join("cache");
    let err = Image::pull_with(&registry.reference("test/busybox:v1"), options(&cache))
        .await
        .unwrap_err();
    match &err {
        ImageError::DigestMismatch { expected, .. } => assert_eq!(expected, layer),
        other => panic!("expected a digest mismatch, got {other}"),
    }
    let hex = layer.trim_start_matches("sha256:");
    let files = cached_files(&cache);
    assert!(
        !files.iter().any(|f| f.contains(hex)),
        "tampered blob left in the cache: {files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_download_resumes_and_bad_partials_are_not_trusted() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = images::busybox_layout(&work.path().join("layout"), "v1").unwrap();
    registry
        .push_layout(&layout.dir, "v1", "test/busybox:v1", false)
        .unwrap();
    let layer = &layout.layer_digests[0];
    let hex = layer.trim_start_matches("sha256:");
    let blob = std::fs::read(layout.dir.join("blobs/sha256").join(hex)).unwrap();
    let half = blob.len() / 2;

    for (name, partial, expect_resume) in [
        ("good prefix", blob[..half].to_vec(), true),
        ("garbage prefix", vec![0x55; half], true),
    ] {
        let cache = work.path().join(name.replace(' ', "-"));
        std::fs::create_dir_all(cache.join("blobs/tmp")).unwrap();
        std::fs::write(cache.join(format!("blobs/tmp/{hex}.partial")), &partial).unwrap();
        let (opts, events) = layer_progress_recorder();
        let image = Image::pull_with(
            &registry.reference("test/busybox:v1"),
            opts.cache_dir(&cache)
                .docker_config(cache.join("none.json")),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(image.layers()[0].digest, *layer);
        let events = events.lock().unwrap();
        let resumed = events.iter().any(
            |e| matches!(e, PullEvent::LayerStarted { resumed_from, .. } if *resumed_from == half as u64),
        );
        assert_eq!(resumed, expect_resume, "{name}: {events:?}");
        assert_eq!(
            std::fs::read(cache.join("blobs/sha256").join(hex)).unwrap(),
            blob,
            "{name}"
        );
        assert!(
            !cache.join(format!("blobs/tmp/{hex}.partial")).exists(),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_hardlinks_and_metadata_survive_into_the_rootfs() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = images::layered_layout(&work.path().join("layout"), "v1").unwrap();
    registry
        .push_layout(&layout.dir, "v1", "test/layered:v1", false)
        .unwrap();
    let cache = work.path().join("cache");
    let image = Image::pull_with(&registry.reference("test/layered:v1"), options(&cache))
        .await
        .unwrap();
    let media: Vec<_> = image
        .layers()
        .iter()
        .map(|l| l.media_type.as_str())
        .collect();
    assert_eq!(
        media,
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+zstd"
        ]
    );
    let rootfs = image.rootfs().await.unwrap();
    let img = open(&rootfs.path);

    let expected: Vec<(String, char)> = LAYERED_TREE
        .iter()
        .map(|(p, k)| (p.to_string(), *k))
        .collect();
    assert_eq!(tree(&img), expected);

    let meta = |p: &str| img.stat(p).unwrap();
    let owner_mode = |p: &str| {
        let m = meta(p);
        (m.uid, m.gid, m.mode)
    };
    assert_eq!(img.read("a/keep").unwrap(), b"v3");
    assert_eq!(img.read("x").unwrap(), b"now a file");
    // Owners and modes.
    assert_eq!(owner_mode("data"), (1000, 1000, 0o750));
    assert_eq!(owner_mode("data/owned"), (1000, 1001, 0o640));
    assert_eq!(owner_mode("bin/suid"), (0, 0, 0o4755));
    assert_eq!(owner_mode("a/keep"), (0, 0, 0o644));
    // Hardlinks: one inode, across three layers, with the first layer's owner and mode.
    let target = meta("links/target");
    assert_eq!(target.nlink, 3);
    assert_eq!(owner_mode("links/target"), (1002, 1003, 0o604));
    assert_eq!(meta("links/hard").ino, target.ino);
    assert_eq!(meta("links/hard2").ino, target.ino);
    assert_eq!(img.read("links/hard2").unwrap(), b"shared");
    // A symlink with its own owner, to the shared file.
    let sym = meta("links/sym");
    assert_eq!(sym.kind, Kind::Symlink);
    assert_eq!((sym.uid, sym.gid), (1001, 1001));
    assert_eq!(sym.link_target.as_deref(), Some("target"));
    // Device node and fifo.
    let chr = meta("dev/testchr");
    assert_eq!(
        (chr.kind, chr.rdev, chr.mode, chr.uid),
        (Kind::CharDevice, Some((1, 3)), 0o666, 0)
    );
    let fifo = meta("dev/fifo");
    assert_eq!((fifo.kind, fifo.mode), (Kind::Fifo, 0o644));
    // The xattr from the PAX header, and no other.
    let xattrs = meta("data/xattr").xattrs;
    let want = [("user.test".to_owned(), b"hello".to_vec())];
    assert_eq!(xattrs.into_iter().collect::<Vec<_>>(), want);
    assert!(meta("data/owned").xattrs.is_empty());

    // The same image from the OCI layout: same image ID, so the same rootfs.
    let imported = Image::from_oci_layout_with(
        &layout.dir,
        Some("v1"),
        &ImportOptions::new().cache_dir(&cache),
    )
    .await
    .unwrap();
    assert_eq!(imported.digest(), image.digest());
    assert_eq!(imported.manifest_digest(), layout.manifest_digest);
    assert!(imported.rootfs().await.unwrap().reused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_oci_layout_and_docker_archive() {
    let work = tempfile::tempdir().unwrap();
    let layout = images::busybox_layout(&work.path().join("layout"), "v1").unwrap();
    let cache = work.path().join("cache");
    let opts = ImportOptions::new().cache_dir(&cache);

    let from_layout = Image::from_oci_layout_with(&layout.dir, Some("v1"), &opts)
        .await
        .unwrap();
    assert_eq!(from_layout.digest(), layout.config_digest);
    assert_eq!(from_layout.manifest_digest(), layout.manifest_digest);
    assert_eq!(from_layout.config().default_command(), ["sh"]);
    // Without a tag: the only image.
    let untagged = Image::from_oci_layout_with(&layout.dir, None, &opts)
        .await
        .unwrap();
    assert_eq!(untagged.digest(), from_layout.digest());
    let missing = Image::from_oci_layout_with(&layout.dir, Some("nope"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(missing, ImageError::NotFound { .. }), "{missing}");

    // A tampered layout blob is refused and not stored.
    let tampered_dir = work.path().join("tampered");
    let tampered = images::busybox_layout(&tampered_dir, "v1").unwrap();
    let layer_hex = tampered.layer_digests[0].trim_start_matches("sha256:");
    let blob_path = tampered_dir.join("blobs/sha256").join(layer_hex);
    let mut bytes = std::fs::read(&blob_path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&blob_path, bytes).unwrap();
    let tampered_cache = work.path().join("tampered-cache");
    let err = Image::from_oci_layout_with(
        &tampered_dir,
        Some("v1"),
        &ImportOptions::new().cache_dir(&tampered_cache),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(!cached_files(&tampered_cache)
        .iter()
        .any(|f| f.contains(layer_hex)));

    // docker-archive (uncompressed layers): same config, so the same image ID and rootfs.
    let archive = work.path().join("busybox.tar");
    docker_archive_from_layout(&layout.dir, "v1", &archive, "test/busybox:v1").unwrap();
    let from_archive = Image::from_docker_archive_with(&archive, &opts)
        .await
        .unwrap();
    assert_eq!(from_archive.digest(), from_layout.digest());
    assert_eq!(from_archive.config(), from_layout.config());
    assert!(
        from_archive.source().ends_with("test/busybox:v1"),
        "{}",
        from_archive.source()
    );
    assert_eq!(
        from_archive.layers()[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar"
    );
    let rootfs = from_archive.rootfs().await.unwrap();
    assert!(!rootfs.reused);
    assert_eq!(
        open(&rootfs.path).stat("bin/busybox").unwrap().kind,
        Kind::File
    );
    assert!(from_layout.rootfs().await.unwrap().reused);
}

/// A one-file layer whose file says which architecture's image it is.
fn marker_layer(architecture: &str) -> images::LayerBlob {
    let mut tar = images::TarBuilder::new();
    tar.file("arch", architecture.as_bytes(), 0o644, 0, 0);
    images::LayerBlob::tar(tar.finish())
}

/// Images follow the host: the default platform is `linux/<host arch>`, a multi-platform index
/// (from a registry or an OCI layout) resolves to the host's image, and a single-platform image
/// built for another architecture is refused by name, from every source and by `Vm::start`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_follow_the_host_platform() {
    let host = images::host_architecture();
    let foreign = images::foreign_architecture();
    assert_eq!(
        supermachine::Platform::default(),
        supermachine::Platform::host()
    );
    assert_eq!(
        supermachine::Platform::host().to_string(),
        format!("linux/{host}")
    );

    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let run = serde_json::json!({"Cmd": ["sh"]});
    let multi = images::write_multi_arch_layout(
        &work.path().join("multi"),
        "v1",
        &[
            (foreign, vec![marker_layer(foreign)]),
            (host, vec![marker_layer(host)]),
        ],
        run.clone(),
    )
    .unwrap();
    let registry = Registry::start().unwrap();
    registry
        .push_index(&multi[0].dir, "v1", "test/multi:v1")
        .unwrap();

    // A multi-platform index, pulled and imported: the host's image by default.
    let pulled = Image::pull_with(&registry.reference("test/multi:v1"), options(&cache))
        .await
        .unwrap();
    assert_eq!(pulled.digest(), multi[1].config_digest);
    assert_eq!(pulled.config().architecture, host);
    let imported = Image::from_oci_layout_with(
        &multi[0].dir,
        Some("v1"),
        &ImportOptions::new().cache_dir(&cache),
    )
    .await
    .unwrap();
    assert_eq!(imported.digest(), multi[1].config_digest);
    // The other one on request.
    let other: supermachine::Platform = format!("linux/{foreign}").parse().unwrap();
    let chosen = Image::from_oci_layout_with(
        &multi[0].dir,
        Some("v1"),
        &ImportOptions::new()
            .cache_dir(&cache)
            .platform(other.clone()),
    )
    .await
    .unwrap();
    assert_eq!(chosen.digest(), multi[0].config_digest);

    // An index without the host's platform: the error names what it has.
    let foreign_only = images::write_multi_arch_layout(
        &work.path().join("foreign-index"),
        "v1",
        &[(foreign, vec![marker_layer(foreign)])],
        run.clone(),
    )
    .unwrap();
    registry
        .push_index(&foreign_only[0].dir, "v1", "test/foreign-index:v1")
        .unwrap();
    let err = Image::pull_with(
        &registry.reference("test/foreign-index:v1"),
        options(&cache),
    )
    .await
    .unwrap_err();
    let want = format!("has no image for platform linux/{host}; it has: linux/{foreign}");
    assert!(
        matches!(err, ImageError::NoMatchingPlatform { .. }) && err.to_string().contains(&want),
        "{err}"
    );

    // A single-platform image for another architecture, from each source.
    let single = images::write_oci_layout_for(
        &work.path().join("single"),
        "v1",
        &[marker_layer(foreign)],
        run,
        foreign,
    )
    .unwrap();
    registry
        .push_layout(&single.dir, "v1", "test/foreign:v1", false)
        .unwrap();
    let archive = work.path().join("foreign.tar");
    docker_archive_from_layout(&single.dir, "v1", &archive, "test/foreign:v1").unwrap();
    let import = ImportOptions::new().cache_dir(&cache);
    for (source, result) in [
        (
            "registry",
            Image::pull_with(&registry.reference("test/foreign:v1"), options(&cache)).await,
        ),
        (
            "OCI layout",
            Image::from_oci_layout_with(&single.dir, Some("v1"), &import).await,
        ),
        (
            "docker archive",
            Image::from_docker_archive_with(&archive, &import).await,
        ),
    ] {
        let err = result.map(|i| i.digest().to_owned()).unwrap_err();
        assert!(
            matches!(err, ImageError::NoMatchingPlatform { .. }) && err.to_string().contains(&want),
            "{source}: {err}"
        );
    }

    // Asked for explicitly it imports, but a VM on this host refuses it before building anything.
    let explicit = Image::from_oci_layout_with(
        &single.dir,
        Some("v1"),
        &ImportOptions::new().cache_dir(&cache).platform(other),
    )
    .await
    .unwrap();
    let err = supermachine::Vm::start(supermachine::VmConfig::new().image(explicit))
        .await
        .map(|_| ())
        .unwrap_err();
    let message = supermachine::Report(&err).to_string();
    assert!(
        message.contains(&format!(
            "is built for linux/{foreign}, but VMs on this host run linux/{host}"
        )),
        "{message}"
    );
    assert!(
        !cache.join("rootfs").exists()
            || std::fs::read_dir(cache.join("rootfs"))
                .unwrap()
                .next()
                .is_none(),
        "no rootfs was built for the refused image"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_minbase_pull_and_convert_figures() {
    let work = tempfile::tempdir().unwrap();
    let layout = tokio::task::spawn_blocking({
        let dir = work.path().join("layout");
        move || images::debian_layout(&dir, "bookworm")
    })
    .await
    .unwrap()
    .unwrap();
    let registry = Registry::start().unwrap();
    registry
        .push_layout(&layout.dir, "bookworm", "debian/minbase:bookworm", false)
        .unwrap();
    let cache = work.path().join("cache");
    let reference = registry.reference("debian/minbase:bookworm");

    let started = Instant::now();
    let image = Image::pull_with(&reference, options(&cache)).await.unwrap();
    let pulled = started.elapsed();
    let rootfs = image.rootfs().await.unwrap();
    let cold = started.elapsed();
    assert!(!rootfs.reused);

    let started = Instant::now();
    let again = Image::pull_with(&reference, options(&cache)).await.unwrap();
    let cached_rootfs = again.rootfs().await.unwrap();
    let warm = started.elapsed();
    assert!(cached_rootfs.reused);

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "debian bookworm minbase: pull {:.2}s + convert {:.2}s = cold {:.2}s; cached pull+rootfs {:.3}s; \
         compressed layers {:.1} MiB, rootfs image {:.1} MiB ({:.1} MiB allocated)",
        pulled.as_secs_f64(),
        (cold - pulled).as_secs_f64(),
        cold.as_secs_f64(),
        warm.as_secs_f64(),
        mib(image.compressed_size()),
        mib(rootfs.size),
        mib(rootfs.allocated),
    );
    assert_eq!(image.compressed_size(), layout.layers_bytes);
    assert!(image.config().env.iter().any(|e| e == "HOME=/root"));

    let img = open(&rootfs.path);
    assert_eq!(img.stat("usr/bin/apt-get").unwrap().kind, Kind::File);
    assert_eq!(img.read_link("bin").unwrap(), Path::new("usr/bin")); // merged /usr
    assert_eq!(img.stat("bin/bash").unwrap().kind, Kind::File); // through it
    assert!(img.read("etc/debian_version").unwrap().starts_with(b"12"));
    // Owners, modes and device nodes as debootstrap (run as root) made them, whoever converts.
    let owner_mode = |p: &str| {
        let m = img.stat(p).unwrap();
        (m.uid, m.gid, m.mode)
    };
    assert_eq!(owner_mode("etc/shadow"), (0, 42, 0o640)); // group shadow
    assert_eq!(owner_mode("usr/bin/chage"), (0, 42, 0o2755));
    assert_eq!(owner_mode("usr/bin/passwd"), (0, 0, 0o4755));
    assert_eq!(owner_mode("var/mail"), (0, 8, 0o2775)); // group mail
    let null = img.stat("dev/null").unwrap();
    assert_eq!(
        (null.kind, null.rdev, null.mode),
        (Kind::CharDevice, Some((1, 3)), 0o666)
    );
}

/// Env of [`rootfs_build_child`]: the OCI layout, its tag and the cache dir to build into.
const CHILD_LAYOUT: &str = "SUPERMACHINE_TEST_CHILD_LAYOUT";
const CHILD_TAG: &str = "SUPERMACHINE_TEST_CHILD_TAG";
const CHILD_CACHE: &str = "SUPERMACHINE_TEST_CHILD_CACHE";
/// The user the rootless build runs as (Debian's `nobody`).
const NOBODY: u32 = 65534;

/// Not a test of its own: the child process of [`a_rootfs_built_without_root_equals_the_root_one`]
/// (and of the Debian timing in the README), which runs this test binary as `nobody` with the
/// env above. It builds the rootfs and prints `ROOTFS <path> <seconds>`. Ignored, so that a
/// plain test run does not count it; the parent runs it with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the rootless-build tests, run by them"]
async fn rootfs_build_child() {
    let (Ok(layout), Ok(tag), Ok(cache)) = (
        std::env::var(CHILD_LAYOUT),
        std::env::var(CHILD_TAG),
        std::env::var(CHILD_CACHE),
    ) else {
        return;
    };
    let started = Instant::now();
    let image =
        Image::from_oci_layout_with(&layout, Some(&tag), &ImportOptions::new().cache_dir(&cache))
            .await
            .expect("import the layout");
    let rootfs = image.rootfs().await.expect("rootfs without root");
    println!(
        "ROOTFS {} {:.3}",
        rootfs.path.display(),
        started.elapsed().as_secs_f64()
    );
}

/// Builds the rootfs of `layout:tag` as `nobody` (a child process of this test binary), into a
/// cache dir that user owns; returns the image path and the child's import + build seconds.
fn build_as_nobody(layout: &Path, tag: &str, cache: &Path) -> (PathBuf, f64) {
    std::fs::create_dir_all(cache).unwrap();
    std::os::unix::fs::chown(cache, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".to_owned(),
            "--".to_owned(),
        ])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "rootfs_build_child", "--ignored", "--nocapture"])
        .env(CHILD_LAYOUT, layout)
        .env(CHILD_TAG, tag)
        .env(CHILD_CACHE, cache)
        .env("HOME", cache)
        .output()
        .expect("setpriv (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the build as nobody failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ROOTFS "))
        .unwrap_or_else(|| panic!("no ROOTFS line from the child: {stdout}"));
    let (path, secs) = line.rsplit_once(' ').unwrap();
    (PathBuf::from(path), secs.parse().unwrap())
}

/// Everything a guest can see of each path of `image` (its root included, `lost+found` left
/// out), for comparing two images: kind, owner, mode, device number, size, content digest, link
/// target, mtime, link count, xattrs, and which paths share an inode.
fn listing(image: &Path) -> Vec<String> {
    let img = open(image);
    let root = Entry {
        path: "/".to_owned(),
        inode: img.stat("/").unwrap(),
    };
    let entries: Vec<Entry> = std::iter::once(root)
        .chain(without_lost_found(img.walk().unwrap()))
        .collect();
    let mut files: Vec<u64> = entries
        .iter()
        .filter(|e| e.inode.kind == Kind::File)
        .map(|e| e.inode.ino)
        .collect();
    files.sort_unstable();
    files.dedup();
    let mut digests = HashMap::new();
    img.for_each_content(&files, |ino, bytes| {
        digests.insert(ino, images::sha256(bytes));
    })
    .unwrap();
    // Each inode's first name in sorted order: names, not inode numbers, are what two images can
    // share. The walk is sorted, so the first name seen is the first.
    let mut first_name: HashMap<u64, String> = HashMap::new();
    for e in &entries {
        first_name
            .entry(e.inode.ino)
            .or_insert_with(|| e.path.clone());
    }
    entries
        .iter()
        .map(|Entry { path, inode: m }| {
            // `mkfs.ext4 -d` gives the root directory its own build time, not the tree's (nor
            // the layers' `./` mtime), as root and as nobody alike: not comparable.
            let mtime = if path == "/" {
                "build time".to_owned()
            } else {
                m.mtime.to_string()
            };
            let content = match m.kind {
                Kind::File => digests[&m.ino].clone(),
                _ => m.link_target.clone().unwrap_or_default(),
            };
            format!(
                "{path} {} mode={:o} uid={} gid={} rdev={:?} size={} mtime={} nlink={} \
                 {content} xattrs={:?} inode-of={}",
                m.kind.letter(),
                m.mode,
                m.uid,
                m.gid,
                m.rdev,
                if m.kind == Kind::Dir { 0 } else { m.size },
                mtime,
                m.nlink,
                m.xattrs,
                first_name[&m.ino],
            )
        })
        .collect()
}

/// Whether this process runs as root (`/proc/self` belongs to its effective uid); says why the
/// test skips when not.
fn root_or_skip() -> bool {
    let root = std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0);
    if !root {
        eprintln!("skipped: needs root, to compare with the root build and to run as nobody");
    }
    root
}

/// The rootfs of `layout:tag` built as root and as `nobody`, each into its own cache under
/// `work`: (root's image, its import + build seconds, nobody's image, its seconds).
async fn build_both(layout: &Path, tag: &str, work: &Path) -> (PathBuf, f64, PathBuf, f64) {
    let started = Instant::now();
    let as_root = Image::from_oci_layout_with(
        layout,
        Some(tag),
        &ImportOptions::new().cache_dir(work.join("root-cache")),
    )
    .await
    .unwrap()
    .rootfs()
    .await
    .unwrap();
    let root_secs = started.elapsed().as_secs_f64();
    let (rootless, rootless_secs) = build_as_nobody(layout, tag, &work.join("nobody-cache"));
    let owner = std::fs::metadata(&rootless).unwrap();
    assert_eq!(owner.uid(), NOBODY, "the image is the user's own file");
    (as_root.path, root_secs, rootless, rootless_secs)
}

/// A temp dir `nobody` can read (the layout it imports lives there).
fn shared_workdir() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    work
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rootfs_built_without_root_equals_the_root_one() {
    if !root_or_skip() {
        return;
    }
    let work = shared_workdir();
    let layout = images::layered_layout(&work.path().join("layout"), "v1").unwrap();
    let (as_root, _, rootless, _) = build_both(&layout.dir, "v1", work.path()).await;

    let expected = assert_same_tree(&as_root, &rootless);
    assert!(
        expected
            .iter()
            .any(|l| l.starts_with("dev/testchr c ") && l.contains("rdev=Some((1, 3))")),
        "the root build has the device node: {expected:#?}"
    );
    assert!(
        expected.iter().any(|l| l.contains("user.test")),
        "the root build has the xattr: {expected:#?}"
    );
}

/// The Debian minbase image converted as root and as `nobody`: the same tree (owners, modes,
/// device nodes, links, contents, xattrs), and both conversion times (import + rootfs, the
/// layout already on disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_minbase_converts_the_same_without_root() {
    if !root_or_skip() {
        return;
    }
    let work = shared_workdir();
    let layout = images::debian_layout(&work.path().join("layout"), "bookworm").unwrap();
    let (as_root, root_secs, rootless, rootless_secs) =
        build_both(&layout.dir, "bookworm", work.path()).await;
    println!(
        "debian bookworm minbase, import + rootfs: as root {root_secs:.2} s, as nobody \
         {rootless_secs:.2} s ({:.2}x)",
        rootless_secs / root_secs
    );
    let expected = assert_same_tree(&as_root, &rootless);
    assert!(
        expected.len() > 1000,
        "a Debian tree: {} paths",
        expected.len()
    );
}

/// Asserts both images' [`listing`]s are equal; returns the listing.
fn assert_same_tree(as_root: &Path, rootless: &Path) -> Vec<String> {
    let expected = listing(as_root);
    assert_eq!(listing(rootless), expected);
    expected
}
