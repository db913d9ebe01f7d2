//! Support for supermachine's end-to-end tests and examples.
//!
//! * [`agent_binary`] finds the static guest agent, building it on first use exactly as it goes
//!   into a VM (`--release --target x86_64-unknown-linux-musl`).
//! * [`HostAgent`] runs that agent in host mode on a Unix socket in a temp dir, and kills it on
//!   drop.
//! * [`processes_matching`] / [`wait_until_gone`] look for leaked processes in `/proc` by a unique
//!   marker in their command line.
//! * [`registry::Registry`] runs a real `docker-registry` (optionally with basic auth) and
//!   [`images`] builds the OCI test images the image tests push to it.
//! * [`ext4::Ext4Image`] reads the ext4 rootfs images the library builds (owners, modes, xattrs,
//!   device nodes, hard links, contents) through `debugfs`, without mounting them or root.

pub mod bench;
pub mod ext4;
pub mod firecracker;
pub mod images;
pub mod registry;

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use supermachine::Agent;

/// The target the agent is built for: static, so the same binary runs on the host and as the
/// guest's `/init`.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

/// Environment variable that points at a prebuilt agent binary, skipping the build.
pub const AGENT_BIN_ENV: &str = "SUPERMACHINE_AGENT_BIN";

/// The workspace root (this package's manifest directory).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Path to the static agent binary: `$SUPERMACHINE_AGENT_BIN`, or built once per process with
/// `cargo build -p supermachine-agent --release --target x86_64-unknown-linux-musl`.
pub fn agent_binary() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| match std::env::var_os(AGENT_BIN_ENV) {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => build_agent(),
        })
        .clone()
}

fn build_agent() -> Result<PathBuf, String> {
    cargo_build(
        &[
            "-p",
            "supermachine-agent",
            "--release",
            "--target",
            AGENT_TARGET,
        ],
        "supermachine-agent",
    )
    .map_err(|e| format!("{e}; is the target installed? `rustup target add {AGENT_TARGET}`"))
}

/// Path to the `supermachine` CLI binary of this workspace, built once per process with
/// `cargo build -p supermachine --features cli --bin supermachine` (the test profile's).
pub fn cli_binary() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            cargo_build(
                &[
                    "-p",
                    "supermachine",
                    "--features",
                    "cli",
                    "--bin",
                    "supermachine",
                ],
                "supermachine",
            )
        })
        .clone()
}

/// `cargo build --quiet ARGS`, returning the path of the executable named `binary`.
fn cargo_build(args: &[&str], binary: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet"])
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo to build {binary}: {e}"))?;
    if !output.status.success() {
        return Err(format!("building {binary} failed ({})", output.status));
    }
    // The last compiler-artifact line for the binary names the executable.
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .rfind(|path| path.file_name().is_some_and(|n| n == binary))
        .ok_or_else(|| format!("cargo built {binary} but reported no executable"))
}

