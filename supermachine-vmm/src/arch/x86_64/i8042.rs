//! The part of the PC keyboard controller (i8042) a Linux guest uses without a keyboard: the
//! command port's reset command, which is how it reboots with `reboot=k`.

use std::sync::Arc;

use crate::arch::{PowerControl, PowerRequest};
use crate::bus::BusDevice;

/// i8042 command (write) / status (read) port.
pub(super) const COMMAND_PORT: u16 = 0x64;
/// Writing this to the command port pulses the CPU reset line.
const CMD_RESET: u8 = 0xfe;
/// What reads of the status port return: "output buffer full, input buffer empty".
///
/// There is no keyboard. The kernel's reboot path spins (up to 64K port reads, each a VM exit)
/// until the "input buffer full" bit clears before it writes the reset command, so that bit must
/// read 0. The i8042 driver's probe, meanwhile, drains the output buffer while the "output full"
/// bit is set and gives up after 16 bytes ("No controller found"), which is the quickest way for
/// it to conclude there is no controller. 0x01 satisfies both.
const STATUS: u8 = 0x01;

/// The command/status port, on the port-I/O bus at [`COMMAND_PORT`].
pub(super) struct I8042 {
    power: Arc<dyn PowerControl>,
}

impl I8042 {
    /// A controller whose reset command goes to `power`.
    pub(super) fn new(power: Arc<dyn PowerControl>) -> Self {
        I8042 { power }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(STATUS);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&CMD_RESET) {
            self.power.request(PowerRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Requests(Mutex<Vec<PowerRequest>>);

    impl PowerControl for Requests {
        fn request(&self, request: PowerRequest) {
            self.0.lock().unwrap().push(request);
        }
    }

    #[test]
    fn reset_command_requests_a_reset_and_status_reads_idle() {
        let requests = Arc::new(Requests::default());
        let mut dev = I8042::new(requests.clone());
        let mut status = [0u8; 1];
        dev.read(0, &mut status);
        assert_eq!(status, [STATUS]);
        dev.write(0, &[0xd1]);
        assert!(requests.0.lock().unwrap().is_empty());
        dev.write(0, &[CMD_RESET]);
        assert_eq!(*requests.0.lock().unwrap(), vec![PowerRequest::Reset]);
    }
}
