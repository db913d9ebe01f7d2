//! The crate's error type.

use std::path::PathBuf;

pub use crate::arch::BootError;
pub use crate::hypervisor::HvError;
pub use crate::memory::MemoryError;

/// Everything that can go wrong setting up or starting a machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The machine configuration is invalid; nothing was created.
    #[error("invalid machine configuration")]
    Config(#[from] ConfigError),
    /// The hypervisor is unavailable or refused an operation. For a missing or inaccessible
    /// `/dev/kvm` ([`HvError::Unavailable`]) the message says how to fix it.
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    /// Guest RAM could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initramfs or boot structures could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// `Machine::start` was called outside a tokio runtime.
    #[error("Machine::start must be called from inside a tokio runtime (devices run on it)")]
    NoRuntime,
    /// All virtio-mmio slots (one per free interrupt line; x86: IOAPIC pin) are taken.
    #[error("no free virtio-mmio slot (a machine has at most {max})")]
    NoFreeMmioSlot {
        /// The number of slots.
        max: u32,
    },
    /// Creating an eventfd failed (usually the fd limit).
    #[error("creating an eventfd failed")]
    EventFd(#[source] std::io::Error),
    /// A configured device could not be created (e.g. a disk image that cannot be opened).
    #[error("device {device} could not be created")]
    Device {
        /// Which device.
        device: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A device's address range overlaps another's (a VMM bug).
    #[error(transparent)]
    Bus(#[from] crate::bus::BusOverlap),
    /// The machine could not be paused.
    #[error("the machine could not be paused")]
    Pause(#[from] crate::vcpu::PauseError),
    /// A snapshot could not be taken or restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A vCPU thread could not be spawned.
    #[error("spawning the thread of vCPU {id} failed")]
    Thread {
        /// vCPU index.
        id: u32,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// `error` and its causes on one line (`what: why: cause`), for the places that keep an error
/// as text (a vCPU failure is reported through a `Clone` exit reason).
pub(crate) fn flatten(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

impl Error {
    /// Whether this is "the hypervisor cannot be used on this host" (as opposed to a bad config
    /// or a failure of a working hypervisor).
    pub fn is_hypervisor_unavailable(&self) -> bool {
        matches!(self, Error::Hypervisor(HvError::Unavailable { .. }))
    }
}

/// An invalid [`MachineConfig`](crate::MachineConfig) field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `vcpus` is 0.
    #[error("a machine needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than the hypervisor or the platform (x86: the MP table) allow.
    #[error("{requested} vCPUs requested, at most {max} supported")]
    TooManyVcpus {
        /// Requested.
        requested: u32,
        /// Limit.
        max: usize,
    },
    /// Less RAM than a guest can boot in.
    #[error("{mib} MiB of memory is too little (at least {min} MiB)")]
    MemoryTooSmall {
        /// Requested.
        mib: u32,
        /// Minimum.
        min: u32,
    },
    /// More RAM than fits below the MMIO hole.
    #[error("{mib} MiB of memory does not fit below the MMIO hole (at most {max} MiB)")]
    MemoryTooLarge {
        /// Requested.
        mib: u32,
        /// Maximum.
        max: u32,
    },
    /// The kernel path is not a file.
    #[error("kernel {0} not found")]
    KernelNotFound(PathBuf),
    /// The initramfs path is not a file.
    #[error("initramfs {0} not found")]
    InitramfsNotFound(PathBuf),
    /// The extra command line is not acceptable.
    #[error("{0}")]
    Cmdline(String),
}
