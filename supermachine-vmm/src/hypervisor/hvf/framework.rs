//! The handful of Hypervisor.framework calls the backend makes, as a trait, so everything above
//! it (exit decoding, PSCI, WFI, state) is plain Rust that runs against a fake on Linux.
//!
//! The real implementation (`real.rs`, macOS only) is a thin layer over the `applevisor` crate;
//! the fake (`fake.rs`, tests only) records calls and scripts exits. One [`Framework`] value is
//! one VM: Hypervisor.framework allows a single VM per process, created with its GIC.

use serde::{Deserialize, Serialize};

/// Where the framework's GICv3 goes and how big the address space is (what `hv_vm_create` and
/// `hv_gic_create` are given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VmSetup {
    /// Bits of guest-physical address the VM needs.
    pub ipa_bits: u32,
    /// The GIC distributor's guest-physical base.
    pub gic_distributor: u64,
    /// The first redistributor's guest-physical base.
    pub gic_redistributors: u64,
    /// Where the redistributor region must end (the next device's base).
    pub gic_redistributors_end: u64,
}

/// One VM of the framework: memory, the GIC, vCPU creation and kicks.
pub(crate) trait Framework: Send + Sync + Sized + 'static {
    /// A vCPU, bound to the thread that created it.
    type Vcpu: FwVcpu<Handle = Self::Handle>;
    /// What another thread names a vCPU by to make it exit (`hv_vcpus_exit`).
    type Handle: Clone + Send + Sync + 'static;

    /// Creates the process's VM with its GIC (`hv_vm_create`, `hv_gic_create`).
    fn create(setup: &VmSetup) -> Result<Self, FwError>;

    /// The most vCPUs a VM may have.
    fn max_vcpus() -> Result<u32, FwError>;

    /// Maps `size` bytes of host memory at `host` into the guest at `gpa`, read/write/execute.
    ///
    /// # Safety
    /// The host range must stay mapped and unused for anything else as long as the VM exists.
    unsafe fn map(&self, host: *mut u8, gpa: u64, size: usize) -> Result<(), FwError>;

    /// Creates a vCPU on (and for) the calling thread.
    fn create_vcpu(&self) -> Result<Self::Vcpu, FwError>;

    /// Makes the named vCPUs leave (or not enter) the guest (`hv_vcpus_exit`). A handle of a
    /// destroyed vCPU is skipped.
    fn exit_vcpus(&self, vcpus: &[Self::Handle]) -> Result<(), FwError>;

    /// Sets the level of the SPI with GIC INTID `intid`.
    fn set_spi(&self, intid: u32, level: bool) -> Result<(), FwError>;

    /// The GIC's state (distributor, redistributors) as the framework serialises it.
    fn gic_state(&self) -> Result<Vec<u8>, FwError>;

    /// Loads GIC state from [`gic_state`](Self::gic_state).
    fn set_gic_state(&self, data: &[u8]) -> Result<(), FwError>;

    /// The host counter the vCPUs' virtual counters derive from (guest `CNTVCT_EL0` = this
    /// minus the vCPU's vtimer offset), and its frequency in Hz.
    fn counter(&self) -> (u64, u64);
}

/// A vCPU of the framework. Not `Send`: the framework binds it to its creating thread.
pub(crate) trait FwVcpu {
    /// See [`Framework::Handle`].
    type Handle;

    /// This vCPU's handle for [`Framework::exit_vcpus`].
    fn handle(&self) -> Self::Handle;
    /// Runs the guest until it exits (`hv_vcpu_run`).
    fn run(&mut self) -> Result<Exit, FwError>;
    /// Reads a general-purpose or special register.
    fn reg(&self, reg: Reg) -> Result<u64, FwError>;
    /// Writes a general-purpose or special register.
    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<(), FwError>;
    /// Reads SIMD/FP register Q`n`.
    fn simd(&self, n: u8) -> Result<u128, FwError>;
    /// Writes SIMD/FP register Q`n`.
    fn set_simd(&mut self, n: u8, value: u128) -> Result<(), FwError>;
    /// Reads a system register.
    fn sys_reg(&self, reg: SysReg) -> Result<u64, FwError>;
    /// Writes a system register.
    fn set_sys_reg(&mut self, reg: SysReg, value: u64) -> Result<(), FwError>;
    /// Reads a GIC CPU-interface register of this vCPU.
    fn icc_reg(&self, reg: IccReg) -> Result<u64, FwError>;
    /// Writes a GIC CPU-interface register of this vCPU.
    fn set_icc_reg(&mut self, reg: IccReg, value: u64) -> Result<(), FwError>;
    /// Whether this vCPU's redistributor holds an enabled, pending SGI or PPI (an IPI another
    /// vCPU sent through the framework's GIC, which the VMM is not told of).
    fn sgi_ppi_pending(&self) -> Result<bool, FwError>;
    /// Marks PPI INTID `intid` pending in this vCPU's redistributor.
    fn set_ppi_pending(&mut self, intid: u32) -> Result<(), FwError>;
    /// Masks or unmasks the virtual timer.
    fn set_vtimer_masked(&mut self, masked: bool) -> Result<(), FwError>;
    /// The vtimer offset (host counter minus guest virtual counter).
    fn vtimer_offset(&self) -> Result<u64, FwError>;
    /// Sets the vtimer offset.
    fn set_vtimer_offset(&mut self, offset: u64) -> Result<(), FwError>;
}

