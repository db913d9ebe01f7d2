//! Loading an arm64 Linux `Image` into guest RAM.
//!
//! The format is a raw kernel with a 64-byte header (Documentation/arm64/booting.rst): it is copied
//! as is to `text_offset` past a 2 MiB aligned base and entered at its first byte. linux-loader's
//! `PE` loader does the copy too, but it only compiles for arm64 and RISC-V targets (so its use
//! could not be unit-tested on the x86 hosts that build everything else) and it neither checks
//! the endianness flag nor reports the kernel's full footprint (`image_size`, which covers BSS and
//! which the initrd must not overlap); the header is small enough to read here.

use std::io::Read;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::layout;

/// Size of the header.
pub const HEADER_SIZE: usize = 64;

/// "ARM\x64", little-endian, at byte 56.
const MAGIC: u32 = 0x644d_5241;

/// `text_offset` of kernels older than 3.17, whose header has `image_size` 0.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

/// Header flag bit 0: the kernel is big-endian.
const FLAG_BIG_ENDIAN: u64 = 1;

/// The header fields the loader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Where the image goes, relative to a 2 MiB aligned base.
    pub text_offset: u64,
    /// The kernel's memory footprint from the load address, BSS included (0: unknown, an old
    /// kernel).
    pub image_size: u64,
    /// Informative flags (endianness, page size, placement).
    pub flags: u64,
}

