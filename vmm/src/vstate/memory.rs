//! Guest memory and its backings: a memfd for a cold boot (so a snapshot can copy just what the
//! guest touched), a snapshot's memory file mapped privately (copy-on-write: N restores share its
//! page cache), or anonymous memory that a userfaultfd handler fills from the file on demand.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

/// Guest memory with a dirty bitmap of its own beside KVM's: KVM's dirty log sees only what
/// vCPUs write, while devices write guest memory from the VMM's threads (used rings, received
/// packets, blocks read from disk). A Diff snapshot needs both (see `Vm::dirty_bitmaps`).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
type MmapRegion = vm_memory::MmapRegion<AtomicBitmap>;

use crate::arch::layout::ram_regions;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size guest memory to {size} bytes: {source}")]
    Size { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(String),
    #[error("memory file {path} is {actual} bytes, but the snapshot's guest has {expected} bytes of memory")]
    FileSize {
        path: String,
        actual: u64,
        expected: u64,
    },
    #[error("cannot {what} memory file {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

pub enum Backing {
    /// Shared memfd: holes are pages the guest never touched.
    Memfd(File),
    /// The snapshot's memory file, mapped MAP_PRIVATE.
    PrivateFile(File),
    /// Anonymous MAP_PRIVATE memory populated through userfaultfd.
    Uffd,
}

pub struct GuestMemory {
    pub mem: GuestMemoryMmap,
    pub backing: Backing,
    pub size: u64,
}

/// Each region's offset in a memory file: regions are stored one after another.
fn file_layout(size: u64) -> Vec<(u64, u64, u64)> {
    let mut offset = 0;
    ram_regions(size)
        .into_iter()
        .map(|(start, len)| {
            let entry = (start, len, offset);
            offset += len;
            entry
        })
        .collect()
}

pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"airlock-guest-mem".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own and nothing else holds.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Size { size, source })?;
    let mut ranges = Vec::new();
    for (start, len, offset) in file_layout(size) {
        let file_offset = FileOffset::new(
            file.try_clone()
                .map_err(|e| MemoryError::Map(e.to_string()))?,
            offset,
        );
        ranges.push((GuestAddress(start), len as usize, Some(file_offset)));
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&ranges)
        .map_err(|e| MemoryError::Map(e.to_string()))?;
    Ok(GuestMemory {
        mem,
        backing: Backing::Memfd(file),
        size,
    })
}

