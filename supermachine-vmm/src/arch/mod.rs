//! The platform layer: what a guest architecture contributes to a machine.
//!
//! The machine (`machine/`) is architecture-neutral. Everything that depends on which computer
//! it emulates comes from the host architecture's module, `pub use`d here, as Cloud
//! Hypervisor's `arch` crate does:
//!
//! | item | what it is |
//! |------|------------|
//! | [`ARCH`] | the architecture's name; snapshots record it and refuse another's |
//! | [`RAM_START`], [`MAX_MEMORY_MIB`], [`MMIO_BASE`] | guest memory layout: RAM is one region from `RAM_START`; virtio-mmio slot *i* is at `MMIO_BASE + i * 0x1000` |
//! | [`MAX_VCPUS`] | what the platform's CPU description (x86: the MP table) can list |
//! | `virtio_irq(slot)` | interrupt-line number of virtio-mmio slot *i*, `None` past the last one |
//! | [`BASE_CMDLINE`], `host_cmdline()` | the kernel command line every machine starts with; host-specific guest workarounds |
//! | `cmdline_device_entries(&[VirtioMmioDevice])` | how devices are announced on the command line (none where a device tree does it) |
//! | `validate_cmdline(&str)` | what the kernel accepts |
//! | `add_platform_devices(..)` | the console UART and other fixed devices on their bus, with their interrupt lines |
//! | `BootImage`, `load_kernel(mem, &BootSpec)` | loads kernel, initramfs and boot structures |
//! | `VcpuInit`, `vcpu_init(..)`, `configure_vcpu(..)` | vCPU state before the first run, computed once, applied on each vCPU's thread |
//! | `warn_host_limits(vcpus)` | logs what this host will not do for the guest |
//! | `is_quiet_port(addr)` | port accesses the guest makes without a device, not worth a log line |
//!
//! The signatures are checked by the compiler below (`_CONTRACT`). The neutral types a platform
//! works with (`BootSpec`, `VirtioMmioDevice`, [`BootError`], `PowerControl`,
//! `PlatformDevices`) are defined here. `ARCH.md` describes how a new architecture plugs in.

// The arm64 platform is compiled on every host for its unit tests (device tree, Image header,
// layout); the machine uses it only on arm64.
#[cfg(any(target_arch = "aarch64", test))]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub(crate) use self::aarch64::{
    add_platform_devices, cmdline_device_entries, configure_vcpu, host_cmdline, is_quiet_port,
    load_kernel, validate_cmdline, vcpu_init, virtio_irq, warn_host_limits, BootImage, VcpuInit,
};
#[cfg(target_arch = "aarch64")]
pub use self::aarch64::{ARCH, BASE_CMDLINE, MAX_MEMORY_MIB, MAX_VCPUS, MMIO_BASE, RAM_START};

#[cfg(target_arch = "x86_64")]
pub(crate) use self::x86_64::{
    add_platform_devices, cmdline_device_entries, configure_vcpu, host_cmdline, is_quiet_port,
    load_kernel, validate_cmdline, vcpu_init, virtio_irq, warn_host_limits, BootImage, VcpuInit,
};
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{ARCH, BASE_CMDLINE, MAX_MEMORY_MIB, MAX_VCPUS, MMIO_BASE, RAM_START};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use crate::bus::Bus;
use crate::devices::serial::{ConsoleLog, Serial};
use crate::hypervisor::{HvError, HvVcpu, HvVm, Hypervisor};

/// What to boot.
#[derive(Debug, Clone)]
pub(crate) struct BootSpec<'a> {
    /// The kernel image (x86: an ELF `vmlinux`).
    pub kernel: &'a Path,
    /// Optional initramfs (cpio, possibly compressed with a format the kernel supports).
    pub initramfs: Option<&'a Path>,
    /// The complete kernel command line.
    pub cmdline: &'a str,
    /// vCPU count, for the platform's CPU description.
    pub vcpus: u32,
    /// The virtio-mmio devices, for platforms that describe them in boot structures (a device
    /// tree) rather than on the command line.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub devices: &'a [VirtioMmioDevice],
}

/// One virtio-mmio device as the guest must be told about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VirtioMmioDevice {
    /// Guest physical base of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt line ([`virtio_irq`]).
    pub irq: u32,
}

/// A power event a platform device asks the machine for (the x86 keyboard controller's reset;
/// arm64 has no such device: PSCI goes through the hypervisor).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PowerRequest {
    /// Reset the machine (which this VMM reports as the guest's end).
    Reset,
}

