//! The KVM backend of the hypervisor boundary (kvm-ioctls / kvm-bindings).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_pit_config,
    kvm_regs, kvm_run, kvm_segment, kvm_userspace_memory_region, CpuId, Msrs, KVM_API_VERSION,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm_state;
use super::x86_64::{
    CpuidEntry, DescriptorTable, FpuControl, LapicState, MsrEntry, Regs, Segment, SpecialRegs,
    LAPIC_REGS_SIZE,
};
use super::{
    HvError, HvState, HvVcpu, HvVm, Hypervisor, IoEventAddress, SystemEvent, VcpuExit, VcpuKicker,
};

const KVM_PATH: &str = "/dev/kvm";

/// Where KVM puts the 3-page TSS it needs for real-mode emulation on Intel without "unrestricted
/// guest": just below the 4 GiB boundary, inside the MMIO hole, where no RAM or device lives.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// CPUID.1:ECX bit 24, TSC-deadline timer. KVM reports the in-kernel LAPIC's support through
/// `KVM_CAP_TSC_DEADLINE_TIMER` instead of `KVM_GET_SUPPORTED_CPUID`.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

fn call_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HvError {
    move |e| HvError::Call {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// `/dev/kvm`.
pub(super) struct KvmHypervisor {
    kvm: Kvm,
    /// The MSRs a snapshot saves: every MSR KVM can save or emulate (KVM_GET_MSR_INDEX_LIST).
    msr_index: Arc<[u32]>,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and checks the API version and the capabilities this VMM relies on.
    pub(super) fn open() -> Result<Self, HvError> {
        let kvm = Kvm::new().map_err(|e| open_error(e.errno()))?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(HvError::Unsupported {
                what: format!("KVM API version {KVM_API_VERSION} (it has {version})"),
            });
        }
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HvError::Unsupported { what: name.into() });
            }
        }
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(call_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .into();
        Ok(KvmHypervisor { kvm, msr_index })
    }
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

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HvError> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(call_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| {
                let mut entry = CpuidEntry {
                    function: e.function,
                    index: e.index,
                    significant_index: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                    eax: e.eax,
                    ebx: e.ebx,
                    ecx: e.ecx,
                    edx: e.edx,
                };
                if entry.function == 1 && tsc_deadline {
                    entry.ecx |= CPUID_1_ECX_TSC_DEADLINE;
                }
                entry
            })
            .collect())
    }

    fn create_vm(&self) -> Result<Box<dyn HvVm>, HvError> {
        let fd = self.kvm.create_vm().map_err(call_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(call_err("KVM_SET_TSS_ADDR"))?;
        let run_size = self
            .kvm
            .get_vcpu_mmap_size()
            .map_err(call_err("KVM_GET_VCPU_MMAP_SIZE"))?;
        Ok(Box::new(KvmVm {
            fd,
            run_size,
            msr_index: self.msr_index.clone(),
            memory: Mutex::new(Vec::new()),
        }))
    }
}

struct KvmVm {
    fd: VmFd,
    run_size: usize,
    msr_index: Arc<[u32]>,
    /// Keeps every mapped `GuestMemoryMmap` alive as long as KVM may touch it (until this VM's fd
    /// is closed, which happens before these are dropped: fields drop in declaration order).
    memory: Mutex<Vec<Arc<GuestMemoryMmap>>>,
}

impl HvVm for KvmVm {
    fn map_memory(&self, mem: &Arc<GuestMemoryMmap>) -> Result<(), HvError> {
        let mut kept = self.memory.lock().unwrap_or_else(|p| p.into_inner());
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
        self.fd
            .create_irq_chip()
            .map_err(call_err("KVM_CREATE_IRQCHIP"))?;
        // A dummy PC speaker port (0x61) lets the guest's PIT calibration poll it in-kernel.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(call_err("KVM_CREATE_PIT2"))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HvError> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(call_err("KVM_IRQFD"))
    }