/// A guest agent running in host mode, listening on a Unix socket in its own temp dir.
///
/// Dropping it kills the agent (and so every exec it runs) and removes the temp dir.
#[derive(Debug)]
pub struct HostAgent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl HostAgent {
    /// Starts an agent and waits until it accepts connections.
    pub fn start() -> io::Result<HostAgent> {
        let binary = agent_binary().map_err(io::Error::other)?;
        let dir = tempfile::Builder::new()
            .prefix("supermachine-agent")
            .tempdir()?;
        let socket = dir.path().join("agent.sock");
        let mut child = Command::new(&binary)
            .arg("--unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", binary.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if read.is_err() || line.trim() != "supermachine-agent ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "the agent did not report ready (said {line:?}, {read:?})"
            )));
        }
        Ok(HostAgent {
            child,
            socket,
            _dir: dir,
        })
    }

    /// A client for this agent.
    pub fn agent(&self) -> Agent {
        Agent::unix(&self.socket)
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pids of live (non-zombie) processes whose command line contains `marker`.
pub fn processes_matching(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            // Zombies have an empty cmdline, so they never match: they are already dead.
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmd| {
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    cmd.contains(marker)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Waits up to `limit` for every process matching `marker` to be gone; returns the survivors.
pub async fn wait_until_gone(marker: &str, limit: Duration) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let left = processes_matching(marker);
        if left.is_empty() || start.elapsed() > limit {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `limit` for a process matching `marker` to appear.
pub async fn wait_until_running(marker: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !processes_matching(marker).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Kills every process matching `marker` (cleanup after a test that orphans processes on
/// purpose).
pub fn kill_matching(marker: &str) {
    for pid in processes_matching(marker) {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    }
}

/// The `sha256sum` line of a host file (to check that VMs never wrote to a shared image).
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("sha256sum {}: {e}", path.display()));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `exec` (a builder, or `&mut` one) to completion: its exit code as a shell reports it
/// (`128 + N` for signal `N`) and its stdout, trimmed. Panics on failure (for tests).
pub fn exec_output(
    mut exec: impl std::borrow::BorrowMut<supermachine::ExecBuilder>,
) -> impl std::future::Future<Output = (i32, String)> {
    let output = exec.borrow_mut().output();
    async move {
        let out = output.await.unwrap_or_else(|e| panic!("exec: {e}"));
        (
            shell_code(&out.status),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }
}

/// An exit status as a shell reports it: the exit code, or `128 + N` for signal `N`.
pub fn shell_code(status: &supermachine::ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (_, signal) => 128i32.saturating_add(signal.unwrap_or(0)),
    }
}

/// A multi-threaded runtime shared by every test of a binary that uses VMs: a VM's devices run
/// on the runtime it was started in, so that runtime must outlive every test using the VM.
pub fn shared_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// This process's current and peak resident set size in KiB (`VmRSS`, `VmHWM`).
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Environment variable naming a prebuilt guest kernel (`vmlinux`).
pub const KERNEL_ENV: &str = supermachine::KERNEL_ENV;

/// The guest kernel: `$SUPERMACHINE_KERNEL`, or what `supermachine-vmm/guest/build-kernel.sh`
/// prints (instant on a cache hit; a miss builds the kernel, several minutes).
pub fn guest_kernel() -> Result<PathBuf, String> {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            if let Some(path) = std::env::var_os(KERNEL_ENV).filter(|p| !p.is_empty()) {
                return Ok(PathBuf::from(path));
            }
            let script = workspace_root().join("supermachine-vmm/guest/build-kernel.sh");
            let output = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("running {}: {e}", script.display()))?;
            if !output.status.success() {
                return Err(format!("{} failed ({})", script.display(), output.status));
            }
            let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "build-kernel.sh printed {path:?}, which is not a file"
                ))
            }
        })
        .clone()
}

/// A static busybox (Debian's `busybox-static`), for a userland in test guests.
pub fn static_busybox() -> Result<PathBuf, String> {
    for candidate in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = Path::new(candidate);
        let is_static = Command::new("file")
            .arg("-L")
            .arg(path)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
            // Without `file`, trust Debian's busybox-static layout.
            .unwrap_or(true);
        if path.is_file() && is_static {
            return Ok(path.to_path_buf());
        }
    }
    Err("a static busybox is needed: apt-get install -y busybox-static".to_owned())
}

/// Busybox applets linked into test guests' `/bin` (each link is a few bytes of initramfs).
pub const GUEST_APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "printf",
    "sleep",
    "stty",
    "true",
    "false",
    "uname",
    "kill",
    "ps",
    "ls",
    "date",
    "head",
    "tail",
    "od",
    "dd",
    "env",
    "pwd",
    "id",
    "sync",
    "reboot",
    "poweroff",
    "wc",
    "seq",
    "tr",
    "yes",
    "mkdir",
    "rm",
    "test",
    "[",
    "grep",
    "sed",
    "stat",
    "hostname",
    "nproc",
    "taskset",
    "free",
    "mount",
    "cut",
    "md5sum",
    "sha256sum",
    "tty",
    "trap",
    "timeout",
    "setsid",
];

/// A [`VmConfig`](supermachine::VmConfig) for tests and examples: the project's kernel and agent,
/// and a static busybox with [`GUEST_APPLETS`] in `/bin`.
pub fn test_vm_config() -> Result<supermachine::VmConfig, String> {
    let busybox = static_busybox()?;
    let mut config = supermachine::VmConfig::new()
        .kernel(guest_kernel()?)
        .agent(agent_binary()?)
        .add_file("/bin/busybox", busybox);
    for applet in GUEST_APPLETS {
        config = config.add_symlink(format!("/bin/{applet}"), "busybox");
    }
    Ok(config)
}

/// Whether tests that need `/dev/kvm` should run: they may skip only when it is absent and
/// `SUPERMACHINE_REQUIRE_KVM` is unset; with the variable set, a missing `/dev/kvm` fails.
pub fn kvm_available_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("SUPERMACHINE_REQUIRE_KVM").is_some() {
        panic!("{test}: /dev/kvm is missing but SUPERMACHINE_REQUIRE_KVM is set");
    }
    eprintln!("{test}: skipped (no /dev/kvm; set SUPERMACHINE_REQUIRE_KVM=1 to fail instead)");
    false
}

