//! The Hypervisor.framework (HVF) backend: arm64 VMs on Apple silicon (macOS 15 or later, for
//! the framework's GICv3).
//!
//! Where KVM does things in the kernel, Hypervisor.framework hands them to the VMM; this
//! backend does them in plain Rust modules that build and are unit-tested on every host, against
//! a fake of the framework:
//!
//! | module | job |
//! |---|---|
//! | `framework.rs` | the trait over the handful of `hv_*` calls used (VM, memory, vCPU, GIC, vtimer) |
//! | `syndrome.rs` | ESR_EL2 → data abort, HVC/SMC, WFI/WFE, system-register trap |
//! | `mmio.rs` | a data abort → access size, register, sign extension, the zero register |
//! | `psci.rs` | PSCI 1.0: CPU_ON/OFF on a per-VM power board, SYSTEM_OFF/RESET, VERSION, FEATURES |
//! | `wait.rs` | where idle vCPUs sleep (WFI, powered off) and how kicks and interrupts wake them; the virtual timer's deadline |
//! | `engine.rs` | one vCPU's run loop: exits → MMIO / power events / kicks for the machine |
//! | `state.rs` | snapshot state (vCPU registers, GIC CPU interface, counter, power; the GIC), tagged "hvf" |
//! | `backend.rs` | the `Hypervisor`/`HvVm`/`HvVcpu` traits over the above (arm64 hosts) |
//! | `real.rs` | the framework trait over the `applevisor` crate (macOS only) |
//! | `fake.rs` | the fake framework (tests only) |
//!
//! Not yet run on Apple hardware: everything here is checked by the compiler for
//! `aarch64-apple-darwin` and by the unit tests against the fake; nothing proves the framework
//! behaves as `real.rs` assumes (see the README's macOS section).

// On hosts other than macOS only the tests use the backend.
#![cfg_attr(not(target_os = "macos"), allow(dead_code))]

#[cfg(target_arch = "aarch64")]
mod backend;
mod engine;
mod framework;
mod mmio;
mod psci;
#[cfg(target_os = "macos")]
mod real;
mod state;
mod syndrome;
mod wait;

#[cfg(test)]
mod fake;

#[cfg(target_os = "macos")]
pub(super) use backend::open;
