//! [`VmConfig`]: what a VM is made of, and the checks that run before anything is created.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the guest kernel (`vmlinux`) when [`VmConfig::kernel`] is not
/// set. `supermachine-vmm/guest/build-kernel.sh` builds one and prints its path.
pub const KERNEL_ENV: &str = "SUPERMACHINE_KERNEL";
/// Environment variable naming the static guest agent when [`VmConfig::agent`] is not set.
pub const AGENT_ENV: &str = "SUPERMACHINE_AGENT_BIN";

/// The smallest guest RAM accepted, in MiB: the kernel, the initramfs and room to run.
pub const MIN_MEMORY_MIB: u32 = supermachine_vmm::MIN_MEMORY_MIB;
/// The largest guest RAM accepted, in MiB (RAM ends below the MMIO hole).
pub const MAX_MEMORY_MIB: u32 = supermachine_vmm::memory::MAX_MEMORY_MIB;
/// The most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;

/// How a VM is built: size, guest kernel, agent, and extra initramfs contents.
///
/// ```no_run
/// # use std::time::Duration;
/// use supermachine::VmConfig;
/// let config = VmConfig::new()
///     .memory_mib(256)
///     .kernel("/path/to/vmlinux")
///     .agent("/path/to/supermachine-agent")
///     .boot_timeout(Duration::from_secs(60));
/// ```
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
    pub(crate) kernel: Option<PathBuf>,
    pub(crate) agent: Option<PathBuf>,
    pub(crate) files: Vec<GuestFile>,
    pub(crate) boot_timeout: Duration,
    pub(crate) kernel_cmdline: String,
    pub(crate) verbose_console: bool,
    pub(crate) console_to_stderr: bool,
    pub(crate) test_hooks: bool,
    pub(crate) snapshot_cache: bool,
    pub(crate) rootfs: Option<PathBuf>,
    pub(crate) image: Option<crate::image::Image>,
    pub(crate) publish: Vec<crate::publish::PortMapping>,
    pub(crate) network: super::network::Network,
}

/// An extra initramfs entry.
#[derive(Debug, Clone)]
pub(crate) enum GuestFile {
    Copy {
        guest: String,
        host: PathBuf,
        mode: Option<u32>,
    },
    Symlink {
        guest: String,
        target: String,
    },
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig::new()
    }
}

