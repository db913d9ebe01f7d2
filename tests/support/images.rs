//! Test images built from real files, written as OCI image layouts that `skopeo` pushes and
//! `Image::from_oci_layout` imports.
//!
//! * [`busybox_layout`]: one gzip layer with `/bin/busybox` of the `busybox-static` package and
//!   its applet symlinks.
//! * [`layered_layout`]: three layers (gzip, plain tar, zstd) with whiteouts, an opaque
//!   directory, hardlinks across layers, a dir replaced by a file, owners, modes, set-uid, an
//!   xattr, a symlink with its own owner, a character device and a fifo. [`LAYERED_TREE`] is the
//!   exact tree it must produce.
//! * [`debian_layout`]: one gzip layer of a Debian bookworm `debootstrap --variant=minbase`,
//!   made once and cached as `cache::root()/test-images/debian-bookworm-minbase-v1.tar.gz`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::from("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// One layer blob and its uncompressed digest.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// The blob as stored (compressed or not).
    pub bytes: Vec<u8>,
    /// Its OCI media type.
    pub media_type: &'static str,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
}

impl LayerBlob {
    /// An uncompressed tar layer.
    pub fn tar(tar: Vec<u8>) -> Self {
        LayerBlob {
            diff_id: sha256(&tar),
            bytes: tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// A gzip layer.
    pub fn gzip(tar: Vec<u8>) -> io::Result<Self> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&tar)?;
        Ok(LayerBlob {
            diff_id: sha256(&tar),
            bytes: enc.finish()?,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        })
    }

    /// A zstd layer.
    pub fn zstd(tar: Vec<u8>) -> io::Result<Self> {
        Ok(LayerBlob {
            diff_id: sha256(&tar),
            bytes: zstd::encode_all(&tar[..], 3)?,
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
        })
    }
}

/// What [`write_oci_layout`] wrote.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    /// The layout directory.
    pub dir: PathBuf,
    /// The tag in `index.json`.
    pub tag: String,
    /// The manifest digest.
    pub manifest_digest: String,
    /// The config digest (the image ID).
    pub config_digest: String,
    /// The layer digests, bottom first.
    pub layer_digests: Vec<String>,
    /// Sum of the layer blob sizes.
    pub layers_bytes: u64,
}

/// OCI's name for this host's architecture (`amd64`, `arm64`): what test images are built for.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "x86_64" => "amd64",
        other => other,
    }
}

/// An architecture that is not this host's, for images that must be refused.
pub fn foreign_architecture() -> &'static str {
    if host_architecture() == "arm64" {
        "amd64"
    } else {
        "arm64"
    }
}

/// Writes an OCI image layout at `dir` holding one image for this host's architecture, tagged
/// `tag`, with `layers` and the run settings `run` (the config's `config` object: `Env`, `Cmd`,
/// ...).
pub fn write_oci_layout(
    dir: &Path,
    tag: &str,
    layers: &[LayerBlob],
    run: serde_json::Value,
) -> io::Result<WrittenImage> {
    write_oci_layout_for(dir, tag, layers, run, host_architecture())
}

/// [`write_oci_layout`] for an image built for `architecture` (`linux/<architecture>`).
pub fn write_oci_layout_for(
    dir: &Path,
    tag: &str,
    layers: &[LayerBlob],
    run: serde_json::Value,
    architecture: &str,
) -> io::Result<WrittenImage> {
    let written = put_image(dir, layers, &run, architecture)?;
    let entry = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": written.manifest_digest, "size": written.manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
        "platform": {"architecture": architecture, "os": "linux"},
    });
    write_index_json(dir, entry)?;
    Ok(WrittenImage {
        dir: dir.to_owned(),
        tag: tag.to_owned(),
        manifest_digest: written.manifest_digest,
        config_digest: written.config_digest,
        layer_digests: written.layer_digests,
        layers_bytes: layers.iter().map(|l| l.bytes.len() as u64).sum(),
    })
}

