//! Device benchmark: the VMM's own cost of serving virtio requests, beside the host doing the same
//! work directly. Requests are placed in real split virtqueues in guest memory (virtio-queue's mock
//! rings), and the real device code serves them; no guest runs, because guest code on the nested
//! development hosts runs ~1000x slower than native and would measure the hypervisor, not us.
//!
//! `cargo run --release -p airlock-vmm --example bench-devices`

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use airlock_vmm::devices::virtio::block::Block;
use airlock_vmm::devices::virtio::vsock::{PacketHeader, Vsock, HEADER_LEN};
use airlock_vmm::devices::virtio::{Activation, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QSIZE: u16 = 256;

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

fn irq() -> Arc<IrqLine> {
    Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// Reads (or writes) `total` bytes as requests of `size` bytes at `offsets`, in batches that fit
/// the ring; returns MB/s.
fn block_run(
    mem: &GuestMemoryMmap,
    blk: &mut Block,
    offsets: &[u64],
    size: u32,
    write: bool,
) -> f64 {
    let per_batch = (QSIZE / 3) as usize;
    let data_base = 0x100_0000u64;
    let mut served = 0u64;
    let start = Instant::now();
    for batch in offsets.chunks(per_batch) {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let mut descs = Vec::with_capacity(batch.len() * 3);
        for (i, &off) in batch.iter().enumerate() {
            let hdr = 0x80_0000 + i as u64 * 16;
            let header = [if write { 1u32 } else { 0 }, 0];
            mem.write_obj(header, GuestAddress(hdr)).unwrap();
            mem.write_obj(off / 512, GuestAddress(hdr + 8)).unwrap();
            let data = data_base + (i as u64 % 4) * u64::from(size);
            let data_flags = if write { F_NEXT } else { F_WRITE | F_NEXT };
            descs.push(desc(hdr, 16, F_NEXT));
            descs.push(desc(data, size, data_flags));
            descs.push(desc(0x90_0000 + i as u64, 1, F_WRITE));
        }
        // Fix up the next indices: chains are laid out one after another.
        let descs: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = Descriptor::from(*d);
                let next = if d.flags() & F_NEXT != 0 {
                    i as u16 + 1
                } else {
                    0
                };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), d.flags(), next))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        blk.activate(Activation {
            mem: mem.clone(),
            queues: vec![vq.create_queue::<Queue>().unwrap()],
            irq: irq(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        blk.process_queue();
        served += batch.len() as u64 * u64::from(size);
    }
    mbps(served, start.elapsed().as_secs_f64())
}

fn host_run(file: &std::fs::File, offsets: &[u64], size: usize, write: bool) -> f64 {
    let mut buf = vec![0x5au8; size];
    let start = Instant::now();
    for &off in offsets {
        if write {
            file.write_all_at(&buf, off).unwrap();
        } else {
            file.read_exact_at(&mut buf, off).unwrap();
        }
    }
    mbps(
        offsets.len() as u64 * size as u64,
        start.elapsed().as_secs_f64(),
    )
}

fn bench_block() {
    const DISK: u64 = 256 << 20;
    let path = std::env::temp_dir().join(format!("airlock-bench-disk-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..DISK >> 20 {
        file.write_all_at(&chunk, i << 20).unwrap();
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut blk = Block::new("bench", path.to_str().unwrap(), false).unwrap();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let random: Vec<u64> = (0..65_536)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % (DISK / 4096)) * 4096
        })
        .collect();
    let sequential: Vec<u64> = (0..DISK >> 20).map(|i| i << 20).collect();
    println!(
        "virtio-blk (raw file in the page cache, {} MiB):",
        DISK >> 20
    );
    println!("  {:<34} {:>12} {:>12}", "", "through VMM", "host direct");
    for (name, offsets, size) in [
        ("4 KiB random", &random, 4096u32),
        ("1 MiB sequential", &sequential, 1 << 20),
    ] {
        for write in [false, true] {
            let vmm = block_run(&mem, &mut blk, offsets, size, write);
            let host = host_run(&file, offsets, size as usize, write);
            let op = if write { "write" } else { "read" };
            println!(
                "  {:<34} {:>9.0} MB/s {:>7.0} MB/s",
                format!("{name} {op}"),
                vmm,
                host
            );
        }
    }
    let _ = std::fs::remove_file(path);
}

fn header(op: u16, len: u32) -> PacketHeader {
    PacketHeader {
        src_cid: 3,
        dst_cid: 2,
        src_port: 1024,
        dst_port: 5000,
        len,
        type_: 1,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

/// A vsock device in an event loop, with rx and tx rings the benchmark fills by hand.
struct VsockRig<'a> {
    mem: &'a GuestMemoryMmap,
    vsock: Arc<Mutex<Vsock>>,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_evt: EventFd,
    tx_evt: EventFd,
    em: EventManager<Arc<Mutex<Vsock>>>,
    rx_slot: u16,
    tx_slot: u16,
    rx_seen: u16,
}

const RX_BUF: u64 = 0x100_0000;
const TX_BUF: u64 = 0x200_0000;
const BUF_LEN: u32 = (HEADER_LEN as u32) + (64 << 10);

impl VsockRig<'_> {
    /// Fresh rings, so the benchmark never wraps them (the mock ring helper does not wrap);
    /// the device keeps its connections across re-activation.
    fn reset_rings(&mut self) {
        self.rx = MockSplitQueue::create(self.mem, GuestAddress(0), QSIZE);
        self.tx = MockSplitQueue::create(self.mem, GuestAddress(0x40000), QSIZE);
        let evq = MockSplitQueue::create(self.mem, GuestAddress(0x80000), QSIZE);
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
                irq: irq(),
                acked_features: VIRTIO_F_VERSION_1,
            })
            .unwrap();
        self.rx_slot = 0;
        self.tx_slot = 0;
        self.rx_seen = 0;
        self.post_rx(64);
    }

    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let slot = self.rx_slot % QSIZE;
            self.rx
                .add_desc_chains(
                    &[desc(
                        RX_BUF + u64::from(slot) * u64::from(BUF_LEN),
                        BUF_LEN,
                        F_WRITE,
                    )],
                    slot,
                )
                .unwrap();
            self.rx_slot = self.rx_slot.wrapping_add(1);
        }
        self.rx_evt.write(1).unwrap();
    }

    fn send(&mut self, h: PacketHeader, payload: &[u8]) {
        let slot = (self.tx_slot % (QSIZE / 2)) * 2;
        let base = TX_BUF + u64::from(slot) * u64::from(BUF_LEN);
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
    fn flush_tx(&mut self) {
        while self.tx.used().idx().load() != self.tx_slot {
            self.em.run_with_timeout(100).unwrap();
        }
    }

    /// Runs the loop until the guest has received `n` more packets; returns their headers.
    fn receive(&mut self, n: u16) -> Vec<PacketHeader> {
        let mut out = Vec::new();
        while out.len() < usize::from(n) {
            let used = self.rx.used().idx().load();
            while self.rx_seen != used {
                let e = self
                    .rx
                    .used()
                    .ring()
                    .ref_at(usize::from(self.rx_seen % QSIZE))
                    .unwrap()
                    .load();
                let addr = RX_BUF + u64::from(e.id() as u16) * u64::from(BUF_LEN);
                out.push(self.mem.read_obj(GuestAddress(addr)).unwrap());
                self.rx_seen = self.rx_seen.wrapping_add(1);
                self.post_rx(1);
            }
            if out.len() < usize::from(n) {
                self.em.run_with_timeout(100).unwrap();
            }
        }
        out
    }
}

