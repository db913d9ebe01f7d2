//! Interrupt lines: how a device raises its interrupt without knowing the hypervisor.
//!
//! The hypervisor backend supplies the objects ([`HvVm::interrupt_line`]): on KVM an eventfd
//! registered as an irqfd, so a trigger reaches the in-kernel interrupt controller without a
//! VMM round trip; a backend without irqfds implements the same trait with its own injection
//! call. Devices hold an `Arc<dyn InterruptLine>` and never see which.
//!
//! [`HvVm::interrupt_line`]: crate::hypervisor::HvVm::interrupt_line

/// One edge-triggered interrupt line of the guest's interrupt controller.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt once (an edge). Callable from any thread.
    fn trigger(&self) -> std::io::Result<()>;
}

/// A bare eventfd is a line whose edges the holder of the other end counts: what KVM's irqfd
/// consumes, and what the device tests read back.
impl InterruptLine for crate::os::EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}
