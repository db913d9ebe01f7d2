//! A running microVM: memory, VM, devices and vCPU threads, and its lifecycle.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootSpec};
use crate::bus::{Bus, SharedDevice};
use crate::devices::block::BlockDevice;
use crate::devices::serial::{
    ConsoleLog, Serial, COM1_GSI, COM1_PORT, COM1_PORT_LEN, DEFAULT_CONSOLE_CAPACITY,
};
use crate::devices::virtio::{
    MmioSlot, MmioTransport, VirtioDevice, MMIO_SLOT_SIZE, QUEUE_NOTIFY_OFFSET,
};
use crate::devices::vsock::{VsockConfig, VsockDevice, VsockHandle};
use crate::error::{ConfigError, Error};
use crate::hypervisor::{self, HvVcpu, HvVm, Hypervisor, IoEventAddress, VcpuKicker};
use crate::memory::{self, RamBacking, MAX_MEMORY_MIB, MMIO_BASE};
use crate::snapshot::{
    format, MachineState, SavedConfig, SnapshotError, SnapshotInfo, MEMORY_FILE, VMSTATE_FILE,
};
use crate::vcpu::{self, PauseError, RunControl, VcpuContext};

/// The smallest guest RAM accepted: the kernel (~16 MiB loaded at 16 MiB) plus an initramfs and
/// room to run.
pub const MIN_MEMORY_MIB: u32 = 64;

/// The kernel command line every machine starts with (the config's `cmdline` is appended last,
/// so it can override any of these):
///
/// * `console=ttyS0` — kernel console on the 8250 at 0x3f8, i.e. the console log.
/// * `reboot=k` — reboot through the keyboard controller (0xFE to port 0x64), which the VMM turns
///   into [`ExitReason::Reset`]; the x86 default tries ACPI and EFI first, which do not exist here.
/// * `panic=-1` — reboot at once on a kernel panic, so a panicking guest exits instead of
///   hanging (reported as [`ExitReason::Panic`]).
/// * `8250.nr_uarts=1` — only ttyS0 exists; skips probing three absent legacy UARTs.
///
/// Not needed: `acpi=off`, `pci=off`, `nomodule` (compiled out of the guest kernel); `noapic`
/// would be wrong (virtio-mmio devices use IOAPIC pins 5..23).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1";

/// Appended on PVM hosts (`/sys/module/kvm_pvm` exists): see `guest/pvm-cmdline.txt` and
/// GUEST-KERNEL.md. It hides CPU features PVM's instruction emulator cannot run.
const PVM_CMDLINE: &str = include_str!("../guest/pvm-cmdline.txt");

/// The part of every machine's kernel command line that depends on this host and build, not on
/// the config: [`BASE_CMDLINE`] and, on PVM hosts, the PVM workarounds. Snapshot caches key on
/// it (a snapshot booted with other parameters is another guest).
pub fn platform_cmdline() -> String {
    let mut line = BASE_CMDLINE.to_string();
    if is_pvm_host() {
        if let Some(pvm) = PVM_CMDLINE.lines().map(str::trim).find(|l| !l.is_empty()) {
            line.push(' ');
            line.push_str(pvm);
        }
    }
    line
}

/// Environment variable: when set to `1`, the console is also copied to stderr as it arrives.
pub const CONSOLE_STDERR_ENV: &str = "SUPERMACHINE_CONSOLE_STDERR";

/// The highest GSI the IOAPIC has (24 pins).
const MAX_GSI: u32 = 23;
/// GSI of virtio-mmio slot 0; slot *i* uses `FIRST_VIRTIO_GSI + i` (DESIGN.md).
const FIRST_VIRTIO_GSI: u32 = 5;

/// What to boot and how big.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MachineConfig {
    /// Number of vCPUs (≥ 1). Note: on PVM hosts only one vCPU comes up (`maxcpus=1`).
    pub vcpus: u32,
    /// Guest RAM in MiB, `MIN_MEMORY_MIB..=` 3328 (RAM ends below the MMIO hole at 0xd000_0000).
    pub memory_mib: u32,
    /// The guest kernel: an x86-64 ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended after [`BASE_CMDLINE`] and the device entries.
    pub cmdline: String,
    /// Console ring capacity in bytes (oldest output dropped beyond it).
    pub console_capacity: usize,
    /// Copy console output to stderr as it arrives (also enabled by
    /// `SUPERMACHINE_CONSOLE_STDERR=1`).
    pub console_to_stderr: bool,
    /// A virtio-vsock device (always virtio-mmio slot 0 when present); its host side is
    /// [`Machine::vsock`].
    pub vsock: Option<VsockConfig>,
    /// virtio-blk disks, in order (`/dev/vda`, `/dev/vdb`, ...), in the slots after vsock.
    pub disks: Vec<DiskConfig>,
}

