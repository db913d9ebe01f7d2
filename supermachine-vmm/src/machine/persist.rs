//! Snapshots of a machine and restoring them: what goes into `vmstate` and `memory`, and how a
//! new machine is built from them. Each device's own saved state is defined beside the device
//! (`devices/*/persist.rs`); the file format is `snapshot/format.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::builder::MachineBuilder;
use super::config::MachineConfig;
use super::lifecycle::Hold;
use super::{lock, Machine};
use crate::arch::ARCH;
use crate::devices::vsock::VsockHandle;
use crate::error::Error;
use crate::memory::{self, RamBacking};
use crate::snapshot::working_set::{WorkingSet, WORKING_SET_FILE};
use crate::snapshot::{
    format, MachineState, SnapshotError, SnapshotInfo, MEMORY_FILE, VMSTATE_FILE,
};
use crate::vcpu::{PauseError, Prefault, VcpuSetup};

impl Machine {
    /// Restores the snapshot in `dir` into a new machine and starts it.
    ///
    /// `config` gives the machine's shape, which must be the snapshot's: vCPU count, memory
    /// size, vsock CID and the number of disks (with their read-only flags); its kernel,
    /// initramfs and command line are not used (the snapshot's memory holds the booted kernel).
    /// Disk paths may differ from the snapshot's, but must hold the same contents.
    ///
    /// Guest RAM is the snapshot's `memory` file mapped copy-on-write, so VMs restored from one
    /// snapshot share its clean pages. Only its `working-set` (if any, see
    /// [`record_working_set`](Self::record_working_set)) is touched before the guest runs: mapped
    /// into the hypervisor's page tables, the written pages copied first. Fails with
    /// [`Error::Snapshot`] on a damaged, truncated, foreign or mismatched snapshot (one of
    /// another architecture: [`SnapshotError::Architecture`]); nothing is left running then.
    /// Must be called inside a tokio runtime.
    pub fn restore(config: MachineConfig, dir: &Path) -> Result<Machine, Error> {
        let state_path = dir.join(VMSTATE_FILE);
        let bytes = std::fs::read(&state_path).map_err(SnapshotError::io(&state_path))?;
        let state = format::decode(&bytes, &state_path)?;
        Self::restore_state(config, dir, &state)
    }

    /// [`restore`](Self::restore) with the `vmstate` already read and checked (by
    /// [`format::decode`]), so a caller that validated the snapshot up front does not read and
    /// hash it again; the memory file is still taken from `dir` and its size checked.
    pub fn restore_state(
        config: MachineConfig,
        dir: &Path,
        state: &MachineState,
    ) -> Result<Machine, Error> {
        config.validate_shape()?;
        check_shape(&config, state)?;
        let memory_path = dir.join(MEMORY_FILE);
        let file = std::fs::File::open(&memory_path).map_err(SnapshotError::io(&memory_path))?;
        let found = file
            .metadata()
            .map_err(SnapshotError::io(&memory_path))?
            .len();
        let expected = memory::ram_size(config.memory_mib)?;
        if found != expected {
            return Err(SnapshotError::MemoryTruncated {
                path: memory_path,
                expected,
                found,
            }
            .into());
        }
        // An optimisation only: a restore goes on without a working set it cannot use.
        let working_set = match WorkingSet::load(dir, expected) {
            Ok(set) => set,
            Err(error) => {
                tracing::warn!(
                    error = crate::error::flatten(&error),
                    "ignoring the snapshot's working set"
                );
                None
            }
        };
        let memory = memory::create(config.memory_mib, RamBacking::SnapshotFile(file))?;
        // Mapping the set starts now, beside the VMM's own work below.
        let prefault = working_set
            .map(|set| Prefault::start(set, Arc::clone(&memory), state.vcpus.len() as u32));
        MachineBuilder::assemble_on(config, memory)?.restore(state, prefault)
    }

    /// Records the guest pages this machine — restored from the snapshot in `dir` — has
    /// touched so far into `dir`'s working set ([`WorkingSet`]), which later restores of that
    /// snapshot map before the guest runs. Call it once the machine has answered the requests
    /// that should be fast after a restore (the embedding library: its first agent round trip
    /// and a first exec). Returns the set written.
    pub fn record_working_set(&self, dir: &Path) -> Result<WorkingSet, Error> {
        let set =
            WorkingSet::resident(&self.memory).map_err(SnapshotError::io("/proc/self/pagemap"))?;
        set.save(dir)
            .map_err(SnapshotError::io(dir.join(WORKING_SET_FILE)))?;
        Ok(set)
    }

    /// Whether this machine's hypervisor can map a working set ahead of the guest
    /// ([`HvVcpu::prefault`](crate::hypervisor::HvVcpu::prefault)); recording one is pointless
    /// where it cannot.
    pub fn can_prefault(&self) -> bool {
        self.vm.can_prefault()
    }

