//! Loading a guest kernel (ELF `vmlinux` or `bzImage`) and initrd, and writing the Linux zero page
//! with its e820 map and command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::vstate::memory::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" boot header)")]
    NotAKernel(String),
    #[error("{0} is an ELF file but not a 64-bit x86 kernel")]
    WrongElf(String),
    #[error("cannot load kernel {path} into guest memory: {source}")]
    Load {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig { path: String, size: u64 },
    #[error("cannot read initrd {path}: {reason}")]
    InitrdRead { path: String, reason: String },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write the zero page: {0}")]
    ZeroPage(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const ELF_CLASS_64: u8 = 2;
const ELF_MACHINE_X86_64: u16 = 62;
/// The 64-bit entry point sits 0x200 bytes into a bzImage's protected-mode payload.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 4096;

/// Tells an ELF `vmlinux` from a `bzImage` by their magic numbers, so a wrong file is refused with
/// a clear message before any guest memory is touched.
pub fn detect_format(file: &mut File, path: &str) -> Result<KernelFormat, BootError> {
    let read_at = |file: &mut File, offset: u64, buf: &mut [u8]| -> bool {
        file.seek(SeekFrom::Start(offset)).is_ok() && file.read_exact(buf).is_ok()
    };
    let mut head = [0u8; 20];
    if read_at(file, 0, &mut head) && &head[..4] == ELF_MAGIC {
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if head[4] != ELF_CLASS_64 || machine != ELF_MACHINE_X86_64 {
            return Err(BootError::WrongElf(path.to_string()));
        }
        return Ok(KernelFormat::Elf);
    }
    let mut magic = [0u8; 4];
    if read_at(file, BZIMAGE_MAGIC_OFFSET, &mut magic) && &magic == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel(path.to_string()))
}

/// Opens a kernel image and checks its format, without loading it.
pub fn check_kernel_file(path: &Path) -> Result<KernelFormat, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::Open {
        what: "kernel image",
        path: shown.clone(),
        source,
    })?;
    detect_format(&mut file, &shown)
}

#[derive(Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// Where the vCPU starts: the ELF entry, or the bzImage's 64-bit entry.
    pub entry: GuestAddress,
    pub kernel_end: u64,
    pub setup_header: Option<setup_header>,
}

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::Open {
        what: "kernel image",
        path: shown.clone(),
        source,
    })?;
    let format = detect_format(&mut file, &shown)?;
    let load_err = |source| BootError::Load {
        path: shown.clone(),
        source,
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            // linux-loader skips segments with no file bytes (.bss): the kernel's memory ends
            // where its last segment's memory ends, which nothing else may overlap.
            let memsz_end = elf_memory_end(&mut file).unwrap_or(0);
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load,
                kernel_end: r.kernel_end.max(memsz_end),
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            // The kernel decompresses and runs within init_size bytes of where it was loaded.
            let init_end = r
                .setup_header
                .map(|h| r.kernel_load.0 + u64::from(h.init_size))
                .unwrap_or(0);
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                kernel_end: r.kernel_end.max(init_end),
                setup_header: r.setup_header,
            })
        }
    }
}

const ELF_PT_LOAD: u32 = 1;
/// More program headers than any kernel has; a bound so a hostile file cannot make us loop long.
const ELF_MAX_PHDRS: u16 = 256;