/// A raw disk image attached over virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Attach read-only (guest writes fail with an I/O error).
    pub read_only: bool,
}

impl MachineConfig {
    /// One vCPU, 256 MiB, no initramfs, no extra cmdline.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        MachineConfig {
            vcpus: 1,
            memory_mib: 256,
            kernel: kernel.into(),
            initramfs: None,
            cmdline: String::new(),
            console_capacity: DEFAULT_CONSOLE_CAPACITY,
            console_to_stderr: false,
            vsock: None,
            disks: Vec::new(),
        }
    }

    /// Checks what can be checked without a hypervisor.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_shape()?;
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelNotFound(self.kernel.clone()));
        }
        if let Some(initramfs) = &self.initramfs {
            if !initramfs.is_file() {
                return Err(ConfigError::InitramfsNotFound(initramfs.clone()));
            }
        }
        boot::validate_cmdline(&self.cmdline).map_err(|e| ConfigError::Cmdline(e.to_string()))
    }

    /// The checks that also apply to a restore (which needs no kernel).
    fn validate_shape(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > boot::mptable::MAX_CPUS {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max: boot::mptable::MAX_CPUS as usize,
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
        Ok(())
    }
}

/// How the machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (`reboot`, a keyboard-controller reset or a triple fault).
    Reset,
    /// The guest powered off or halted (`poweroff`, `halt`): the kernel's "reboot: Power down" /
    /// "reboot: System halted" console line, or a platform power-off event.
    Shutdown,
    /// The guest kernel panicked (then reset because of `panic=-1`). Detected from the panic
    /// banner on the console, so it needs `console=ttyS0` and a kernel that prints it.
    Panic {
        /// The panic message (`Attempted to kill init! ...`).
        message: String,
    },
    /// The host stopped the machine ([`Machine::stop`] or drop).
    Stopped,
    /// A vCPU could not go on.
    Failed(VcpuFailure),
    /// The device side could not go on (e.g. the tokio runtime running the devices shut down
    /// while the machine ran); the vCPUs were stopped.
    DeviceFailed {
        /// What failed.
        message: String,
    },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => f.write_str("the guest reset"),
            ExitReason::Shutdown => f.write_str("the guest shut down"),
            ExitReason::Panic { message } => write!(f, "the guest kernel panicked: {message}"),
            ExitReason::Stopped => f.write_str("stopped by the host"),
            ExitReason::Failed(failure) => write!(f, "failed: {failure}"),
            ExitReason::DeviceFailed { message } => write!(f, "device failure: {message}"),
        }
    }
}

/// Why a vCPU could not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuFailure {
    /// The hypervisor could not handle something the guest did. On PVM hosts this is how an
    /// instruction missing from KVM's emulator shows up (host `dmesg`: "INTERNAL_ERROR in batch
    /// emul").
    #[error(
        "vCPU {vcpu}: hypervisor internal error (suberror {suberror}, guest RIP {rip:x?}, \
         data {data:x?})"
    )]
    InternalError {
        /// vCPU index.
        vcpu: u32,
        /// KVM suberror (1: emulation failure).
        suberror: u32,
        /// Guest instruction pointer, if it could be read.
        rip: Option<u64>,
        /// Diagnostic words from the hypervisor.
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest.
    #[error("vCPU {vcpu}: guest entry failed (hardware reason {reason:#x})")]
    EntryFailed {
        /// vCPU index.
        vcpu: u32,
        /// Hardware-specific reason.
        reason: u64,
    },
    /// The vCPU halted with nothing that could wake it.
    #[error("vCPU {vcpu} halted with nothing to wake it")]
    Halted {
        /// vCPU index.
        vcpu: u32,
    },
    /// The guest reported a crash through the platform.
    #[error("vCPU {vcpu}: the guest reported a crash")]
    GuestCrash {
        /// vCPU index.
        vcpu: u32,
    },
    /// An exit this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u32,
        /// The exit, as the backend names it.
        exit: String,
    },
    /// The run call itself failed.
    #[error("vCPU {vcpu}: run failed: {message}")]
    RunFailed {
        /// vCPU index.
        vcpu: u32,
        /// The error.
        message: String,
    },
    /// The vCPU thread panicked (a VMM bug).
    #[error("vCPU {vcpu} thread panicked: {message}")]
    ThreadPanicked {
        /// vCPU index.
        vcpu: u32,
        /// Panic payload.
        message: String,
    },
}

