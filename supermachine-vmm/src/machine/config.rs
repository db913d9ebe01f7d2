//! What a machine is made of: [`MachineConfig`] and its checks.

use std::path::PathBuf;

use crate::arch::{self, MAX_MEMORY_MIB};
use crate::devices::serial::DEFAULT_CONSOLE_CAPACITY;
use crate::devices::vsock::VsockConfig;
use crate::error::ConfigError;
use crate::net::StackConfig;

#[cfg(doc)]
use super::{Machine, BASE_CMDLINE};

/// The smallest guest RAM accepted: the kernel (~16 MiB loaded at 16 MiB) plus an initramfs and
/// room to run.
pub const MIN_MEMORY_MIB: u32 = 64;

/// What to boot and how big.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MachineConfig {
    /// Number of vCPUs (≥ 1). Note: on PVM hosts only one vCPU comes up (`maxcpus=1`).
    pub vcpus: u32,
    /// Guest RAM in MiB, `MIN_MEMORY_MIB..=`[`MAX_MEMORY_MIB`] (x86: 3328, RAM ends below the
    /// MMIO hole at 0xd000_0000).
    pub memory_mib: u32,
    /// The guest kernel (x86: an ELF `vmlinux`).
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
    /// A virtio-net NIC in front of a user-mode network of its own built from this (in the
    /// slot after the disks); `None`: no NIC at all. A restored machine gets a new network
    /// from its own config.
    pub network: Option<StackConfig>,
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
    /// One vCPU, 256 MiB, no initramfs, no extra cmdline, no devices.
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
            network: None,
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
        arch::validate_cmdline(&self.cmdline).map_err(|e| ConfigError::Cmdline(e.to_string()))
    }

    /// The checks that also apply to a restore (which needs no kernel).
    pub(super) fn validate_shape(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > arch::MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max: arch::MAX_VCPUS as usize,
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
}
