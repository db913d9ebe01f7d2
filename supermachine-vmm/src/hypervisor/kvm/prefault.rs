//! `KVM_PRE_FAULT_MEMORY` (Linux 6.10+, x86 with two-dimensional paging): KVM maps a range of
//! guest physical memory into its nested page tables on request, as a guest read of each page
//! would, so a restored guest's first touch of those pages does not exit to the host.
//!
//! kvm-ioctls 0.25 has no wrapper for this ioctl; its argument struct comes from kvm-bindings.

use kvm_bindings::{kvm_pre_fault_memory, KVMIO};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::hypervisor::HvError;

vmm_sys_util::ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);

/// Maps `[gpa, gpa + len)` (page aligned, inside a memory slot) for `vcpu`. `Ok(false)`: this
/// KVM cannot (older than 6.10, shadow paging as on PVM hosts, or a VM type that refuses it);
/// nothing is wrong, and what was mapped before it said so stays mapped.
pub(super) fn prefault(vcpu: &VcpuFd, gpa: u64, len: u64) -> Result<bool, HvError> {
    let mut range = kvm_pre_fault_memory {
        gpa,
        size: len,
        ..Default::default()
    };
    // The kernel advances `gpa` and shrinks `size` as it goes and returns early on a pending
    // signal (EINTR) or a race (EAGAIN): go on from where it stopped.
    while range.size > 0 {
        let before = range.size;
        // SAFETY: `vcpu` is an open vCPU fd and `range` a live `kvm_pre_fault_memory`, the
        // argument this ioctl number is defined with; the kernel writes only inside it.
        let rc = unsafe { ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut range) };
        if rc >= 0 {
            if range.size >= before {
                // Success without progress would loop forever; the API promises progress.
                return Err(HvError::Unsupported {
                    what: "a KVM_PRE_FAULT_MEMORY that makes progress".into(),
                });
            }
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR | libc::EAGAIN) => continue,
            // No such ioctl (ENOTTY, older kernels), or not for this VM (EOPNOTSUPP).
            Some(libc::ENOTTY | libc::EOPNOTSUPP) => return Ok(false),
            _ => {
                return Err(HvError::Call {
                    op: "KVM_PRE_FAULT_MEMORY",
                    source: err,
                })
            }
        }
    }
    Ok(true)
}