/// How the machine ended, with the end of its console output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineExit {
    /// Why.
    pub reason: ExitReason,
    /// The last few KiB of console output at that moment.
    pub console_tail: String,
}

impl std::fmt::Display for MachineExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)?;
        if matches!(
            self.reason,
            ExitReason::Failed(_) | ExitReason::Panic { .. } | ExitReason::DeviceFailed { .. }
        ) {
            write!(f, "\n--- console tail ---\n{}", self.console_tail)?;
        }
        Ok(())
    }
}

/// A machine being assembled: RAM, VM, interrupt controller and serial exist; devices can be
/// added; [`start`](Self::start) loads the kernel and runs the vCPUs.
pub struct MachineBuilder {
    config: MachineConfig,
    hv: Arc<dyn Hypervisor>,
    vm: Box<dyn HvVm>,
    memory: Arc<GuestMemoryMmap>,
    mmio: Bus,
    pio: Bus,
    console: ConsoleLog,
    runtime: tokio::runtime::Handle,
    /// `virtio_mmio.device=` entries, in slot order.
    device_cmdline: Vec<String>,
    next_slot: u32,
    vsock: Option<VsockHandle>,
    serial: Arc<Mutex<Serial>>,
    /// Virtio transports in slot order, for snapshots.
    transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// Devices added as plain bus devices, which a snapshot cannot save.
    opaque_devices: Vec<String>,
}