impl VmConfig {
    /// One vCPU, 256 MiB, kernel and agent from `SUPERMACHINE_KERNEL` / `SUPERMACHINE_AGENT_BIN`,
    /// the [`public`](crate::Network::public) network, a 5 minute boot timeout (guest boots take 10–100 s on nested PVM hosts; well under a
    /// second on hardware KVM).
    pub fn new() -> Self {
        VmConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel: None,
            agent: None,
            files: Vec::new(),
            boot_timeout: Duration::from_secs(300),
            kernel_cmdline: String::new(),
            verbose_console: false,
            console_to_stderr: false,
            test_hooks: false,
            snapshot_cache: true,
            rootfs: None,
            image: None,
            publish: Vec::new(),
            network: super::network::Network::public(),
        }
    }

    /// Number of vCPUs (1..=32). On PVM hosts only the first one runs.
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Guest RAM in MiB (64..=3328).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The guest kernel, an x86-64 ELF `vmlinux` built from `supermachine-vmm/guest/`.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// The static `supermachine-agent` binary that becomes the guest's `/init`.
    pub fn agent(mut self, path: impl Into<PathBuf>) -> Self {
        self.agent = Some(path.into());
        self
    }

    /// Copies the host file `host` into the initramfs at the absolute guest path `guest`
    /// (parents are created; the mode is the host file's). Every MiB added costs boot time.
    pub fn add_file(mut self, guest: impl Into<String>, host: impl Into<PathBuf>) -> Self {
        self.files.push(GuestFile::Copy {
            guest: guest.into(),
            host: host.into(),
            mode: None,
        });
        self
    }

    /// Adds a symbolic link `guest -> target` to the initramfs.
    pub fn add_symlink(mut self, guest: impl Into<String>, target: impl Into<String>) -> Self {
        self.files.push(GuestFile::Symlink {
            guest: guest.into(),
            target: target.into(),
        });
        self
    }

    /// How long [`Vm::start`](crate::Vm::start) waits for the agent to answer.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// Extra kernel command-line parameters, appended last.
    pub fn kernel_cmdline(mut self, extra: impl Into<String>) -> Self {
        self.kernel_cmdline = extra.into();
        self
    }

    /// Keep the kernel's boot messages on the console. Off by default: every console byte is
    /// a trapped I/O write, which is slow on nested hosts; panics and errors are printed either
    /// way.
    pub fn verbose_console(mut self, verbose: bool) -> Self {
        self.verbose_console = verbose;
        self
    }

    /// Copy the guest console to this process's stderr as it arrives.
    pub fn console_to_stderr(mut self, tee: bool) -> Self {
        self.console_to_stderr = tee;
        self
    }

    /// Runs every exec inside a root filesystem: an ext4 image, attached read-only as the
    /// first virtio-blk disk. The guest mounts it under an overlay whose writable layer is in
    /// guest RAM (writes never reach the image, which VMs can share), with `/proc`, `/sys`,
    /// `/dev`, `/dev/pts`, `/tmp`, `/run`, `/etc/hosts` and `/etc/resolv.conf` set up. Without
    /// it, execs run in the initramfs (the agent and the files added with
    /// [`add_file`](Self::add_file)).
    ///
    /// The image must not change while VMs or snapshots use it: snapshots record its hash.
    /// Replaces an [`image`](Self::image) set before.
    pub fn rootfs(mut self, image: impl Into<PathBuf>) -> Self {
        self.rootfs = Some(image.into());
        self.image = None;
        self
    }

    /// Runs the VM on an OCI image: its root filesystem (built from the layers on first use
    /// and cached, see [`Image::rootfs`](crate::Image::rootfs)) as with [`rootfs`](Self::rootfs),
    /// and its config's `Env`, `WorkingDir` and `User` as the defaults of every
    /// [`Vm::exec`](crate::Vm::exec) (a request's own settings win), with `Entrypoint` + `Cmd`
    /// as the command of [`Vm::run`](crate::Vm::run). Replaces a [`rootfs`](Self::rootfs) set
    /// before.
    pub fn image(mut self, image: crate::image::Image) -> Self {
        self.image = Some(image);
        self.rootfs = None;
        self
    }

    /// Whether [`Vm::start`](crate::Vm::start) uses the snapshot cache (on by default): the
    /// first start of a configuration boots the guest and snapshots it under
    /// `~/.cache/supermachine/snapshots/<key>/` (the key hashes the kernel, agent, extra
    /// files, size and command line); every later start restores that snapshot in
    /// milliseconds. Where KVM can pre-fault, that first start also records the snapshot's
    /// working set (one restore and one exec more, see [`Vm::snapshot`](crate::Vm::snapshot)).
    /// Off: every start cold-boots and nothing is written.
    pub fn snapshot_cache(mut self, enabled: bool) -> Self {
        self.snapshot_cache = enabled;
        self
    }

    /// Publishes a guest TCP port on the host (`docker run -p`): [`Vm::start`](crate::Vm::start)
    /// listens on `mapping.host` before the VM starts (an address in use fails the start with
    /// [`Error::Publish`](crate::Error::Publish), and nothing is left running), and every
    /// connection is carried over vsock to `127.0.0.1:mapping.guest_port` in the guest. Call
    /// it once per port. Ports are host-side only: they are not part of snapshots or of the
    /// snapshot cache key.
    ///
    /// ```
    /// # fn demo() -> Result<(), supermachine::PortMappingError> {
    /// use supermachine::VmConfig;
    /// let config = VmConfig::new().publish("8080:80".parse()?);
    /// # Ok(()) }
    /// ```
    pub fn publish(mut self, mapping: crate::publish::PortMapping) -> Self {
        self.publish.push(mapping);
        self
    }

    /// The VM's network ([`Network::public`](crate::Network::public) by default):
    /// [`Network::none`](crate::Network::none) gives it no NIC at all; otherwise it has `eth0`
    /// on a user-mode network of its own, behind the network's egress policy. Whether there is
    /// a NIC is part of the snapshot cache key; the policy is not (it is applied by the host
    /// each time the VM starts or is restored).
    pub fn network(mut self, network: crate::Network) -> Self {
        self.network = network;
        self
    }

    /// Enables test-only agent actions such as [`Vm::crash_guest`](crate::Vm::crash_guest).
    #[doc(hidden)]
    pub fn test_hooks(mut self, enabled: bool) -> Self {
        self.test_hooks = enabled;
        self
    }

    /// The number of vCPUs.
    pub fn get_vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Guest RAM in MiB.
    pub fn get_memory_mib(&self) -> u32 {
        self.memory_mib
    }

    /// Checks everything that can be checked without a hypervisor, and resolves the kernel and
    /// agent paths (from the environment where not set).
    pub(crate) fn resolve(&self) -> Result<Resolved, ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall {
                mib: self.memory_mib,
                min: MIN_MEMORY_MIB,
            });
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(ConfigError::MemoryTooLarge {
                mib: self.memory_mib,
                max: MAX_MEMORY_MIB,
            });
        }
        if self.kernel_cmdline.contains(['\n', '\0']) {
            return Err(ConfigError::KernelCmdline(
                "it must be one line without NUL bytes".into(),
            ));
        }
        if let Some(image) = &self.image {
            let host = crate::image::Platform::host();
            let built_for = image.config();
            let differs = |have: &str, want: &str| !have.is_empty() && have != want;
            if differs(&built_for.os, &host.os)
                || differs(&built_for.architecture, &host.architecture)
            {
                return Err(ConfigError::ImagePlatform {
                    image: image.source().to_owned(),
                    built_for: format!("{}/{}", built_for.os, built_for.architecture),
                    host: host.to_string(),
                });
            }
        }
        let kernel = pick(&self.kernel, KERNEL_ENV, INSTALLED_KERNEL, Bundled::Kernel)?
            .ok_or(ConfigError::KernelNotSet)?;
        readable_file(&kernel).map_err(|reason| ConfigError::KernelUnreadable {
            path: kernel.clone(),
            reason,
        })?;
        let agent = pick(&self.agent, AGENT_ENV, INSTALLED_AGENT, Bundled::Agent)?
            .ok_or(ConfigError::AgentNotSet)?;
        readable_file(&agent).map_err(|reason| ConfigError::AgentUnreadable {
            path: agent.clone(),
            reason,
        })?;
        if let Some(rootfs) = &self.rootfs {
            readable_file(rootfs).map_err(|reason| ConfigError::RootfsUnreadable {
                path: rootfs.clone(),
                reason,
            })?;
        }
        Ok(Resolved { kernel, agent })
    }
}

