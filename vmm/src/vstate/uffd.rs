//! userfaultfd, for restoring guest memory lazily: pages the guest (or KVM on its behalf) touches
//! are read from the snapshot's memory file on first access, by a handler thread in the VMM.
//!
//! The kernel ABI is five ioctls on plain structs (linux/userfaultfd.h); it is defined here rather
//! than through a -sys crate, whose build would need libclang and a musl C toolchain.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

const UFFD_API: u64 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
// _IOWR(0xAA, nr, size): (3 << 30) | (size << 16) | (0xAA << 8) | nr
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
// _IO(0xAA, 0x00), on /dev/userfaultfd
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault, the address sits at offset 16.
const UFFD_MSG_SIZE: usize = 32;

pub const PAGE_SIZE: u64 = 4096;

fn ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request number here is paired with the struct the kernel expects for it, and
    // `arg` is a live, writable instance of that struct.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A userfaultfd with the API handshake done.
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    pub fn new() -> io::Result<Userfaultfd> {
        // Faults raised by KVM on the guest's behalf come from kernel mode, so the fd must not be
        // user-mode-only: the syscall needs privilege (or vm.unprivileged_userfaultfd), and
        // /dev/userfaultfd (created by the jailer) is the unprivileged way in.
        // SAFETY: userfaultfd takes flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as i32;
        let fd = if raw >= 0 {
            // SAFETY: a fresh fd that we own.
            unsafe { OwnedFd::from_raw_fd(raw) }
        } else {
            let dev = File::open("/dev/userfaultfd").map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "userfaultfd is not available (syscall refused, /dev/userfaultfd: {e})"
                    ),
                )
            })?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags and returns the fd or -1.
            let raw =
                unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd that we own.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        ioctl(&fd, UFFDIO_API, &mut api)?;
        Ok(Userfaultfd { fd })
    }

    /// Routes missing-page faults in [start, start+len) to this fd.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ..Default::default()
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut reg)
    }

    /// Blocks for the next page fault; returns the faulting address.
    pub fn next_fault(&self) -> io::Result<Option<u64>> {
        let mut msg = [0u8; UFFD_MSG_SIZE];
        // SAFETY: reading into our own buffer of the message's size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), UFFD_MSG_SIZE) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(err);
        }
        if n as usize != UFFD_MSG_SIZE || msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        Ok(Some(u64::from_le_bytes(
            msg[16..24].try_into().expect("8 bytes"),
        )))
    }

    /// Copies `data` into the missing pages at `dst`. EEXIST (already populated, e.g. by the
    /// prefetcher) is success.
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<()> {
        let mut copy = UffdioCopy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            ..Default::default()
        };
        match ioctl(&self.fd, UFFDIO_COPY, &mut copy) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Maps zero pages at [dst, dst+len). EEXIST is success.
    pub fn zero(&self, dst: u64, len: u64) -> io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            ..Default::default()
        };
        match ioctl(&self.fd, UFFDIO_ZEROPAGE, &mut z) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }
}

/// One guest memory region as the handler sees it: host address, length, offset in the file.
#[derive(Debug, Clone, Copy)]
pub struct FaultRegion {
    pub host_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Serves one fault: the page's bytes from the file, or a zero page where the file has zeros.
pub fn serve_page(
    uffd: &Userfaultfd,
    file: &File,
    regions: &[FaultRegion],
    addr: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let page = addr & !(PAGE_SIZE - 1);
    let region = regions
        .iter()
        .find(|r| page >= r.host_addr && page < r.host_addr + r.len)
        .ok_or_else(|| io::Error::other(format!("fault at {addr:#x} is outside guest memory")))?;
    let offset = region.file_offset + (page - region.host_addr);
    let buf = &mut buf[..PAGE_SIZE as usize];
    file.read_exact_at(buf, offset)?;
    if buf.iter().all(|&b| b == 0) {
        uffd.zero(page, PAGE_SIZE)
    } else {
        uffd.copy(page, buf)
    }
}

/// Populates a whole region in 2 MiB steps (the prefetcher), racing the fault handler harmlessly.
pub fn populate_region(uffd: &Userfaultfd, file: &File, region: FaultRegion) -> io::Result<()> {
    const CHUNK: u64 = 2 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut done = 0;
    while done < region.len {
        let len = CHUNK.min(region.len - done);
        let chunk = &mut buf[..len as usize];
        file.read_exact_at(chunk, region.file_offset + done)?;
        // Page by page: a chunk with one page already present fails whole with EEXIST.
        for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
            let dst = region.host_addr + done + i as u64 * PAGE_SIZE;
            if page.iter().all(|&b| b == 0) {
                uffd.zero(dst, PAGE_SIZE)?;
            } else {
                uffd.copy(dst, page)?;
            }
        }
        done += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        let iowr = |nr: u64, size: usize| (3u64 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr;
        assert_eq!(UFFDIO_API, iowr(0x3f, std::mem::size_of::<UffdioApi>()));
        assert_eq!(
            UFFDIO_REGISTER,
            iowr(0x00, std::mem::size_of::<UffdioRegister>())
        );
        assert_eq!(UFFDIO_COPY, iowr(0x03, std::mem::size_of::<UffdioCopy>()));
        assert_eq!(
            UFFDIO_ZEROPAGE,
            iowr(0x04, std::mem::size_of::<UffdioZeropage>())
        );
    }

    #[test]
    fn faults_are_served_from_the_file() {
        // Needs root or /dev/userfaultfd; the development hosts and CI run as root.
        let uffd = match Userfaultfd::new() {
            Ok(u) => u,
            Err(e) => panic!("userfaultfd unavailable on this host: {e}"),
        };
        let path = std::env::temp_dir().join(format!("airlock-uffd-{}", std::process::id()));
        let mut content = vec![0u8; 4 * PAGE_SIZE as usize];
        content[PAGE_SIZE as usize..PAGE_SIZE as usize + 5].copy_from_slice(b"hello");
        std::fs::write(&path, &content).unwrap();
        let file = File::open(&path).unwrap();
        let len = content.len();
        // SAFETY: a fresh anonymous private mapping that only this test uses.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        uffd.register(addr, len as u64).unwrap();
        let regions = [FaultRegion {
            host_addr: addr,
            len: len as u64,
            file_offset: 0,
        }];
        // Populate directly (no second thread needed): the pages are then present.
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        serve_page(&uffd, &file, &regions, addr + PAGE_SIZE + 3, &mut buf).unwrap();
        populate_region(&uffd, &file, regions[0]).unwrap();
        // SAFETY: reading the mapping we populated above.
        let got = unsafe { std::slice::from_raw_parts((addr + PAGE_SIZE) as *const u8, 5) };
        assert_eq!(got, b"hello");
        assert!(serve_page(&uffd, &file, &regions, addr + 10 * PAGE_SIZE, &mut buf).is_err());
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(addr as *mut _, len) };
        let _ = std::fs::remove_file(path);
    }
}
