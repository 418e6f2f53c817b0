//! A vsock device in its event loop, with rx and tx rings in guest memory that the caller fills
//! by hand (virtio-queue's mock rings): the guest's side of the device without a guest. Shared by
//! the unit tests (`vsock.rs`) and the device benchmark (`examples/bench-devices.rs`), which both
//! include this file and provide the device types in the parent module.
// Each includer uses its own subset.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
// Spelled out, not `crate::vstate::memory::GuestMemoryMmap`: the device benchmark includes this file too.
type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, IrqLine, PacketHeader, VirtioDevice, Vsock, HEADER_LEN, VIRTIO_F_VERSION_1,
};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const RIG_QUEUE_SIZE: u16 = 256;
const RX_BUF: u64 = 0x100_0000;
/// Past the last rx buffer (256 of them from 16 MiB end at about 32.01 MiB).
const TX_BUF: u64 = 0x210_0000;
/// Room for a header and a 64 KiB payload, the most the device sends in one packet.
pub const RIG_BUF_LEN: u32 = (HEADER_LEN as u32) + (64 << 10);
/// Guest memory the rig needs: rings below 16 MiB, rx buffers from 16 MiB, tx from 33 MiB.
pub const RIG_MEM_SIZE: usize = 64 << 20;
/// How long `receive` waits before it gives up (a test must fail, not hang).
const RECEIVE_LIMIT: Duration = Duration::from_secs(20);

