//! [`VmExit`]: how a VM ended, as the public API reports it.

use std::fmt;

use supermachine_vmm::{ExitReason, MachineExit};

/// How a VM ended, with the end of its console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Why it ended.
    pub reason: VmExitReason,
    /// The last few KiB of the guest console at that moment.
    pub console_tail: String,
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmExitReason {
    /// The guest kernel panicked; `message` is its panic line.
    KernelPanic {
        /// The text after "Kernel panic - not syncing: ".
        message: String,
    },
    /// The guest reset itself (`reboot`, or a triple fault).
    Reset,
    /// The guest powered off.
    Shutdown,
    /// The host stopped it ([`Vm::stop`](crate::Vm::stop) or drop).
    Stopped,
    /// The host stopped it because its guest stopped answering: a restored VM whose agent
    /// answered nothing within a minute of running time (see [`Vm::restore`](crate::Vm::restore)).
    Unresponsive {
        /// What the host waited for, and for how long.
        message: String,
    },
    /// The VMM could not keep it running (a vCPU or device failure).
    Failed {
        /// What failed.
        message: String,
    },
}

impl VmExit {
    /// Whether the guest crashed (kernel panic, VMM failure, or stopped answering), as opposed to
    /// an orderly end.
    pub fn is_crash(&self) -> bool {
        matches!(
            self.reason,
            VmExitReason::KernelPanic { .. }
                | VmExitReason::Failed { .. }
                | VmExitReason::Unresponsive { .. }
        )
    }
}

impl From<MachineExit> for VmExit {
    fn from(exit: MachineExit) -> Self {
        let reason = match exit.reason {
            ExitReason::Panic { message } => VmExitReason::KernelPanic { message },
            ExitReason::Reset => VmExitReason::Reset,
            ExitReason::Shutdown => VmExitReason::Shutdown,
            ExitReason::Stopped => VmExitReason::Stopped,
            ExitReason::Unresponsive { message } => VmExitReason::Unresponsive { message },
            ExitReason::Failed(failure) => VmExitReason::Failed {
                message: failure.to_string(),
            },
            ExitReason::DeviceFailed { message } => VmExitReason::Failed { message },
        };
        VmExit {
            reason,
            console_tail: exit.console_tail,
        }
    }
}

impl fmt::Display for VmExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExitReason::KernelPanic { message } => {
                write!(f, "the guest kernel panicked: {message}")
            }
            VmExitReason::Reset => f.write_str("the guest reset"),
            VmExitReason::Shutdown => f.write_str("the guest powered off"),
            VmExitReason::Stopped => f.write_str("the VM was stopped by the host"),
            VmExitReason::Unresponsive { message } => {
                write!(
                    f,
                    "the host stopped the VM, which stopped answering: {message}"
                )
            }
            VmExitReason::Failed { message } => write!(f, "the VMM failed: {message}"),
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        if self.is_crash() && !self.console_tail.is_empty() {
            write!(f, "\n--- guest console (tail) ---\n{}", self.console_tail)?;
        }
        Ok(())
    }
}
