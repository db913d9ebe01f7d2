//! Snapshots: a paused machine's complete state, and restoring it into a new machine.
//!
//! A snapshot directory holds two files written by this crate (ARCHITECTURE.md decision 7):
//! * `vmstate` — [`MachineState`] (the guest architecture, hypervisor state per vCPU and per
//!   VM, serial registers, every virtio-mmio transport with its queue positions, and the
//!   machine's shape), framed by [`format`] with magic, format version and checksum;
//! * `memory` — guest RAM, raw and sparse (untouched pages are holes).
//!
//! A third, optional file, `working-set`, lists the pages a restored machine touched while it
//! answered its first requests ([`working_set`]); restores map those pages ahead of the guest.
//!
//! The embedding library adds its own metadata (`meta.json`) beside them.
//!
//! Taking one ([`Machine::snapshot`](crate::Machine::snapshot)) parks every vCPU between two
//! instructions, holds every device worker between two batches, saves, and lets everything
//! go on: the running machine does not notice. Restoring
//! ([`Machine::restore`](crate::Machine::restore)) maps `memory` copy-on-write, rebuilds the
//! devices from the saved configuration, loads the state and resumes; vsock connections of the
//! old machine do not exist in the new one, so if there were any, the guest is sent a
//! transport reset (its listening sockets survive, its connected ones are closed). Snapshots
//! taken with no connection open skip that reset: [`MachineState::vsock_connections`].

pub mod format;
pub mod working_set;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialSaved;
use crate::devices::virtio::mmio::TransportState;
use crate::hypervisor::HvState;

/// The state file's name inside a snapshot directory.
pub const VMSTATE_FILE: &str = "vmstate";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// The machine's shape, saved so a restore can rebuild the same devices in the same slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// vCPU count.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// The vsock device's guest CID, if the machine has one.
    pub vsock_cid: Option<u64>,
    /// Disks in slot order: path and read-only flag.
    pub disks: Vec<(PathBuf, bool)>,
    /// The kernel command line the machine booted with (informational).
    pub cmdline: String,
}

/// Everything in a `vmstate` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// The guest architecture ([`crate::arch::ARCH`]): a snapshot restores only on the one that
    /// took it.
    pub arch: String,
    /// The machine's shape.
    pub config: SavedConfig,
    /// VM-wide hypervisor state.
    pub vm: HvState,
    /// Per-vCPU hypervisor state, in vCPU order.
    pub vcpus: Vec<HvState>,
    /// The UART.
    pub serial: SerialSaved,
    /// Every virtio-mmio transport, in slot order.
    pub transports: Vec<TransportState>,
    /// Connections the vsock device tracked when the snapshot was taken. With none, the guest
    /// has no connected vsock socket, and a restore skips the transport reset (and the guest
    /// round trip it costs before the first connection).
    pub vsock_connections: usize,
}

/// A snapshot could not be taken, opened or restored. One type for the VMM and the library
/// above it (which re-exports it): each variant names what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Reading or writing a snapshot file failed.
    #[error("cannot read or write {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot file is damaged (bad checksum, bad magic, undecodable) or not a snapshot file.
    #[error("{path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The snapshot was written by another, incompatible format version.
    #[error(
        "the snapshot has format version {found}, this build reads version {supported}; \
         take the snapshot again with this build"
    )]
    FormatVersion {
        /// The file's version.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The snapshot was taken on another guest architecture.
    #[error("the snapshot is of a {snapshot} machine; this build runs {host} machines")]
    Architecture {
        /// The snapshot's architecture.
        snapshot: String,
        /// This build's.
        host: &'static str,
    },
    /// The memory file is shorter or longer than the VM's RAM (truncated or replaced).
    #[error(
        "{path} is {found} bytes, the snapshot's RAM is {expected} bytes: truncated or replaced"
    )]
    MemoryTruncated {
        /// The memory file.
        path: PathBuf,
        /// Size it must have.
        expected: u64,
        /// Size it has.
        found: u64,
    },
    /// The memory file's contents differ from what was written (a full check, which restores
    /// do not make: `Snapshot::verify_memory` in the library).
    #[error("{path}: contents changed since the snapshot was taken (sha256 mismatch)")]
    MemoryChanged {
        /// The memory file.
        path: PathBuf,
    },
    /// The snapshot is of another machine than the one asked for.
    #[error(
        "snapshot does not match the configuration: {what} is {snapshot} in the snapshot, \
         {requested} requested"
    )]
    Mismatch {
        /// Which property differs.
        what: &'static str,
        /// The snapshot's value.
        snapshot: String,
        /// The requested value.
        requested: String,
    },
    /// The target directory already exists and is not empty.
    #[error("{0} already exists; snapshots are written to a new directory")]
    Exists(PathBuf),
    /// The machine is not running (it ended or is stopping), so it cannot be snapshotted.
    #[error("the machine is not running")]
    NotRunning,
    /// Pausing the machine failed.
    #[error("the machine could not be paused for the snapshot")]
    Pause(#[from] crate::vcpu::PauseError),
    /// The hypervisor could not save or load its state.
    #[error("the hypervisor could not save or load the machine's state")]
    Hypervisor(#[from] crate::hypervisor::HvError),
    /// A device could not be saved or restored.
    #[error("device {device}: its state could not be saved or restored")]
    Device {
        /// Which device.
        device: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A device was added as a plain bus device, so the VMM cannot see (or save) its state.
    #[error("device {0} was added as a plain bus device; its state cannot be saved")]
    OpaqueDevice(String),
    /// The state (or the library's metadata) could not be encoded.
    #[error("encoding the snapshot state failed")]
    Encode(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SnapshotError {
    /// [`SnapshotError::Io`] for `path`, as a `map_err` argument.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| SnapshotError::Io { path, source }
    }
}

/// What [`Machine::snapshot`](crate::Machine::snapshot) wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Bytes of guest RAM actually written (non-zero pages).
    pub memory_bytes_written: u64,
    /// The memory file's digest ([`crate::memory::sparse_digest`]), for later verification.
    pub memory_sha256: [u8; 32],
    /// How long the machine was paused.
    pub paused_for: std::time::Duration,
}
