//! Errors of the arm64 KVM pieces.

use std::io;

/// An arm64 KVM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmArm64Error {
    /// An ioctl failed.
    #[error("{op} failed")]
    Call {
        /// The operation (`KVM_ARM_VCPU_INIT`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing one vCPU register failed.
    #[error("{op} of register {id:#x} failed")]
    Reg {
        /// `KVM_GET_ONE_REG` or `KVM_SET_ONE_REG`.
        op: &'static str,
        /// The register's KVM id.
        id: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing one vGIC register failed.
    #[error("{op} of vGIC group {group} attribute {attr:#x} failed")]
    VgicAttr {
        /// `KVM_GET_DEVICE_ATTR` or `KVM_SET_DEVICE_ATTR`.
        op: &'static str,
        /// `KVM_DEV_ARM_VGIC_GRP_*`.
        group: u32,
        /// The attribute (register offset or encoding, with the MPIDR where it applies).
        attr: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// KVM lists a register wider than this VMM saves (SVE vectors; SVE is never enabled).
    #[error("register {id:#x} is {bytes} bytes wide; only registers up to 16 bytes are saved")]
    RegTooWide {
        /// The register's KVM id.
        id: u64,
        /// Its width.
        bytes: usize,
    },
    /// Saved state does not match the machine it is restored into.
    #[error("saved {what} is for {saved}, this machine has {here}")]
    Mismatch {
        /// What differs ("vGIC interrupt count", "vCPU count", ...).
        what: &'static str,
        /// The saved value.
        saved: u64,
        /// This machine's.
        here: u64,
    },
}

impl KvmArm64Error {
    /// `op` failed with kvm-ioctls' error `e`.
    pub(super) fn call(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |e| KvmArm64Error::Call {
            op,
            source: io::Error::from_raw_os_error(e.errno()),
        }
    }
}
