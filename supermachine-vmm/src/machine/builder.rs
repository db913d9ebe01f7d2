//! [`MachineBuilder`]: assembles RAM, VM, platform devices and virtio devices, then loads the
//! kernel and starts the vCPU threads.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use super::exit::{is_power_off_line, ExitReason, ExitRecorder};
use super::{lifecycle, Machine, CONSOLE_STDERR_ENV};
use crate::arch::{self, BootSpec, PlatformContext, VirtioMmioDevice, BASE_CMDLINE};
use crate::bus::Bus;
use crate::devices::block::BlockDevice;
use crate::devices::net::NetDevice;
use crate::devices::serial::{ConsoleLog, Serial};
use crate::devices::virtio::{MmioTransport, VirtioDevice, MMIO_SLOT_SIZE};
use crate::devices::vsock::{VsockDevice, VsockHandle};
use crate::error::{ConfigError, Error};
use crate::hypervisor::{self, HvVm, Hypervisor, VcpuKicker};
use crate::memory::{self, RamBacking};
use crate::snapshot::SavedConfig;
use crate::vcpu::{self, RunControl, VcpuContext, VcpuSetup};

use super::config::MachineConfig;

/// A machine being assembled: RAM, VM, interrupt controller and platform devices exist;
/// devices can be added; [`start`](Self::start) loads the kernel and runs the vCPUs.
pub struct MachineBuilder {
    pub(super) config: MachineConfig,
    pub(super) hv: Arc<dyn Hypervisor>,
    pub(super) vm: Arc<dyn HvVm>,
    pub(super) memory: Arc<GuestMemoryMmap>,
    pub(super) mmio: Bus,
    pub(super) pio: Bus,
    pub(super) console: ConsoleLog,
    pub(super) runtime: tokio::runtime::Handle,
    /// Runs the vCPUs; created first, so platform devices can end the machine.
    pub(super) control: Arc<RunControl>,
    pub(super) exit: Arc<ExitRecorder>,
    pub(super) exit_rx: tokio::sync::watch::Receiver<Option<super::MachineExit>>,
    /// The virtio-mmio devices, in slot order, as the guest is told about them.
    pub(super) devices: Vec<VirtioMmioDevice>,
    pub(super) next_slot: u32,
    pub(super) vsock: Option<VsockHandle>,
    pub(super) serial: Arc<Mutex<Serial>>,
    /// Virtio transports in slot order, for snapshots.
    pub(super) transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// Devices added as plain bus devices, which a snapshot cannot save.
    pub(super) opaque_devices: Vec<String>,
}

impl MachineBuilder {
    /// Validates `config` and sets up everything up to the devices. Must be called inside a
    /// tokio runtime (devices run their work on it).
    pub fn new(config: MachineConfig) -> Result<Self, Error> {
        config.validate()?;
        Self::assemble(config, RamBacking::Anonymous)
    }

    /// Everything but the kernel: RAM, VM, irqchip, platform devices and the configured
    /// devices.
    pub(super) fn assemble(config: MachineConfig, backing: RamBacking) -> Result<Self, Error> {
        let memory = memory::create(config.memory_mib, backing)?;
        Self::assemble_on(config, memory)
    }

    /// [`assemble`](Self::assemble) on guest RAM already created (of `config`'s size): a
    /// restore starts mapping its working set into RAM before the VM exists.
    pub(super) fn assemble_on(
        config: MachineConfig,
        memory: Arc<GuestMemoryMmap>,
    ) -> Result<Self, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;

        let hv = hypervisor::open()?;
        let max = hv.max_vcpus();
        if config.vcpus as usize > max {
            return Err(ConfigError::TooManyVcpus {
                requested: config.vcpus,
                max,
            }
            .into());
        }
        arch::warn_host_limits(config.vcpus);
        let vm: Arc<dyn HvVm> = Arc::from(hv.create_vm()?);
        vm.map_memory(&memory)?;
        vm.create_irqchip()?;

