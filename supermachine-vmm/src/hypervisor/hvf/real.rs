//! The framework trait over the real Hypervisor.framework, through the `applevisor` crate (1.0,
//! MIT/Apache-2.0) and, for the one call it has no safe form of (mapping memory the VMM owns),
//! `applevisor-sys`. macOS only; nothing here has run on Apple hardware yet.

use applevisor::prelude::{
    GicConfig, GicEnabled, GicIccReg, GicRedistributorReg, HypervisorError, Reg as HvReg,
    SimdFpReg, SysReg as HvSysReg, Vcpu, VcpuHandle, VirtualMachine, VirtualMachineConfig,
    VirtualMachineInstance,
};
use applevisor_sys::{hv_exit_reason_t, HV_MEMORY_EXEC, HV_MEMORY_READ, HV_MEMORY_WRITE};

use super::framework::{
    with_sys_regs, Exit, Framework, FwCode, FwError, FwVcpu, IccReg, Reg, SysReg, VmSetup,
};
use crate::hypervisor::HvError;

/// The first macOS with the framework's GIC (`hv_gic_create`).
const MIN_MACOS: u32 = 15;

/// Refuses macOS before 15 with a clear error, before any `hv_gic_*` call (with the framework
/// weakly linked, as the supermachine CLI is, those symbols are absent there; otherwise the
/// loader refuses the binary at launch).
pub(crate) fn check_host() -> Result<(), HvError> {
    let version = macos_version();
    match version
        .as_deref()
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
    {
        Some(major) if major < MIN_MACOS => Err(HvError::Unavailable {
            path: "Hypervisor.framework",
            reason: format!(
                "this is macOS {}, and supermachine needs the framework's GICv3 (macOS 15)",
                version.unwrap_or_default()
            ),
            fix: "update to macOS 15 or later",
        }),
        _ => Ok(()),
    }
}

/// `kern.osproductversion` ("15.1"), if the kernel says.
fn macos_version() -> Option<String> {
    let name = c"kern.osproductversion";
    let mut buf = [0u8; 32];
    let mut len = buf.len();
    // SAFETY: `name` is NUL-terminated; `buf`/`len` describe a writable buffer the kernel fills
    // up to `len` bytes; no new value is passed.
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return None;
    }
    let text = &buf[..len.min(buf.len())];
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    Some(String::from_utf8_lossy(&text[..end]).into_owned())
}

fn code(e: HypervisorError) -> FwCode {
    match e {
        HypervisorError::Denied => FwCode::Denied,
        HypervisorError::Unsupported | HypervisorError::NoDevice => FwCode::Unsupported,
        HypervisorError::Busy => FwCode::Busy,
        HypervisorError::BadArgument => FwCode::BadArgument,
        HypervisorError::NoResources => FwCode::NoResources,
        other => FwCode::Other(other.into()),
    }
}

fn err(call: &'static str) -> impl Fn(HypervisorError) -> FwError {
    move |e| FwError::new(call, code(e))
}

/// The process's VM, with the framework's GIC.
pub(crate) struct AppleFramework {
    vm: VirtualMachineInstance<GicEnabled>,
    /// Ticks per second of the counter `counter` reads.
    hz: u64,
}

impl Framework for AppleFramework {
    type Vcpu = AppleVcpu;
    type Handle = VcpuHandle;

    fn create(setup: &VmSetup) -> Result<Self, FwError> {
        let mut config = VirtualMachineConfig::new();
        let max_ipa = VirtualMachineConfig::get_max_ipa_size()
            .map_err(err("hv_vm_config_get_max_ipa_size"))?;
        config
            .set_ipa_size(setup.ipa_bits.min(max_ipa))
            .map_err(err("hv_vm_config_set_ipa_size"))?;
        // The redistributors the framework lays out must fit before the next device.
        let region = GicConfig::get_redistributor_region_size()
            .map_err(err("hv_gic_get_redistributor_region_size"))? as u64;
        if setup.gic_redistributors + region > setup.gic_redistributors_end {
            return Err(FwError::new(
                "hv_gic_get_redistributor_region_size",
                FwCode::NoResources,
            ));
        }
        let mut gic = GicConfig::new();
        gic.set_distributor_base(setup.gic_distributor)
            .map_err(err("hv_gic_config_set_distributor_base"))?;
        gic.set_redistributor_base(setup.gic_redistributors)
            .map_err(err("hv_gic_config_set_redistributor_base"))?;
        let vm =
            VirtualMachine::with_gic(config, gic).map_err(err("hv_vm_create/hv_gic_create"))?;
        Ok(AppleFramework {
            vm,
            hz: counter_hz(),
        })
    }

    fn max_vcpus() -> Result<u32, FwError> {
        Vcpu::get_max_count().map_err(err("hv_vm_get_max_vcpu_count"))
    }