/// One past the highest physical address any PT_LOAD segment occupies in memory (file bytes and
/// zero-filled tail alike), or None if the headers cannot be read.
pub fn elf_memory_end<R: Read + Seek>(file: &mut R) -> Option<u64> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut ehdr).ok()?;
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().ok()?);
    let phentsize = u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]);
    let phnum = u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]).min(ELF_MAX_PHDRS);
    if phentsize < 0x30 {
        return None;
    }
    let mut end = 0u64;
    for i in 0..u64::from(phnum) {
        let mut phdr = [0u8; 0x30];
        file.seek(SeekFrom::Start(
            phoff.checked_add(i.checked_mul(u64::from(phentsize))?)?,
        ))
        .ok()?;
        file.read_exact(&mut phdr).ok()?;
        if u32::from_le_bytes(phdr[0..4].try_into().ok()?) != ELF_PT_LOAD {
            continue;
        }
        let paddr = u64::from_le_bytes(phdr[0x18..0x20].try_into().ok()?);
        let memsz = u64::from_le_bytes(phdr[0x28..0x30].try_into().ok()?);
        end = end.max(paddr.saturating_add(memsz));
    }
    Some(end)
}

/// Where an initrd of `size` bytes goes: the highest page-aligned spot in low RAM, which must lie
/// above the kernel.
pub fn initrd_address(mem_size: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let lowmem_end = mem_size.min(MMIO_MEM_START);
    let addr = lowmem_end.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end && addr >= HIMEM_START).then_some(addr)
}