        let tee =
            config.console_to_stderr || std::env::var(CONSOLE_STDERR_ENV).is_ok_and(|v| v == "1");
        let console = ConsoleLog::new(config.console_capacity, tee);
        let control = RunControl::new();
        let (exit, exit_rx) = ExitRecorder::new(console.clone(), Arc::clone(&control));
        let mut mmio = Bus::new();
        let mut pio = Bus::new();
        let platform = arch::add_platform_devices(PlatformContext {
            vm: vm.as_ref(),
            mmio: &mut mmio,
            pio: &mut pio,
            console: console.clone(),
            power: exit.clone(),
        })?;

        let mut builder = MachineBuilder {
            config,
            hv,
            vm,
            memory,
            mmio,
            pio,
            console,
            runtime,
            control,
            exit,
            exit_rx,
            devices: Vec::new(),
            next_slot: 0,
            vsock: None,
            serial: platform.serial,
            transports: Vec::new(),
            opaque_devices: Vec::new(),
        };

        // Devices from the config, in a fixed order (vsock, disks, NIC) so slot addresses are
        // the same on every boot of one config; snapshots rely on it.
        if let Some(vsock_config) = builder.config.vsock.clone() {
            let device = VsockDevice::new(vsock_config, builder.runtime.clone()).map_err(|e| {
                Error::Device {
                    device: "virtio-vsock".into(),
                    source: Box::new(e),
                }
            })?;
            builder.vsock = Some(device.handle());
            builder.add_virtio_device(Box::new(device), "virtio-vsock")?;
        }
        for disk in builder.config.disks.clone() {
            let device =
                BlockDevice::open(&disk.path, disk.read_only).map_err(|e| Error::Device {
                    device: format!("virtio-blk {}", disk.path.display()),
                    source: Box::new(e),
                })?;
            builder.add_virtio_device(Box::new(device), "virtio-blk")?;
        }
        if let Some(network) = builder.config.network.clone() {
            // A new user-mode network for every machine built, restored ones included.
            let device = NetDevice::new(network, builder.runtime.clone());
            builder.add_virtio_device(Box::new(device), "virtio-net")?;
        }
        Ok(builder)
    }

    /// Puts `device` behind a virtio-mmio transport in the next slot. Returns the slot's base
    /// address and interrupt line.
    pub fn add_virtio_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
        name: &str,
    ) -> Result<(u64, u32), Error> {
        let num_queues = u16::try_from(device.queue_max_sizes().len()).unwrap_or(u16::MAX);
        let slot = self.allocate_slot(num_queues)?;
        let (base, irq) = (slot.base, slot.irq_line);
        let transport =
            MmioTransport::new(device, self.memory.clone(), slot).map_err(|e| Error::Device {
                device: name.to_owned(),
                source: Box::new(e),
            })?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(base, MMIO_SLOT_SIZE, transport.clone())?;
        self.transports.push((name.to_owned(), transport));
        self.announce(base, irq);
        Ok((base, irq))
    }

    /// The host side of the configured vsock device, if any.
    pub fn vsock(&self) -> Option<&VsockHandle> {
        self.vsock.as_ref()
    }

    /// Guest RAM (devices need it to reach their queues).
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// The runtime devices should spawn their work on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// The full kernel command line this machine will boot with: [`BASE_CMDLINE`], the
    /// platform's device announcements, the host's guest workarounds, then the config's.
    pub fn cmdline(&self) -> String {
        let mut parts = vec![BASE_CMDLINE.to_string()];
        parts.extend(arch::cmdline_device_entries(&self.devices));
        if let Some(line) = arch::host_cmdline() {
            parts.push(line.to_string());
        }
        debug_assert!(super::platform_cmdline()
            .split(' ')
            .all(|t| parts.iter().any(|p| p.split(' ').any(|q| q == t))));
        if !self.config.cmdline.trim().is_empty() {
            parts.push(self.config.cmdline.trim().to_string());
        }
        parts.join(" ")
    }

    /// Loads the kernel and starts the vCPUs (each is created and set up on its own thread).
    pub fn start(self) -> Result<Machine, Error> {
        let cmdline = self.cmdline();
        tracing::debug!(%cmdline, "booting");
        let image = arch::load_kernel(
            &self.memory,
            &BootSpec {
                kernel: &self.config.kernel,
                initramfs: self.config.initramfs.as_deref(),
                cmdline: &cmdline,
                vcpus: self.config.vcpus,
                devices: &self.devices,
            },
        )?;
        tracing::debug!(?image, "boot image loaded");
        let init = Arc::new(arch::vcpu_init(
            self.hv.as_ref(),
            &image,
            self.config.vcpus,
        )?);
        let setups = (0..self.config.vcpus)
            .map(|_| VcpuSetup::Boot(Arc::clone(&init)))
            .collect();
        self.launch(setups, cmdline)
    }

    /// Starts one thread per vCPU with its setup, and lets them run once every vCPU is ready.
    /// A vCPU that could not be created or set up fails the start with its error (the lowest
    /// vCPU's, when several did), and no vCPU runs.
    pub(super) fn launch(self, setups: Vec<VcpuSetup>, cmdline: String) -> Result<Machine, Error> {
        let saved_config = SavedConfig {
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            vsock_cid: self.config.vsock.as_ref().map(|v| v.guest_cid),
            disks: self
                .config
                .disks
                .iter()
                .map(|d| (d.path.clone(), d.read_only))
                .collect(),
            cmdline,
        };
        // Without ACPI the guest kernel cannot power the machine off; it only says so on the
        // console (and then halts or, once init exits, panics). Treat that line as the shutdown.
        let weak = Arc::downgrade(&self.exit);
        self.console.set_line_hook(Some(Arc::new(move |line: &str| {
            if is_power_off_line(line) {
                if let Some(exit) = weak.upgrade() {
                    exit.finish(ExitReason::Shutdown);
                }
            }
        })));
        let ctx = Arc::new(VcpuContext {
            mmio: Arc::new(self.mmio),
            pio: Arc::new(self.pio),
            control: Arc::clone(&self.control),
            end: self.exit.clone(),
            created: vcpu::CreatedGate::new(setups.len()),
        });
        let mut machine = Machine {
            control: self.control,
            exit: self.exit,
            exit_rx: self.exit_rx,
            threads: Vec::new(),
            console: self.console,
            vsock: self.vsock,
            serial: self.serial,
            transports: self.transports,
            opaque_devices: self.opaque_devices,
            saved_config,
            hold: Mutex::new(None),
            paused: lifecycle::PausedFlag::default(),
            vm: self.vm,
            memory: self.memory,
            runtime: self.runtime,
        };
        let count = setups.len();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for (id, setup) in (0..).zip(setups) {
            let vm = Arc::clone(&machine.vm);
            match vcpu::spawn(id, vm, setup, Arc::clone(&ctx), ready_tx.clone()) {
                Ok(handle) => machine.threads.push(handle),
                // Dropping `machine` stops and joins the threads already started; they have
                // not run (the gate is closed).
                Err(source) => return Err(Error::Thread { id, source }),
            }
        }
        drop(ready_tx);
        let mut kickers: Vec<Option<Arc<dyn VcpuKicker>>> = vec![None; count];
        let mut failures: Vec<(u32, Error)> = Vec::new();
        for _ in 0..count {
            match ready_rx.recv() {
                Ok((id, Ok(kicker))) => {
                    if let Some(slot) = kickers.get_mut(id as usize) {
                        *slot = Some(kicker);
                    }
                }
                Ok((id, Err(e))) => failures.push((id, e)),
                // Every thread reports before it drops its sender, unless it panicked.
                Err(_) => break,
            }
        }
        machine
            .control
            .set_kickers(kickers.iter().flatten().cloned().collect());
        if let Some((_, e)) = failures.into_iter().min_by_key(|(id, _)| *id) {
            return Err(e);
        }
        if let Some(id) = kickers.iter().position(Option::is_none) {
            return Err(Error::Thread {
                id: id as u32,
                source: std::io::Error::other("the vCPU thread ended before its vCPU was set up"),
            });
        }
        machine.vm.vcpus_created()?;
        machine.control.open_gate();
        machine.watch_device_runtime();
        Ok(machine)
    }
}
