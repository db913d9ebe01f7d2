//! The supermachine virtual machine monitor.
//!
//! Hypervisor boundary ([`hypervisor`]: KVM now; HVF and WHP later), the guest platform
//! ([`arch`]: x86-64 PC now), guest memory, virtio-mmio devices (vsock, block, console) and
//! snapshot/restore ([`snapshot`]). Nothing outside this crate names a hypervisor type. The guest
//! kernel's config, patches and build script live in `guest/`; `DESIGN.md` fixes the internal
//! module contract, `ARCH.md` says where a new architecture or hypervisor plugs in.
//!
//! # Running a machine
//! [`Machine::start`] (or [`MachineBuilder`] to add virtio-mmio devices first) boots an ELF
//! `vmlinux` with an optional initramfs; [`Machine::console`] is the serial console log,
//! [`Machine::wait_exit`] reports how the guest ended ([`ExitReason`]), and dropping the machine
//! stops and frees everything. Requirements and process-wide effects:
//! * `/dev/kvm` readable and writable ([`Error::is_hypervisor_unavailable`] otherwise, with the
//!   fix in the message);
//! * a tokio runtime (`Machine::start` fails with [`Error::NoRuntime`] outside one);
//! * one std thread per vCPU (which creates and runs its vCPU), and, on KVM, a no-op handler
//!   installed for the real-time signal `SIGRTMIN`, which interrupts vCPU threads when a machine
//!   stops or pauses. Do not use `SIGRTMIN` for anything else in a process that runs machines.

pub mod arch;
pub mod bus;
pub mod devices;
mod error;
pub mod hypervisor;
pub mod interrupt;
mod machine;
pub mod memory;
pub mod net;
pub mod os;
pub mod snapshot;
mod vcpu;

pub use vcpu::{PauseError, VcpuFailure};

pub use arch::{is_pvm_host, BASE_CMDLINE};
pub use error::{BootError, ConfigError, Error, HvError, MemoryError};
pub use machine::{
    platform_cmdline, DiskConfig, ExitReason, Machine, MachineBuilder, MachineConfig, MachineExit,
    PausedFlag, CONSOLE_STDERR_ENV, MIN_MEMORY_MIB,
};
