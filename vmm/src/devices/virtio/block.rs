//! virtio-blk over a raw image file: read, write (unless read-only), flush and GET_ID. Every
//! request is bounds-checked against the disk and every buffer against guest memory (by
//! virtio-queue's Reader/Writer), so a hostile driver gets IOERR or a dropped request.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::vstate::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    drain_queue, read_config_bytes, Activation, Chain, SingleQueue, VirtioDevice, INT_USED_RING,
    QUEUE_SIZE, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

pub const SECTOR_SIZE: u64 = 512;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
pub const ID_BYTES: usize = 20;
/// Data is moved through a bounce buffer of this size, so no request holds much memory.
const IO_CHUNK: usize = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open drive {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("drive {path} is {len} bytes, not a whole number of 512-byte sectors")]
    NotSectorAligned { path: String, len: u64 },
    #[error("cannot create the drive's queue eventfd: {0}")]
    EventFd(std::io::Error),
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain integers in a repr(C) struct with no padding.
unsafe impl ByteValued for RequestHeader {}

pub struct Block {
    path: String,
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_BYTES],
    config: [u8; 8],
    queue_evts: [EventFd; 1],
    active: Option<SingleQueue>,
}

impl Block {
    pub fn new(drive_id: &str, path: &str, read_only: bool) -> Result<Block, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_string(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: path.to_string(),
                source,
            })?
            .len();
        if len % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorAligned {
                path: path.to_string(),
                len,
            });
        }
        let sectors = len / SECTOR_SIZE;
        let mut id = [0u8; ID_BYTES];
        let n = drive_id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&drive_id.as_bytes()[..n]);
        Ok(Block {
            path: path.to_string(),
            file,
            read_only,
            sectors,
            id,
            config: sectors.to_le_bytes(),
            queue_evts: [EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            active: None,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Byte offset and length of a data transfer, if it lies within the disk.
    fn disk_range(&self, sector: u64, len: usize) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len as u64)?;
        (end <= self.sectors * SECTOR_SIZE).then_some(offset)
    }

    /// Carries out one request; returns the bytes written to the driver's buffers (data and the
    /// status byte), or None to drop a chain too malformed to answer.
    fn handle(&mut self, chain: Chain<'_>, mem: &GuestMemoryMmap) -> Option<u32> {
        let mut reader = chain.clone().reader(mem).ok()?;
        let mut writer = chain.writer(mem).ok()?;
        let header: RequestHeader = reader.read_obj().ok()?;
        // The status byte is the last device-writable byte.
        let data_len = writer.available_bytes().checked_sub(1)?;
        let mut status_writer = writer.split_at(data_len).ok()?;
        let (status, written) = match header.request_type {
            VIRTIO_BLK_T_IN => match self.disk_range(header.sector, data_len) {
                Some(offset) => match self.read_into(&mut writer, offset, data_len) {
                    Ok(()) => (VIRTIO_BLK_S_OK, data_len),
                    Err(_) => (VIRTIO_BLK_S_IOERR, writer.bytes_written()),
                },
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_OUT => {
                let len = reader.available_bytes();
                match self.disk_range(header.sector, len) {
                    Some(offset) if !self.read_only => {
                        match self.write_from(&mut reader, offset, len) {
                            Ok(()) => (VIRTIO_BLK_S_OK, 0),
                            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                        }
                    }
                    _ => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                let ok = self.read_only || self.file.sync_data().is_ok();
                (
                    if ok {
                        VIRTIO_BLK_S_OK
                    } else {
                        VIRTIO_BLK_S_IOERR
                    },
                    0,
                )
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_len.min(ID_BYTES);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        status_writer.write_all(&[status]).ok()?;
        Some(written as u32 + 1)
    }

    fn read_into(&self, writer: &mut impl Write, offset: u64, len: usize) -> std::io::Result<()> {
        let mut buf = vec![0u8; len.min(IO_CHUNK)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(IO_CHUNK);
            self.file
                .read_exact_at(&mut buf[..n], offset + done as u64)?;
            writer.write_all(&buf[..n])?;
            done += n;
        }
        Ok(())
    }

    fn write_from(&self, reader: &mut impl Read, offset: u64, len: usize) -> std::io::Result<()> {
        let mut buf = vec![0u8; len.min(IO_CHUNK)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(IO_CHUNK);
            reader.read_exact(&mut buf[..n])?;
            self.file.write_all_at(&buf[..n], offset + done as u64)?;
            done += n;
        }
        Ok(())
    }

    pub fn process_queue(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.clone();
        let notify = drain_queue(&mut active.queue, &mem, |chain| {
            self.handle(chain, &mem).unwrap_or(0)
        });
        if notify {
            active.irq.trigger(INT_USED_RING);
        }
        self.active = Some(active);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | ro
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        self.active = Some(SingleQueue::activate(a, "block")?);
        // The work itself happens on the device loop, never on the vCPU that activated us.
        self.kick_queues();
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| std::slice::from_ref(&a.queue))
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            eprintln!(
                "airlock-vmm: block {}: cannot watch its queue: {e:?}",
                self.path
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_evts[0].as_raw_fd() {
            let _ = self.queue_evts[0].read();
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::guest_memory;
    use super::super::IrqLine;
    use super::*;
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const HDR: u64 = 0x10_000;
    const DATA: u64 = 0x20_000;
    const STATUS: u64 = 0x30_000;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn disk(name: &str, sectors: u64, ro: bool) -> (Block, String) {
        let path = std::env::temp_dir()
            .join(format!("airlock-blk-{}-{name}", std::process::id()))
            .display()
            .to_string();
        let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, content).unwrap();
        (Block::new("test-drive", &path, ro).unwrap(), path)
    }

    /// Runs one request (header type/sector, data descriptor) and returns (status, used len).
    fn request(
        blk: &mut Block,
        mem: &GuestMemoryMmap,
        chain: &[RawDescriptor],
        header: RequestHeader,
    ) -> (u8, u32) {
        mem.write_obj(header, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 16);
        vq.build_desc_chain(chain).unwrap();
        blk.activate(Activation {
            mem: mem.clone(),
            queues: vec![vq.create_queue::<Queue>().unwrap()],
            irq: Arc::new(IrqLine::new(EventFd::new(0).unwrap())),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        blk.process_queue();
        let used = vq.used().ring().ref_at(0).unwrap().load();
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
    }

    fn hdr(t: u32, sector: u64) -> RequestHeader {
        RequestHeader {
            request_type: t,
            reserved: 0,
            sector,
        }
    }

    fn rw_chain(len: u32, data_flags: u16) -> Vec<RawDescriptor> {
        vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(DATA, len, data_flags | F_NEXT, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ]
    }

    #[test]
    fn reads_writes_flushes_and_identifies() {
        let mem = guest_memory();
        let (mut blk, path) = disk("rw", 16, false);
        assert_eq!(
            request(
                &mut blk,
                &mem,
                &rw_chain(1024, F_WRITE),
                hdr(VIRTIO_BLK_T_IN, 1)
            ),
            (0, 1025)
        );
        let mut data = [0u8; 4];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(
            data.to_vec(),
            (512..516).map(|i| (i % 251) as u8).collect::<Vec<_>>()
        );
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            request(&mut blk, &mem, &rw_chain(512, 0), hdr(VIRTIO_BLK_T_OUT, 3)),
            (0, 1)
        );
        assert_eq!(
            &std::fs::read(&path).unwrap()[3 * 512..4 * 512],
            &[0xab; 512][..]
        );
        let flush = [desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        assert_eq!(
            request(&mut blk, &mem, &flush, hdr(VIRTIO_BLK_T_FLUSH, 0)).0,
            0
        );
        assert_eq!(
            request(
                &mut blk,
                &mem,
                &rw_chain(20, F_WRITE),
                hdr(VIRTIO_BLK_T_GET_ID, 0)
            ),
            (0, 21)
        );
        let mut id = [0u8; 10];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"test-drive");
        assert_eq!(
            request(&mut blk, &mem, &flush, hdr(99, 0)).0,
            VIRTIO_BLK_S_UNSUPP
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn out_of_range_and_overflowing_sectors_are_ioerr() {
        let mem = guest_memory();
        let (mut blk, path) = disk("range", 4, false);
        assert_eq!(
            request(
                &mut blk,
                &mem,
                &rw_chain(512, F_WRITE),
                hdr(VIRTIO_BLK_T_IN, 4)
            )
            .0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            request(
                &mut blk,
                &mem,
                &rw_chain(1024, F_WRITE),
                hdr(VIRTIO_BLK_T_IN, 3)
            )
            .0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            request(
                &mut blk,
                &mem,
                &rw_chain(512, 0),
                hdr(VIRTIO_BLK_T_OUT, u64::MAX / 256)
            )
            .0,
            VIRTIO_BLK_S_IOERR
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mem = guest_memory();
        let (mut blk, path) = disk("ro", 4, true);
        assert_ne!(blk.avail_features() & VIRTIO_BLK_F_RO, 0);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            request(&mut blk, &mem, &rw_chain(512, 0), hdr(VIRTIO_BLK_T_OUT, 0)).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(std::fs::read(&path).unwrap()[0], 0);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn hostile_chains_are_dropped() {
        let mem = guest_memory();
        let (mut blk, path) = disk("hostile", 4, false);
        let cases: Vec<Vec<RawDescriptor>> = vec![
            // Data buffer far outside guest memory.
            vec![
                desc(HDR, 16, F_NEXT, 1),
                desc(0x7fff_0000_0000, 512, F_WRITE | F_NEXT, 2),
                desc(STATUS, 1, F_WRITE, 0),
            ],
            // Header too short to hold a request.
            vec![desc(HDR, 8, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)],
            // No writable status byte at all.
            vec![desc(HDR, 16, 0, 0)],
            // A length that wraps the address space.
            vec![
                desc(HDR, 16, F_NEXT, 1),
                desc(u64::MAX - 10, 512, F_WRITE | F_NEXT, 2),
                desc(STATUS, 1, F_WRITE, 0),
            ],
        ];
        for chain in cases {
            let (status, len) = request(&mut blk, &mem, &chain, hdr(VIRTIO_BLK_T_IN, 0));
            assert_eq!((status, len), (0xff, 0), "{chain:?}");
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn unaligned_or_missing_images_are_refused() {
        let path = std::env::temp_dir().join(format!("airlock-blk-{}-odd", std::process::id()));
        std::fs::write(&path, [0u8; 700]).unwrap();
        let err = Block::new("d", path.to_str().unwrap(), false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("not a whole number of 512-byte sectors"),
            "{err}"
        );
        let err = Block::new("d", "/nonexistent/disk.img", false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("cannot open drive /nonexistent/disk.img"),
            "{err}"
        );
        let _ = std::fs::remove_file(path);
    }
}