fn map_regions(size: u64, file: Option<&File>) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (start, len, offset) in file_layout(size) {
        let (file_offset, flags) = match file {
            Some(f) => (
                Some(FileOffset::new(
                    f.try_clone().map_err(|e| MemoryError::Map(e.to_string()))?,
                    offset,
                )),
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            ),
            None => (
                None,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
        };
        let region = MmapRegion::build(
            file_offset,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| MemoryError::Map("region overflows the address space".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Opens a memory file and checks it holds `size` bytes.
pub fn open_memory_file(path: &str, size: u64) -> Result<File, MemoryError> {
    let file = File::open(path).map_err(|source| MemoryError::Io {
        what: "open",
        path: path.to_string(),
        source,
    })?;
    let actual = file
        .metadata()
        .map_err(|source| MemoryError::Io {
            what: "stat",
            path: path.to_string(),
            source,
        })?
        .len();
    if actual != size {
        return Err(MemoryError::FileSize {
            path: path.to_string(),
            actual,
            expected: size,
        });
    }
    Ok(file)
}

/// The snapshot's memory file mapped copy-on-write: pages are read on demand and shared with
/// every other VM restored from the same file until written.
pub fn map_private_file(file: File, size: u64) -> Result<GuestMemory, MemoryError> {
    let mem = map_regions(size, Some(&file))?;
    Ok(GuestMemory {
        mem,
        backing: Backing::PrivateFile(file),
        size,
    })
}

/// Anonymous memory for the userfaultfd backend; nothing is populated until a fault asks.
pub fn anonymous_for_uffd(size: u64) -> Result<GuestMemory, MemoryError> {
    Ok(GuestMemory {
        mem: map_regions(size, None)?,
        backing: Backing::Uffd,
        size,
    })
}

impl GuestMemory {
    /// (host address, length, offset in the memory file) of each region.
    pub fn host_regions(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .zip(file_layout(self.size))
            .map(|(region, (_, len, offset))| {
                let host = self
                    .mem
                    .get_host_address(region.start_addr())
                    .map(|p| p as u64)
                    .unwrap_or(0);
                (host, len, offset)
            })
            .collect()
    }
}

const PAGE: u64 = 4096;
const COPY_CHUNK: u64 = 2 << 20;

fn io_err<'a>(what: &'static str, path: &'a str) -> impl Fn(std::io::Error) -> MemoryError + 'a {
    move |source| MemoryError::Io {
        what,
        path: path.to_string(),
        source,
    }
}

fn create_sized(path: &str, size: u64) -> Result<File, MemoryError> {
    let file = File::create(path).map_err(io_err("create", path))?;
    file.set_len(size).map_err(io_err("size", path))?;
    Ok(file)
}

/// Writes the pages of `chunk` (guest file offset `offset`) that are not all zero; zero pages
/// stay holes in the sparse output.
fn write_nonzero_pages(
    out: &File,
    chunk: &[u8],
    offset: u64,
    path: &str,
) -> Result<u64, MemoryError> {
    let mut written = 0;
    let mut run_start: Option<usize> = None;
    let pages = chunk.len().div_ceil(PAGE as usize);
    for i in 0..=pages {
        let page = (i < pages)
            .then(|| &chunk[i * PAGE as usize..((i + 1) * PAGE as usize).min(chunk.len())]);
        let nonzero = page.is_some_and(|p| p.iter().any(|&b| b != 0));
        match (nonzero, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(start)) => {
                let bytes = &chunk[start * PAGE as usize..(i * PAGE as usize).min(chunk.len())];
                out.write_all_at(bytes, offset + start as u64 * PAGE)
                    .map_err(io_err("write", path))?;
                written += bytes.len() as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Data ranges of a sparse file (SEEK_DATA/SEEK_HOLE), for copying only what was written.
fn data_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < len {
        // SAFETY: lseek on our own descriptor; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        ranges.push((data as u64, (end.min(len as i64) - data) as u64));
        pos = end;
    }
    ranges
}

/// A full memory file: every page the guest has, as a sparse file of `size` bytes. Returns the
/// bytes actually written.
pub fn write_full(memory: &GuestMemory, path: &str) -> Result<u64, MemoryError> {
    let out = create_sized(path, memory.size)?;
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut written = 0;
    if let Backing::Memfd(memfd) = &memory.backing {
        // Only what the guest touched is allocated in the memfd.
        for (start, len) in data_ranges(memfd, memory.size) {
            let mut done = 0;
            while done < len {
                let n = COPY_CHUNK.min(len - done);
                let chunk = &mut buf[..n as usize];
                memfd
                    .read_exact_at(chunk, start + done)
                    .map_err(io_err("read guest memory for", path))?;
                written += write_nonzero_pages(&out, chunk, start + done, path)?;
                done += n;
            }
        }
    } else {
        for (region, (_, len, offset)) in memory.mem.iter().zip(file_layout(memory.size)) {
            let mut done = 0;
            while done < len {
                let n = COPY_CHUNK.min(len - done);
                let chunk = &mut buf[..n as usize];
                region
                    .read_slice(chunk, MemoryRegionAddress(done))
                    .map_err(|e| MemoryError::Map(e.to_string()))?;
                written += write_nonzero_pages(&out, chunk, offset + done, path)?;
                done += n;
            }
        }
    }
    out.sync_data().map_err(io_err("sync", path))?;
    Ok(written)
}

/// A diff memory file: only the pages set in `bitmaps` (one KVM dirty log per region), written
/// whole (zeros included) so that merging finds them as data.
pub fn write_diff(
    memory: &GuestMemory,
    bitmaps: &[Vec<u64>],
    path: &str,
) -> Result<u64, MemoryError> {
    let out = create_sized(path, memory.size)?;
    let mut page = vec![0u8; PAGE as usize];
    let mut written = 0;
    for ((region, (_, len, offset)), bitmap) in
        memory.mem.iter().zip(file_layout(memory.size)).zip(bitmaps)
    {
        for (word_index, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page_offset = (word_index as u64 * 64 + bit) * PAGE;
                if page_offset >= len {
                    continue;
                }
                region
                    .read_slice(&mut page, MemoryRegionAddress(page_offset))
                    .map_err(|e| MemoryError::Map(e.to_string()))?;
                out.write_all_at(&page, offset + page_offset)
                    .map_err(io_err("write", path))?;
                written += PAGE;
            }
        }
    }
    out.sync_data().map_err(io_err("sync", path))?;
    Ok(written)
}

/// Applies a diff memory file onto its base in place: every data range of the diff overwrites
/// the base at the same offset. Returns the bytes copied.
pub fn merge_diff(base_path: &str, diff_path: &str) -> Result<u64, MemoryError> {
    let diff = File::open(diff_path).map_err(io_err("open", diff_path))?;
    let base = std::fs::OpenOptions::new()
        .write(true)
        .open(base_path)
        .map_err(io_err("open", base_path))?;
    let diff_len = diff.metadata().map_err(io_err("stat", diff_path))?.len();
    let base_len = base.metadata().map_err(io_err("stat", base_path))?.len();
    if diff_len != base_len {
        return Err(MemoryError::FileSize {
            path: diff_path.to_string(),
            actual: diff_len,
            expected: base_len,
        });
    }
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut copied = 0;
    for (start, len) in data_ranges(&diff, diff_len) {
        let mut done = 0;
        while done < len {
            let n = COPY_CHUNK.min(len - done);
            let chunk = &mut buf[..n as usize];
            diff.read_exact_at(chunk, start + done)
                .map_err(io_err("read", diff_path))?;
            base.write_all_at(chunk, start + done)
                .map_err(io_err("write", base_path))?;
            copied += n;
            done += n;
        }
    }
    base.sync_data().map_err(io_err("sync", base_path))?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn temp(name: &str) -> String {
        std::env::temp_dir()
            .join(format!("airlock-mem-{}-{name}", std::process::id()))
            .display()
            .to_string()
    }

    #[test]
    fn guest_writes_are_visible_in_the_memfd() {
        let gm = create_guest_memory(8 << 20).unwrap();
        gm.mem.write_obj(0xfeed_u32, GuestAddress(0x1000)).unwrap();
        let Backing::Memfd(mut f) = gm.backing else {
            panic!("memfd backing")
        };
        let mut buf = [0u8; 4];
        f.seek(SeekFrom::Start(0x1000)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xfeed);
    }

    #[test]
    fn large_guest_is_split_around_the_hole_in_one_file() {
        let gm = create_guest_memory(0xd000_0000 + (2 << 20)).unwrap();
        assert_eq!(gm.mem.num_regions(), 2);
        gm.mem.write_obj(7u8, GuestAddress(1 << 32)).unwrap();
        assert!(gm.mem.write_obj(7u8, GuestAddress(0xd000_0000)).is_err());
        assert_eq!(gm.host_regions()[1].2, 0xd000_0000);
    }

    #[test]
    fn full_file_round_trips_and_stays_sparse() {
        let gm = create_guest_memory(16 << 20).unwrap();
        gm.mem.write_obj(0xabcd_u64, GuestAddress(0x5000)).unwrap();
        gm.mem
            .write_obj(0x1234_u64, GuestAddress(0xf0_0000))
            .unwrap();
        let path = temp("full");
        let written = write_full(&gm, &path).unwrap();
        assert_eq!(written, 2 * PAGE);
        let restored =
            map_private_file(open_memory_file(&path, 16 << 20).unwrap(), 16 << 20).unwrap();
        assert_eq!(
            restored.mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(),
            0xabcd
        );
        assert_eq!(
            restored
                .mem
                .read_obj::<u64>(GuestAddress(0xf0_0000))
                .unwrap(),
            0x1234
        );
        // Copy-on-write: writing the restored guest leaves the file alone.
        restored.mem.write_obj(9u64, GuestAddress(0x5000)).unwrap();
        let again = map_private_file(open_memory_file(&path, 16 << 20).unwrap(), 16 << 20).unwrap();
        assert_eq!(
            again.mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(),
            0xabcd
        );
        // A snapshot of the restored guest reads through the private mapping.
        let path2 = temp("full2");
        write_full(&restored, &path2).unwrap();
        let third =
            map_private_file(open_memory_file(&path2, 16 << 20).unwrap(), 16 << 20).unwrap();
        assert_eq!(third.mem.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 9);
        for p in [path, path2] {
            let _ = std::fs::remove_file(p);
        }
    }

    /// What the VMM writes (a device filling a buffer, a used ring) lands in the memory's own
    /// dirty bitmap, which a Diff snapshot joins with KVM's log of vCPU writes.
    #[test]
    fn vmm_writes_mark_the_dirty_bitmap() {
        let guest = create_guest_memory(8 << 20).unwrap();
        let region = guest.mem.iter().next().unwrap();
        let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
        mapping.bitmap().reset();
        guest
            .mem
            .write_obj(1u64, GuestAddress(3 * 4096 + 8))
            .unwrap();
        guest
            .mem
            .write_slice(&[7u8; 4096], GuestAddress(70 * 4096))
            .unwrap();
        let words = mapping.bitmap().get_and_reset();
        assert_eq!(words[0], 1 << 3);
        assert_eq!(words[1], 1 << (70 - 64));
        assert!(words[2..].iter().all(|w| *w == 0));
        assert!(mapping.bitmap().get_and_reset().iter().all(|w| *w == 0));
    }

    #[test]
    fn diff_merged_onto_base_equals_full() {
        let gm = create_guest_memory(4 << 20).unwrap();
        gm.mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        let (base, diff, full) = (temp("base"), temp("diff"), temp("full3"));
        write_full(&gm, &base).unwrap();
        gm.mem.write_obj(2u64, GuestAddress(0x1000)).unwrap();
        gm.mem.write_obj(0u64, GuestAddress(0x3000)).unwrap();
        gm.mem.write_obj(3u64, GuestAddress(0x20_0000)).unwrap();
        // Pages 1, 3 and 512 dirty.
        let mut bitmap = vec![0u64; (4 << 20) / 4096 / 64];
        bitmap[0] = (1 << 1) | (1 << 3);
        bitmap[8] = 1;
        write_diff(&gm, &[bitmap], &diff).unwrap();
        write_full(&gm, &full).unwrap();
        merge_diff(&base, &diff).unwrap();
        assert_eq!(std::fs::read(&base).unwrap(), std::fs::read(&full).unwrap());
        for p in [base, diff, full] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn wrong_sized_memory_file_is_refused() {
        let path = temp("short");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let err = open_memory_file(&path, 8 << 20).unwrap_err().to_string();
        assert!(
            err.contains("is 4096 bytes, but the snapshot's guest has 8388608"),
            "{err}"
        );
        let _ = std::fs::remove_file(path);
        assert!(open_memory_file("/nonexistent/mem", 1).is_err());
    }
}
