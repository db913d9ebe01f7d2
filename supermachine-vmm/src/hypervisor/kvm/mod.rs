//! The KVM backend of the hypervisor boundary (kvm-ioctls / kvm-bindings; Linux only).
//!
//! The architecture-neutral part lives here: opening `/dev/kvm`, VMs, memory slots, irqfds and
//! ioeventfds, vCPU creation, `KVM_RUN` and its exits, and the kick. What is x86 (CPUID, MSRs,
//! registers, the PIC/IOAPIC/PIT, the saved state) is in `x86_64/`, what is arm64 (vCPU init,
//! the GICv3, the saved state) in `aarch64/`; both provide the same hooks under the name `arch`.
//!
//! **The kick.** A vCPU is made to leave the guest by arming its `immediate_exit` and sending
//! its thread a real-time signal ([`kick_signal`]) whose handler does nothing: a thread inside
//! `KVM_RUN` returns with `EINTR`, one about to enter returns at once because of the armed
//! flag, and one in userspace sees the flag on its next entry. The signal goes to the thread
//! that created the vCPU (which is the one that runs it: [`HvVcpu`] is not `Send`) by its
//! kernel thread id, and only while the vCPU exists (its drop clears the id under the kicker's
//! lock), so it never reaches a thread that has gone.

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod blob;
mod prefault;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
use self::aarch64 as arch;
#[cfg(target_arch = "x86_64")]
use self::x86_64 as arch;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kvm_bindings::{
    kvm_run, kvm_userspace_memory_region, KVM_API_VERSION, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use self::arch::{ArchData, VmData};
use super::{HvError, HvState, HvVcpu, HvVm, Hypervisor, SystemEvent, VcpuExit, VcpuKicker};
use crate::interrupt::InterruptLine;

const KVM_PATH: &str = "/dev/kvm";

/// The capabilities every architecture needs (each adds its own in `x86_64/`).
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

pub(super) fn call_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HvError {
    move |e| HvError::Call {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `/dev/kvm`.
pub(super) struct KvmHypervisor {
    kvm: Kvm,
    /// What the architecture keeps per host (x86: the MSRs a snapshot saves).
    arch: ArchData,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`, checks the API version and the capabilities this VMM relies on, and
    /// installs the kick signal's handler.
    pub(super) fn open() -> Result<Self, HvError> {
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(|e| open_error(e.errno()))?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(HvError::Unsupported {
                what: format!("KVM API version {KVM_API_VERSION} (it has {version})"),
            });
        }
        for &(cap, name) in REQUIRED_CAPS.iter().chain(arch::REQUIRED_CAPS) {
            if !kvm.check_extension(cap) {
                return Err(HvError::Unsupported { what: name.into() });
            }
        }
        let arch = ArchData::new(&kvm)?;
        Ok(KvmHypervisor { kvm, arch })
    }
}

/// The signal that interrupts `KVM_RUN` (see the module docs).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the no-op handler for [`kick_signal`] once per process. A handler (not "ignore") is
/// required: an ignored signal is discarded without interrupting the ioctl.
fn install_kick_handler() -> Result<(), HvError> {
    // The OS error is kept as its errno (an `io::Error` is not `Clone`, and every later call
    // must report the same failure).
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| HvError::Call {
            op: "installing the vCPU kick signal handler (SIGRTMIN)",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// Turns the errno of opening `/dev/kvm` into an error that says how to fix it.
fn open_error(errno: i32) -> HvError {
    let (reason, fix) = match errno {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => (
            "it does not exist".to_string(),
            "load the KVM module (`modprobe kvm_intel` or `modprobe kvm_amd`) and make sure \
             hardware virtualization is enabled in the firmware, or run on a host that has KVM",
        ),
        libc::EACCES | libc::EPERM => (
            "permission denied".to_string(),
            "give this user read/write access: add it to the `kvm` group \
             (`sudo usermod -aG kvm $USER`, then log in again) or `sudo chmod 666 /dev/kvm`",
        ),
        _ => (
            format!(
                "opening it failed: {}",
                std::io::Error::from_raw_os_error(errno)
            ),
            "check `dmesg` for KVM errors and that no other policy (seccomp, container device \
             rules) blocks /dev/kvm",
        ),
    };
    HvError::Unavailable {
        path: KVM_PATH,
        reason,
        fix,
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    fn create_vm(&self) -> Result<Box<dyn HvVm>, HvError> {
        let fd = self.kvm.create_vm().map_err(call_err("KVM_CREATE_VM"))?;
        arch::setup_vm(&fd)?;
        let run_size = self
            .kvm
            .get_vcpu_mmap_size()
            .map_err(call_err("KVM_GET_VCPU_MMAP_SIZE"))?;
        // Asked of the VM, not of /dev/kvm: whether pre-faulting is allowed depends on the VM type.
        let can_prefault =
            fd.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY)) > 0;
        Ok(Box::new(KvmVm {
            fd,
            run_size,
            can_prefault,
            arch: self.arch.clone(),
            // A unit struct on x86, not on arm64.
            #[allow(clippy::default_constructed_unit_structs)]
            data: VmData::default(),
            pending_irqfds: Mutex::new(Vec::new()),
            memory: Mutex::new(Vec::new()),
        }))
    }
}

struct KvmVm {
    fd: VmFd,
    run_size: usize,
    /// `KVM_CAP_PRE_FAULT_MEMORY` (Linux 6.10+ with two-dimensional paging).
    can_prefault: bool,
    arch: ArchData,
    /// What the architecture keeps per VM (arm64: the vGIC, once the vCPUs exist).
    data: VmData,
    /// Interrupt lines handed out before the interrupt controller can take irqfds (arm64: KVM
    /// refuses them until the vGIC is initialised, which needs every vCPU); registered in
    /// `vcpus_created`. An event written meanwhile is delivered on registration.
    pending_irqfds: Mutex<Vec<(EventFd, u32)>>,
    /// Keeps every mapped `GuestMemoryMmap` alive as long as KVM may touch it (until this VM's fd
    /// is closed, which happens before these are dropped: fields drop in declaration order).
    memory: Mutex<Vec<Arc<GuestMemoryMmap>>>,
}

impl HvVm for KvmVm {
    fn map_memory(&self, mem: &Arc<GuestMemoryMmap>) -> Result<(), HvError> {
        let mut kept = lock(&self.memory);
        let first_slot = kept.iter().map(|m| m.num_regions()).sum::<usize>();
        for (i, region) in mem.iter().enumerate() {
            let slot = u32::try_from(first_slot + i).map_err(|_| HvError::Unsupported {
                what: "that many memory slots".into(),
            })?;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range is a live mapping owned by `mem`, which this VM keeps a clone
            // of (pushed below) until after its fd is closed, so KVM never sees it unmapped.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(call_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        kept.push(Arc::clone(mem));
        Ok(())
    }

    fn create_irqchip(&self) -> Result<(), HvError> {
        arch::create_irqchip(&self.fd)
    }

    fn interrupt_line(&self, line: u32) -> Result<Arc<dyn InterruptLine>, HvError> {
        // Not inherited by child processes the embedding program spawns.
        let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
            HvError::Call {
                op: "eventfd",
                source,
            }
        })?;
        if arch::IRQFD_AFTER_VCPUS {
            let copy = fd.try_clone().map_err(|source| HvError::Call {
                op: "dup(eventfd)",
                source,
            })?;
            lock(&self.pending_irqfds).push((copy, line));
        } else {
            self.fd
                .register_irqfd(&fd, line)
                .map_err(call_err("KVM_IRQFD"))?;
        }
        // Writing the eventfd is the interrupt (see `crate::interrupt`).
        Ok(Arc::new(fd))
    }

    fn bind_queue_notify(&self, notify: &EventFd, addr: u64, queue: u32) -> Result<(), HvError> {
        self.fd
            .register_ioevent(notify, &kvm_ioctls::IoEventAddress::Mmio(addr), queue)
            .map_err(call_err("KVM_IOEVENTFD"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn HvVcpu>, HvError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(call_err("KVM_CREATE_VCPU"))?;
        arch::setup_vcpu(&self.fd, &self.data, &fd, id)?;
        let run = RunPage::map(&fd, self.run_size)?;
        // The thread inherits its spawner's signal mask; the kick must get through.
        if let Err(e) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
            tracing::warn!(error = %e, "could not unblock the vCPU kick signal");
        }
        // SAFETY: gettid has no preconditions; it returns the calling thread's id.
        let thread = unsafe { libc::gettid() };
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            kicker: Arc::new(KvmKicker {
                run,
                thread: Mutex::new(Some(thread)),
            }),
            arch: self.arch.clone(),
            can_prefault: self.can_prefault,
        }))
    }

    fn vcpus_created(&self) -> Result<(), HvError> {
        arch::vcpus_created(&self.fd, &self.data)?;
        for (fd, line) in lock(&self.pending_irqfds).drain(..) {
            self.fd
                .register_irqfd(&fd, line)
                .map_err(call_err("KVM_IRQFD"))?;
        }
        Ok(())
    }

    fn save_state(&self) -> Result<HvState, HvError> {
        arch::save_vm(&self.fd, &self.data)
    }

    fn restore_state(&self, state: &HvState) -> Result<(), HvError> {
        arch::restore_vm(&self.fd, &self.data, state)
    }

    fn can_prefault(&self) -> bool {
        self.can_prefault
    }
}

/// A second mapping of a vCPU's `kvm_run` area, owned independently of the `VcpuFd`.
///
/// Kicking a vCPU means writing `immediate_exit` from another thread. Doing that through the
/// `VcpuFd`'s own mapping would race with the vCPU thread dropping it; this mapping holds its own
/// reference to the vCPU file, so it stays valid for as long as any kicker exists.
struct RunPage {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all writes from other threads go through atomics.
unsafe impl Send for RunPage {}
// SAFETY: as above.
unsafe impl Sync for RunPage {}

impl RunPage {
    fn map(fd: &VcpuFd, len: usize) -> Result<Self, HvError> {
        debug_assert!(len >= std::mem::size_of::<kvm_run>());
        // SAFETY: a fresh shared mapping of the vCPU fd's run area (offset 0, the length KVM
        // reports); the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(HvError::Call {
                op: "mmap(kvm_run)",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(RunPage {
            ptr: ptr.cast(),
            len,
        })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: `immediate_exit` is a byte inside the live mapping; the kernel only reads it,
        // and every userspace access goes through this atomic.
        unsafe { AtomicU8::from_ptr(self.ptr.add(std::mem::offset_of!(kvm_run, immediate_exit))) }
    }

    /// `(suberror, data)` of a `KVM_EXIT_INTERNAL_ERROR`. Call only right after such an exit, on
    /// the vCPU thread.
    fn internal_error(&self) -> (u32, Vec<u64>) {
        let run = self.ptr.cast::<kvm_run>();
        // SAFETY: the mapping covers a whole `kvm_run`; after an internal-error exit the kernel
        // filled the `internal` union member and is not writing while the vCPU is out of KVM_RUN.
        let internal = unsafe {
            std::ptr::read_volatile(std::ptr::addr_of!((*run).__bindgen_anon_1.internal))
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; nothing references it any more.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Kicks one vCPU (see the module docs).
struct KvmKicker {
    run: RunPage,
    /// The kernel id of the thread running the vCPU; `None` once the vCPU was dropped. Held
    /// while signalling, so the thread cannot finish dropping the vCPU (and exit) meanwhile.
    thread: Mutex<Option<libc::pid_t>>,
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        self.run.immediate_exit().store(1, Ordering::SeqCst);
        let thread = lock(&self.thread);
        if let Some(tid) = *thread {
            // SAFETY: tgkill takes plain integers. The thread is alive: it clears `thread` under
            // this lock (in `KvmVcpu::drop`, on that thread) before it can exit, and the ids
            // are of this process, so no other process can be signalled.
            let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal()) };
            if rc != 0 {
                let error = std::io::Error::last_os_error();
                tracing::warn!(%error, tid, "could not signal a vCPU thread");
            }
        }
    }
}

struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    kicker: Arc<KvmKicker>,
    arch: ArchData,
    can_prefault: bool,
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // From here on no kick signals this thread (see `KvmKicker`).
        *lock(&self.kicker.thread) = None;
    }
}

impl HvVcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn run(&mut self) -> Result<VcpuExit<'_>, HvError> {
        use kvm_ioctls::VcpuExit as K;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A signal or `immediate_exit`: disarm so the next run enters the guest again.
                self.kicker.run.immediate_exit().store(0, Ordering::SeqCst);
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => return Err(call_err("KVM_RUN")(e)),
        };
        Ok(match exit {
            K::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            K::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            K::IoIn(port, data) => VcpuExit::IoIn { port, data },
            K::IoOut(port, data) => VcpuExit::IoOut { port, data },
            K::Hlt => VcpuExit::Hlt,
            K::Shutdown => VcpuExit::Shutdown,
            K::Intr => VcpuExit::Interrupted,
            K::FailEntry(reason, _cpu) => VcpuExit::FailEntry { reason },
            K::SystemEvent(kind, _) => VcpuExit::SystemEvent(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                other => SystemEvent::Other(other),
            }),
            K::InternalError => {
                let (suberror, data) = self.kicker.run.internal_error();
                VcpuExit::InternalError { suberror, data }
            }
            other => VcpuExit::Unsupported(format!("{other:?}")),
        })
    }

    fn instruction_pointer(&self) -> Result<u64, HvError> {
        arch::instruction_pointer(&self.fd)
    }

    fn save_state(&mut self) -> Result<HvState, HvError> {
        arch::save_vcpu(&self.fd, &self.arch, self.id)
    }

    fn restore_state(&mut self, state: &HvState) -> Result<(), HvError> {
        arch::restore_vcpu(&self.fd, state)
    }

    fn prefault(&self, gpa: u64, len: u64) -> Result<bool, HvError> {
        if !self.can_prefault {
            return Ok(false);
        }
        prefault::prefault(&self.fd, gpa, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_say_how_to_fix() {
        let msg = open_error(libc::EACCES).to_string();
        assert!(msg.contains("chmod 666 /dev/kvm"), "{msg}");
        assert!(msg.contains("kvm` group"), "{msg}");
        let msg = open_error(libc::ENOENT).to_string();
        assert!(msg.contains("modprobe kvm_intel"), "{msg}");
    }
}