/// How long a snapshot waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MachineBuilder {
    /// Validates `config` and sets up everything up to the devices. Must be called inside a
    /// tokio runtime (devices run their work on it).
    pub fn new(config: MachineConfig) -> Result<Self, Error> {
        config.validate()?;
        Self::assemble(config, RamBacking::Anonymous)
    }

    /// Everything but the kernel: RAM, VM, irqchip, serial and the configured devices.
    fn assemble(config: MachineConfig, backing: RamBacking) -> Result<Self, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        vcpu::install_kick_handler().map_err(Error::Signal)?;

        let hv = hypervisor::open()?;
        let max = hv.max_vcpus();
        if config.vcpus as usize > max {
            return Err(ConfigError::TooManyVcpus {
                requested: config.vcpus,
                max,
            }
            .into());
        }
        if config.vcpus > 1 && is_pvm_host() {
            // GUEST-KERNEL.md: secondary CPU bring-up hangs under PVM, so the PVM cmdline has
            // `maxcpus=1`; the other vCPUs exist but stay parked.
            tracing::warn!(
                vcpus = config.vcpus,
                "PVM host: only one vCPU will run (maxcpus=1)"
            );
        }
        let memory = memory::create(config.memory_mib, backing)?;
        let vm = hv.create_vm()?;
        vm.map_memory(&memory)?;
        vm.create_irqchip()?;

        let tee =
            config.console_to_stderr || std::env::var(CONSOLE_STDERR_ENV).is_ok_and(|v| v == "1");
        let console = ConsoleLog::new(config.console_capacity, tee);
        let serial_irq = new_eventfd()?;
        vm.register_irqfd(&serial_irq, COM1_GSI)?;
        let mut pio = Bus::new();
        let serial = Arc::new(Mutex::new(Serial::new(console.clone(), serial_irq)));
        pio.insert(
            u64::from(COM1_PORT),
            u64::from(COM1_PORT_LEN),
            serial.clone(),
        )?;

        let mut builder = MachineBuilder {
            config,
            hv,
            vm,
            memory,
            mmio: Bus::new(),
            pio,
            console,
            runtime,
            device_cmdline: Vec::new(),
            next_slot: 0,
            vsock: None,
            serial,
            transports: Vec::new(),
            opaque_devices: Vec::new(),
        };

        // Devices from the config, in a fixed order (vsock, then disks) so slot addresses are
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
        Ok(builder)
    }

    /// Puts `device` behind a virtio-mmio transport in the next slot.
    pub fn add_virtio_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
        name: &str,
    ) -> Result<(u64, u32), Error> {
        let num_queues = u16::try_from(device.queue_max_sizes().len()).unwrap_or(u16::MAX);
        let slot = self.allocate_slot(num_queues)?;
        let (base, gsi) = (slot.base, slot.gsi);
        let entry = slot.cmdline_entry();
        let transport =
            MmioTransport::new(device, self.memory.clone(), slot).map_err(|e| Error::Device {
                device: name.to_owned(),
                source: Box::new(e),
            })?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(base, MMIO_SLOT_SIZE, transport.clone())?;
        self.transports.push((name.to_owned(), transport));
        self.device_cmdline.push(entry);
        Ok((base, gsi))
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

    /// Allocates the next virtio-mmio slot for `device`: creates its irqfd (GSI `5 + i`) and one
    /// ioeventfd per queue on `QueueNotify` (datamatch = queue index), registers them with the
    /// hypervisor, puts `device` on the MMIO bus at the slot's base, and announces it on the
    /// kernel command line. The returned [`MmioSlot`] carries the eventfds for the device.
    pub fn add_virtio_mmio(
        &mut self,
        device: SharedDevice,
        num_queues: u16,
    ) -> Result<MmioSlot, Error> {
        let slot = self.allocate_slot(num_queues)?;
        self.attach(&slot, device)?;
        self.opaque_devices
            .push(format!("virtio-mmio device at {:#x}", slot.base));
        Ok(slot)
    }

    /// Like [`add_virtio_mmio`](Self::add_virtio_mmio), for a device that is built from its slot
    /// (e.g. a transport that owns the eventfds): `build` gets the slot and returns the device
    /// to put at its base. Returns the slot's `(base, gsi)`.
    pub fn add_virtio_mmio_with(
        &mut self,
        num_queues: u16,
        build: impl FnOnce(MmioSlot) -> SharedDevice,
    ) -> Result<(u64, u32), Error> {
        let slot = self.allocate_slot(num_queues)?;
        let (base, gsi) = (slot.base, slot.gsi);
        let entry = slot.cmdline_entry();
        let device = build(slot);
        self.mmio.insert(base, MMIO_SLOT_SIZE, device)?;
        self.opaque_devices
            .push(format!("virtio-mmio device at {base:#x}"));
        self.device_cmdline.push(entry);
        Ok((base, gsi))
    }

    /// Takes the next slot and registers its eventfds. The slot index is consumed even if a
    /// later step fails: its eventfds are registered with the VM and cannot be reused.
    fn allocate_slot(&mut self, num_queues: u16) -> Result<MmioSlot, Error> {
        let index = self.next_slot;
        let gsi = FIRST_VIRTIO_GSI + index;
        if gsi > MAX_GSI {
            return Err(Error::NoFreeMmioSlot {
                max: MAX_GSI - FIRST_VIRTIO_GSI + 1,
            });
        }
        self.next_slot += 1;
        let base = MMIO_BASE + u64::from(index) * MMIO_SLOT_SIZE;
        let irq = new_eventfd()?;
        self.vm.register_irqfd(&irq, gsi)?;
        let mut notify = Vec::with_capacity(usize::from(num_queues));
        for queue in 0..num_queues {
            let fd = new_eventfd()?;
            self.vm.register_ioeventfd(
                &fd,
                IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                Some(u32::from(queue)),
            )?;
            notify.push(fd);
        }
        Ok(MmioSlot {
            base,
            gsi,
            irq,
            notify,
        })
    }

    fn attach(&mut self, slot: &MmioSlot, device: SharedDevice) -> Result<(), Error> {
        self.mmio.insert(slot.base, MMIO_SLOT_SIZE, device)?;
        self.device_cmdline.push(slot.cmdline_entry());
        Ok(())
    }

    /// The full kernel command line this machine will boot with.
    pub fn cmdline(&self) -> String {
        let mut parts = vec![BASE_CMDLINE.to_string()];
        parts.extend(self.device_cmdline.iter().cloned());
        if is_pvm_host() {
            if let Some(line) = PVM_CMDLINE.lines().map(str::trim).find(|l| !l.is_empty()) {
                parts.push(line.to_string());
            }
        }
        debug_assert!(platform_cmdline()
            .split(' ')
            .all(|t| parts.iter().any(|p| p.split(' ').any(|q| q == t))));
        if !self.config.cmdline.trim().is_empty() {
            parts.push(self.config.cmdline.trim().to_string());
        }
        parts.join(" ")
    }

    /// Loads the kernel, sets up the vCPUs and starts them.
    pub fn start(self) -> Result<Machine, Error> {
        let cmdline = self.cmdline();
        tracing::debug!(%cmdline, "booting");
        let image = boot::load(
            &self.memory,
            &BootSpec {
                kernel: &self.config.kernel,
                initramfs: self.config.initramfs.as_deref(),
                cmdline: &cmdline,
                vcpus: self.config.vcpus,
            },
        )?;
        tracing::debug!(
            entry = format_args!("{:#x}", image.entry),
            kernel_end = format_args!("{:#x}", image.kernel_end),
            initramfs = ?image.initramfs,
            "boot image loaded"
        );
        let cpuid = self.hv.supported_cpuid()?;
        let mut vcpus = Vec::with_capacity(self.config.vcpus as usize);
        for id in 0..self.config.vcpus {
            let vcpu = self.vm.create_vcpu(id)?;
            boot::configure_vcpu(vcpu.as_ref(), self.config.vcpus, &image, &cpuid)?;
            vcpus.push(vcpu);
        }
        self.launch(vcpus, cmdline)
    }

    /// Loads a snapshot's device and hypervisor state into this machine (built on the
    /// snapshot's memory) and starts it.
    fn restore(self, state: &MachineState) -> Result<Machine, Error> {
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
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (id, saved) in (0..).zip(&state.vcpus) {
            let mut vcpu = self.vm.create_vcpu(id)?;
            vcpu.restore_state(saved)?;
            vcpus.push(vcpu);
        }
        let vsock = self.vsock.clone();
        let cmdline = state.config.cmdline.clone();
        let machine = self.launch(vcpus, cmdline)?;
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

    /// Starts the vCPU threads of a machine whose vCPUs are ready to run.
    fn launch(self, vcpus: Vec<Box<dyn HvVcpu>>, cmdline: String) -> Result<Machine, Error> {
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
        let (control, exit_rx) = RunControl::new(self.console.clone());
        // Without ACPI the guest kernel cannot power the machine off; it only says so on the
        // console (and then halts or, once init exits, panics). Treat that line as the shutdown.
        let weak = Arc::downgrade(&control);
        self.console.set_line_hook(Some(Arc::new(move |line: &str| {
            if vcpu::is_power_off_line(line) {
                if let Some(control) = weak.upgrade() {
                    control.finish(ExitReason::Shutdown);
                }
            }
        })));
        let ctx = Arc::new(VcpuContext {
            mmio: Arc::new(self.mmio),
            pio: Arc::new(self.pio),
            control: Arc::clone(&control),
        });
        let mut machine = Machine {
            control,
            exit_rx,
            threads: Vec::new(),
            console: self.console,
            vsock: self.vsock,
            serial: self.serial,
            transports: self.transports,
            opaque_devices: self.opaque_devices,
            saved_config,
            hold: Mutex::new(None),
            paused: PausedFlag::default(),
            vm: self.vm,
            memory: self.memory,
            runtime: self.runtime,
        };
        let mut kickers: Vec<Arc<dyn VcpuKicker>> = Vec::new();
        for vcpu in vcpus {
            let id = vcpu.id();
            kickers.push(vcpu.kicker());
            match vcpu::spawn(vcpu, Arc::clone(&ctx)) {
                Ok(handle) => machine.threads.push(handle),
                Err(source) => {
                    // Dropping `machine` stops and joins the threads already started.
                    machine.register_threads(&kickers);
                    return Err(Error::Thread { id, source });
                }
            }
        }
        machine.register_threads(&kickers);
        machine.watch_device_runtime();
        Ok(machine)
    }
}

/// Ends the machine with [`ExitReason::DeviceFailed`] when dropped while armed: it lives in a
/// task on the device runtime, and the runtime drops its tasks when it shuts down. A machine
/// whose devices no longer run must not keep its vCPUs spinning or its callers waiting.
struct DeviceRuntimeGuard {
    control: std::sync::Weak<RunControl>,
    armed: bool,
}

impl DeviceRuntimeGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for DeviceRuntimeGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(control) = self.control.upgrade() {
            control.finish(ExitReason::DeviceFailed {
                message: "the tokio runtime running this machine's devices shut down while the \
                          machine ran; keep the runtime alive for as long as the machine"
                    .to_owned(),
            });
        }
    }
}

