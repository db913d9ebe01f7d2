//! Guest RAM layout and creation.
//!
//! RAM is one region from guest physical 0 up to `memory_mib`, which must end at or below
//! [`MMIO_BASE`]: the rest of the 32-bit space is the MMIO hole (virtio-mmio slots, then IOAPIC and
//! LAPIC near 4 GiB). RAM above 4 GiB is not supported yet.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Start of the MMIO hole; virtio-mmio device *i* lives at `MMIO_BASE + i * 0x1000`.
pub const MMIO_BASE: u64 = 0xd000_0000;

/// The largest RAM size that fits below the MMIO hole, in MiB.
pub const MAX_MEMORY_MIB: u32 = (MMIO_BASE >> 20) as u32;

/// How guest RAM is backed on the host.
///
/// Only anonymous memory exists today. Restoring a snapshot will add a file-backed variant
/// (`MAP_PRIVATE` of the snapshot's memory file, so VMs of one snapshot share clean pages through
/// the page cache): everything that consumes RAM takes the resulting `GuestMemoryMmap`, so that
/// variant only changes how the mapping is made here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RamBacking {
    /// Private anonymous pages (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`), zero-filled on
    /// first touch.
    #[default]
    Anonymous,
}

/// Guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size does not fit below the MMIO hole.
    #[error(
        "{mib} MiB of guest memory does not fit below the MMIO hole at {MMIO_BASE:#x} \
         (at most {MAX_MEMORY_MIB} MiB)"
    )]
    TooLarge {
        /// Requested size.
        mib: u32,
    },
    /// Zero bytes requested.
    #[error("guest memory size must be positive")]
    Empty,
    /// The host refused the mapping.
    #[error("mapping {mib} MiB of guest memory failed: {source}")]
    Map {
        /// Requested size.
        mib: u32,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The size in bytes of `mib` MiB of RAM, if it fits below the MMIO hole.
pub fn ram_size(mib: u32) -> Result<u64, MemoryError> {
    if mib == 0 {
        return Err(MemoryError::Empty);
    }
    if mib > MAX_MEMORY_MIB {
        return Err(MemoryError::TooLarge { mib });
    }
    Ok(u64::from(mib) << 20)
}

/// Creates guest RAM `[0, mib MiB)`.
pub fn create(mib: u32, backing: RamBacking) -> Result<Arc<GuestMemoryMmap>, MemoryError> {
    let size = ram_size(mib)?;
    let mem = match backing {
        RamBacking::Anonymous => {
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
                .map_err(|source| MemoryError::Map { mib, source })?
        }
    };
    Ok(Arc::new(mem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn sizes_are_checked_against_the_hole() {
        assert!(matches!(ram_size(0), Err(MemoryError::Empty)));
        assert_eq!(ram_size(MAX_MEMORY_MIB).unwrap(), MMIO_BASE);
        assert!(matches!(
            ram_size(MAX_MEMORY_MIB + 1),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn creates_zeroed_ram_from_zero() {
        let mem = create(2, RamBacking::Anonymous).unwrap();
        assert_eq!(mem.last_addr(), GuestAddress((2 << 20) - 1));
        let v: u64 = mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0);
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x1ffff8))
            .unwrap();
        assert!(mem.read_obj::<u8>(GuestAddress(2 << 20)).is_err());
    }
}
