//! Routes vCPU MMIO and port-I/O exits to the device that owns the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through guest MMIO or port I/O.
///
/// `offset` is relative to the base address the device was inserted at. Called from vCPU threads,
/// so implementations must be quick: queue work elsewhere, do not block.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shareable device on a [`Bus`].
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping address ranges mapped to devices.
///
/// Hand-written rather than `vm-device`'s bus: this is a sorted map lookup, and owning it keeps
/// the device-facing trait free of that crate's generic address types.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

/// The range asked for overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct BusOverlap {
    /// Requested base.
    pub base: u64,
    /// Requested length.
    pub len: u64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusOverlap> {
        let end = base.checked_add(len).ok_or(BusOverlap { base, len })?;
        if len == 0 {
            return Err(BusOverlap { base, len });
        }
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(&b, r)| b + r.len > base);
        if overlaps_prev {
            return Err(BusOverlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Range)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, range))
    }

    /// Dispatches a read; `false` if no device owns `addr` (the caller decides what the guest
    /// sees, usually all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, range)) => {
                let mut device = range.device.lock().unwrap_or_else(|p| p.into_inner());
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` if no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, range)) => {
                let mut device = range.device.lock().unwrap_or_else(|p| p.into_inner());
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x1100, 0x100, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert!(bus
            .insert(0x10ff, 2, Arc::new(Mutex::new(Recorder::default())))
            .is_err());
        assert!(bus
            .insert(0x0fff, 2, Arc::new(Mutex::new(Recorder::default())))
            .is_err());
        let mut buf = [0u8; 2];
        assert!(bus.read(0x1004, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(bus.write(0x10f0, &[9]));
        assert_eq!(a.lock().unwrap().last, Some((0xf0, vec![9])));
        assert!(!bus.read(0x1200, &mut buf));
        assert!(!bus.write(0xfff, &[1]));
    }
}