    fn register_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), HvError> {
        let addr = match addr {
            IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
            IoEventAddress::Pio(p) => kvm_ioctls::IoEventAddress::Pio(u64::from(p)),
        };
        match datamatch {
            Some(value) => self.fd.register_ioevent(fd, &addr, value),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(call_err("KVM_IOEVENTFD"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn HvVcpu>, HvError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(call_err("KVM_CREATE_VCPU"))?;
        let run = Arc::new(RunPage::map(&fd, self.run_size)?);
        Ok(Box::new(KvmVcpu {
            id,
            fd,
            run,
            msr_index: self.msr_index.clone(),
        }))
    }

    fn save_state(&self) -> Result<HvState, HvError> {
        kvm_state::save_vm(&self.fd)
    }

    fn restore_state(&self, state: &HvState) -> Result<(), HvError> {
        kvm_state::restore_vm(&self.fd, state)
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

impl VcpuKicker for RunPage {
    fn kick(&self) {
        self.immediate_exit().store(1, Ordering::SeqCst);
    }
}

struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    run: Arc<RunPage>,
    msr_index: Arc<[u32]>,
}

impl HvVcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.run.clone()
    }

    fn run(&mut self) -> Result<VcpuExit<'_>, HvError> {
        use kvm_ioctls::VcpuExit as K;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A signal or `immediate_exit`: disarm so the next run enters the guest again.
                self.run.immediate_exit().store(0, Ordering::SeqCst);
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
                let (suberror, data) = self.run.internal_error();
                VcpuExit::InternalError { suberror, data }
            }
            other => VcpuExit::Unsupported(format!("{other:?}")),
        })
    }

    fn regs(&self) -> Result<Regs, HvError> {
        let r = self.fd.get_regs().map_err(call_err("KVM_GET_REGS"))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&self, r: &Regs) -> Result<(), HvError> {
        let regs = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd.set_regs(&regs).map_err(call_err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegs, HvError> {
        let s = self.fd.get_sregs().map_err(call_err("KVM_GET_SREGS"))?;
        Ok(SpecialRegs {
            cs: seg_from_kvm(&s.cs),
            ds: seg_from_kvm(&s.ds),
            es: seg_from_kvm(&s.es),
            fs: seg_from_kvm(&s.fs),
            gs: seg_from_kvm(&s.gs),
            ss: seg_from_kvm(&s.ss),
            tr: seg_from_kvm(&s.tr),
            ldt: seg_from_kvm(&s.ldt),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_sregs(&self, s: &SpecialRegs) -> Result<(), HvError> {
        // Start from the current state so what the neutral type does not carry (the pending
        // interrupt bitmap) is preserved.
        let mut k = self.fd.get_sregs().map_err(call_err("KVM_GET_SREGS"))?;
        k.cs = seg_to_kvm(&s.cs);
        k.ds = seg_to_kvm(&s.ds);
        k.es = seg_to_kvm(&s.es);
        k.fs = seg_to_kvm(&s.fs);
        k.gs = seg_to_kvm(&s.gs);
        k.ss = seg_to_kvm(&s.ss);
        k.tr = seg_to_kvm(&s.tr);
        k.ldt = seg_to_kvm(&s.ldt);
        k.gdt = kvm_dtable {
            base: s.gdt.base,
            limit: s.gdt.limit,
            ..Default::default()
        };
        k.idt = kvm_dtable {
            base: s.idt.base,
            limit: s.idt.limit,
            ..Default::default()
        };
        k.cr0 = s.cr0;
        k.cr2 = s.cr2;
        k.cr3 = s.cr3;
        k.cr4 = s.cr4;
        k.cr8 = s.cr8;
        k.efer = s.efer;
        k.apic_base = s.apic_base;
        self.fd.set_sregs(&k).map_err(call_err("KVM_SET_SREGS"))
    }

    fn set_fpu(&self, fpu: &FpuControl) -> Result<(), HvError> {
        let k = kvm_fpu {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd.set_fpu(&k).map_err(call_err("KVM_SET_FPU"))
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<(), HvError> {
        let kvm_entries: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: if e.significant_index {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries).map_err(|_| HvError::Unsupported {
            what: format!("{} CPUID entries", entries.len()),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(call_err("KVM_SET_CPUID2"))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<(), HvError> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|_| HvError::Unsupported {
            what: format!("{} MSRs in one call", msrs.len()),
        })?;
        // KVM_SET_MSRS returns how many it set, stopping at the first it refuses.
        let set = self
            .fd
            .set_msrs(&kvm_msrs)
            .map_err(call_err("KVM_SET_MSRS"))?;
        if set != msrs.len() {
            return Err(HvError::MsrRefused {
                set,
                total: msrs.len(),
                refused: msrs[set].index,
            });
        }
        Ok(())
    }

    fn lapic(&self) -> Result<LapicState, HvError> {
        let k = self.fd.get_lapic().map_err(call_err("KVM_GET_LAPIC"))?;
        let mut state = LapicState::default();
        for (dst, src) in state.regs.iter_mut().zip(k.regs.iter()) {
            *dst = *src as u8;
        }
        Ok(state)
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<(), HvError> {
        let mut k = kvm_lapic_state::default();
        debug_assert_eq!(k.regs.len(), LAPIC_REGS_SIZE);
        for (dst, src) in k.regs.iter_mut().zip(lapic.regs.iter()) {
            *dst = *src as std::os::raw::c_char;
        }
        self.fd.set_lapic(&k).map_err(call_err("KVM_SET_LAPIC"))
    }

    fn save_state(&mut self) -> Result<HvState, HvError> {
        kvm_state::save_vcpu(&self.fd, &self.msr_index)
    }

    fn restore_state(&mut self, state: &HvState) -> Result<(), HvError> {
        kvm_state::restore_vcpu(&self.fd, state)
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
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

    #[test]
    fn segments_round_trip() {
        let s = Segment {
            base: 0x1234,
            limit: 0xfffff,
            selector: 0x10,
            type_: 3,
            present: true,
            dpl: 0,
            db: true,
            s: true,
            l: false,
            g: true,
            avl: false,
            unusable: false,
        };
        assert_eq!(seg_from_kvm(&seg_to_kvm(&s)), s);
    }
}