/// Whether a machine is paused by [`Machine::pause`]; cheap to clone and read from anywhere
/// (see [`Machine::paused_flag`]). Reads `false` once the machine has been stopped; a machine
/// that ends on its own while paused keeps it set, so check the machine's exit too.
#[derive(Debug, Clone, Default)]
pub struct PausedFlag(Arc<std::sync::atomic::AtomicBool>);

impl PausedFlag {
    /// Whether the machine is paused.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A paused machine: every vCPU parked between two instructions (with the state each saved as
/// it parked) and every device worker held between two batches (with its transport's state).
/// Nothing in the guest runs while it exists, so the saved states stay current; dropping it lets
/// the devices go on first, then the vCPUs (field order).
struct Hold {
    _devices: PausedDevices,
    _vcpus: ParkedVcpus,
    /// VM-wide state (clock, interrupt controllers) taken with the vCPUs', so a snapshot of a
    /// machine paused long ago is of one moment.
    vm_state: hypervisor::HvState,
    vcpu_states: Vec<hypervisor::HvState>,
    transport_states: Vec<crate::devices::virtio::mmio::TransportState>,
}

/// Lets parked vCPUs go on when dropped.
struct ParkedVcpus(Arc<RunControl>);

impl Drop for ParkedVcpus {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// Resumes paused device workers when dropped.
struct PausedDevices(Vec<Arc<Mutex<MmioTransport>>>);

impl Drop for PausedDevices {
    fn drop(&mut self) {
        for transport in &self.0 {
            lock(transport).resume();
        }
    }
}

/// Refuses a snapshot whose machine differs from `config` in a way that matters to the guest.
fn check_shape(config: &MachineConfig, state: &MachineState) -> Result<(), SnapshotError> {
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

/// A non-blocking eventfd that is not inherited by child processes the embedding program spawns.
fn new_eventfd() -> Result<EventFd, Error> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)
}

/// Whether `/dev/kvm` is PVM's (software-assisted nested KVM), which needs guest workarounds.
pub fn is_pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// A running (or ended) microVM. Dropping it stops the vCPUs and frees everything.
pub struct Machine {
    control: Arc<RunControl>,
    exit_rx: watch::Receiver<Option<MachineExit>>,
    threads: Vec<JoinHandle<()>>,
    console: ConsoleLog,
    vsock: Option<VsockHandle>,
    serial: Arc<Mutex<Serial>>,
    transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    opaque_devices: Vec<String>,
    saved_config: SavedConfig,
    /// Set while the machine is paused (by [`Machine::pause`] or a snapshot in progress).
    hold: Mutex<Option<Hold>>,
    /// Set while paused by [`Machine::pause`] (not by a snapshot), under `hold`'s lock.
    paused: PausedFlag,
    // Dropped after the threads are joined (in `Drop`): the VM fd, then guest RAM.
    vm: Box<dyn HvVm>,
    memory: Arc<GuestMemoryMmap>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.threads.len())
            .field("exit", &*self.exit_rx.borrow())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Validates `config`, boots it and returns once the vCPUs run. Must be called inside a
    /// tokio runtime.
    pub fn start(config: MachineConfig) -> Result<Machine, Error> {
        MachineBuilder::new(config)?.start()
    }

