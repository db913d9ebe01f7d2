//! Loads the kernel, initramfs and command line, and writes the zero page, GDT, IDT, page tables
//! and MP table into guest memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{
    gdt, mem_err, mptable, paging, BootError, BootSpec, CMDLINE_ADDR, CMDLINE_MAX, EBDA_START,
    GDT_ADDR, HIMEM_START, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS": the setup header is valid.
const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` 0xff: "other / undefined" boot loader.
const LOADER_OTHER: u8 = 0xff;
/// The kernel's default physical alignment (CONFIG_PHYSICAL_ALIGN).
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
const PAGE_SIZE: u64 = 0x1000;

/// Where the kernel starts (the rest of the placement is logged as it is loaded).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BootImage {
    /// Guest physical address of the 64-bit entry point.
    pub entry: u64,
}

/// `boot_params` as plain bytes for vm-memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: `boot_params` is a packed C struct of integers and arrays of integers: any bit pattern
// is valid and it has no padding or references.
unsafe impl ByteValued for ZeroPage {}

/// Loads everything for a boot into `mem` and returns where the kernel starts.
pub(crate) fn load(mem: &GuestMemoryMmap, spec: &BootSpec<'_>) -> Result<BootImage, BootError> {
    let ram_end = mem.last_addr().raw_value() + 1;

    // Kernel: ELF PT_LOAD segments at their physical addresses.
    let mut file = File::open(spec.kernel).map_err(|source| BootError::KernelOpen {
        path: spec.kernel.to_path_buf(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::KernelLoad {
            path: spec.kernel.to_path_buf(),
            format: "an x86-64 ELF vmlinux",
            reason: e.to_string(),
        }
    })?;
    let entry = loaded.kernel_load.raw_value();
    let kernel_end = loaded.kernel_end;
    tracing::debug!(
        entry = format_args!("{entry:#x}"),
        kernel_end = format_args!("{kernel_end:#x}"),
        pvh_note = matches!(loaded.pvh_boot_cap, PvhBootCapability::PvhEntryPresent(_)),
        "kernel loaded (booting the 64-bit entry)"
    );

    // Initramfs: as high as possible, page aligned, above the kernel.
    let initramfs = match spec.initramfs {
        Some(path) => Some(load_initramfs(mem, path, kernel_end, ram_end)?),
        None => None,
    };

    write_cmdline(mem, spec.cmdline)?;
    write_zero_page(mem, spec.cmdline.len(), initramfs, ram_end)?;

    let gdt_bytes: Vec<u8> = gdt::TABLE.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt_bytes, GuestAddress(GDT_ADDR))
        .map_err(mem_err("GDT"))?;
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem_err("IDT"))?;
    debug_assert!(paging::end(PML4_ADDR) <= CMDLINE_ADDR);
    paging::write(mem, PML4_ADDR)?;
    mptable::write(mem, spec.vcpus, EBDA_START)?;

    Ok(BootImage { entry })
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    ram_end: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::InitramfsRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    let too_large = || BootError::InitramfsTooLarge {
        path: PathBuf::from(path),
        size,
        available: ram_end.saturating_sub(floor),
    };
    let addr = ram_end.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    // The kernel reads `ramdisk_image` as 32 bits (plus `ext_ramdisk_image`, unused here: RAM
    // ends below 4 GiB).
    if addr < floor || size > u64::from(u32::MAX) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::InitramfsRead {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    tracing::debug!(addr = format_args!("{addr:#x}"), size, "initramfs loaded");
    Ok((addr, size))
}

/// Checks the command line is something the kernel will parse as given: printable ASCII that
/// fits `COMMAND_LINE_SIZE` with its NUL.
pub(crate) fn validate_cmdline(cmdline: &str) -> Result<(), BootError> {
    super::super::validate_printable_cmdline(cmdline, CMDLINE_MAX)
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    validate_cmdline(cmdline)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err("kernel command line"))
}

/// The E820 map: base memory up to the EBDA (where the MP table lives), then RAM from 1 MiB.
/// The legacy hole between is not listed, so the kernel treats it as reserved; the EBDA is listed
/// as reserved explicitly so the MP table survives.
fn e820(ram_end: u64) -> Vec<boot_e820_entry> {
    vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            r#type: E820_RESERVED,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: ram_end - HIMEM_START,
            r#type: E820_RAM,
        },
    ]
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
    ram_end: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDR_MAGIC;
    params.hdr.type_of_loader = LOADER_OTHER;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        // Both fit in 32 bits: checked in `load_initramfs`.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820(ram_end);
    debug_assert!(map.len() <= E820_MAX_ENTRIES_ZEROPAGE);
    let mut table = params.e820_table;
    table[..map.len()].copy_from_slice(&map);
    params.e820_table = table;
    params.e820_entries = map.len() as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_ADDR))
        .map_err(mem_err("zero page"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_is_one_page() {
        assert_eq!(std::mem::size_of::<ZeroPage>(), 4096);
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_mp_table() {
        let map = e820(256 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, EBDA_START + (256 << 20) - HIMEM_START);
        let reserved = map.iter().find(|e| e.r#type == E820_RESERVED).unwrap();
        let (addr, size) = (reserved.addr, reserved.size);
        assert!(addr <= EBDA_START && addr + size >= EBDA_START + 0x400);
    }

    #[test]
    fn zero_page_fields() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        write_zero_page(&mem, 13, Some((0x300_0000, 0x1234)), 64 << 20).unwrap();
        let zp: ZeroPage = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let p = zp.0;
        let (flag, hdr, ptr, ramdisk, entries) = (
            p.hdr.boot_flag,
            p.hdr.header,
            p.hdr.cmd_line_ptr,
            p.hdr.ramdisk_image,
            p.e820_entries,
        );
        assert_eq!(flag, BOOT_FLAG_MAGIC);
        assert_eq!(hdr, HDR_MAGIC);
        assert_eq!(u64::from(ptr), CMDLINE_ADDR);
        assert_eq!(ramdisk, 0x300_0000);
        assert_eq!(entries, 3);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn cmdline_validation() {
        assert!(validate_cmdline("console=ttyS0 panic=-1").is_ok());
        assert!(validate_cmdline(&"x".repeat(CMDLINE_MAX - 1)).is_ok());
        assert!(validate_cmdline(&"x".repeat(CMDLINE_MAX)).is_err());
        assert!(validate_cmdline("a\nb").is_err());
        assert!(validate_cmdline("a\0b").is_err());
        assert!(validate_cmdline("caf\u{e9}").is_err());
    }

    #[test]
    fn initramfs_goes_high_and_page_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![7u8; 5000]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let (addr, size) = load_initramfs(&mem, &path, 0x200_0000, 64 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 64 << 20 && addr + size > (64 << 20) - PAGE_SIZE * 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 7);
        // Does not fit above a kernel that ends near the top.
        assert!(matches!(
            load_initramfs(&mem, &path, (64 << 20) - 100, 64 << 20),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }
}
