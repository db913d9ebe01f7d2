//! A snapshot's recorded working set: the guest pages a machine restored from it touched while
//! it answered its first requests, kept beside the snapshot (`working-set`) so later restores
//! map exactly those pages into the hypervisor's page tables before the guest runs
//! ([`HvVcpu::prefault`](crate::hypervisor::HvVcpu::prefault)) instead of taking one exit per
//! page as the guest touches them (REAP, ASPLOS '21, records and prefetches the same set).
//!
//! The set is what `/proc/self/pagemap` shows of the recording machine's RAM after its first
//! requests: present pages, and among them the private copies (pages the guest wrote). That
//! is about twice the pages the guest itself touched, because a read fault in a file mapping
//! also maps the page's neighbours in the page cache (the kernel's fault-around). The surplus
//! is wanted: an exact set (recorded through userfaultfd) made restores' first exec slower
//! (one exit per neighbour the next restore does touch, and pages written back unchanged, such
//! as guest page tables whose accessed bits the walk sets, then map read-only).
//!
//! Pages the guest wrote are copied up front too (`MADV_POPULATE_WRITE`): it would copy them on
//! its first write anyway, and a page already private maps writable at once.
//!
//! The file is an optimisation: a restore without one, or with one this build cannot read, is
//! correct, only slower (a damaged file is logged and ignored).
//!
//! Format (little endian): the 8-byte magic `SMWSET\0\x01`, the RAM size in bytes (`u64`), the
//! run count (`u64`), then per run its first page index from the RAM start (`u64`), its length
//! in pages (`u32`) and flags (`u32`, bit 0: written). Runs are sorted and do not overlap.

use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::memory::RAM_START;

/// The working-set file's name inside a snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set";

const MAGIC: &[u8; 8] = b"SMWSET\0\x01";
const PAGE: u64 = 4096;
const WRITTEN: u32 = 1;

/// Consecutive guest pages, all written or all only read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Index of the first page, counted from the RAM start.
    pub first: u64,
    /// Number of pages (at least one).
    pub pages: u32,
    /// Whether the guest wrote these pages (their copy-on-write copies were made).
    pub written: bool,
}

impl PageRun {
    /// The run's guest physical address.
    pub fn gpa(&self) -> u64 {
        RAM_START + self.first * PAGE
    }

    /// The run's length in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.pages) * PAGE
    }
}

/// The pages a restored machine touched, in address order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    ram_size: u64,
    runs: Vec<PageRun>,
}

/// Why a working-set file was not used.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing the file failed.
    #[error("cannot read or write {path}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a working set of this machine (damaged, or of another RAM size).
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

impl WorkingSet {
    /// The pages of `mem` that are resident in this process now, as `/proc/self/pagemap` says
    /// (a superset of the pages the guest touched: read faults map neighbours too):
    /// present pages, marked written where the page is a private copy (anonymous) rather than
    /// the memory file's own page. Call on a machine restored from a snapshot (whose RAM is the
    /// memory file mapped copy-on-write), after it answered the requests to record.
    pub fn resident(mem: &GuestMemoryMmap) -> std::io::Result<WorkingSet> {
        use std::os::unix::fs::FileExt;
        // pagemap has one entry per host page; the set (and KVM's pre-fault) counts 4 KiB ones.
        // SAFETY: sysconf has no preconditions.
        let host_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if host_page != PAGE as libc::c_long {
            return Err(std::io::Error::other(format!(
                "host pages are {host_page} bytes; working sets are recorded on 4 KiB-page hosts"
            )));
        }
        // Bits of a pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
        const PRESENT: u64 = 1 << 63;
        const FILE_OR_SHARED: u64 = 1 << 61;
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let mut set = WorkingSet::default();
        for region in mem.iter() {
            let start = region.start_addr().0;
            let len = region.len();
            set.ram_size = set.ram_size.max(start - RAM_START + len);
            let host = mem
                .get_host_address(GuestAddress(start))
                .map_err(|e| std::io::Error::other(format!("guest RAM at {start:#x}: {e}")))?;
            let first_host_page = host as u64 / PAGE;
            let pages = len / PAGE;
            // 8 bytes per page: 512 KiB for 256 MiB of RAM, read in 64 KiB steps.
            const STEP: u64 = 8192;
            let mut buf = vec![0u8; (STEP * 8) as usize];
            let mut page = 0;
            while page < pages {
                let n = STEP.min(pages - page);
                let bytes = &mut buf[..(n * 8) as usize];
                pagemap.read_exact_at(bytes, (first_host_page + page) * 8)?;
                for (i, entry) in bytes.chunks_exact(8).enumerate() {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(entry);
                    let entry = u64::from_le_bytes(word);
                    if entry & PRESENT != 0 {
                        let index = (start - RAM_START) / PAGE + page + i as u64;
                        set.push(index, entry & FILE_OR_SHARED == 0);
                    }
                }
                page += n;
            }
        }
        Ok(set)
    }

