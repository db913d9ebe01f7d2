//! The supermachine virtual machine monitor.
//!
//! Hypervisor boundary (KVM now; HVF and WHP later), guest memory, virtio-mmio devices (vsock,
//! block, console) and, later, snapshot/restore. Nothing outside this crate names a hypervisor
//! type. The guest kernel's config, patches and build script live in `guest/`; `DESIGN.md` fixes
//! the internal module contract.

#![warn(missing_docs)]

pub mod bus;
pub mod devices;