/// The kernel image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Shorter than the header.
    #[error("the kernel is {len} bytes, shorter than the {HEADER_SIZE}-byte arm64 Image header")]
    Truncated {
        /// Its length.
        len: u64,
    },
    /// Not an arm64 `Image` (an ELF `vmlinux`, a compressed `Image.gz`, an x86 bzImage, ...).
    #[error(
        "not an arm64 Image: magic {found:#010x} at byte 56, expected {MAGIC:#010x} (\"ARM\\x64\")"
    )]
    BadMagic {
        /// The word found.
        found: u32,
    },
    /// A big-endian kernel, which this VMM does not boot.
    #[error("the arm64 Image is big-endian (header flags {flags:#x})")]
    BigEndian {
        /// The header's flags.
        flags: u64,
    },
    /// The kernel does not fit in RAM where it must go.
    #[error("the kernel does not fit in guest RAM")]
    Placement(#[from] layout::LayoutError),
    /// Reading the image failed.
    #[error("reading the kernel image failed")]
    Read(#[source] std::io::Error),
    /// Copying into guest RAM failed (a short file or a RAM hole).
    #[error("copying the kernel into guest memory at {addr:#x} failed")]
    Copy {
        /// Where it was going.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl ImageHeader {
    /// Reads the header from the first bytes of an image.
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        let header: &[u8; HEADER_SIZE] = bytes
            .get(..HEADER_SIZE)
            .and_then(|h| h.try_into().ok())
            .ok_or(ImageError::Truncated {
            len: bytes.len() as u64,
        })?;
        let u64_at = |at: usize| {
            let mut word = [0; 8];
            word.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let magic = u32::from_le_bytes([header[56], header[57], header[58], header[59]]);
        if magic != MAGIC {
            return Err(ImageError::BadMagic { found: magic });
        }
        let flags = u64_at(24);
        if flags & FLAG_BIG_ENDIAN != 0 {
            return Err(ImageError::BigEndian { flags });
        }
        let image_size = u64_at(16);
        // booting.rst: with image_size 0, text_offset is 0x80000 whatever the field says.
        let text_offset = if image_size == 0 {
            LEGACY_TEXT_OFFSET
        } else {
            u64_at(8)
        };
        Ok(ImageHeader {
            text_offset,
            image_size,
            flags,
        })
    }

    /// The footprint to reserve for a file of `file_len` bytes: `image_size`, or the file
    /// itself for old kernels that do not say.
    pub fn footprint(&self, file_len: u64) -> u64 {
        self.image_size.max(file_len)
    }
}

/// Where an image was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    /// The header.
    pub header: ImageHeader,
    /// Load address and entry point (PC at boot).
    pub entry: u64,
    /// One past the kernel's footprint; boot data must go above it.
    pub end: u64,
}

/// Copies the `len`-byte image read from `src` into `mem` at [`layout::RAM_START`] plus its
/// `text_offset`, checking that the kernel's whole footprint lies inside `ram_size` bytes of RAM.
pub fn load<R: Read + ReadVolatile>(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    src: &mut R,
    len: u64,
) -> Result<LoadedImage, ImageError> {
    let mut head = [0u8; HEADER_SIZE];
    if len < HEADER_SIZE as u64 {
        return Err(ImageError::Truncated { len });
    }
    src.read_exact(&mut head).map_err(ImageError::Read)?;
    let header = ImageHeader::parse(&head)?;
    let placement = layout::place_boot(ram_size, header.text_offset, header.footprint(len), None)?;

    let entry = placement.kernel;
    let copy_err = |addr| move |source| ImageError::Copy { addr, source };
    mem.write_slice(&head, GuestAddress(entry))
        .map_err(copy_err(entry))?;
    let rest_at = entry + HEADER_SIZE as u64;
    let rest =
        usize::try_from(len - HEADER_SIZE as u64).map_err(|_| ImageError::Truncated { len })?;
    mem.read_exact_volatile_from(GuestAddress(rest_at), src, rest)
        .map_err(copy_err(rest_at))?;
    Ok(LoadedImage {
        header,
        entry,
        end: placement.kernel_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::layout::RAM_START;

    const MIB: u64 = 1 << 20;

    /// A synthetic image: a header with the given fields followed by `body`.
    fn image(text_offset: u64, image_size: u64, flags: u64, magic: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_SIZE];
        // code0: a branch over the header, as real kernels have.
        bytes[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes());
        bytes[8..16].copy_from_slice(&text_offset.to_le_bytes());
        bytes[16..24].copy_from_slice(&image_size.to_le_bytes());
        bytes[24..32].copy_from_slice(&flags.to_le_bytes());
        bytes[56..60].copy_from_slice(&magic.to_le_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    fn ram(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM_START), (mib * MIB) as usize)]).unwrap()
    }

    #[test]
    fn header_fields_are_little_endian() {
        let header = ImageHeader::parse(&image(0, 0x1234_0000, 0xa, MAGIC, &[])).unwrap();
        assert_eq!(
            header,
            ImageHeader {
                text_offset: 0,
                image_size: 0x1234_0000,
                flags: 0xa
            }
        );
        assert_eq!(header.footprint(100), 0x1234_0000);
    }

    #[test]
    fn old_kernels_without_image_size_get_the_legacy_text_offset() {
        let header = ImageHeader::parse(&image(0x1234, 0, 0, MAGIC, &[])).unwrap();
        assert_eq!(header.text_offset, 0x8_0000);
        assert_eq!(header.footprint(5 * MIB), 5 * MIB);
    }

    #[test]
    fn wrong_images_are_refused_by_kind() {
        let short = ImageHeader::parse(&[0u8; 63]).unwrap_err();
        assert!(
            matches!(short, ImageError::Truncated { len: 63 }),
            "{short}"
        );
        let elf = image(0, MIB, 0, u32::from_le_bytes(*b"\x7fELF"), &[]);
        let err = ImageHeader::parse(&elf).unwrap_err();
        assert!(
            matches!(err, ImageError::BadMagic { found: 0x464c_457f }),
            "{err}"
        );
        assert!(err.to_string().contains("0x464c457f"), "{err}");
        let big = ImageHeader::parse(&image(0, MIB, 1, MAGIC, &[])).unwrap_err();
        assert!(matches!(big, ImageError::BigEndian { flags: 1 }), "{big}");
    }

    #[test]
    fn load_copies_the_image_to_ram_start_plus_text_offset() {
        let body: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let bytes = image(0, 2 * MIB, 0, MAGIC, &body);
        let mem = ram(16);
        let loaded = load(&mem, 16 * MIB, &mut bytes.as_slice(), bytes.len() as u64).unwrap();
        assert_eq!(loaded.entry, RAM_START);
        assert_eq!(loaded.end, RAM_START + 2 * MIB);
        let mut back = vec![0u8; bytes.len()];
        mem.read_slice(&mut back, GuestAddress(RAM_START)).unwrap();
        assert_eq!(back, bytes);
    }

    #[test]
    fn load_honours_text_offset() {
        let bytes = image(0x8_0000, 2 * MIB, 0, MAGIC, b"kernel text");
        let mem = ram(16);
        let loaded = load(&mem, 16 * MIB, &mut bytes.as_slice(), bytes.len() as u64).unwrap();
        assert_eq!(loaded.entry, RAM_START + 0x8_0000);
        assert_eq!(loaded.end, RAM_START + 0x8_0000 + 2 * MIB);
        let mut text = [0u8; 11];
        mem.read_slice(&mut text, GuestAddress(loaded.entry + HEADER_SIZE as u64))
            .unwrap();
        assert_eq!(&text, b"kernel text");
    }

    #[test]
    fn load_refuses_what_does_not_fit_or_is_cut_short() {
        let mem = ram(16);
        // image_size beyond RAM (less the 2 MiB kept for the device tree).
        let big = image(0, 15 * MIB, 0, MAGIC, &[]);
        let err = load(&mem, 16 * MIB, &mut big.as_slice(), big.len() as u64).unwrap_err();
        assert!(matches!(err, ImageError::Placement(_)), "{err}");
        // The caller's length promises more than the source holds.
        let cut = image(0, MIB, 0, MAGIC, &[1, 2, 3]);
        let err = load(&mem, 16 * MIB, &mut cut.as_slice(), cut.len() as u64 + 100).unwrap_err();
        assert!(matches!(err, ImageError::Copy { .. }), "{err}");
        let err = load(&mem, 16 * MIB, &mut &cut[..10], 10).unwrap_err();
        assert!(matches!(err, ImageError::Truncated { len: 10 }), "{err}");
        let gz = [0x1f, 0x8b, 8, 0].repeat(32);
        let err = load(&mem, 16 * MIB, &mut gz.as_slice(), gz.len() as u64).unwrap_err();
        assert!(matches!(err, ImageError::BadMagic { .. }), "{err}");
    }
}
