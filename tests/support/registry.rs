//! A real registry for the image tests: Debian's `docker-registry` (distribution 2.x) on
//! 127.0.0.1 with a free port, its own config and storage in a temp dir, optionally with htpasswd
//! (bcrypt) basic auth; killed on drop. Images are pushed with `skopeo`.
//!
//! Needs `apt-get install docker-registry skopeo apache2-utils`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    addr: String,
    credentials: Option<(String, String)>,
}

impl Registry {
    /// A registry without authentication.
    pub fn start() -> Result<Self, String> {
        Self::launch(None)
    }

    /// A registry that wants HTTP basic auth for `user` / `password` (htpasswd, bcrypt).
    pub fn start_with_auth(user: &str, password: &str) -> Result<Self, String> {
        Self::launch(Some((user.to_owned(), password.to_owned())))
    }

    fn launch(credentials: Option<(String, String)>) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("registry-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // A free port: bind, read it, release it for the registry.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let auth = match &credentials {
            None => String::new(),
            Some((user, password)) => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .map_err(|e| {
                        format!("cannot run htpasswd ({e}); apt-get install apache2-utils")
                    })?;
                if !out.status.success() {
                    return Err(format!(
                        "htpasswd failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, &out.stdout).map_err(|e| e.to_string())?;
                format!(
                    "auth:\n  htpasswd:\n    realm: supermachine-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: supermachine-test-secret\n{auth}",
            dir.path().join("storage").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("registry.log")).map_err(|e| e.to_string())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot run docker-registry ({e}); apt-get install docker-registry")
            })?;
        let mut registry = Registry {
            child,
            dir,
            addr,
            credentials,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("docker-registry exited ({status}): {}", self.log()));
            }
            if TcpStream::connect(&self.addr).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "docker-registry did not listen on {}: {}",
            self.addr,
            self.log()
        ))
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `<addr>/<repo_tag>`, a reference for `Image::pull`.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// Pushes the image tagged `tag` of the OCI layout `layout` as `<repo_tag>` (`repo:tag`).
    /// `v2s2` converts the manifest to Docker's v2 schema 2 media types on the way.
    pub fn push_layout(
        &self,
        layout: &Path,
        tag: &str,
        repo_tag: &str,
        v2s2: bool,
    ) -> Result<(), String> {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if v2s2 {
            cmd.args(["--format", "v2s2"]);
        } else {
            // Push the blobs as they are (skopeo would gzip an uncompressed layer otherwise).
            cmd.arg("--preserve-digests");
        }
        if let Some((user, password)) = &self.credentials {
            cmd.arg("--dest-creds").arg(format!("{user}:{password}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.reference(repo_tag)));
        run(&mut cmd)
    }

    /// Pushes the multi-platform image index tagged `tag` in `layout`, every image of it, as
    /// `<repo_tag>`, digests unchanged.
    pub fn push_index(&self, layout: &Path, tag: &str, repo_tag: &str) -> Result<(), String> {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        if let Some((user, password)) = &self.credentials {
            cmd.arg("--dest-creds").arg(format!("{user}:{password}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.reference(repo_tag)));
        run(&mut cmd)
    }

    /// Where the registry keeps the bytes of blob `digest` (to tamper with them).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a `docker save`-style archive of the image tagged `tag` in `layout` with `skopeo`.
pub fn docker_archive_from_layout(
    layout: &Path,
    tag: &str,
    archive: &Path,
    name: &str,
) -> Result<(), String> {
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker-archive:{}:{name}", archive.display())))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?} ({e}); apt-get install skopeo"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