fn bench_vsock() {
    let dir = std::env::temp_dir().join(format!("airlock-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    // The host side: echo for the round trips, then a sink for the throughput run.
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut small = [0u8; 64];
        for _ in 0..2000 {
            s.read_exact(&mut small).unwrap();
            s.write_all(&small).unwrap();
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break total,
                Ok(n) => total += n as u64,
            }
        }
    });
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let vsock = Arc::new(Mutex::new(Vsock::new(3, uds.to_str().unwrap()).unwrap()));
    let (rx_evt, tx_evt) = {
        let v = vsock.lock().unwrap();
        (
            v.queue_events()[0].try_clone().unwrap(),
            v.queue_events()[1].try_clone().unwrap(),
        )
    };
    let rx = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x40000), QSIZE);
    let evq = MockSplitQueue::create(&mem, GuestAddress(0x80000), QSIZE);
    vsock
        .lock()
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![
                rx.create_queue::<Queue>().unwrap(),
                tx.create_queue::<Queue>().unwrap(),
                evq.create_queue::<Queue>().unwrap(),
            ],
            irq: irq(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
    let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    em.add_subscriber(vsock.clone());
    let mut rig = VsockRig {
        mem: &mem,
        vsock: vsock.clone(),
        rx,
        tx,
        rx_evt,
        tx_evt,
        em,
        rx_slot: 0,
        tx_slot: 0,
        rx_seen: 0,
    };
    rig.post_rx(64);
    rig.send(header(1, 0), &[]);
    let resp = rig.receive(1);
    assert_eq!(
        { resp[0].op },
        2,
        "the host listener answers the guest's REQUEST"
    );

    // Round trips: 64 bytes guest -> host echo -> guest, through the device both ways.
    let mut rtts = Vec::new();
    for i in 0..2000 {
        if i % 32 == 0 {
            rig.reset_rings();
        }
        let t = Instant::now();
        rig.send(header(5, 64), &[7u8; 64]);
        let mut got = 0;
        while got < 64 {
            for h in rig.receive(1) {
                if { h.op } == 5 {
                    got += h.len;
                }
            }
        }
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // Throughput: 256 MiB guest -> host in 64 KiB packets, within the device's credit.
    let payload = vec![0x42u8; 64 << 10];
    let total: u64 = 256 << 20;
    let start = Instant::now();
    let mut sent = 0u64;
    // Two packets in flight stay within the device's 256 KiB of credit, as a guest must.
    let mut round = 0;
    while sent < total {
        if round % 32 == 0 {
            rig.reset_rings();
        }
        round += 1;
        for _ in 0..2 {
            rig.send(header(5, payload.len() as u32), &payload);
            sent += payload.len() as u64;
        }
        rig.flush_tx();
    }
    drop(rig);
    drop(vsock);
    let received = host.join().unwrap();
    let vsock_mbps = mbps(received, start.elapsed().as_secs_f64());

    // Host baselines: the same echo and stream over a plain Unix socket pair.
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut small = [0u8; 64];
        for _ in 0..2000 {
            b.read_exact(&mut small).unwrap();
            b.write_all(&small).unwrap();
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        while let Ok(n) = b.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let mut host_rtts = Vec::new();
    let mut small = [7u8; 64];
    for _ in 0..2000 {
        let t = Instant::now();
        a.write_all(&small).unwrap();
        a.read_exact(&mut small).unwrap();
        host_rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    host_rtts.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        a.write_all(&payload).unwrap();
        left -= payload.len() as u64;
    }
    drop(a);
    let host_total = echo.join().unwrap();
    let host_mbps = mbps(host_total, start.elapsed().as_secs_f64());
    let p = |v: &[f64], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!("virtio-vsock (guest rings <-> Unix socket on the host):");
    println!("  {:<34} {:>12} {:>12}", "", "through VMM", "host direct");
    println!(
        "  {:<34} {:>9.1} us {:>9.1} us",
        "64-byte round trip, p50",
        p(&rtts, 0.5),
        p(&host_rtts, 0.5)
    );
    println!(
        "  {:<34} {:>9.1} us {:>9.1} us",
        "64-byte round trip, p99",
        p(&rtts, 0.99),
        p(&host_rtts, 0.99)
    );
    println!(
        "  {:<34} {:>9.0} MB/s {:>7.0} MB/s",
        "guest -> host stream, 64 KiB packets", vsock_mbps, host_mbps
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    // The subscriber type must be a MutEventSubscriber; Arc<Mutex<Vsock>> is one.
    fn _check<T: MutEventSubscriber>() {}
    _check::<Arc<Mutex<Vsock>>>();
    bench_block();
    bench_vsock();
}