    /// Saves the machine's complete state into `dir` (which must exist): `vmstate` and a
    /// sparse `memory` file (see [`snapshot`](crate::snapshot)).
    ///
    /// The vCPUs are parked and the device workers held between two batches while the state
    /// is written, then everything goes on where it stopped; connections stay open. Fails with
    /// [`SnapshotError::NotRunning`] if the machine has ended, and for machines with devices
    /// added through [`MachineBuilder::add_virtio_mmio`] (whose state the VMM cannot see).
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, Error> {
        if let Some(device) = self.opaque_devices.first() {
            return Err(SnapshotError::OpaqueDevice(device.clone()).into());
        }
        if self.exit_status().is_some() {
            return Err(SnapshotError::NotRunning.into());
        }
        let started = Instant::now();
        let mut hold = lock(&self.hold);
        // A machine paused by its owner stays paused; otherwise the pause lasts as long as the
        // save.
        let paused_here = hold.is_none();
        let held = match hold.take() {
            Some(held) => held,
            None => self.hold_still().map_err(|e| match e {
                PauseError::NotRunning => SnapshotError::NotRunning,
                other => SnapshotError::Pause(other),
            })?,
        };
        let result = self.save(dir, &held);
        if paused_here {
            drop(held);
        } else {
            *hold = Some(held);
        }
        drop(hold);
        let written = result?;
        let paused_for = started.elapsed();
        tracing::debug!(
            ?paused_for,
            memory_bytes = written.bytes_written,
            "snapshot taken"
        );
        Ok(SnapshotInfo {
            memory_bytes_written: written.bytes_written,
            memory_sha256: written.sha256,
            paused_for,
        })
    }

    /// Writes the state of the held machine into `dir`.
    fn save(&self, dir: &Path, held: &Hold) -> Result<memory::SparseWrite, SnapshotError> {
        let state = MachineState {
            arch: ARCH.to_owned(),
            config: self.saved_config.clone(),
            vm: held.vm_state.clone(),
            vcpus: held.vcpu_states.clone(),
            serial: lock(&self.serial).save(),
            transports: held.transport_states.clone(),
            vsock_connections: self.vsock.as_ref().map_or(0, VsockHandle::connection_count),
        };
        // A working set recorded for what was in `dir` before does not describe this state.
        let stale = dir.join(WORKING_SET_FILE);
        match std::fs::remove_file(&stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SnapshotError::io(stale)(e)),
        }
        let memory_path = dir.join(MEMORY_FILE);
        let file = std::fs::File::create(&memory_path).map_err(SnapshotError::io(&memory_path))?;
        let written =
            memory::write_sparse(&self.memory, &file).map_err(SnapshotError::io(&memory_path))?;
        let state_path = dir.join(VMSTATE_FILE);
        std::fs::write(&state_path, format::encode(&state)?)
            .map_err(SnapshotError::io(&state_path))?;
        Ok(written)
    }
}

impl MachineBuilder {
    /// Loads a snapshot's device and hypervisor state into this machine (built on the
    /// snapshot's memory) and starts it; each vCPU thread creates its vCPU, loads its state and
    /// maps its share of the working set, if any.
    pub(super) fn restore(
        self,
        state: &MachineState,
        prefault: Option<Arc<Prefault>>,
    ) -> Result<Machine, Error> {
        let device_err = |device: &str, source: Box<dyn std::error::Error + Send + Sync>| {
            SnapshotError::Device {
                device: device.to_owned(),
                source,
            }
        };
        if state.transports.len() != self.transports.len() {
            return Err(SnapshotError::Mismatch {
                what: "virtio devices",
                snapshot: state.transports.len().to_string(),
                requested: self.transports.len().to_string(),
            }
            .into());
        }
        // Interrupt controllers first: restored devices may raise interrupts right away.
        self.vm.restore_state(&state.vm)?;
        lock(&self.serial)
            .restore(&state.serial)
            .map_err(|e| device_err("serial", Box::new(e)))?;
        for ((name, transport), saved) in self.transports.iter().zip(&state.transports) {
            lock(transport)
                .restore(saved)
                .map_err(|e| device_err(name, Box::new(e)))?;
        }
        let setups = state
            .vcpus
            .iter()
            .map(|saved| VcpuSetup::Restore(saved.clone(), prefault.clone()))
            .collect();
        let vsock = self.vsock.clone();
        let cmdline = state.config.cmdline.clone();
        let machine = self.launch(setups, cmdline)?;
        // The old machine's connections do not exist here: the guest drops its connected
        // sockets (listeners survive) before it sees anything new from us. Without any, there
        // is nothing to drop.
        if let Some(vsock) = vsock.filter(|_| state.vsock_connections > 0) {
            tracing::debug!(
                connections = state.vsock_connections,
                "resetting the vsock transport"
            );
            vsock.reset_transport();
        }
        Ok(machine)
    }
}

/// Refuses a snapshot whose machine differs from `config` in a way that matters to the guest.
fn check_shape(config: &MachineConfig, state: &MachineState) -> Result<(), SnapshotError> {
    if state.arch != ARCH {
        return Err(SnapshotError::Architecture {
            snapshot: state.arch.clone(),
            host: ARCH,
        });
    }
    let saved = &state.config;
    let mismatch = |what: &'static str, snapshot: String, requested: String| {
        Err(SnapshotError::Mismatch {
            what,
            snapshot,
            requested,
        })
    };
    if saved.vcpus != config.vcpus || state.vcpus.len() != saved.vcpus as usize {
        return mismatch(
            "vCPUs",
            state.vcpus.len().to_string(),
            config.vcpus.to_string(),
        );
    }
    if saved.memory_mib != config.memory_mib {
        return mismatch(
            "memory",
            format!("{} MiB", saved.memory_mib),
            format!("{} MiB", config.memory_mib),
        );
    }
    let cid = config.vsock.as_ref().map(|v| v.guest_cid);
    if saved.vsock_cid != cid {
        return mismatch(
            "vsock",
            format!("{:?}", saved.vsock_cid),
            format!("{cid:?}"),
        );
    }
    let ro: Vec<bool> = config.disks.iter().map(|d| d.read_only).collect();
    let saved_ro: Vec<bool> = saved.disks.iter().map(|d| d.1).collect();
    if ro != saved_ro {
        return mismatch(
            "disks (read-only flags in order)",
            format!("{saved_ro:?}"),
            format!("{ro:?}"),
        );
    }
    Ok(())
}