/// Paths [`VmConfig::resolve`] settled on.
pub(crate) struct Resolved {
    pub(crate) kernel: PathBuf,
    pub(crate) agent: PathBuf,
}

/// The kernel's file name in the install directory ([`crate::cache::install_dir`]).
const INSTALLED_KERNEL: &str = "vmlinux";
/// The agent's file name in the install directory.
const INSTALLED_AGENT: &str = "supermachine-agent";

/// The explicit path, else the environment variable, else the installed file if there is one,
/// else the bundled artifact (unpacked into the cache on first use; blocking).
fn pick(
    explicit: &Option<PathBuf>,
    env: &str,
    installed: &str,
    bundled: Bundled,
) -> Result<Option<PathBuf>, ConfigError> {
    let chosen = explicit
        .clone()
        .or_else(|| {
            std::env::var_os(env)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            crate::cache::install_dir()
                .map(|dir| dir.join(installed))
                .filter(|path| path.is_file())
        });
    match chosen {
        Some(path) => Ok(Some(path)),
        None => bundled.unpack(),
    }
}

/// Which bundled artifact ([`supermachine_guest`]) stands in when nothing else is given.
#[derive(Debug, Clone, Copy)]
enum Bundled {
    Kernel,
    Agent,
}

impl Bundled {
    #[cfg(feature = "bundled-guest")]
    fn unpack(self) -> Result<Option<PathBuf>, ConfigError> {
        let artifact = match self {
            Bundled::Kernel => supermachine_guest::kernel(),
            Bundled::Agent => supermachine_guest::agent(),
        };
        let Some(artifact) = artifact else {
            return Ok(None);
        };
        let failed = |reason: String| ConfigError::BundledGuest {
            name: artifact.name(),
            reason,
        };
        let dir = crate::cache::dir("guest").map_err(|e| failed(e.to_string()))?;
        let started = std::time::Instant::now();
        let fresh = !dir.join(artifact.sha256()).join(artifact.name()).is_file();
        let path = artifact
            .unpack(&dir)
            .map_err(|e| failed(crate::Report(&e).to_string()))?;
        if fresh {
            tracing::info!(
                file = artifact.name(),
                compressed = artifact.compressed_len(),
                ms = started.elapsed().as_millis() as u64,
                path = %path.display(),
                "unpacked the bundled guest file"
            );
        }
        Ok(Some(path))
    }

    #[cfg(not(feature = "bundled-guest"))]
    fn unpack(self) -> Result<Option<PathBuf>, ConfigError> {
        Ok(None)
    }
}

