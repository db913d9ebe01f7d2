//! Guest RAM creation, and memory files for snapshots.
//!
//! RAM is one region of `memory_mib` from the platform's [`RAM_START`] (x86: guest physical 0,
//! ending at or below the MMIO hole at [`MMIO_BASE`]); the layout is the platform's
//! (`arch/`). Restored machines map their snapshot's memory file copy-on-write
//! ([`RamBacking::SnapshotFile`]). A memory file holds RAM from its start: file offset 0 is
//! guest address [`RAM_START`].

use std::sync::Arc;

use sha2::{Digest, Sha256};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

pub use crate::arch::{MAX_MEMORY_MIB, MMIO_BASE, RAM_START};

/// How guest RAM is backed on the host.
#[derive(Debug, Default)]
#[non_exhaustive]
pub enum RamBacking {
    /// Private anonymous pages (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`), zero-filled on
    /// first touch.
    #[default]
    Anonymous,
    /// A private (copy-on-write) mapping of a snapshot's memory file: pages are read from the
    /// page cache on first touch — shared by every VM restored from the same file — and copied
    /// only when the guest writes them. Nothing is read eagerly. The file must be exactly the
    /// RAM size long.
    SnapshotFile(std::fs::File),
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
    /// The host refused the file mapping.
    #[error("mapping the {mib} MiB memory file failed")]
    MapFile {
        /// Requested size.
        mib: u32,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The host refused the mapping.
    #[error("mapping {mib} MiB of guest memory failed")]
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

/// Creates guest RAM `[RAM_START, RAM_START + mib MiB)`. With [`RamBacking::SnapshotFile`], the file's length must
/// already have been checked against the size.
pub fn create(mib: u32, backing: RamBacking) -> Result<Arc<GuestMemoryMmap>, MemoryError> {
    let size = ram_size(mib)?;
    let mem = match backing {
        RamBacking::Anonymous => {
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_START), size as usize)])
                .map_err(|source| MemoryError::Map { mib, source })?
        }
        RamBacking::SnapshotFile(file) => {
            let region = MmapRegionBuilder::new(size as usize)
                .with_file_offset(FileOffset::new(file, 0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|source| MemoryError::MapFile { mib, source })?;
            let region = GuestRegionMmap::new(region, GuestAddress(RAM_START))
                .ok_or(MemoryError::TooLarge { mib })?;
            GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::Map {
                mib,
                source: e.into(),
            })?
        }
    };
    Ok(Arc::new(mem))
}

/// Page granularity of sparse memory files.
const PAGE: usize = 4096;

/// What [`write_sparse`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseWrite {
    /// Bytes of non-zero pages written.
    pub bytes_written: u64,
    /// [`sparse_digest`] of the file as written.
    pub sha256: [u8; 32],
}

/// Feeds one chunk of a memory image at `offset` into a [`sparse_digest`]: every page that is
/// not all zero, with its offset. Holes and zero pages are the same to it, so a sparse file
/// hashes the same however its holes were made.
fn digest_chunk(h: &mut Sha256, offset: u64, chunk: &[u8]) {
    for (i, page) in chunk.chunks(PAGE).enumerate() {
        if !is_zero(page) {
            h.update((offset + (i * PAGE) as u64).to_le_bytes());
            h.update(page);
        }
    }
}

