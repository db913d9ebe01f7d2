//! How a machine ends: [`ExitReason`] and [`MachineExit`], and the [`ExitRecorder`] that keeps
//! the first report (from a vCPU, a platform device, the console or the host) and stops the
//! vCPUs.

use std::sync::Arc;

use tokio::sync::watch;

use crate::arch::{PowerControl, PowerRequest};
use crate::devices::serial::ConsoleLog;
use crate::vcpu::{EndSink, RunControl, VcpuEnd, VcpuFailure};

#[cfg(doc)]
use super::Machine;

/// How much console output a failure report carries.
pub(crate) const CONSOLE_TAIL_BYTES: usize = 8 * 1024;
/// The kernel's panic banner; with `panic=-1` a panic resets the machine right after it.
const PANIC_BANNER: &str = "Kernel panic - not syncing: ";

/// How the machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset itself (`reboot`, a keyboard-controller reset or a triple fault).
    Reset,
    /// The guest powered off or halted (`poweroff`, `halt`): the kernel's "reboot: Power down" /
    /// "reboot: System halted" console line, or a platform power-off event.
    Shutdown,
    /// The guest kernel panicked (then reset because of `panic=-1`). Detected from the panic
    /// banner on the console, so it needs `console=ttyS0` and a kernel that prints it.
    Panic {
        /// The panic message (`Attempted to kill init! ...`).
        message: String,
    },
    /// The host stopped the machine ([`Machine::stop`] or drop).
    Stopped,
    /// The host stopped the machine because its guest stopped answering
    /// ([`Machine::stop_unresponsive`]).
    Unresponsive {
        /// What the host waited for, and for how long.
        message: String,
    },
    /// A vCPU could not go on.
    Failed(VcpuFailure),
    /// The device side could not go on (e.g. the tokio runtime running the devices shut down
    /// while the machine ran); the vCPUs were stopped.
    DeviceFailed {
        /// What failed.
        message: String,
    },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => f.write_str("the guest reset"),
            ExitReason::Shutdown => f.write_str("the guest shut down"),
            ExitReason::Panic { message } => write!(f, "the guest kernel panicked: {message}"),
            ExitReason::Stopped => f.write_str("stopped by the host"),
            ExitReason::Unresponsive { message } => {
                write!(f, "stopped by the host, unresponsive: {message}")
            }
            ExitReason::Failed(failure) => write!(f, "failed: {failure}"),
            ExitReason::DeviceFailed { message } => write!(f, "device failure: {message}"),
        }
    }
}

impl From<VcpuEnd> for ExitReason {
    fn from(end: VcpuEnd) -> Self {
        match end {
            VcpuEnd::Reset => ExitReason::Reset,
            VcpuEnd::Shutdown => ExitReason::Shutdown,
            VcpuEnd::Stopped => ExitReason::Stopped,
            VcpuEnd::Failed(failure) => ExitReason::Failed(failure),
        }
    }
}

/// How the machine ended, with the end of its console output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineExit {
    /// Why.
    pub reason: ExitReason,
    /// The last few KiB of console output at that moment.
    pub console_tail: String,
}

impl std::fmt::Display for MachineExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)?;
        if matches!(
            self.reason,
            ExitReason::Failed(_)
                | ExitReason::Panic { .. }
                | ExitReason::DeviceFailed { .. }
                | ExitReason::Unresponsive { .. }
        ) {
            write!(f, "\n--- console tail ---\n{}", self.console_tail)?;
        }
        Ok(())
    }
}

/// Keeps the first report of how the machine ended, and stops the vCPUs when it gets one.
pub(crate) struct ExitRecorder {
    exit: watch::Sender<Option<MachineExit>>,
    console: ConsoleLog,
    control: Arc<RunControl>,
}

impl ExitRecorder {
    /// A recorder for a machine whose vCPUs `control` runs.
    pub(super) fn new(
        console: ConsoleLog,
        control: Arc<RunControl>,
    ) -> (Arc<Self>, watch::Receiver<Option<MachineExit>>) {
        let (exit, rx) = watch::channel(None);
        let recorder = Arc::new(ExitRecorder {
            exit,
            console,
            control,
        });
        (recorder, rx)
    }

    /// Records how the machine ended (the first report wins) and stops the vCPUs.
    pub(super) fn finish(&self, reason: ExitReason) {
        let console_tail = self.console.tail(CONSOLE_TAIL_BYTES);
        let reason = match reason {
            ExitReason::Reset => match panic_message(&console_tail) {
                Some(message) => ExitReason::Panic { message },
                None => ExitReason::Reset,
            },
            other => other,
        };
        let mut recorded = false;
        self.exit.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(MachineExit {
                    reason: reason.clone(),
                    console_tail,
                });
                recorded = true;
            }
            recorded
        });
        if recorded {
            match &reason {
                ExitReason::Failed(f) => tracing::error!(failure = %f, "machine failed"),
                r => tracing::debug!(reason = ?r, "machine exited"),
            }
        }
        self.control.request_stop();
    }
}

impl EndSink for ExitRecorder {
    fn vcpu_ended(&self, end: VcpuEnd) {
        self.finish(end.into());
    }
}

impl PowerControl for ExitRecorder {
    fn request(&self, request: PowerRequest) {
        match request {
            PowerRequest::Reset => self.finish(ExitReason::Reset),
        }
    }
}

/// The message of the last kernel panic in `console`, if the guest panicked.
fn panic_message(console: &str) -> Option<String> {
    let at = console.rfind(PANIC_BANNER)?;
    let line = console[at + PANIC_BANNER.len()..]
        .lines()
        .next()
        .unwrap_or_default();
    Some(line.trim().to_string())
}

/// Whether `line` is the kernel's last word before it powers off or halts (`reboot: Power down`,
/// `reboot: System halted`, after the printk timestamp).
pub(super) fn is_power_off_line(line: &str) -> bool {
    let line = line.trim_end();
    line.ends_with("] reboot: Power down")
        || line.ends_with("] reboot: System halted")
        || line == "reboot: Power down"
        || line == "reboot: System halted"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_panic_message() {
        let console = "[    1.0] Run /init as init process\n\
                       [    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n\
                       [    1.2] CPU: 0 PID: 1 Comm: init\n";
        assert_eq!(
            panic_message(console).as_deref(),
            Some("Attempted to kill init! exitcode=0x00000100")
        );
        assert_eq!(panic_message("reboot: Restarting system\n"), None);
    }

    #[test]
    fn recognises_power_off_lines() {
        assert!(is_power_off_line("[   69.561837] reboot: Power down"));
        assert!(is_power_off_line("[    1.000000] reboot: System halted\r"));
        assert!(is_power_off_line("reboot: Power down"));
        assert!(!is_power_off_line(
            "[   69.557387] reboot: Restarting system"
        ));
        assert!(!is_power_off_line("echo reboot: Power down now"));
    }
}