/// Starts `busybox nc -l -p PORT -e sh -c SCRIPT` through `agent` (one connection, its stdin
/// and stdout being the script's) and returns once it listens. Listening is read from
/// `/proc/net/tcp` rather than probed: a probe would use up nc's only connection. Panics, with
/// nc's stderr, if nc exits first or does not listen within `within`.
pub async fn start_nc_server(
    agent: &Agent,
    port: u16,
    script: &str,
    within: Duration,
) -> supermachine::ExecChild {
    use tokio::io::AsyncReadExt;

    let mut child = agent
        .exec([
            "busybox",
            "nc",
            "-l",
            "-p",
            &port.to_string(),
            "-e",
            "sh",
            "-c",
            script,
        ])
        .stdin(supermachine::Stdio::null())
        .spawn()
        .await
        .expect("start nc");
    let deadline = Instant::now() + within;
    // The local address column, e.g. `0100007F:1F90` or `00000000:1F90`, in state 0A (LISTEN).
    let port_suffix = format!(":{port:04X}");
    loop {
        let mut table = tokio::time::timeout(within, agent.read_file("/proc/net/tcp"))
            .await
            .expect("reading /proc/net/tcp hangs")
            .expect("read /proc/net/tcp")
            .to_vec();
        // A host (host mode) may give nc an IPv6 socket; the guest kernel has no IPv6.
        table.extend_from_slice(&agent.read_file("/proc/net/tcp6").await.unwrap_or_default());
        let listening = String::from_utf8_lossy(&table).lines().any(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns
                .get(1)
                .is_some_and(|local| local.ends_with(&port_suffix))
                && columns.get(3) == Some(&"0A")
        });
        if listening {
            return child;
        }
        assert!(Instant::now() < deadline, "nc never listened on {port}");
        // Waiting on the child doubles as the pause between polls: nc must not exit first.
        if let Ok(status) = tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut stderr).await;
            }
            panic!("nc exited before listening on {port}: {status:?}; stderr: {stderr}");
        }
    }
}

/// Which kind of KVM this process runs on, for benchmark and test reports (figures from
/// different lanes must never be compared):
/// * `"PVM host"` when `kvm_pvm` is loaded (the development machines' own `/dev/kvm`);
/// * `"nested kvm_amd (L1 under QEMU TCG)"` when `kvm_amd` is loaded and the CPU is QEMU's TCG
///   (hypervisor CPUID leaf `TCGTCGTCGTCG`): the nested lane of `lane/run.sh`;
/// * `"nested arm64 KVM (L1: QEMU virt, TCG)"` on an arm64 QEMU `virt` board: the arm64 lane
///   (`lane/run.sh --arch aarch64`);
/// * `"hardware KVM"` otherwise.
pub fn lane() -> &'static str {
    let module = |name: &str| Path::new("/sys/module").join(name).exists();
    if module("kvm_pvm") {
        "PVM host"
    } else if module("kvm_amd") && hypervisor_vendor() == *b"TCGTCGTCGTCG" {
        "nested kvm_amd (L1 under QEMU TCG)"
    } else if cfg!(target_arch = "aarch64") && qemu_virt_machine() {
        "nested arm64 KVM (L1: QEMU virt, TCG)"
    } else {
        "hardware KVM"
    }
}

/// Whether this (arm64) machine is QEMU's `virt` board: its device tree says `linux,dummy-virt`.
/// Here that is the arm64 lane's L1 (TCG; no machine here can accelerate an arm64 guest).
fn qemu_virt_machine() -> bool {
    std::fs::read("/sys/firmware/devicetree/base/compatible")
        .is_ok_and(|c| c.split(|&b| b == 0).any(|s| s == b"linux,dummy-virt"))
}

/// The hypervisor's CPUID vendor signature (leaf 0x4000_0000), zeros on bare metal or off x86_64.
fn hypervisor_vendor() -> [u8; 12] {
    // Filled only on x86_64.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut vendor = [0u8; 12];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID exists on every x86_64 CPU; leaf 0x4000_0000 is reserved for
        // hypervisors and reads as zeros or unrelated data elsewhere, which only fails the match.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0x4000_0000) };
        vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        vendor[8..].copy_from_slice(&r.edx.to_le_bytes());
    }
    vendor
}