/// Loads the initrd and returns its guest address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::Open {
        what: "initrd",
        path: shown.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|e| BootError::InitrdRead {
            path: shown.clone(),
            reason: e.to_string(),
        })?
        .len();
    let addr = initrd_address(mem_size, kernel_end, size).ok_or(BootError::InitrdTooBig {
        path: shown.clone(),
        size,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::InitrdRead {
            path: shown,
            reason: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Parses the user's boot arguments into a command line bounded by Linux's size.
pub fn build_cmdline(boot_args: &str) -> Result<Cmdline, BootError> {
    Cmdline::try_from(boot_args, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))
}

/// The e820 map for `mem_size` bytes of RAM: low RAM below the EBDA, then RAM from 1 MiB, split
/// around the 32-bit MMIO hole. It matches the memory regions given to KVM exactly.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, kind| boot_e820_entry {
        addr,
        size,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let end = mem_size.min(MMIO_MEM_START);
    if end > HIMEM_START {
        map.push(entry(HIMEM_START, end - HIMEM_START, E820_RAM));
    }
    if mem_size > MMIO_MEM_START {
        map.push(entry(
            FIRST_ADDR_PAST_32BITS,
            mem_size - MMIO_MEM_START,
            E820_RAM,
        ));
    }
    map
}

/// Builds the zero page (`boot_params`).
pub fn zero_page(
    mem_size: u64,
    cmdline_len: usize,
    setup: Option<setup_header>,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = setup {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params
}

/// Writes the command line and the zero page into guest memory.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &Cmdline,
    setup: Option<setup_header>,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    let params = zero_page(mem_size, len, setup, initrd);
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::ZeroPage(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("airlock-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn e820_matches_memory_given() {
        // boot_e820_entry is packed: copy fields out before comparing.
        let fields = |map: &[boot_e820_entry]| -> Vec<(u64, u64, u32)> {
            map.iter()
                .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
                .collect()
        };
        let small = fields(&e820_map(128 << 20));
        assert_eq!(
            small,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        let big = fields(&e820_map(6 << 30));
        let ram: u64 = big.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (6 << 30) - (HIMEM_START - EBDA_START));
        // Each KVM memory region ends where an e820 RAM entry ends.
        for (region, entry) in ram_regions(6 << 30).iter().zip([big[2], big[3]]) {
            assert_eq!(region.0 + region.1, entry.0 + entry.1);
        }
        assert_eq!(big[3].0, FIRST_ADDR_PAST_32BITS);
    }

    #[test]
    fn zero_page_points_at_cmdline_and_initrd() {
        let p = zero_page(256 << 20, 12, None, Some((0x800_0000, 4096)));
        let hdr = p.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ hdr.ramdisk_size }, 4096);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn bzimage_header_is_kept() {
        let setup = setup_header {
            version: 0x20f,
            loadflags: 1,
            ..Default::default()
        };
        let p = zero_page(64 << 20, 0, Some(setup), None);
        let hdr = p.hdr;
        assert_eq!({ hdr.version }, 0x20f);
        assert_eq!({ hdr.type_of_loader }, 0xff);
    }

    #[test]
    fn initrd_goes_high_but_above_kernel() {
        assert_eq!(
            initrd_address(64 << 20, 0x20_0000, 4096),
            Some((64 << 20) - 4096)
        );
        assert_eq!(
            initrd_address(64 << 20, 0x20_0000, 4097),
            Some((64 << 20) - 8192)
        );
        assert_eq!(initrd_address(8 << 20, 0x70_0000, 2 << 20), None);
        assert_eq!(initrd_address(1 << 20, 0, 2 << 20), None);
        assert_eq!(
            initrd_address(8 << 30, 0x20_0000, 4096),
            Some(MMIO_MEM_START - 4096)
        );
    }

    #[test]
    fn detects_formats_and_refuses_other_files() {
        let text = temp_file("text", b"this is not a kernel, just some text in a file");
        let err = check_kernel_file(&text).unwrap_err().to_string();
        assert!(
            err.contains("neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = temp_file("bz", &bz);
        assert_eq!(check_kernel_file(&bz).unwrap(), KernelFormat::BzImage);
        let mut elf32 = vec![0u8; 64];
        elf32[..4].copy_from_slice(ELF_MAGIC);
        elf32[4] = 1;
        let elf32 = temp_file("elf32", &elf32);
        assert!(check_kernel_file(&elf32)
            .unwrap_err()
            .to_string()
            .contains("not a 64-bit x86 kernel"));
        let missing = check_kernel_file(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(missing
            .to_string()
            .contains("cannot open kernel image /nonexistent/vmlinux"));
        for p in [text, bz, elf32] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn truncated_elf_is_a_load_error_not_a_panic() {
        let mut elf = [0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = ELF_CLASS_64;
        elf[18] = ELF_MACHINE_X86_64 as u8;
        let path = temp_file("trunc-elf", &elf[..40]);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let err = load_kernel(&mem, &path).unwrap_err().to_string();
        assert!(err.contains("cannot load kernel"), "{err}");
        let _ = std::fs::remove_file(path);
    }

    fn elf_with_segments(segments: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56 * segments.len()];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = ELF_CLASS_64;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (kind, paddr, memsz)) in segments.iter().enumerate() {
            let ph = 64 + 56 * i;
            elf[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            elf[ph + 0x18..ph + 0x20].copy_from_slice(&paddr.to_le_bytes());
            elf[ph + 0x28..ph + 0x30].copy_from_slice(&memsz.to_le_bytes());
        }
        elf
    }

    #[test]
    fn elf_memory_end_counts_bss_only_segments() {
        let elf = elf_with_segments(&[
            (1, 0x10_0000, 0x1000),
            (4, 0x90_0000, 0x1000),
            (1, 0x20_0000, 0x15_e000),
        ]);
        let end = elf_memory_end(&mut std::io::Cursor::new(elf)).unwrap();
        assert_eq!(end, 0x35_e000);
        let mut bad = elf_with_segments(&[(1, u64::MAX, 2)]);
        assert_eq!(
            elf_memory_end(&mut std::io::Cursor::new(bad.clone())),
            Some(u64::MAX)
        );
        bad.truncate(70);
        assert_eq!(elf_memory_end(&mut std::io::Cursor::new(bad)), None);
    }

    #[test]
    fn cmdline_and_zero_page_land_in_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let cmdline = build_cmdline("console=ttyS0 probe=boot").unwrap();
        write_boot_params(&mem, 4 << 20, &cmdline, None, None).unwrap();
        let mut buf = [0u8; 25];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf[..24], b"console=ttyS0 probe=boot");
        assert_eq!(buf[24], 0);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(entries, 3);
        assert!(build_cmdline(&"x".repeat(5000)).is_err());
    }
}