/// Writes an OCI image layout at `dir` whose tag `tag` names a multi-platform image index with
/// one image per `(architecture, layers)`, all with the run settings `run`. Returns each image,
/// in the order given.
pub fn write_multi_arch_layout(
    dir: &Path,
    tag: &str,
    images: &[(&str, Vec<LayerBlob>)],
    run: serde_json::Value,
) -> io::Result<Vec<WrittenImage>> {
    let mut written = Vec::new();
    let mut manifests = Vec::new();
    for (architecture, layers) in images {
        let image = put_image(dir, layers, &run, architecture)?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.manifest_digest, "size": image.manifest_size,
            "platform": {"architecture": architecture, "os": "linux"},
        }));
        written.push(WrittenImage {
            dir: dir.to_owned(),
            tag: tag.to_owned(),
            manifest_digest: image.manifest_digest,
            config_digest: image.config_digest,
            layer_digests: image.layer_digests,
            layers_bytes: layers.iter().map(|l| l.bytes.len() as u64).sum(),
        });
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))?;
    let digest = put_blob(dir, &index)?;
    write_index_json(
        dir,
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }),
    )?;
    Ok(written)
}

/// The blobs of one image in a layout.
struct PutImage {
    manifest_digest: String,
    manifest_size: usize,
    config_digest: String,
    layer_digests: Vec<String>,
}

/// Stores `bytes` as a blob of the layout at `dir`; returns its digest.
fn put_blob(dir: &Path, bytes: &[u8]) -> io::Result<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let digest = sha256(bytes);
    std::fs::write(blobs.join(&digest["sha256:".len()..]), bytes)?;
    Ok(digest)
}

/// Stores the config, layers and manifest of one image built for `architecture`.
fn put_image(
    dir: &Path,
    layers: &[LayerBlob],
    run: &serde_json::Value,
    architecture: &str,
) -> io::Result<PutImage> {
    let config = serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()},
    });
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = put_blob(dir, &config_bytes)?;
    let mut layer_digests = Vec::new();
    let mut descriptors = Vec::new();
    for layer in layers {
        let digest = put_blob(dir, &layer.bytes)?;
        descriptors.push(serde_json::json!({
            "mediaType": layer.media_type, "digest": digest, "size": layer.bytes.len(),
        }));
        layer_digests.push(digest);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_bytes.len()},
        "layers": descriptors,
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    Ok(PutImage {
        manifest_digest: put_blob(dir, &manifest_bytes)?,
        manifest_size: manifest_bytes.len(),
        config_digest,
        layer_digests,
    })
}

/// Writes the layout's `index.json` (with the one entry `entry`) and `oci-layout`.
fn write_index_json(dir: &Path, entry: serde_json::Value) -> io::Result<()> {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
}

/// Builds layer tars entry by entry, with explicit owners, modes and types.
pub struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    /// An empty tar.
    pub fn new() -> Self {
        TarBuilder {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid, gid);
        self.builder
            .append_data(&mut h, path, io::empty())
            .expect("tar dir");
        self
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid);
        h.set_size(data.len() as u64);
        self.builder
            .append_data(&mut h, path, data)
            .expect("tar file");
        self
    }

    /// A regular file preceded by a PAX header carrying `xattrs` (`SCHILY.xattr.<name>`).
    pub fn file_with_xattrs(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        let mut records = Vec::new();
        for (name, value) in xattrs {
            let body_len = format!(" SCHILY.xattr.{name}=").len() + value.len() + 1;
            // The length prefix counts its own digits.
            let mut len = body_len + 1;
            while len.to_string().len() + body_len != len {
                len = len.to_string().len() + body_len;
            }
            records.extend_from_slice(format!("{len} SCHILY.xattr.{name}=").as_bytes());
            records.extend_from_slice(value);
            records.push(b'\n');
        }
        let mut pax = Self::header(tar::EntryType::XHeader, 0o644, 0, 0);
        pax.set_size(records.len() as u64);
        self.builder
            .append_data(&mut pax, format!("PaxHeaders/{path}"), &records[..])
            .expect("tar pax");
        self.file(path, data, mode, 0, 0)
    }

    /// A symlink.
    pub fn symlink(&mut self, path: &str, target: &str, uid: u64, gid: u64) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, uid, gid);
        self.builder
            .append_link(&mut h, path, target)
            .expect("tar symlink");
        self
    }

    /// `/bin` with `busybox` (the binary's bytes) and a symlink to it for each applet.
    pub fn busybox<'a>(
        &mut self,
        busybox: &[u8],
        applets: impl IntoIterator<Item = &'a str>,
    ) -> &mut Self {
        self.dir("bin", 0o755, 0, 0)
            .file("bin/busybox", busybox, 0o755, 0, 0);
        for applet in applets {
            self.symlink(&format!("bin/{applet}"), "busybox", 0, 0);
        }
        self
    }

    /// `/etc` with this `passwd`, `/root` (0700) and `/tmp` (1777): the rest of a minimal root.
    pub fn skeleton(&mut self, passwd: &[u8]) -> &mut Self {
        self.dir("etc", 0o755, 0, 0)
            .file("etc/passwd", passwd, 0o644, 0, 0)
            .dir("root", 0o700, 0, 0)
            .dir("tmp", 0o1777, 0, 0)
    }

    /// A hardlink to `target` (a path in this or an earlier layer).
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0, 0);
        self.builder
            .append_link(&mut h, path, target)
            .expect("tar hardlink");
        self
    }

    /// A character device, block device or fifo.
    pub fn node(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, mode, 0, 0);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        self.builder
            .append_data(&mut h, path, io::empty())
            .expect("tar node");
        self
    }

    /// The finished tar.
    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("tar finish")
    }
}