    unsafe fn map(&self, host: *mut u8, gpa: u64, size: usize) -> Result<(), FwError> {
        // SAFETY: the caller keeps `host..host + size` mapped for the VM's life (the trait's
        // contract); the framework only records the mapping.
        let rc = unsafe {
            applevisor_sys::hv_vm_map(
                host.cast_const().cast(),
                gpa,
                size,
                HV_MEMORY_READ | HV_MEMORY_WRITE | HV_MEMORY_EXEC,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(FwError::new("hv_vm_map", code(HypervisorError::from(rc))))
        }
    }

    fn create_vcpu(&self) -> Result<AppleVcpu, FwError> {
        let vcpu = self.vm.vcpu_create().map_err(err("hv_vcpu_create"))?;
        Ok(AppleVcpu { vcpu })
    }

    fn exit_vcpus(&self, vcpus: &[VcpuHandle]) -> Result<(), FwError> {
        self.vm.vcpus_exit(vcpus).map_err(err("hv_vcpus_exit"))
    }

    fn set_spi(&self, intid: u32, level: bool) -> Result<(), FwError> {
        self.vm
            .gic_set_spi(intid, level)
            .map_err(err("hv_gic_set_spi"))
    }

    fn gic_state(&self) -> Result<Vec<u8>, FwError> {
        let mut state = self
            .vm
            .gic_state_create()
            .map_err(err("hv_gic_state_create"))?;
        let mut data = vec![0; state.size().map_err(err("hv_gic_state_get_size"))?];
        state.get(&mut data).map_err(err("hv_gic_state_get_data"))?;
        Ok(data)
    }

    fn set_gic_state(&self, data: &[u8]) -> Result<(), FwError> {
        let state = self
            .vm
            .gic_state_create()
            .map_err(err("hv_gic_state_create"))?;
        state.set(data).map_err(err("hv_gic_set_state"))
    }

    fn counter(&self) -> (u64, u64) {
        // SAFETY: mach_absolute_time has no preconditions. On Apple silicon it is the counter
        // the guests' CNTVCT_EL0 is offset from.
        (unsafe { mach_absolute_time() }, self.hz)
    }
}

/// `struct mach_timebase_info` (libc's binding is deprecated in favour of another crate; these
/// two calls are all this backend needs).
#[repr(C)]
struct MachTimebaseInfo {
    numer: u32,
    denom: u32,
}

extern "C" {
    fn mach_absolute_time() -> u64;
    fn mach_timebase_info(info: *mut MachTimebaseInfo) -> libc::c_int;
}

/// Ticks per second of `mach_absolute_time` (24 MHz on Apple silicon).
fn counter_hz() -> u64 {
    let mut info = MachTimebaseInfo { numer: 0, denom: 0 };
    // SAFETY: `info` is a valid out-pointer to a struct of the C layout.
    let rc = unsafe { mach_timebase_info(&mut info) };
    if rc != 0 || info.numer == 0 {
        return 24_000_000;
    }
    1_000_000_000 * u64::from(info.denom) / u64::from(info.numer)
}

/// A vCPU of the real framework (bound to its thread by `applevisor`).
pub(crate) struct AppleVcpu {
    vcpu: Vcpu,
}

fn hv_reg(reg: Reg) -> HvReg {
    match reg {
        Reg::X(n) => match n {
            0 => HvReg::X0,
            1 => HvReg::X1,
            2 => HvReg::X2,
            3 => HvReg::X3,
            4 => HvReg::X4,
            5 => HvReg::X5,
            6 => HvReg::X6,
            7 => HvReg::X7,
            8 => HvReg::X8,
            9 => HvReg::X9,
            10 => HvReg::X10,
            11 => HvReg::X11,
            12 => HvReg::X12,
            13 => HvReg::X13,
            14 => HvReg::X14,
            15 => HvReg::X15,
            16 => HvReg::X16,
            17 => HvReg::X17,
            18 => HvReg::X18,
            19 => HvReg::X19,
            20 => HvReg::X20,
            21 => HvReg::X21,
            22 => HvReg::X22,
            23 => HvReg::X23,
            24 => HvReg::X24,
            25 => HvReg::X25,
            26 => HvReg::X26,
            27 => HvReg::X27,
            28 => HvReg::X28,
            29 => HvReg::X29,
            _ => HvReg::X30,
        },
        Reg::Pc => HvReg::PC,
        Reg::Cpsr => HvReg::CPSR,
        Reg::Fpcr => HvReg::FPCR,
        Reg::Fpsr => HvReg::FPSR,
    }
}

fn hv_sys_reg(reg: SysReg) -> HvSysReg {
    // The framework's names are ours (framework.rs keeps the one list).
    macro_rules! same {
        ($($name:ident),* $(,)?) => {
            match reg { $(SysReg::$name => HvSysReg::$name,)* }
        };
    }
    with_sys_regs!(same)
}

fn hv_icc_reg(reg: IccReg) -> GicIccReg {
    match reg {
        IccReg::SRE_EL1 => GicIccReg::SRE_EL1,
        IccReg::CTLR_EL1 => GicIccReg::CTLR_EL1,
        IccReg::PMR_EL1 => GicIccReg::PMR_EL1,
        IccReg::BPR0_EL1 => GicIccReg::BPR0_EL1,
        IccReg::BPR1_EL1 => GicIccReg::BPR1_EL1,
        IccReg::AP0R0_EL1 => GicIccReg::AP0R0_EL1,
        IccReg::AP1R0_EL1 => GicIccReg::AP1R0_EL1,
        IccReg::IGRPEN0_EL1 => GicIccReg::IGRPEN0_EL1,
        IccReg::IGRPEN1_EL1 => GicIccReg::IGRPEN1_EL1,
    }
}

fn hv_simd(n: u8) -> SimdFpReg {
    // SAFETY: `hv_simd_fp_reg_t` is a fieldless `repr(C)` enum of Q0..=Q31 numbered 0..=31, and
    // `n` is masked into that range.
    unsafe { std::mem::transmute::<u32, SimdFpReg>(u32::from(n & 31)) }
}

impl FwVcpu for AppleVcpu {
    type Handle = VcpuHandle;