/// Why `hv_vcpu_run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// `hv_vcpus_exit` was called for this vCPU.
    Canceled,
    /// The guest trapped: ESR_EL2 and, for aborts, the faulting guest-physical address.
    Exception {
        /// The exception syndrome.
        syndrome: u64,
        /// The faulting intermediate physical address (data and instruction aborts).
        ipa: u64,
    },
    /// The virtual timer fired; the framework masked it.
    VtimerActivated,
    /// A reason this backend does not know.
    Unknown(u32),
}

/// General-purpose and special registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Reg {
    /// X0..=X30.
    X(u8),
    /// The program counter.
    Pc,
    /// PSTATE.
    Cpsr,
    /// Floating-point control.
    Fpcr,
    /// Floating-point status.
    Fpsr,
}

/// Calls `$m! { ... }` with the names of the system registers a Linux guest's EL1 context lives
/// in: one list for [`SysReg`] and for the real framework's mapping of it (`real.rs`).
macro_rules! with_sys_regs {
    ($m:ident) => {
        $m! {
            MPIDR_EL1, SCTLR_EL1, CPACR_EL1, TTBR0_EL1, TTBR1_EL1, TCR_EL1, MAIR_EL1, AMAIR_EL1,
            VBAR_EL1, CONTEXTIDR_EL1, TPIDR_EL1, TPIDR_EL0, TPIDRRO_EL0, SP_EL0, SP_EL1, ELR_EL1,
            SPSR_EL1, ESR_EL1, FAR_EL1, AFSR0_EL1, AFSR1_EL1, PAR_EL1, CNTKCTL_EL1, CNTV_CTL_EL0,
            CNTV_CVAL_EL0, MDSCR_EL1, CSSELR_EL1, APIAKEYLO_EL1, APIAKEYHI_EL1, APIBKEYLO_EL1,
            APIBKEYHI_EL1, APDAKEYLO_EL1, APDAKEYHI_EL1, APDBKEYLO_EL1, APDBKEYHI_EL1,
            APGAKEYLO_EL1, APGAKEYHI_EL1,
        }
    };
}
#[cfg_attr(not(target_os = "macos"), allow(unused_imports))] // real.rs is macOS only.
pub(crate) use with_sys_regs;

macro_rules! define_sys_regs {
    ($($name:ident),* $(,)?) => {
        /// The system registers a Linux guest's EL1 context lives in: what a snapshot saves.
        #[allow(non_camel_case_types, missing_docs)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub(crate) enum SysReg {
            $($name,)*
        }

        impl SysReg {
            /// Every register, in save order.
            pub(crate) const ALL: &'static [SysReg] = &[$(SysReg::$name,)*];
        }
    };
}
with_sys_regs!(define_sys_regs);

/// The GIC CPU-interface registers a snapshot saves per vCPU.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum IccReg {
    SRE_EL1,
    CTLR_EL1,
    PMR_EL1,
    BPR0_EL1,
    BPR1_EL1,
    AP0R0_EL1,
    AP1R0_EL1,
    IGRPEN0_EL1,
    IGRPEN1_EL1,
}

impl IccReg {
    /// Every register, in restore order (SRE first: it decides how the rest are accessed).
    pub(crate) const ALL: [IccReg; 9] = {
        use IccReg::*;
        [
            SRE_EL1,
            CTLR_EL1,
            PMR_EL1,
            BPR0_EL1,
            BPR1_EL1,
            AP0R0_EL1,
            AP1R0_EL1,
            IGRPEN0_EL1,
            IGRPEN1_EL1,
        ]
    };
}

/// A framework call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed: {code}")]
pub(crate) struct FwError {
    /// The call (`hv_vm_create`, ...).
    pub call: &'static str,
    /// What the framework said.
    pub code: FwCode,
}

/// The framework's error codes (`HV_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FwCode {
    /// `HV_DENIED`: the process lacks the hypervisor entitlement.
    #[error("denied (HV_DENIED)")]
    Denied,
    /// `HV_UNSUPPORTED`: the host cannot do it (no virtualisation, or too old).
    #[error("unsupported (HV_UNSUPPORTED)")]
    Unsupported,
    /// `HV_BUSY`: the resource is taken (a VM already exists in this process).
    #[error("busy (HV_BUSY)")]
    Busy,
    /// `HV_BAD_ARGUMENT`.
    #[error("bad argument (HV_BAD_ARGUMENT)")]
    BadArgument,
    /// `HV_NO_RESOURCES`.
    #[error("no resources (HV_NO_RESOURCES)")]
    NoResources,
    /// Anything else.
    #[error("error {0:#x}")]
    Other(i32),
}

impl FwError {
    /// `call` failed with `code`.
    pub(crate) fn new(call: &'static str, code: FwCode) -> Self {
        FwError { call, code }
    }
}