/// The busybox image: `/bin/busybox` (from the host's `busybox-static`) and applet symlinks.
pub fn busybox_layout(dir: &Path, tag: &str) -> io::Result<WrittenImage> {
    let busybox = std::fs::read("/bin/busybox").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("/bin/busybox: {e} (apt-get install busybox-static)"),
        )
    })?;
    let mut tar = TarBuilder::new();
    tar.busybox(&busybox, ["sh", "ls", "cat", "echo", "stat", "id"])
        .skeleton(b"root:x:0:0:root:/root:/bin/sh\n");
    let layer = LayerBlob::gzip(tar.finish())?;
    write_oci_layout(
        dir,
        tag,
        &[layer],
        serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/root",
            "Cmd": ["sh"],
        }),
    )
}

/// The exact tree [`layered_layout`] produces: `(path, kind)` with kind `d`, `f`, `l`
/// (symlink), `c` (char device), `p` (fifo), sorted by path.
pub const LAYERED_TREE: &[(&str, char)] = &[
    ("a", 'd'),
    ("a/keep", 'f'),
    ("bin", 'd'),
    ("bin/suid", 'f'),
    ("data", 'd'),
    ("data/owned", 'f'),
    ("data/xattr", 'f'),
    ("dev", 'd'),
    ("dev/fifo", 'p'),
    ("dev/testchr", 'c'),
    ("links", 'd'),
    ("links/hard", 'f'),
    ("links/hard2", 'f'),
    ("links/sym", 'l'),
    ("links/target", 'f'),
    ("opq", 'd'),
    ("opq/new", 'f'),
    ("opq/sub", 'd'),
    ("opq/sub/fresh", 'f'),
    ("x", 'f'),
];

/// Three layers exercising whiteouts, opaque dirs, hardlinks across layers and metadata.
pub fn layered_layout(dir: &Path, tag: &str) -> io::Result<WrittenImage> {
    let mut l1 = TarBuilder::new();
    l1.dir("a", 0o755, 0, 0)
        .file("a/keep", b"v1", 0o644, 0, 0)
        .file("a/gone", b"gone", 0o644, 0, 0)
        .dir("opq", 0o755, 0, 0)
        .file("opq/old1", b"old", 0o644, 0, 0)
        .dir("opq/sub", 0o755, 0, 0)
        .file("opq/sub/old2", b"old", 0o644, 0, 0)
        .dir("data", 0o750, 1000, 1000)
        .file("data/owned", b"owned", 0o640, 1000, 1001)
        .file_with_xattrs("data/xattr", b"x", 0o600, &[("user.test", b"hello")])
        .dir("links", 0o755, 0, 0)
        .file("links/target", b"shared", 0o604, 1002, 1003)
        .symlink("links/sym", "target", 1001, 1001)
        .dir("bin", 0o755, 0, 0)
        .file("bin/suid", b"#!/bin/sh\n", 0o4755, 0, 0)
        .dir("dev", 0o755, 0, 0)
        .node("dev/testchr", tar::EntryType::Char, 1, 3, 0o666)
        .node("dev/fifo", tar::EntryType::Fifo, 0, 0, 0o644)
        .dir("x", 0o755, 0, 0)
        .file("x/inside", b"dir soon replaced by a file", 0o644, 0, 0)
        .file("gone-dir-file", b"", 0o644, 0, 0);
    let mut l2 = TarBuilder::new();
    l2.file("a/.wh.gone", b"", 0o644, 0, 0)
        .dir("opq", 0o755, 0, 0)
        .file("opq/.wh..wh..opq", b"", 0o644, 0, 0)
        .file("opq/new", b"new", 0o644, 0, 0)
        .dir("opq/sub", 0o755, 0, 0)
        .file("opq/sub/fresh", b"fresh", 0o644, 0, 0)
        .hardlink("links/hard", "links/target")
        .file("x", b"now a file", 0o644, 0, 0)
        .file(".wh.gone-dir-file", b"", 0o644, 0, 0);
    let mut l3 = TarBuilder::new();
    l3.file("a/keep", b"v3", 0o644, 0, 0)
        .hardlink("links/hard2", "links/hard");
    write_oci_layout(
        dir,
        tag,
        &[
            LayerBlob::gzip(l1.finish())?,
            LayerBlob::tar(l2.finish()),
            LayerBlob::zstd(l3.finish())?,
        ],
        serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}),
    )
}