/// One descriptor, not chained.
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// A header from guest `cid` port `src_port` to host port `dst_port`, advertising 1 MiB of
/// receive buffer.
pub fn guest_header(cid: u64, src_port: u32, dst_port: u32, op: u16, len: u32) -> PacketHeader {
    PacketHeader {
        src_cid: cid,
        dst_cid: 2,
        src_port,
        dst_port,
        len,
        type_: 1,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

pub struct VsockRig<'a> {
    mem: &'a GuestMemoryMmap,
    pub vsock: Arc<Mutex<Vsock>>,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_evt: EventFd,
    tx_evt: EventFd,
    em: EventManager<Arc<Mutex<Vsock>>>,
    rx_slot: u16,
    tx_slot: u16,
    rx_seen: u16,
}

impl<'a> VsockRig<'a> {
    /// Activates `vsock` on fresh rings in `mem` (at least [`RIG_MEM_SIZE`]) and posts 64
    /// receive buffers.
    pub fn new(mem: &'a GuestMemoryMmap, vsock: Vsock) -> Self {
        let (rx_evt, tx_evt) = (
            vsock.queue_events()[0].try_clone().unwrap(),
            vsock.queue_events()[1].try_clone().unwrap(),
        );
        let vsock = Arc::new(Mutex::new(vsock));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(vsock.clone());
        let mut rig = VsockRig {
            mem,
            vsock,
            rx: MockSplitQueue::create(mem, GuestAddress(0), RIG_QUEUE_SIZE),
            tx: MockSplitQueue::create(mem, GuestAddress(0x40000), RIG_QUEUE_SIZE),
            rx_evt,
            tx_evt,
            em,
            rx_slot: 0,
            tx_slot: 0,
            rx_seen: 0,
        };
        rig.reset_rings();
        rig
    }

    /// Fresh rings (the mock ring helper does not wrap); the device keeps its connections across
    /// re-activation.
    pub fn reset_rings(&mut self) {
        self.rx = MockSplitQueue::create(self.mem, GuestAddress(0), RIG_QUEUE_SIZE);
        self.tx = MockSplitQueue::create(self.mem, GuestAddress(0x40000), RIG_QUEUE_SIZE);
        let evq = MockSplitQueue::create(self.mem, GuestAddress(0x80000), RIG_QUEUE_SIZE);
        self.vsock
            .lock()
            .unwrap()
            .activate(Activation {
                mem: self.mem.clone(),
                queues: vec![
                    self.rx.create_queue::<Queue>().unwrap(),
                    self.tx.create_queue::<Queue>().unwrap(),
                    evq.create_queue::<Queue>().unwrap(),
                ],
                irq: Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
                acked_features: VIRTIO_F_VERSION_1,
            })
            .unwrap();
        self.rx_slot = 0;
        self.tx_slot = 0;
        self.rx_seen = 0;
        self.post_rx(64);
    }

    /// Ring slots used so far; call [`reset_rings`](Self::reset_rings) before either reaches
    /// [`RIG_QUEUE_SIZE`].
    pub fn slots_used(&self) -> (u16, u16) {
        (self.rx_slot, self.tx_slot)
    }

    pub fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let slot = self.rx_slot % RIG_QUEUE_SIZE;
            let addr = RX_BUF + u64::from(slot) * u64::from(RIG_BUF_LEN);
            self.rx
                .add_desc_chains(&[desc(addr, RIG_BUF_LEN, F_WRITE)], slot)
                .unwrap();
            self.rx_slot = self.rx_slot.wrapping_add(1);
        }
        self.rx_evt.write(1).unwrap();
    }

    /// Puts one packet on the tx ring (a header descriptor and a payload descriptor) and kicks.
    pub fn send(&mut self, h: PacketHeader, payload: &[u8]) {
        let slot = (self.tx_slot % (RIG_QUEUE_SIZE / 2)) * 2;
        let base = TX_BUF + u64::from(slot) * u64::from(RIG_BUF_LEN);
        self.mem.write_obj(h, GuestAddress(base)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(base + HEADER_LEN as u64))
            .unwrap();
        let chain = [
            RawDescriptor::from(Descriptor::new(base, HEADER_LEN as u32, F_NEXT, slot + 1)),
            desc(base + HEADER_LEN as u64, payload.len().max(1) as u32, 0),
        ];
        self.tx.add_desc_chains(&chain, slot).unwrap();
        self.tx_slot = self.tx_slot.wrapping_add(1);
        self.tx_evt.write(1).unwrap();
    }

    /// Runs the loop until the device has taken every packet sent so far.
    pub fn flush_tx(&mut self) {
        while self.tx.used().idx().load() != self.tx_slot {
            self.em.run_with_timeout(100).unwrap();
        }
    }

    /// Runs the event loop once (host socket events), waiting up to `ms`.
    pub fn run_once(&mut self, ms: i32) {
        self.em.run_with_timeout(ms).unwrap();
    }

    /// Packets the device has put in the rx ring so far, with their payloads; gives each buffer
    /// back.
    pub fn take_received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut out = Vec::new();
        let used = self.rx.used().idx().load();
        while self.rx_seen != used {
            let e = (self.rx.used().ring())
                .ref_at(usize::from(self.rx_seen % RIG_QUEUE_SIZE))
                .unwrap()
                .load();
            let addr = RX_BUF + u64::from(e.id() as u16) * u64::from(RIG_BUF_LEN);
            let h: PacketHeader = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let len = (h.len as usize).min(e.len() as usize - HEADER_LEN.min(e.len() as usize));
            let mut payload = vec![0u8; len];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HEADER_LEN as u64))
                .unwrap();
            out.push((h, payload));
            self.rx_seen = self.rx_seen.wrapping_add(1);
            self.post_rx(1);
        }
        out
    }

    /// Runs the loop until the guest has received `n` more packets; panics after 20 s.
    pub fn receive(&mut self, n: usize) -> Vec<(PacketHeader, Vec<u8>)> {
        let deadline = Instant::now() + RECEIVE_LIMIT;
        let mut out = self.take_received();
        while out.len() < n {
            assert!(
                Instant::now() < deadline,
                "the device sent {} of {n} packets within {RECEIVE_LIMIT:?}",
                out.len()
            );
            self.em.run_with_timeout(100).unwrap();
            out.extend(self.take_received());
        }
        out
    }
}