/// Writes all of guest RAM to `out` as a sparse file, file offset 0 at [`RAM_START`]: all-zero
/// pages are left as holes (most of a freshly booted guest's RAM was never touched).
///
/// The guest and every device must be paused: the copy is not atomic.
pub fn write_sparse(mem: &GuestMemoryMmap, out: &std::fs::File) -> std::io::Result<SparseWrite> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut end = 0u64;
    let mut digest = Sha256::new();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        // File offsets are guest addresses less the RAM start (identical on x86, where RAM
        // starts at 0).
        let file_start = start.checked_sub(RAM_START).ok_or_else(|| {
            std::io::Error::other(format!("guest RAM region at {start:#x} below RAM_START"))
        })?;
        end = end.max(file_start + len);
        let mut off = 0u64;
        while off < len {
            let n = CHUNK.min((len - off) as usize);
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(start + off))
                .map_err(|e| std::io::Error::other(format!("reading guest memory: {e}")))?;
            // One zero check per page: non-zero pages go into the digest (as `digest_chunk`
            // would) and are written in maximal runs.
            let base = file_start + off;
            let mut run: Option<usize> = None;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                let at = i * PAGE;
                if is_zero(page) {
                    if let Some(from) = run.take() {
                        out.write_all_at(&chunk[from..at], base + from as u64)?;
                        written += (at - from) as u64;
                    }
                } else {
                    digest.update((base + at as u64).to_le_bytes());
                    digest.update(page);
                    run.get_or_insert(at);
                }
            }
            if let Some(from) = run {
                out.write_all_at(&chunk[from..], base + from as u64)?;
                written += (n - from) as u64;
            }
            off += n as u64;
        }
    }
    out.set_len(end)?;
    Ok(SparseWrite {
        bytes_written: written,
        sha256: digest.finalize().into(),
    })
}

/// The digest [`write_sparse`] reports, computed from a memory file (reads all of it).
pub fn sparse_digest(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut digest = Sha256::new();
    let mut offset = 0u64;
    loop {
        // Fill whole chunks so page boundaries line up with the offsets.
        let mut n = 0;
        while n < buf.len() {
            let got = file.read(&mut buf[n..])?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        digest_chunk(&mut digest, offset, &buf[..n]);
        offset += n as u64;
    }
    Ok(digest.finalize().into())
}

fn is_zero(bytes: &[u8]) -> bool {
    // Slice equality on bytes is a `memcmp`, fast even in unoptimised (test) builds, where a
    // byte loop would make snapshotting hundreds of MiB take seconds.
    static ZEROS: [u8; PAGE] = [0; PAGE];
    bytes
        .chunks(PAGE)
        .all(|chunk| chunk == &ZEROS[..chunk.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn sizes_are_checked_against_the_hole() {
        assert!(matches!(ram_size(0), Err(MemoryError::Empty)));
        assert_eq!(
            ram_size(MAX_MEMORY_MIB).unwrap(),
            u64::from(MAX_MEMORY_MIB) << 20
        );
        assert!(matches!(
            ram_size(MAX_MEMORY_MIB + 1),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn creates_zeroed_ram_from_the_ram_start() {
        let mem = create(2, RamBacking::Anonymous).unwrap();
        assert_eq!(mem.last_addr(), GuestAddress(RAM_START + (2 << 20) - 1));
        let v: u64 = mem.read_obj(GuestAddress(RAM_START + 0x1000)).unwrap();
        assert_eq!(v, 0);
        mem.write_obj(0xdead_beef_u64, GuestAddress(RAM_START + 0x1ffff8))
            .unwrap();
        assert!(mem
            .read_obj::<u8>(GuestAddress(RAM_START + (2 << 20)))
            .is_err());
    }

    #[test]
    fn sparse_write_matches_memory_and_its_digest() {
        let mem = create(4, RamBacking::Anonymous).unwrap();
        // Non-zero pages: a run of two at 0x1000, one at a chunk boundary, the very last.
        mem.write_slice(&[1; 2 * PAGE], GuestAddress(RAM_START + 0x1000))
            .unwrap();
        mem.write_obj(7u8, GuestAddress(RAM_START + (1 << 20) - 1))
            .unwrap();
        mem.write_obj(9u8, GuestAddress(RAM_START + (4 << 20) - 1))
            .unwrap();
        let file = tempfile::tempfile().unwrap();
        let wrote = write_sparse(&mem, &file).unwrap();
        assert_eq!(wrote.bytes_written, 4 * PAGE as u64);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).unwrap();
        let mut ram = vec![0u8; 4 << 20];
        mem.read_slice(&mut ram, GuestAddress(RAM_START)).unwrap();
        assert!(bytes == ram, "the file must hold exactly guest RAM");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(sparse_digest(&path).unwrap(), wrote.sha256);
    }
}
