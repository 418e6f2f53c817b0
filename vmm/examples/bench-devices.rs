//! Device benchmark: the VMM's own cost of serving virtio requests, beside the host doing the same
//! work directly. Requests are placed in real split virtqueues in guest memory (virtio-queue's mock
//! rings), and the real device code serves them; no guest runs, because guest code on the nested
//! development hosts runs ~1000x slower than native and would measure the hypervisor, not us.
//!
//! `cargo run --release -p airlock-vmm --example bench-devices`

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Instant;

use airlock_vmm::devices::virtio::block::Block;
use airlock_vmm::devices::virtio::vsock::{PacketHeader, Vsock, HEADER_LEN};
use airlock_vmm::devices::virtio::{Activation, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use airlock_vmm::vstate::memory::GuestMemoryMmap;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

#[path = "../src/devices/virtio/vsock_rig.rs"]
mod vsock_rig;
use vsock_rig::{desc, VsockRig, F_NEXT, F_WRITE, RIG_MEM_SIZE};

const QSIZE: u16 = 256;

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
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
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
    vsock_rig::guest_header(3, 1024, 5000, op, len)
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
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RIG_MEM_SIZE)]).unwrap();
    let mut rig = VsockRig::new(&mem, Vsock::new(3, uds.to_str().unwrap()).unwrap());
    rig.send(header(1, 0), &[]);
    let resp = rig.receive(1);
    assert_eq!(
        { resp[0].0.op },
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
            for (h, _) in rig.receive(1) {
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
    bench_block();
    bench_vsock();
}