    /// Restores the snapshot in `dir` into a new machine and starts it.
    ///
    /// `config` gives the machine's shape, which must be the snapshot's: vCPU count, memory
    /// size, vsock CID and the number of disks (with their read-only flags); its kernel,
    /// initramfs and command line are not used (the snapshot's memory holds the booted kernel).
    /// Disk paths may differ from the snapshot's, but must hold the same contents.
    ///
    /// Guest RAM is the snapshot's `memory` file mapped copy-on-write, so nothing is read up
    /// front and VMs restored from one snapshot share its clean pages. Fails with
    /// [`Error::Snapshot`] on a damaged, truncated, foreign or mismatched snapshot; nothing is
    /// left running then. Must be called inside a tokio runtime.
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
        MachineBuilder::assemble(config, RamBacking::SnapshotFile(file))?.restore(state)
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

    /// Pauses the machine: every vCPU parks between two guest instructions and every device
    /// worker stops between two batches, until [`resume`](Self::resume). Nothing is lost:
    /// vsock connections stay open (the host side of a stream simply sees no data), pending
    /// guest I/O carries on after the resume, and [`snapshot`](Self::snapshot) and
    /// [`stop`](Self::stop) work on a paused machine. The guest's clock is not stopped, so
    /// after a resume the guest sees the time that passed. Idempotent. Blocks for as long as
    /// the vCPUs take to leave the guest (microseconds on hardware KVM), and for a snapshot
    /// in progress to finish.
    pub fn pause(&self) -> Result<(), Error> {
        if self.exit_status().is_some() {
            return Err(PauseError::NotRunning.into());
        }
        let mut hold = lock(&self.hold);
        if hold.is_none() {
            *hold = Some(self.hold_still()?);
        }
        self.paused.0.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets a paused machine run again (see [`pause`](Self::pause)); does nothing when it is
    /// not paused.
    pub fn resume(&self) {
        let mut hold = lock(&self.hold);
        self.paused.0.store(false, Ordering::SeqCst);
        drop(hold.take());
    }

    /// Whether the machine is paused by [`pause`](Self::pause) (and has not ended since).
    pub fn is_paused(&self) -> bool {
        self.paused.get() && self.exit_status().is_none()
    }

    /// A handle that reads [`is_paused`](Self::is_paused)'s flag without the machine (and
    /// without waiting for a pause or snapshot in progress).
    pub fn paused_flag(&self) -> PausedFlag {
        self.paused.clone()
    }

    /// Parks the vCPUs, then holds the device workers, keeping what each saved.
    fn hold_still(&self) -> Result<Hold, PauseError> {
        let vcpu_states = self.control.pause(self.threads.len(), PAUSE_TIMEOUT)?;
        let vcpus = ParkedVcpus(Arc::clone(&self.control));
        let mut devices = PausedDevices(Vec::with_capacity(self.transports.len()));
        let mut transport_states = Vec::with_capacity(self.transports.len());
        for (name, transport) in &self.transports {
            let state = lock(transport)
                .pause()
                .map_err(|source| PauseError::Device {
                    device: name.clone(),
                    source,
                })?;
            devices.0.push(Arc::clone(transport));
            transport_states.push(state);
        }
        let vm_state = self
            .vm
            .save_state()
            .map_err(|source| PauseError::VmState { source })?;
        Ok(Hold {
            _devices: devices,
            _vcpus: vcpus,
            vm_state,
            vcpu_states,
            transport_states,
        })
    }

    /// Writes the state of the held machine into `dir`.
    fn save(&self, dir: &Path, held: &Hold) -> Result<memory::SparseWrite, SnapshotError> {
        let state = MachineState {
            config: self.saved_config.clone(),
            vm: held.vm_state.clone(),
            vcpus: held.vcpu_states.clone(),
            serial: lock(&self.serial).save(),
            transports: held.transport_states.clone(),
            vsock_connections: self.vsock.as_ref().map_or(0, VsockHandle::connection_count),
        };
        let memory_path = dir.join(MEMORY_FILE);
        let file = std::fs::File::create(&memory_path).map_err(SnapshotError::io(&memory_path))?;
        let written =
            memory::write_sparse(&self.memory, &file).map_err(SnapshotError::io(&memory_path))?;
        let state_path = dir.join(VMSTATE_FILE);
        std::fs::write(&state_path, format::encode(&state)?)
            .map_err(SnapshotError::io(&state_path))?;
        Ok(written)
    }

    /// Spawns the task that turns a shutdown of the device runtime into a machine exit.
    fn watch_device_runtime(&self) {
        let mut guard = DeviceRuntimeGuard {
            control: Arc::downgrade(&self.control),
            armed: true,
        };
        let mut exit = self.exit_rx.clone();
        self.runtime.spawn(async move {
            // Ends (disarmed) with the machine: its exit is recorded, or the machine is gone.
            let _ = exit.wait_for(Option::is_some).await;
            guard.disarm();
        });
    }

    fn register_threads(&self, kickers: &[Arc<dyn VcpuKicker>]) {
        let pairs: Vec<_> = kickers.iter().cloned().zip(self.threads.iter()).collect();
        self.control.set_threads(&pairs);
    }

    /// The console log: everything the guest wrote to the serial port that is still in the ring.
    pub fn console(&self) -> Vec<u8> {
        self.console.contents()
    }

    /// The shared console log (cheap to clone; keeps filling while the machine runs).
    pub fn console_log(&self) -> &ConsoleLog {
        &self.console
    }

    /// The host side of the vsock device, when the config has one.
    pub fn vsock(&self) -> Option<&VsockHandle> {
        self.vsock.as_ref()
    }

    /// A watch of the machine's end: `None` while it runs, then how it ended (set once, before
    /// the vCPU threads leave and the devices are dropped). Outlives the machine: after a drop
    /// the last value stays readable and `changed()` fails.
    pub fn exit_watch(&self) -> watch::Receiver<Option<MachineExit>> {
        self.exit_rx.clone()
    }

    /// How the machine ended, or `None` while it runs.
    pub fn exit_status(&self) -> Option<MachineExit> {
        self.exit_rx.borrow().clone()
    }

    /// Waits until the machine ends (guest reset/shutdown/panic, failure, or [`stop`]).
    ///
    /// [`stop`]: Machine::stop
    pub async fn wait_exit(&self) -> MachineExit {
        let mut rx = self.exit_rx.clone();
        // The sender lives in `self.control`, so the channel cannot close while `self` is
        // borrowed; `stopped_exit` only keeps this free of panics.
        let result = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match result {
            Ok(Some(exit)) => exit,
            _ => self.stopped_exit(),
        }
    }

    fn stopped_exit(&self) -> MachineExit {
        self.exit_status().unwrap_or_else(|| MachineExit {
            reason: ExitReason::Stopped,
            console_tail: self.console.tail(vcpu::CONSOLE_TAIL_BYTES),
        })
    }

    /// Stops the vCPUs (if still running), joins their threads and returns how the machine
    /// ended. Idempotent. Blocks only for as long as the vCPUs take to leave the guest.
    pub fn stop(&mut self) -> MachineExit {
        self.control.request_stop();
        for handle in self.threads.drain(..) {
            // A panicking vCPU thread already reported through `finish`.
            let _ = handle.join();
        }
        // A pause ends with the vCPUs: the device workers are let go, to be closed with them.
        drop(
            self.hold
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        self.paused.0.store(false, Ordering::SeqCst);
        // Threads that never ran far enough to report leave the slot empty.
        self.control.finish(ExitReason::Stopped);
        self.stopped_exit()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_kernel() -> (tempfile::TempDir, MachineConfig) {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"not really").unwrap();
        (dir, MachineConfig::new(kernel))
    }

    #[test]
    fn validation() {
        let (_dir, base) = config_with_kernel();
        assert!(base.validate().is_ok());

        let mut c = base.clone();
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::NoVcpus)));
        c.vcpus = 255;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooManyVcpus { .. })
        ));

        let mut c = base.clone();
        c.memory_mib = 32;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        c.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        c.memory_mib = MAX_MEMORY_MIB;
        assert!(c.validate().is_ok());

        let mut c = base.clone();
        c.kernel = "/nonexistent/vmlinux".into();
        assert!(matches!(c.validate(), Err(ConfigError::KernelNotFound(_))));

        let mut c = base.clone();
        c.initramfs = Some("/nonexistent/initrd".into());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InitramfsNotFound(_))
        ));

        let mut c = base;
        c.cmdline = "a\nb".into();
        assert!(matches!(c.validate(), Err(ConfigError::Cmdline(_))));
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let (_dir, c) = config_with_kernel();
        assert!(matches!(Machine::start(c), Err(Error::NoRuntime)));
    }

    #[test]
    fn machine_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Machine>();
        send_sync::<MachineExit>();
        send_sync::<Error>();
    }

    #[test]
    fn pvm_line_is_one_line() {
        assert_eq!(PVM_CMDLINE.trim().lines().count(), 1);
        assert!(PVM_CMDLINE.contains("maxcpus=1"));
    }
}