fn readable_file(path: &Path) -> Result<(), String> {
    match std::fs::File::open(path) {
        Ok(file) => match file.metadata() {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err("not a regular file".into()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    }
}

/// A [`VmConfig`] that cannot work, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `vcpus(0)`.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than supported.
    #[error("{requested} vCPUs requested; at most {max} are supported")]
    TooManyVcpus {
        /// Requested.
        requested: u32,
        /// Limit.
        max: u32,
    },
    /// Too little RAM to boot.
    #[error("{mib} MiB of memory is too little: a VM needs at least {min} MiB")]
    MemoryTooSmall {
        /// Requested.
        mib: u32,
        /// Minimum.
        min: u32,
    },
    /// More RAM than the machine layout allows.
    #[error("{mib} MiB of memory is too much: at most {max} MiB are supported")]
    MemoryTooLarge {
        /// Requested.
        mib: u32,
        /// Maximum.
        max: u32,
    },
    /// No kernel given, `SUPERMACHINE_KERNEL` unset, none installed, none bundled.
    #[error(
        "no guest kernel: this build bundles none (supermachine-guest was built without its \
         artifacts: run `supermachine-guest/build-artifacts.sh` in the supermachine repository \
         and rebuild), SUPERMACHINE_KERNEL is unset and none is installed; or set \
         SUPERMACHINE_KERNEL to a kernel built by `supermachine-vmm/guest/build-kernel.sh` (it \
         prints the path), or call VmConfig::kernel"
    )]
    KernelNotSet,
    /// The kernel cannot be read.
    #[error("guest kernel {path} cannot be read: {reason}")]
    KernelUnreadable {
        /// The path tried.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No agent given, `SUPERMACHINE_AGENT_BIN` unset, none installed, none bundled.
    #[error(
        "no guest agent: this build bundles none (supermachine-guest was built without its \
         artifacts: run `supermachine-guest/build-artifacts.sh` in the supermachine repository \
         and rebuild), SUPERMACHINE_AGENT_BIN is unset and none is installed; or set \
         SUPERMACHINE_AGENT_BIN to the static agent built by `cargo build -p supermachine-agent \
         --release --target <arch>-unknown-linux-musl`, or call VmConfig::agent"
    )]
    AgentNotSet,
    /// The bundled kernel or agent could not be unpacked into the cache.
    #[error("the bundled guest {name} cannot be unpacked: {reason}")]
    BundledGuest {
        /// The file (`vmlinux`, `Image`, `supermachine-agent`).
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// The agent cannot be read.
    #[error("guest agent {path} cannot be read: {reason}")]
    AgentUnreadable {
        /// The path tried.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The root filesystem image cannot be read.
    #[error("root filesystem image {path} cannot be read: {reason}")]
    RootfsUnreadable {
        /// The path given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The image was built for another platform than the guests this host runs (pull it with
    /// the host's platform, the default, instead).
    #[error("image {image} is built for {built_for}, but VMs on this host run {host}")]
    ImagePlatform {
        /// The image's source (reference or path).
        image: String,
        /// `os/architecture` from the image config.
        built_for: String,
        /// The host's platform.
        host: String,
    },
    /// An extra initramfs file is unusable.
    #[error("initramfs: {0}")]
    Initramfs(String),
    /// The extra kernel command line is unusable.
    #[error("extra kernel command line: {0}")]
    KernelCmdline(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, VmConfig) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.path().join("agent"), b"a").unwrap();
        let config = VmConfig::new()
            .kernel(dir.path().join("vmlinux"))
            .agent(dir.path().join("agent"));
        (dir, config)
    }

    #[test]
    fn valid_config_resolves() {
        let (dir, config) = files();
        let r = config.resolve().unwrap();
        assert_eq!(r.kernel, dir.path().join("vmlinux"));
        assert_eq!(r.agent, dir.path().join("agent"));
    }

    #[test]
    fn each_invalid_field_has_its_error() {
        let (dir, config) = files();
        let err = |c: VmConfig| c.resolve().err().unwrap();
        assert_eq!(err(config.clone().vcpus(0)), ConfigError::NoVcpus);
        assert!(matches!(
            err(config.clone().vcpus(33)),
            ConfigError::TooManyVcpus { requested: 33, .. }
        ));
        assert!(matches!(
            err(config.clone().memory_mib(16)),
            ConfigError::MemoryTooSmall { mib: 16, min: 64 }
        ));
        assert!(matches!(
            err(config.clone().memory_mib(1 << 20)),
            ConfigError::MemoryTooLarge { .. }
        ));
        assert!(matches!(
            err(config.clone().kernel(dir.path().join("missing"))),
            ConfigError::KernelUnreadable { .. }
        ));
        assert!(matches!(
            err(config.clone().kernel(dir.path())),
            ConfigError::KernelUnreadable { reason, .. } if reason.contains("regular")
        ));
        assert!(matches!(
            err(config.clone().agent("/nonexistent/agent")),
            ConfigError::AgentUnreadable { .. }
        ));
        assert!(matches!(
            err(config.kernel_cmdline("a\nb")),
            ConfigError::KernelCmdline(_)
        ));
        // The messages say how to fix it.
        assert!(ConfigError::KernelNotSet
            .to_string()
            .contains("build-kernel.sh"));
        assert!(ConfigError::AgentNotSet
            .to_string()
            .contains("-unknown-linux-musl"));
        assert!(ConfigError::AgentNotSet
            .to_string()
            .contains("build-artifacts.sh"));
    }
}
