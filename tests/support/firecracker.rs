//! Firecracker as a peer for side-by-side benchmarks (`../shared/peers/firecracker`; never a
//! dependency of the library): one process per guest, driven through its API socket, with our
//! agent reached through its vsock muxer ([`UnixConnector::muxed`]), whose `CONNECT`/`OK`
//! handshake ours copies. Same kernel, same initramfs, same client: only the VMM differs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use supermachine::{Agent, UnixConnector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// How long Firecracker may take to open its API socket, and an agent to answer.
const START_LIMIT: Duration = Duration::from_secs(300);
/// How long one API request may take (a snapshot load or create included).
const API_LIMIT: Duration = Duration::from_secs(120);

/// The Firecracker binary: `$SUPERMACHINE_FIRECRACKER`, else `../shared/peers/firecracker`
/// beside the workspace.
pub fn binary() -> PathBuf {
    std::env::var_os("SUPERMACHINE_FIRECRACKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("../shared/peers/firecracker"))
}

/// A running Firecracker process (killed on drop) and our agent inside it.
pub struct Firecracker {
    child: Child,
    api: PathBuf,
    /// The guest's agent, through the vsock muxer's Unix socket.
    pub agent: Agent,
    log: PathBuf,
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Firecracker {
    /// Starts Firecracker in `dir` with an API socket and nothing configured yet
    /// (`--no-seccomp`: the peer build is a gnu one, without a default seccomp policy).
    /// `config`, if given, is a `--config-file` that boots a guest at once.
    pub async fn spawn(dir: &Path, config: Option<&serde_json::Value>) -> Result<Firecracker> {
        let binary = binary();
        let api = dir.join("api.sock");
        // Left by an earlier process in `dir`; Firecracker binds both itself.
        let _ = std::fs::remove_file(&api);
        let _ = std::fs::remove_file(dir.join("vsock.sock"));
        let log = dir.join("console.log");
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(&binary);
        command.args(["--no-seccomp", "--api-sock"]).arg(&api);
        if let Some(config) = config {
            let file = dir.join("config.json");
            std::fs::write(&file, serde_json::to_vec_pretty(config)?)?;
            command.arg("--config-file").arg(file);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let mut fc = Firecracker {
            child,
            api,
            agent: Agent::with_connector(UnixConnector::muxed(dir.join("vsock.sock"))),
            log,
        };
        let started = Instant::now();
        while !fc.api.exists() {
            fc.check_alive(started)?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(fc)
    }

    /// A `--config-file` for a guest booting `kernel` with `initramfs` and `cmdline`, `vcpus`
    /// and `mem_mib`, with a vsock device whose muxer socket is `dir/vsock.sock`.
    pub fn boot_config(
        dir: &Path,
        (kernel, initramfs, cmdline): (&Path, &Path, &str),
        vcpus: u32,
        mem_mib: u32,
    ) -> serde_json::Value {
        serde_json::json!({
            "boot-source": {
                "kernel_image_path": kernel,
                "initrd_path": initramfs,
                "boot_args": cmdline,
            },
            "drives": [],
            "machine-config": { "vcpu_count": vcpus, "mem_size_mib": mem_mib },
            "vsock": { "guest_cid": 3, "uds_path": dir.join("vsock.sock") },
        })
    }

    /// Fails if the process has exited, or has been starting for longer than the limit.
    fn check_alive(&mut self, started: Instant) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            return Err(format!("firecracker exited ({status}): {}", self.log_tail()).into());
        }
        if started.elapsed() > START_LIMIT {
            return Err(format!("firecracker did not get going: {}", self.log_tail()).into());
        }
        Ok(())
    }

    /// Waits until the agent answers a ping; returns how long that took. Retries back off
    /// from 2 ms to 50 ms, so a booting guest is not flooded with connections.
    pub async fn wait_for_agent(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let ping = tokio::time::timeout(Duration::from_secs(5), self.agent.ping()).await;
            if let Ok(Ok(_)) = ping {
                return Ok(started.elapsed());
            }
            self.check_alive(started)?;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// One API request (`method path` with a JSON body); fails unless the answer is 2xx, or
    /// after [`API_LIMIT`].
    pub async fn api(&self, method: &str, path: &str, body: &serde_json::Value) -> Result<()> {
        match tokio::time::timeout(API_LIMIT, self.request(method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(format!("{method} {path}: no answer within {API_LIMIT:?}").into()),
        }
    }

    async fn request(&self, method: &str, path: &str, body: &serde_json::Value) -> Result<()> {
        let body = serde_json::to_vec(body)?;
        // The socket file appears just before Firecracker listens on it.
        let started = Instant::now();
        let mut stream = loop {
            match tokio::net::UnixStream::connect(&self.api).await {
                Ok(stream) => break stream,
                Err(_) if started.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(format!("{}: {e}", self.api.display()).into()),
            }
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        // Firecracker keeps the connection open: read the head, then Content-Length bytes.
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let (head_len, body_len) = loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(format!("{method} {path}: the API closed without answering").into());
            }
            answer.extend_from_slice(&buf[..n]);
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, len);
            }
        };
        while answer.len() < head_len + body_len {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        let status_line = String::from_utf8_lossy(&answer[..head_len]);
        let ok = status_line
            .split_whitespace()
            .nth(1)
            .is_some_and(|code| code.starts_with('2'));
        if !ok {
            return Err(format!(
                "{method} {path}: {}",
                String::from_utf8_lossy(&answer).trim()
            )
            .into());
        }
        Ok(())
    }

    /// Pauses the guest and writes a full snapshot: `dir/vmstate` and `dir/memory`.
    pub async fn snapshot(&self, dir: &Path) -> Result<()> {
        self.api("PATCH", "/vm", &serde_json::json!({ "state": "Paused" }))
            .await?;
        self.api(
            "PUT",
            "/snapshot/create",
            &serde_json::json!({
                "snapshot_type": "Full",
                "snapshot_path": dir.join("vmstate"),
                "mem_file_path": dir.join("memory"),
            }),
        )
        .await
    }

    /// Loads the snapshot in `snapshot_dir` (file-backed memory, mapped privately) and resumes
    /// it. The guest's vsock socket path is the one saved in it, which must not exist now.
    pub async fn load(&self, snapshot_dir: &Path) -> Result<()> {
        self.api(
            "PUT",
            "/snapshot/load",
            &serde_json::json!({
                "snapshot_path": snapshot_dir.join("vmstate"),
                "mem_backend": {
                    "backend_type": "File",
                    "backend_path": snapshot_dir.join("memory"),
                },
                "resume_vm": true,
            }),
        )
        .await
    }

    /// The last lines of the guest console and Firecracker's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}
