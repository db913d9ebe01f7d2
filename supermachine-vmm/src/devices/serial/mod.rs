//! The 8250/16550 UART (the guest's `ttyS0`; where it sits and which interrupt line it has is the
//! platform's choice: COM1 at I/O port 0x3f8 with IRQ 4 on x86), with its output captured in a
//! bounded ring buffer: the machine's console log. Its saved registers are in `persist.rs`.
//!
//! The register model is vm-superio's. Its interrupt goes through an [`InterruptLine`]: the Linux
//! 8250 driver writes the boot console by polling LSR, but once userspace writes to the tty it
//! enables the THR-empty interrupt and waits for it to send the next chunk; without a working
//! IRQ it falls back to a slow timer and console output from `/init` crawls.

mod persist;

pub use persist::SerialSaved;

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial as Uart, Trigger};

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;
/// Default console ring capacity.
pub const DEFAULT_CONSOLE_CAPACITY: usize = 256 * 1024;

/// Called with each complete console line (without the newline), on the vCPU thread that wrote
/// it. Must be quick.
pub type LineHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Lines longer than this are cut (for the hook only; the ring keeps every byte).
const MAX_LINE: usize = 512;

/// The console log: the last `capacity` bytes the guest wrote to the serial port.
///
/// Cheap to clone (shared). Optionally tees every byte to the host's stderr as it arrives, and
/// passes complete lines to a hook (the machine watches for the kernel's power-off message).
#[derive(Clone)]
pub struct ConsoleLog {
    inner: Arc<Mutex<Ring>>,
}

impl std::fmt::Debug for ConsoleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.ring();
        f.debug_struct("ConsoleLog")
            .field("len", &ring.buf.len())
            .field("capacity", &ring.capacity)
            .field("total", &ring.total)
            .finish_non_exhaustive()
    }
}

struct Ring {
    buf: VecDeque<u8>,
    capacity: usize,
    /// Bytes ever written (dropped ones included), so readers can tell the log wrapped.
    total: u64,
    tee_stderr: bool,
    line: Vec<u8>,
    hook: Option<LineHook>,
}

impl ConsoleLog {
    /// An empty log keeping at most `capacity` bytes (oldest dropped first).
    pub fn new(capacity: usize, tee_stderr: bool) -> Self {
        ConsoleLog {
            inner: Arc::new(Mutex::new(Ring {
                buf: VecDeque::with_capacity(capacity.min(64 * 1024)),
                capacity: capacity.max(1),
                total: 0,
                tee_stderr,
                line: Vec::new(),
                hook: None,
            })),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs (or with `None` removes) the line hook.
    pub fn set_line_hook(&self, hook: Option<LineHook>) {
        let mut ring = self.ring();
        ring.hook = hook;
        ring.line.clear();
    }

    /// Appends guest output.
    pub fn push(&self, bytes: &[u8]) {
        let mut lines = Vec::new();
        let (tee, hook) = {
            let mut ring = self.ring();
            ring.total += bytes.len() as u64;
            let keep = &bytes[bytes.len().saturating_sub(ring.capacity)..];
            let overflow = (ring.buf.len() + keep.len()).saturating_sub(ring.capacity);
            ring.buf.drain(..overflow);
            ring.buf.extend(keep);
            if ring.hook.is_some() {
                for &b in bytes {
                    match b {
                        b'\n' => {
                            let line = std::mem::take(&mut ring.line);
                            lines.push(String::from_utf8_lossy(&line).trim_end().to_string());
                        }
                        _ if ring.line.len() < MAX_LINE => ring.line.push(b),
                        _ => {}
                    }
                }
            }
            (ring.tee_stderr, ring.hook.clone())
        };
        if tee {
            // Best effort: a closed stderr must not stall the guest.
            let _ = io::stderr().lock().write_all(bytes);
        }
        // Outside the lock: the hook may read the log.
        if let Some(hook) = hook {
            for line in &lines {
                hook(line);
            }
        }
    }

    /// Everything still in the ring, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        let ring = self.ring();
        let (a, b) = ring.buf.as_slices();
        [a, b].concat()
    }

    /// The last `max` bytes, lossily decoded as UTF-8.
    pub fn tail(&self, max: usize) -> String {
        let ring = self.ring();
        let skip = ring.buf.len().saturating_sub(max);
        let bytes: Vec<u8> = ring.buf.iter().skip(skip).copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Total bytes the guest ever wrote, including those the ring dropped.
    pub fn total_written(&self) -> u64 {
        self.ring().total
    }
}

/// Writes UART output into the console log.
struct LogWriter(ConsoleLog);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raises the UART interrupt through its line.
struct LineTrigger(Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The UART as a bus device.
pub struct Serial {
    uart: Uart<LineTrigger, vm_superio::serial::NoEvents, LogWriter>,
    /// Kept to rebuild the UART from a snapshot.
    log: ConsoleLog,
    /// Kept to rebuild the UART from a snapshot.
    irq: Arc<dyn InterruptLine>,
}

impl Serial {
    /// A UART whose output goes to `log` and whose interrupt is `irq`.
    pub fn new(log: ConsoleLog, irq: Arc<dyn InterruptLine>) -> Self {
        Serial {
            uart: Uart::new(LineTrigger(irq.clone()), LogWriter(log.clone())),
            log,
            irq,
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match u8::try_from(offset) {
            Ok(reg) if data.len() == 1 => self.uart.read(reg),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(reg), [value]) = (u8::try_from(offset), data) else {
            tracing::trace!(offset, len = data.len(), "ignored odd-sized UART write");
            return;
        };
        if let Err(e) = self.uart.write(reg, *value) {
            // Only the interrupt can fail (the log writer cannot); the guest just misses one
            // interrupt, and the driver's timeout recovers.
            tracing::warn!(error = ?e, "serial interrupt could not be raised");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let log = ConsoleLog::new(8, false);
        log.push(b"hello");
        assert_eq!(log.contents(), b"hello");
        log.push(b" world");
        assert_eq!(log.contents(), b"lo world");
        assert_eq!(log.total_written(), 11);
        log.push(b"0123456789abc");
        assert_eq!(log.contents(), b"56789abc");
        assert_eq!(log.tail(3), "abc");
    }

    #[test]
    fn line_hook_sees_complete_lines() {
        let log = ConsoleLog::new(64, false);
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = seen.clone();
        log.set_line_hook(Some(Arc::new(move |l: &str| {
            sink.lock().unwrap().push(l.to_string())
        })));
        log.push(b"[ 1.0] reboot: Pow");
        log.push(b"er down\r\nnext");
        assert_eq!(*seen.lock().unwrap(), vec!["[ 1.0] reboot: Power down"]);
        log.push(&[b'x'; 2000]);
        log.push(b"\n");
        assert_eq!(
            seen.lock().unwrap()[1].len(),
            MAX_LINE,
            "long lines are cut"
        );
    }

    #[test]
    fn uart_output_reaches_the_log_and_raises_thre() {
        let log = ConsoleLog::new(1024, false);
        let irq = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut serial = Serial::new(log.clone(), irq.clone());
        // Enable the THR-empty interrupt (IER bit 1): the model raises it at once.
        serial.write(1, &[0x02]);
        assert_eq!(irq.read().unwrap(), 1);
        // The driver's interrupt handler reads IIR (THR empty), which acknowledges it...
        let mut iir = [0u8];
        serial.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02);
        for b in b"ok\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(log.contents(), b"ok\n");
        // ...so the next transmitted byte raises it again.
        assert!(irq.read().is_ok(), "THR-empty interrupt after transmitting");
        // LSR: transmitter empty.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