    fn handle(&self) -> VcpuHandle {
        self.vcpu.get_handle()
    }

    fn run(&mut self) -> Result<Exit, FwError> {
        self.vcpu.run().map_err(err("hv_vcpu_run"))?;
        let info = self.vcpu.get_exit_info();
        Ok(match info.reason {
            hv_exit_reason_t::CANCELED => Exit::Canceled,
            hv_exit_reason_t::EXCEPTION => Exit::Exception {
                syndrome: info.exception.syndrome,
                ipa: info.exception.physical_address,
            },
            hv_exit_reason_t::VTIMER_ACTIVATED => Exit::VtimerActivated,
            other => Exit::Unknown(other as u32),
        })
    }

    fn reg(&self, reg: Reg) -> Result<u64, FwError> {
        self.vcpu
            .get_reg(hv_reg(reg))
            .map_err(err("hv_vcpu_get_reg"))
    }

    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<(), FwError> {
        self.vcpu
            .set_reg(hv_reg(reg), value)
            .map_err(err("hv_vcpu_set_reg"))
    }

    fn simd(&self, n: u8) -> Result<u128, FwError> {
        self.vcpu
            .get_simd_fp_reg(hv_simd(n))
            .map_err(err("hv_vcpu_get_simd_fp_reg"))
    }

    fn set_simd(&mut self, n: u8, value: u128) -> Result<(), FwError> {
        self.vcpu
            .set_simd_fp_reg(hv_simd(n), value)
            .map_err(err("hv_vcpu_set_simd_fp_reg"))
    }

    fn sys_reg(&self, reg: SysReg) -> Result<u64, FwError> {
        self.vcpu
            .get_sys_reg(hv_sys_reg(reg))
            .map_err(err("hv_vcpu_get_sys_reg"))
    }

    fn set_sys_reg(&mut self, reg: SysReg, value: u64) -> Result<(), FwError> {
        self.vcpu
            .set_sys_reg(hv_sys_reg(reg), value)
            .map_err(err("hv_vcpu_set_sys_reg"))
    }

    fn icc_reg(&self, reg: IccReg) -> Result<u64, FwError> {
        self.vcpu
            .get_icc_reg(hv_icc_reg(reg))
            .map_err(err("hv_gic_get_icc_reg"))
    }

    fn set_icc_reg(&mut self, reg: IccReg, value: u64) -> Result<(), FwError> {
        self.vcpu
            .set_icc_reg(hv_icc_reg(reg), value)
            .map_err(err("hv_gic_set_icc_reg"))
    }

    fn sgi_ppi_pending(&self) -> Result<bool, FwError> {
        let get = |reg| {
            self.vcpu
                .get_redistributor_reg(reg)
                .map_err(err("hv_gic_get_redistributor_reg"))
        };
        let pending = get(GicRedistributorReg::ISPENDR0)?;
        let enabled = get(GicRedistributorReg::ISENABLER0)?;
        Ok(pending & enabled != 0)
    }

    fn set_ppi_pending(&mut self, intid: u32) -> Result<(), FwError> {
        self.vcpu
            .set_redistributor_reg(GicRedistributorReg::ISPENDR0, 1 << (intid & 31))
            .map_err(err("hv_gic_set_redistributor_reg"))
    }

    fn set_vtimer_masked(&mut self, masked: bool) -> Result<(), FwError> {
        self.vcpu
            .set_vtimer_mask(masked)
            .map_err(err("hv_vcpu_set_vtimer_mask"))
    }

    fn vtimer_offset(&self) -> Result<u64, FwError> {
        self.vcpu
            .get_vtimer_offset()
            .map_err(err("hv_vcpu_get_vtimer_offset"))
    }

    fn set_vtimer_offset(&mut self, offset: u64) -> Result<(), FwError> {
        self.vcpu
            .set_vtimer_offset(offset)
            .map_err(err("hv_vcpu_set_vtimer_offset"))
    }
}
