//! Guest memory: one memfd holding all of guest RAM, mapped shared, so that a snapshot can later
//! write or share it as a file.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::ram_regions;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size guest memory to {size} bytes: {source}")]
    Size { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

pub struct GuestMemory {
    pub mem: GuestMemoryMmap,
    pub file: File,
    pub size: u64,
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
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (start, len) in ram_regions(size) {
        let file_offset = FileOffset::new(
            file.try_clone()
                .map_err(|e| MemoryError::Map(e.to_string()))?,
            offset,
        );
        ranges.push((GuestAddress(start), len as usize, Some(file_offset)));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&ranges)
        .map_err(|e| MemoryError::Map(e.to_string()))?;
    Ok(GuestMemory { mem, file, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn guest_writes_are_visible_in_the_file() {
        let mut gm = create_guest_memory(8 << 20).unwrap();
        gm.mem.write_obj(0xfeed_u32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        gm.file.seek(SeekFrom::Start(0x1000)).unwrap();
        gm.file.read_exact(&mut buf).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xfeed);
        assert_eq!(gm.mem.num_regions(), 1);
    }

    #[test]
    fn large_guest_is_split_around_the_hole_in_one_file() {
        let gm = create_guest_memory(0xd000_0000 + (2 << 20)).unwrap();
        assert_eq!(gm.mem.num_regions(), 2);
        gm.mem.write_obj(7u8, GuestAddress(1 << 32)).unwrap();
        assert!(gm.mem.write_obj(7u8, GuestAddress(0xd000_0000)).is_err());
        assert_eq!(gm.file.metadata().unwrap().len(), 0xd000_0000 + (2 << 20));
    }
}