/// Where platform devices send their [`PowerRequest`]s: the machine's exit.
pub(crate) trait PowerControl: Send + Sync {
    /// Ends the machine as requested; returns at once (the vCPUs are stopped asynchronously).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn request(&self, request: PowerRequest);
}

/// The fixed devices a platform adds to every machine, that the machine itself needs to reach.
pub(crate) struct PlatformDevices {
    /// The console UART (its registers are saved in snapshots).
    pub serial: Arc<Mutex<Serial>>,
}

/// What [`add_platform_devices`] gets to work with.
pub(crate) struct PlatformContext<'a> {
    /// The VM, for interrupt lines.
    pub vm: &'a dyn HvVm,
    /// The MMIO bus.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub mmio: &'a mut Bus,
    /// The port-I/O bus (x86; stays empty elsewhere).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub pio: &'a mut Bus,
    /// Where the console UART writes.
    pub console: ConsoleLog,
    /// Where power requests go.
    pub power: Arc<dyn PowerControl>,
}

/// The contract's signatures, checked for the host architecture (see the module docs).
#[allow(clippy::type_complexity)]
const _CONTRACT: (
    fn(u32) -> Option<u32>,
    fn() -> Option<&'static str>,
    fn(&[VirtioMmioDevice]) -> Vec<String>,
    fn(&str) -> Result<(), BootError>,
    fn(PlatformContext<'_>) -> Result<PlatformDevices, crate::Error>,
    fn(&GuestMemoryMmap, &BootSpec<'_>) -> Result<BootImage, BootError>,
    fn(&dyn Hypervisor, &BootImage, u32) -> Result<VcpuInit, HvError>,
    fn(&mut dyn HvVcpu, &VcpuInit) -> Result<(), BootError>,
    fn(u32),
    fn(u64) -> bool,
) = (
    virtio_irq,
    host_cmdline,
    cmdline_device_entries,
    validate_cmdline,
    add_platform_devices,
    load_kernel,
    vcpu_init,
    configure_vcpu,
    warn_host_limits,
    is_quiet_port,
);
const _CONSTANTS: (&str, &str, u64, u64, u32, u32) = (
    ARCH,
    BASE_CMDLINE,
    RAM_START,
    MMIO_BASE,
    MAX_MEMORY_MIB,
    MAX_VCPUS,
);

/// Whether `/dev/kvm` is PVM's (software-assisted nested KVM on x86), which needs guest
/// workarounds (`host_cmdline`). Always `false` elsewhere: the module does not exist there.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Booting failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be opened.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        /// Kernel path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not an image this platform boots (x86: an ELF `vmlinux`; a bzImage is not
    /// accepted).
    #[error("cannot load kernel {path} (need {format}): {reason}")]
    KernelLoad {
        /// Kernel path.
        path: PathBuf,
        /// The image format this platform boots.
        format: &'static str,
        /// What the loader reported.
        reason: String,
    },
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    InitramfsRead {
        /// Initramfs path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of RAM.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest RAM above the kernel \
         ({available} bytes free): give the machine more memory"
    )]
    InitramfsTooLarge {
        /// Initramfs path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room between the kernel's end and the end of RAM.
        available: u64,
    },
    /// The command line is too long or has a byte the kernel cannot take.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Too many vCPUs for the platform's CPU description (x86: the MP table).
    #[error("{0} vCPUs do not fit the platform's CPU table (at most {max})", max = MAX_VCPUS)]
    TooManyCpus(u32),
    /// Writing a boot structure into guest memory failed (RAM too small for the layout).
    #[error("writing {what} into guest memory failed: {reason}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// vm-memory's error.
        reason: String,
    },
    /// Setting a vCPU's boot state failed.
    #[error("setting up vCPU {id} for boot failed")]
    Vcpu {
        /// vCPU index.
        id: u32,
        /// Hypervisor error.
        #[source]
        source: HvError,
    },
}

/// Checks a command line the kernel copies into a `max`-byte buffer (NUL included): printable
/// ASCII only (both architectures' kernels parse it as such).
pub(crate) fn validate_printable_cmdline(cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() + 1 > max {
        return Err(BootError::Cmdline(format!(
            "{} bytes, the kernel takes at most {}",
            cmdline.len(),
            max - 1
        )));
    }
    if let Some(c) = cmdline
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_control())
    {
        return Err(BootError::Cmdline(format!(
            "character {c:?} is not printable ASCII"
        )));
    }
    Ok(())
}

/// A `map_err` argument turning a guest-memory write error into [`BootError::GuestMemory`].
pub(crate) fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |e| BootError::GuestMemory {
        what,
        reason: e.to_string(),
    }
}
