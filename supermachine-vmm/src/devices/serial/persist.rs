//! The UART's saved state, for snapshots: its registers (vm-superio's `SerialState`, which has
//! no serde). The output ring is not saved: a restored machine starts a fresh console log.

use std::io;

use vm_superio::Serial as Uart;

use super::{LineTrigger, LogWriter, Serial};

/// The UART registers, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSaved {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl Serial {
    /// The register state.
    pub fn save(&self) -> SerialSaved {
        let s = self.uart.state();
        SerialSaved {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Loads saved registers, keeping this UART's output and interrupt.
    pub fn restore(&mut self, saved: &SerialSaved) -> io::Result<()> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        self.uart = Uart::from_state(
            &state,
            LineTrigger(self.irq.clone()),
            vm_superio::serial::NoEvents,
            LogWriter(self.log.clone()),
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
        Ok(())
    }
}
