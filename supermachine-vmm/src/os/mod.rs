//! The VMM's OS glue: the one place outside the hypervisor backends where Linux and macOS
//! differ. Everything else (devices, machine, vCPU threads) names only what this module exports.
//!
//! * [`EventFd`]: a counter a queue notification or an interrupt line signals and a worker polls.
//!   Linux has `eventfd(2)` (KVM binds it as an ioeventfd or irqfd); macOS has no eventfd, so there
//!   it is a non-blocking pipe with the same calls ([`PipeEventFd`]), which tokio's `AsyncFd` and
//!   `poll(2)` watch just the same.
//!
//! The hypervisor itself is picked in [`crate::hypervisor::open`] (KVM on Linux,
//! Hypervisor.framework on macOS); host conventions of the library (cache and runtime
//! directories) live in the `supermachine` crate's own `os` module.

pub mod pipe_event;

pub use pipe_event::PipeEventFd;

/// [`EventFd::new`] flag: reads return `WouldBlock` instead of waiting for a signal.
#[cfg(target_os = "linux")]
pub const EFD_NONBLOCK: i32 = libc::EFD_NONBLOCK;
/// [`EventFd::new`] flag: the descriptor is not inherited by programs the process executes.
#[cfg(target_os = "linux")]
pub const EFD_CLOEXEC: i32 = libc::EFD_CLOEXEC;
/// The host's event counter: `eventfd(2)` on Linux.
#[cfg(target_os = "linux")]
pub use vmm_sys_util::eventfd::EventFd;

/// [`EventFd::new`] flag: reads return `WouldBlock` instead of waiting for a signal.
#[cfg(not(target_os = "linux"))]
pub const EFD_NONBLOCK: i32 = pipe_event::NONBLOCK;
/// [`EventFd::new`] flag: accepted for the Linux spelling; the pipe is always close-on-exec.
#[cfg(not(target_os = "linux"))]
pub const EFD_CLOEXEC: i32 = pipe_event::CLOEXEC;
/// The host's event counter: a pipe where there is no `eventfd(2)` (macOS).
#[cfg(not(target_os = "linux"))]
pub use pipe_event::PipeEventFd as EventFd;