/// The Debian mirror `debootstrap` uses (`SUPERMACHINE_DEBIAN_MIRROR` overrides it).
pub fn debian_mirror() -> String {
    std::env::var("SUPERMACHINE_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// `cache::root()/test-images` (the real cache, not a test's own cache dir).
pub fn test_images_dir() -> Result<PathBuf, String> {
    let dir = supermachine::cache::root()
        .map_err(|e| e.to_string())?
        .join("test-images");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// The Debian bookworm minbase root filesystem as a gzip tar and the sha256 of the tar, made
/// with `debootstrap --variant=minbase` the first time (about a minute) and cached.
pub fn debian_minbase_tarball() -> Result<(PathBuf, String), String> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_images_dir()?;
    let gz = dir.join("debian-bookworm-minbase-v1.tar.gz");
    let id_file = dir.join("debian-bookworm-minbase-v1.diffid");
    if let (true, Ok(diff_id)) = (gz.is_file(), std::fs::read_to_string(&id_file)) {
        return Ok((gz, diff_id.trim().to_owned()));
    }
    let work = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(&dir)
        .map_err(|e| e.to_string())?;
    let root = work.path().join("root");
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&root)
        .arg(debian_mirror())
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run debootstrap ({e}); apt-get install debootstrap"))?;
    if !status.success() {
        // Most often: not root. A root run's tarball (and its .diffid) lets another user go on.
        return Err(format!(
            "debootstrap failed: {status}; it needs root: as another user, copy the tarball \
             a root run made to {} (with {})",
            gz.display(),
            id_file.display()
        ));
    }
    let tar = work.path().join("rootfs.tar");
    // Like the official images: no downloaded .debs, no package lists.
    let script = "rm -rf \"$1\"/var/cache/apt/archives/*.deb \"$1\"/var/lib/apt/lists/* && \
                  tar --numeric-owner --xattrs --xattrs-include='*' -C \"$1\" -cf \"$2\" . \
                  && sha256sum \"$2\" | cut -d' ' -f1 > \"$2.sha256\" && gzip -6 \"$2\"";
    let status = Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(&root)
        .arg(&tar)
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("packing the Debian rootfs failed: {status}"));
    }
    let hex = std::fs::read_to_string(work.path().join("rootfs.tar.sha256"))
        .map_err(|e| e.to_string())?;
    let tmp_gz = work.path().join("rootfs.tar.gz");
    std::fs::rename(&tmp_gz, &gz).map_err(|e| e.to_string())?;
    let diff_id = format!("sha256:{}", hex.trim());
    std::fs::write(&id_file, &diff_id).map_err(|e| e.to_string())?;
    Ok((gz, diff_id))
}

/// The Debian minbase image as an OCI layout (one gzip layer).
pub fn debian_layout(dir: &Path, tag: &str) -> Result<WrittenImage, String> {
    let (gz, diff_id) = debian_minbase_tarball()?;
    let bytes = std::fs::read(&gz).map_err(|e| e.to_string())?;
    let layer = LayerBlob {
        bytes,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        diff_id,
    };
    write_oci_layout(
        dir,
        tag,
        &[layer],
        serde_json::json!({
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "Cmd": ["bash"],
        }),
    )
    .map_err(|e| e.to_string())
}