    /// Adds page `index` after every page already in the set.
    fn push(&mut self, index: u64, written: bool) {
        if let Some(last) = self.runs.last_mut() {
            if last.written == written
                && last.first + u64::from(last.pages) == index
                && last.pages < u32::MAX
            {
                last.pages += 1;
                return;
            }
        }
        self.runs.push(PageRun {
            first: index,
            pages: 1,
            written,
        });
    }

    /// The runs, in address order.
    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// Pages in the set.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Pages in the set that were written.
    pub fn written_pages(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.written)
            .map(|r| u64::from(r.pages))
            .sum()
    }

    /// The file's bytes.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.runs.len() * 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.ram_size.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for run in &self.runs {
            out.extend_from_slice(&run.first.to_le_bytes());
            out.extend_from_slice(&run.pages.to_le_bytes());
            let flags = if run.written { WRITTEN } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
        }
        out
    }

    /// Parses a file's bytes for a machine of `ram_size` bytes of RAM.
    fn decode(bytes: &[u8], ram_size: u64) -> Result<WorkingSet, String> {
        let rest = bytes.strip_prefix(MAGIC).ok_or("not a working-set file")?;
        let word = |b: &[u8], at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
        };
        let size = word(rest, 0).ok_or("truncated header")?;
        if size != ram_size {
            return Err(format!(
                "recorded for {size} bytes of RAM, the machine has {ram_size}"
            ));
        }
        let count = word(rest, 8).ok_or("truncated header")?;
        let body = &rest[16..];
        if u64::try_from(body.len()).ok() != count.checked_mul(16) {
            return Err(format!(
                "{count} runs announced, {} bytes follow",
                body.len()
            ));
        }
        let total_pages = ram_size / PAGE;
        let mut runs = Vec::with_capacity(body.len() / 16);
        let mut next_free = 0u64;
        for entry in body.chunks_exact(16) {
            let first = word(entry, 0).ok_or("truncated run")?;
            let pages = u32::from_le_bytes(entry[8..12].try_into().map_err(|_| "truncated run")?);
            let flags = u32::from_le_bytes(entry[12..16].try_into().map_err(|_| "truncated run")?);
            let end = first.checked_add(u64::from(pages)).ok_or("run overflows")?;
            if pages == 0 || first < next_free || end > total_pages || flags & !WRITTEN != 0 {
                return Err(format!(
                    "bad run: pages {first}+{pages} flags {flags:#x} (RAM has {total_pages} pages)"
                ));
            }
            next_free = end;
            runs.push(PageRun {
                first,
                pages,
                written: flags & WRITTEN != 0,
            });
        }
        Ok(WorkingSet { ram_size, runs })
    }

    /// Writes the set into the snapshot directory `dir` as [`WORKING_SET_FILE`], replacing any
    /// earlier one at once (written beside it, then renamed).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{WORKING_SET_FILE}.tmp"));
        let written = std::fs::write(&tmp, self.encode())
            .and_then(|()| std::fs::rename(&tmp, dir.join(WORKING_SET_FILE)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// The set saved in snapshot directory `dir` for a machine of `ram_size` bytes of RAM;
    /// `Ok(None)` when there is none.
    pub fn load(dir: &Path, ram_size: u64) -> Result<Option<WorkingSet>, WorkingSetError> {
        let path = dir.join(WORKING_SET_FILE);
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(WorkingSetError::Io { path, source }),
        };
        // Never block on a FIFO or read an endless file: a set is at most one run per page.
        let most = 24 + 16 * (ram_size / PAGE);
        if !meta.is_file() || meta.len() > most {
            return Err(WorkingSetError::Invalid {
                path,
                why: format!("not a regular file of at most {most} bytes"),
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| WorkingSetError::Io {
            path: path.clone(),
            source,
        })?;
        WorkingSet::decode(&bytes, ram_size)
            .map(Some)
            .map_err(|why| WorkingSetError::Invalid { path, why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{self, RamBacking};
    use vm_memory::Bytes;

    fn set(runs: &[(u64, u32, bool)]) -> WorkingSet {
        WorkingSet {
            ram_size: 4 << 20,
            runs: runs
                .iter()
                .map(|&(first, pages, written)| PageRun {
                    first,
                    pages,
                    written,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let original = set(&[(0, 3, false), (3, 1, true), (1000, 24, false)]);
        original.save(dir.path()).unwrap();
        let loaded = WorkingSet::load(dir.path(), 4 << 20).unwrap().unwrap();
        assert_eq!(loaded, original);
        assert_eq!(loaded.pages(), 28);
        assert_eq!(loaded.written_pages(), 1);
        assert_eq!(loaded.runs()[2].gpa(), RAM_START + 1000 * PAGE);
        assert_eq!(loaded.runs()[2].bytes(), 24 * PAGE);
        assert!(
            WorkingSet::load(tempfile::tempdir().unwrap().path(), 4 << 20)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn refuses_damaged_or_foreign_files() {
        let good = set(&[(0, 3, false), (5, 2, true)]).encode();
        let check = |bytes: &[u8], ram: u64, expect: &str| {
            let err = WorkingSet::decode(bytes, ram).unwrap_err();
            assert!(err.contains(expect), "{err}");
        };
        check(b"nonsense", 4 << 20, "not a working-set");
        // What `load` refuses before reading: something not a file, or longer than any set.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(WORKING_SET_FILE)).unwrap();
        assert!(matches!(
            WorkingSet::load(dir.path(), 4 << 20),
            Err(WorkingSetError::Invalid { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(WORKING_SET_FILE), vec![0u8; 24 + 16 * 1025]).unwrap();
        let err = WorkingSet::load(dir.path(), 4 << 20).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        check(&good, 8 << 20, "recorded for");
        check(&good[..good.len() - 1], 4 << 20, "announced");
        // Overlapping, empty, past the end, unknown flags.
        for (first, pages, flags) in [(1u64, 1u32, 0u32), (9, 0, 0), (1023, 2, 0), (9, 1, 4)] {
            let mut bytes = good.clone();
            let at = bytes.len() - 16;
            bytes[at..at + 8].copy_from_slice(&first.to_le_bytes());
            bytes[at + 8..at + 12].copy_from_slice(&pages.to_le_bytes());
            bytes[at + 12..].copy_from_slice(&flags.to_le_bytes());
            check(&bytes, 4 << 20, "bad run");
        }
    }

    #[test]
    fn resident_pages_of_a_private_file_mapping_say_which_were_written() {
        // A 4 MiB memory file; the mapping reads page 10 and writes page 12.
        let file = tempfile::tempfile().unwrap();
        file.set_len(4 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 4096 * 16], 0).unwrap();
        let mem = memory::create(4, RamBacking::SnapshotFile(file)).unwrap();
        let _: u8 = mem.read_obj(GuestAddress(RAM_START + 10 * PAGE)).unwrap();
        mem.write_obj(1u8, GuestAddress(RAM_START + 12 * PAGE))
            .unwrap();
        let found = WorkingSet::resident(&mem).unwrap();
        assert_eq!(found.ram_size, 4 << 20);
        let written: Vec<u64> = found
            .runs()
            .iter()
            .filter(|r| r.written)
            .flat_map(|r| r.first..r.first + u64::from(r.pages))
            .collect();
        assert_eq!(written, [12]);
        // Page 10 was read (fault-around may map its neighbours as well).
        assert!(found
            .runs()
            .iter()
            .any(|r| !r.written && (r.first..r.first + u64::from(r.pages)).contains(&10)));
        assert!(found.pages() < 64, "{found:?}");
    }
}
