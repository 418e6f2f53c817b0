//! The virtio scenarios: `virtio-blk`, `virtio-rng`, `virtio-vsock` and `virtio-net`.
//! Each drives one virtio-mmio device found on the command line, synchronously: one
//! request in flight per queue, completions polled with TSC-bounded waits.
//!
//! Buffers shared with the devices are statics in the no-init tail of .bss (link.ld),
//! accessed only through `DmaBuf`'s volatile accessors; the guest identity maps RAM, so
//! their addresses are physical addresses.

use crate::arch;
use crate::fmt::{Ascii, LineBuf};
use crate::kernel::BootInfo;
use crate::virtio::{self, Completed, DmaBuf, Virtqueue, F_VERSION_1};
use crate::virtio_blk::{self as blk, Fnv1a64, SECTOR};
use crate::virtio_mmio::{Transport, LONG_WAIT_LOG2, WAIT_LOG2};
use crate::virtio_net::{self as net, Mac};
use crate::virtio_vsock::{self as vsock, Collected, Conn, Header, LineCollector};
use crate::{say, text};

/// A TSC-bounded wait that spans several polls.
#[derive(Clone, Copy)]
struct Deadline {
    start: u64,
    log2: u32,
}

impl Deadline {
    fn new(log2: u32) -> Deadline {
        Deadline {
            start: arch::rdtsc(),
            log2,
        }
    }

    fn expired(&self) -> bool {
        arch::rdtsc().wrapping_sub(self.start) >= 1 << self.log2
    }
}

fn queue_error(label: &str, queue: &str, e: virtio::QueueError) -> LineBuf {
    text!("{label}: {queue}: {e}")
}

// --- virtio-blk -----------------------------------------------------------------------

/// Sectors per request (one 64 KiB data descriptor).
const BLK_CHUNK: u64 = 128;
const BLK_REQ_HDR: usize = 0;
const BLK_REQ_STATUS: usize = 16;
const BLK_REQ_ID: usize = 32;
/// What the status byte holds until the device writes it.
const BLK_NO_STATUS: u8 = 0xff;

#[link_section = ".noinit.virtio_buffers"]
static BLK_DATA: DmaBuf<{ BLK_CHUNK as usize * SECTOR }> = DmaBuf::new();
/// Request header, status byte and GET_ID answer.
#[link_section = ".noinit.virtio_buffers"]
static BLK_REQ: DmaBuf<64> = DmaBuf::new();

struct Blk {
    dev: Transport,
    q: Virtqueue,
}

impl Blk {
    /// Sends one request (header, optional data buffer, status byte) and waits for it.
    /// Returns the status byte; a status the device did not write is an error.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<virtio::Buf>,
    ) -> Result<u8, LineBuf> {
        BLK_REQ.write(BLK_REQ_HDR, &blk::header(kind, sector));
        BLK_REQ.write(BLK_REQ_STATUS, &[BLK_NO_STATUS]);
        let hdr = BLK_REQ.buf(BLK_REQ_HDR, blk::HEADER_LEN, false);
        let status = BLK_REQ.buf(BLK_REQ_STATUS, 1, true);
        let chain = match data {
            Some(d) => [hdr, d, status],
            None => [hdr, status, status],
        };
        let n = if data.is_some() { 3 } else { 2 };
        self.q
            .add(&chain[..n], 0)
            .map_err(|e| queue_error("virtio-blk", "requestq", e))?;
        self.dev.notify(0);
        self.dev.wait(&mut self.q, 0, "requestq", WAIT_LOG2)?;
        let mut s = [0u8];
        BLK_REQ.read(BLK_REQ_STATUS, &mut s);
        if s[0] == BLK_NO_STATUS {
            return Err(text!(
                "virtio-blk: {} request for sector {sector} completed without a status byte",
                blk::type_name(kind)
            ));
        }
        Ok(s[0])
    }

    /// Reads `count` sectors from `first` (at most one chunk) into `BLK_DATA`.
    fn read(&mut self, first: u64, count: u64) -> Result<u8, LineBuf> {
        let buf = BLK_DATA.buf(0, count as usize * SECTOR, true);
        self.request(blk::T_IN, first, Some(buf))
    }
}

fn expect_status(got: u8, want: u8, what: core::fmt::Arguments<'_>) -> Result<(), LineBuf> {
    if got == want {
        return Ok(());
    }
    Err(text!(
        "virtio-blk: {what}: status {got} ({}), expected {want} ({})",
        blk::status_name(got),
        blk::status_name(want)
    ))
}

/// Calls `f` with each chunk `(first sector, count)` of [start, start + count).
fn blk_chunks(
    start: u64,
    count: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), LineBuf>,
) -> Result<(), LineBuf> {
    let mut done = 0;
    while done < count {
        let n = (count - done).min(BLK_CHUNK);
        f(start + done, n)?;
        done += n;
    }
    Ok(())
}

pub fn blk(info: &BootInfo) -> Result<(), LineBuf> {
    let read_n = info.args.blk_read.unwrap_or(8);
    let write_m = info.args.blk_write.unwrap_or(8);
    let ro = info.args.blk_ro.unwrap_or(0) != 0;
    if ro && write_m == 0 {
        return Err(text!(
            "blk_ro=1 needs blk_write=<M> with M >= 1 to check that writes are refused"
        ));
    }

    let mut dev = Transport::find(info.cmdline, virtio::DEVICE_BLOCK, "virtio-blk")?;
    let features = dev.begin(F_VERSION_1, blk::F_FLUSH)?;
    let q = dev.setup_queue(0, "requestq")?;
    dev.driver_ok()?;
    let mut b = Blk { dev, q };

    let capacity = b.dev.config_u64(blk::CONFIG_CAPACITY)?;
    say!("BLK capacity {capacity}");
    if ro && features.offered & blk::F_RO == 0 {
        say!("virtio-blk: blk_ro=1, but the device does not offer VIRTIO_BLK_F_RO");
    }

    BLK_REQ.fill(BLK_REQ_ID, blk::ID_LEN, 0);
    let id_buf = BLK_REQ.buf(BLK_REQ_ID, blk::ID_LEN, true);
    let s = b.request(blk::T_GET_ID, 0, Some(id_buf))?;
    expect_status(s, blk::S_OK, format_args!("GET_ID"))?;
    let mut id = [0u8; blk::ID_LEN];
    BLK_REQ.read(BLK_REQ_ID, &mut id);
    say!("BLK ID {}", Ascii(blk::id_string(&id)));

    let end = read_n.checked_add(write_m).filter(|&e| e <= capacity);
    if end.is_none() {
        return Err(text!(
            "blk_read={read_n} plus blk_write={write_m} sectors do not fit the capacity of {capacity} sectors"
        ));
    }

    let mut sum = Fnv1a64::new();
    blk_chunks(0, read_n, |first, n| {
        let s = b.read(first, n)?;
        expect_status(
            s,
            blk::S_OK,
            format_args!("read of sectors [{first}, {})", first + n),
        )?;
        let mut sector = [0u8; SECTOR];
        for i in 0..n as usize {
            BLK_DATA.read(i * SECTOR, &mut sector);
            sum.update(&sector);
        }
        Ok(())
    })?;
    say!("BLK READ {read_n} sectors fnv1a64 {:016x}", sum.value());

    let fill = |first: u64, n: u64| {
        let mut sector = [0u8; SECTOR];
        for i in 0..n {
            blk::fill_pattern(&mut sector, first + i);
            BLK_DATA.write(i as usize * SECTOR, &sector);
        }
        BLK_DATA.buf(0, n as usize * SECTOR, false)
    };
    if ro {
        let n = write_m.min(BLK_CHUNK);
        let s = b.request(blk::T_OUT, read_n, Some(fill(read_n, n)))?;
        if s == blk::S_OK {
            return Err(text!(
                "virtio-blk: write of sectors [{read_n}, {}) to the read-only disk succeeded",
                read_n + n
            ));
        }
        expect_status(s, blk::S_IOERR, format_args!("write to the read-only disk"))?;
        say!("BLK WRITE REFUSED");
    } else {
        blk_chunks(read_n, write_m, |first, n| {
            let s = b.request(blk::T_OUT, first, Some(fill(first, n)))?;
            expect_status(
                s,
                blk::S_OK,
                format_args!("write of sectors [{first}, {})", first + n),
            )
        })?;
        say!("BLK WROTE {write_m} sectors");
        let s = b.request(blk::T_FLUSH, 0, None)?;
        let offered = if features.accepted & blk::F_FLUSH != 0 {
            "VIRTIO_BLK_F_FLUSH negotiated"
        } else {
            "VIRTIO_BLK_F_FLUSH not offered"
        };
        expect_status(s, blk::S_OK, format_args!("FLUSH ({offered})"))?;
        say!("BLK FLUSHED");
        blk_chunks(read_n, write_m, |first, n| {
            let s = b.read(first, n)?;
            expect_status(
                s,
                blk::S_OK,
                format_args!("read back of sectors [{first}, {})", first + n),
            )?;
            let mut sector = [0u8; SECTOR];
            for i in 0..n {
                BLK_DATA.read(i as usize * SECTOR, &mut sector);
                if let Some(at) = blk::check_pattern(&sector, first + i) {
                    return Err(text!(
                        "virtio-blk: sector {} byte {at} reads back {:#04x}, wrote {:#04x}",
                        first + i,
                        sector[at],
                        blk::pattern_byte(first + i, at)
                    ));
                }
            }
            Ok(())
        })?;
        say!("BLK VERIFIED {write_m} sectors");
    }

    let s = b.read(capacity, 1)?;
    expect_status(
        s,
        blk::S_IOERR,
        format_args!("read of sector {capacity}, one past the end"),
    )?;
    say!("BLK OUT OF RANGE REFUSED");
    b.dev.check_alive()
}

// --- virtio-rng -----------------------------------------------------------------------

const RNG_LEN: usize = 64;
#[link_section = ".noinit.virtio_buffers"]
static RNG_BUF: DmaBuf<{ 2 * RNG_LEN }> = DmaBuf::new();

pub fn rng(info: &BootInfo) -> Result<(), LineBuf> {
    let mut dev = Transport::find(info.cmdline, virtio::DEVICE_ENTROPY, "virtio-rng")?;
    dev.begin(F_VERSION_1, 0)?;
    let mut q = dev.setup_queue(0, "requestq")?;
    dev.driver_ok()?;
    RNG_BUF.fill(0, 2 * RNG_LEN, 0);
    let mut lens = [0usize; 2];
    for (i, len) in lens.iter_mut().enumerate() {
        q.add(&[RNG_BUF.buf(i * RNG_LEN, RNG_LEN, true)], i)
            .map_err(|e| queue_error("virtio-rng", "requestq", e))?;
        dev.notify(0);
        let c = dev.wait(&mut q, 0, "requestq", WAIT_LOG2)?;
        if c.len == 0 || c.len as usize > RNG_LEN {
            return Err(text!(
                "virtio-rng: request {} came back with {} bytes, expected 1..={RNG_LEN}",
                i + 1,
                c.len
            ));
        }
        *len = c.len as usize;
    }
    let mut a = [0u8; RNG_LEN];
    let mut b = [0u8; RNG_LEN];
    RNG_BUF.read(0, &mut a);
    RNG_BUF.read(RNG_LEN, &mut b);
    virtio::check_random(&a[..lens[0]], &b[..lens[1]]).map_err(|e| text!("virtio-rng: {e}"))?;
    if lens[0] == lens[1] {
        say!("RNG {} bytes x2 ok", lens[0]);
    } else {
        say!("RNG {} and {} bytes ok", lens[0], lens[1]);
    }
    dev.check_alive()
}

// --- virtio-net -----------------------------------------------------------------------

const NET_RX_BUFS: usize = 8;
/// Receive buffers are `net::RX_BUF_LEN` (1526) bytes, 64-byte aligned.
const NET_RX_STRIDE: usize = net::RX_BUF_LEN.next_multiple_of(64);
#[link_section = ".noinit.virtio_buffers"]
static NET_RX: DmaBuf<{ NET_RX_BUFS * NET_RX_STRIDE }> = DmaBuf::new();
#[link_section = ".noinit.virtio_buffers"]
static NET_TX: DmaBuf<{ net::HDR_LEN + net::MAX_FRAME }> = DmaBuf::new();
/// Frames of other kinds reported one by one before they are only counted.
const NET_NOISE_LINES: u32 = 4;

struct Net {
    dev: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
}

impl Net {
    fn post_rx(&mut self, i: usize) -> Result<(), LineBuf> {
        let buf = NET_RX.buf(i * NET_RX_STRIDE, net::RX_BUF_LEN, true);
        self.rx
            .add(&[buf], i)
            .map(drop)
            .map_err(|e| queue_error("virtio-net", "receiveq", e))
    }

    /// Sends `frame` behind an all-zero header, in one device-readable descriptor.
    fn send(&mut self, frame: &[u8]) -> Result<(), LineBuf> {
        NET_TX.fill(0, net::HDR_LEN, 0);
        NET_TX.write(net::HDR_LEN, frame);
        let buf = NET_TX.buf(0, net::HDR_LEN + frame.len(), false);
        self.tx
            .add(&[buf], 0)
            .map_err(|e| queue_error("virtio-net", "transmitq", e))?;
        self.dev.notify(1);
        self.dev.wait(&mut self.tx, 1, "transmitq", WAIT_LOG2)?;
        Ok(())
    }

    /// Copies a received frame out of its buffer into `out`, gives the buffer back to the
    /// device, and returns the frame length.
    fn take_rx(&mut self, c: Completed, out: &mut [u8; net::MAX_FRAME]) -> Result<usize, LineBuf> {
        let len = c.len as usize;
        if !(net::HDR_LEN..=net::RX_BUF_LEN).contains(&len) {
            return Err(text!(
                "virtio-net: receive buffer came back with {len} bytes (header {}, buffer {})",
                net::HDR_LEN,
                net::RX_BUF_LEN
            ));
        }
        let frame_len = len - net::HDR_LEN;
        NET_RX.read(
            c.token * NET_RX_STRIDE + net::HDR_LEN,
            &mut out[..frame_len],
        );
        self.post_rx(c.token)?;
        self.dev.notify(0);
        Ok(frame_len)
    }
}

pub fn net(info: &BootInfo) -> Result<(), LineBuf> {
    let mut dev = Transport::find(info.cmdline, virtio::DEVICE_NET, "virtio-net")?;
    dev.begin(F_VERSION_1 | net::F_MAC, 0)?;
    let rx = dev.setup_queue(0, "receiveq")?;
    let tx = dev.setup_queue(1, "transmitq")?;
    let mut n = Net { dev, rx, tx };
    let posted = NET_RX_BUFS.min(usize::from(n.rx.size()));
    for i in 0..posted {
        n.post_rx(i)?;
    }
    n.dev.driver_ok()?;
    n.dev.notify(0);

    let mac = Mac(n.dev.config_bytes::<6>(net::CONFIG_MAC)?);
    say!("NET mac {mac}");

    let mut frame = [0u8; net::MAX_FRAME];
    let len = net::build_frame(
        &mut frame,
        net::BROADCAST,
        mac,
        net::ETHERTYPE,
        net::GREETING,
    );
    n.send(&frame[..len])?;
    say!("NET sent");

    let mut rx = [0u8; net::MAX_FRAME];
    let deadline = Deadline::new(LONG_WAIT_LOG2);
    let mut noise = 0u32;
    let (peer, rx_len) = loop {
        if let Some(c) = n.dev.poll(&mut n.rx, 0, "receiveq")? {
            let rx_len = n.take_rx(c, &mut rx)?;
            match net::parse_frame(&rx[..rx_len]) {
                Some(f) if net::is_test_frame(&f, mac) => break (f.src, rx_len),
                Some(f) => {
                    noise += 1;
                    if noise <= NET_NOISE_LINES {
                        say!(
                            "net: ignoring a {rx_len}-byte frame from {} (ethertype {:#06x})",
                            f.src,
                            f.ethertype
                        );
                    }
                }
                None => say!("net: ignoring a {rx_len}-byte runt frame"),
            }
            continue;
        }
        if deadline.expired() {
            return Err(text!(
                "virtio-net: no frame with ethertype {:#06x} within 2^{LONG_WAIT_LOG2} TSC cycles ({noise} other frames)",
                net::ETHERTYPE
            ));
        }
        arch::pause();
    };
    if noise > NET_NOISE_LINES {
        say!("net: ignored {noise} other frames");
    }
    let payload = &rx[net::ETH_HLEN..rx_len];
    say!("NET received {}", Ascii(net::payload_text(payload)));

    let mut pong = [0u8; net::MAX_PAYLOAD];
    let pong_len = net::pong_payload(payload, &mut pong);
    let len = net::build_frame(&mut frame, peer, mac, net::ETHERTYPE, &pong[..pong_len]);
    n.send(&frame[..len])?;
    say!("NET replied");
    n.dev.check_alive()
}

// --- virtio-vsock ---------------------------------------------------------------------

const VSOCK_RX_BUFS: usize = 8;
const VSOCK_RX_STRIDE: usize = vsock::RX_BUF_LEN.next_multiple_of(64);
const VSOCK_EVENT_BUFS: usize = 4;
const VSOCK_EVENT_LEN: usize = 8;
/// The transmit buffer: header at 0, payload at 64.
const VSOCK_TX_PAYLOAD: usize = 64;
const VSOCK_TX_MAX: usize = 4096;
/// How long the guest waits for credit before it says it is stalled.
const STALL_LOG2: u32 = 30;
#[link_section = ".noinit.virtio_buffers"]
static VSOCK_RX: DmaBuf<{ VSOCK_RX_BUFS * VSOCK_RX_STRIDE }> = DmaBuf::new();
#[link_section = ".noinit.virtio_buffers"]
static VSOCK_EVENTS: DmaBuf<{ VSOCK_EVENT_BUFS * VSOCK_EVENT_LEN }> = DmaBuf::new();
#[link_section = ".noinit.virtio_buffers"]
static VSOCK_TX: DmaBuf<{ VSOCK_TX_PAYLOAD + VSOCK_TX_MAX }> = DmaBuf::new();

const Q_RX: u16 = 0;
const Q_TX: u16 = 1;
const Q_EVENT: u16 = 2;

struct Vsock {
    dev: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    events: Virtqueue,
    cid: u64,
    listen: Option<u32>,
    /// A host REQUEST to the listen port that arrived before the guest was accepting.
    pending: Option<Header>,
    /// Payload of the packet `recv` returned last.
    payload: [u8; vsock::RX_PAYLOAD],
    /// No line per packet (bulk transfers: the console is slow).
    quiet: bool,
}

fn log_packet(dir: &str, h: &Header) {
    say!(
        "vsock: {dir} {} {}:{} -> {}:{} len {} flags {:#x} buf_alloc {} fwd_cnt {}",
        vsock::op_name(h.op),
        h.src_cid,
        h.src_port,
        h.dst_cid,
        h.dst_port,
        h.len,
        h.flags,
        h.buf_alloc,
        h.fwd_cnt
    );
}

impl Vsock {
    fn post_rx(&mut self, i: usize) -> Result<(), LineBuf> {
        let buf = VSOCK_RX.buf(i * VSOCK_RX_STRIDE, vsock::RX_BUF_LEN, true);
        self.rx
            .add(&[buf], i)
            .map(drop)
            .map_err(|e| queue_error("virtio-vsock", "rx", e))
    }

    fn post_event(&mut self, i: usize) -> Result<(), LineBuf> {
        let buf = VSOCK_EVENTS.buf(i * VSOCK_EVENT_LEN, VSOCK_EVENT_LEN, true);
        self.events
            .add(&[buf], i)
            .map(drop)
            .map_err(|e| queue_error("virtio-vsock", "event", e))
    }

    fn open(info: &BootInfo, listen: Option<u32>) -> Result<Vsock, LineBuf> {
        let mut dev = Transport::find(info.cmdline, virtio::DEVICE_VSOCK, "virtio-vsock")?;
        dev.begin(F_VERSION_1, 0)?;
        let rx = dev.setup_queue(Q_RX, "rx")?;
        let tx = dev.setup_queue(Q_TX, "tx")?;
        let events = dev.setup_queue(Q_EVENT, "event")?;
        let mut v = Vsock {
            dev,
            rx,
            tx,
            events,
            cid: 0,
            listen,
            pending: None,
            payload: [0; vsock::RX_PAYLOAD],
            quiet: false,
        };
        for i in 0..VSOCK_RX_BUFS.min(usize::from(v.rx.size())) {
            v.post_rx(i)?;
        }
        for i in 0..VSOCK_EVENT_BUFS.min(usize::from(v.events.size())) {
            v.post_event(i)?;
        }
        v.dev.driver_ok()?;
        v.dev.notify(Q_RX);
        v.dev.notify(Q_EVENT);
        v.cid = v.dev.config_u64(vsock::CONFIG_GUEST_CID)?;
        Ok(v)
    }

    /// Sends one packet: a header descriptor, then a payload descriptor when there is a
    /// payload. Waits until the device has taken it.
    fn send(&mut self, h: Header, payload: &[u8]) -> Result<(), LineBuf> {
        if payload.len() > VSOCK_TX_MAX || h.len as usize != payload.len() {
            return Err(text!(
                "virtio-vsock: {}-byte payload with header len {} (at most {VSOCK_TX_MAX})",
                payload.len(),
                h.len
            ));
        }
        if !self.quiet {
            log_packet("tx", &h);
        }
        VSOCK_TX.write(0, &h.encode());
        let hdr = VSOCK_TX.buf(0, vsock::HDR_LEN, false);
        let result = if payload.is_empty() {
            self.tx.add(&[hdr], 0)
        } else {
            VSOCK_TX.write(VSOCK_TX_PAYLOAD, payload);
            let data = VSOCK_TX.buf(VSOCK_TX_PAYLOAD, payload.len(), false);
            self.tx.add(&[hdr, data], 0)
        };
        result.map_err(|e| queue_error("virtio-vsock", "tx", e))?;
        self.dev.notify(Q_TX);
        self.dev.wait(&mut self.tx, Q_TX, "tx", WAIT_LOG2)?;
        Ok(())
    }

    /// Consumes events (transport resets, which this guest does not act on) and gives
    /// their buffers back.
    fn drain_events(&mut self) -> Result<(), LineBuf> {
        while let Some(c) = self.dev.poll(&mut self.events, Q_EVENT, "event")? {
            let mut id = [0u8; 4];
            VSOCK_EVENTS.read(c.token * VSOCK_EVENT_LEN, &mut id);
            say!(
                "vsock: event id {} ({} bytes), ignored",
                u32::from_le_bytes(id),
                c.len
            );
            self.post_event(c.token)?;
            self.dev.notify(Q_EVENT);
        }
        Ok(())
    }

    /// Takes a received packet out of its buffer (payload into `self.payload`) and gives
    /// the buffer back to the device.
    fn take_rx(&mut self, c: Completed) -> Result<Header, LineBuf> {
        let len = c.len as usize;
        let at = c.token * VSOCK_RX_STRIDE;
        let mut raw = [0u8; vsock::HDR_LEN];
        let h = if (vsock::HDR_LEN..=vsock::RX_BUF_LEN).contains(&len) {
            VSOCK_RX.read(at, &mut raw);
            Header::decode(&raw)
        } else {
            None
        };
        let Some(h) = h else {
            return Err(text!(
                "virtio-vsock: rx buffer came back with {len} bytes (header {}, buffer {})",
                vsock::HDR_LEN,
                vsock::RX_BUF_LEN
            ));
        };
        let plen = h.len as usize;
        if plen > len - vsock::HDR_LEN {
            return Err(text!(
                "virtio-vsock: {} packet says len {plen}, but the device wrote {} payload bytes",
                vsock::op_name(h.op),
                len - vsock::HDR_LEN
            ));
        }
        VSOCK_RX.read(at + vsock::HDR_LEN, &mut self.payload[..plen]);
        self.post_rx(c.token)?;
        self.dev.notify(Q_RX);
        if !self.quiet {
            log_packet("rx", &h);
        }
        Ok(h)
    }

    /// The next received packet, or `None` once `deadline` passes.
    fn recv(&mut self, deadline: Deadline) -> Result<Option<Header>, LineBuf> {
        loop {
            self.drain_events()?;
            if let Some(c) = self.dev.poll(&mut self.rx, Q_RX, "rx")? {
                return self.take_rx(c).map(Some);
            }
            if deadline.expired() {
                return Ok(None);
            }
            arch::pause();
        }
    }

    /// Handles a packet for no connection the guest is working on: an early REQUEST to
    /// the listen port is kept for `accept`; anything else but a RST is answered with RST.
    fn stray(&mut self, h: &Header) -> Result<(), LineBuf> {
        if !h.is_stream_to(self.cid) {
            say!(
                "vsock: ignoring a packet not for a stream to cid {}",
                self.cid
            );
            return Ok(());
        }
        if h.op == vsock::OP_REQUEST && Some(h.dst_port) == self.listen && self.pending.is_none() {
            say!("vsock: holding the early request to port {}", h.dst_port);
            self.pending = Some(*h);
            return Ok(());
        }
        if h.op == vsock::OP_RST {
            return Ok(());
        }
        let rst = Header {
            src_cid: self.cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            kind: vsock::TYPE_STREAM,
            op: vsock::OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        self.send(rst, &[])
    }

    /// The next packet on `c` before `deadline`. Keeps `c`'s view of the peer's credit
    /// current, answers CREDIT_REQUEST, and deals with packets for anything else.
    fn next_for(&mut self, c: &mut Conn, deadline: Deadline) -> Result<Option<Header>, LineBuf> {
        loop {
            let Some(h) = self.recv(deadline)? else {
                return Ok(None);
            };
            if !c.matches(&h) {
                self.stray(&h)?;
                continue;
            }
            c.update_peer_credit(&h);
            if h.op == vsock::OP_CREDIT_REQUEST {
                self.send(c.header(vsock::OP_CREDIT_UPDATE, 0, 0), &[])?;
                continue;
            }
            return Ok(Some(h));
        }
    }

    /// Sends `data` in one RW packet, asking for credit first if the peer has too little.
    fn send_data(&mut self, c: &mut Conn, data: &[u8]) -> Result<(), LineBuf> {
        let len = data.len() as u32;
        if c.peer_credit() < len {
            self.send(c.header(vsock::OP_CREDIT_REQUEST, 0, 0), &[])?;
            let deadline = Deadline::new(WAIT_LOG2);
            let mut said_stalled = false;
            while c.peer_credit() < len {
                let Some(h) = self.next_for(c, Deadline::new(STALL_LOG2))? else {
                    if deadline.expired() {
                        return Err(text!(
                            "virtio-vsock: host port {} gives {} bytes of credit, {len} needed",
                            c.peer_port,
                            c.peer_credit()
                        ));
                    }
                    // The device answered the request and still has no room: its window is
                    // full of data the host has not taken (tests wait for this line).
                    if !said_stalled {
                        say!(
                            "VSOCK stalled: host port {} gives {} bytes of credit, {len} needed",
                            c.peer_port,
                            c.peer_credit()
                        );
                        said_stalled = true;
                    }
                    continue;
                };
                match h.op {
                    vsock::OP_RW => c.consumed(h.len),
                    vsock::OP_RST | vsock::OP_SHUTDOWN => {
                        return Err(text!(
                            "virtio-vsock: host port {} closed the connection while the guest waited for credit",
                            c.peer_port
                        ))
                    }
                    _ => {}
                }
            }
        }
        self.send(c.header(vsock::OP_RW, len, 0), data)?;
        c.sent(len);
        Ok(())
    }

    /// Waits for the host to end `c` (SHUTDOWN or RST). A SHUTDOWN, or no answer at all
    /// before the deadline, is answered with RST.
    fn await_close(&mut self, c: &mut Conn, log2: u32) -> Result<(), LineBuf> {
        let deadline = Deadline::new(log2);
        loop {
            let Some(h) = self.next_for(c, deadline)? else {
                say!(
                    "vsock: host port {} did not close within 2^{log2} TSC cycles",
                    c.peer_port
                );
                break;
            };
            match h.op {
                vsock::OP_RST => {
                    say!("vsock: host port {} reset the connection", c.peer_port);
                    return Ok(());
                }
                vsock::OP_SHUTDOWN => {
                    say!(
                        "vsock: host port {} shut down (flags {:#x})",
                        c.peer_port,
                        h.flags
                    );
                    break;
                }
                // Late data: consumed and dropped.
                vsock::OP_RW => c.consumed(h.len),
                _ => {}
            }
        }
        self.send(c.header(vsock::OP_RST, 0, 0), &[])
    }

    /// Sends `kib` KiB of [`vsock::bulk_byte`] in full packets, waiting for credit as needed:
    /// with a host that stops reading, this outgrows the socket buffer and the device's window.
    fn send_bulk(&mut self, c: &mut Conn, kib: u64) -> Result<(), LineBuf> {
        let total = kib.saturating_mul(1024);
        let mut chunk = [0u8; VSOCK_TX_MAX];
        let mut sent = 0u64;
        self.quiet = true;
        while sent < total {
            let n = (total - sent).min(VSOCK_TX_MAX as u64) as usize;
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = vsock::bulk_byte(sent + i as u64);
            }
            if let Err(mut e) = self.send_data(c, &chunk[..n]) {
                self.quiet = false;
                let _ = core::fmt::Write::write_fmt(
                    &mut e,
                    format_args!(" (after {sent} of {total} bulk bytes)"),
                );
                return Err(e);
            }
            sent += n as u64;
        }
        self.quiet = false;
        say!("VSOCK bulk sent {kib} KiB");
        Ok(())
    }

    /// Part 1: connect to host port `port`, exchange the ping, optionally send `bulk_kib` KiB,
    /// close.
    fn connect(&mut self, port: u32, bulk_kib: Option<u64>) -> Result<(), LineBuf> {
        let local = vsock::local_port(self.listen);
        let mut c = Conn::new(self.cid, local, port);
        say!("vsock: connecting from guest port {local} to host port {port}");
        self.send(c.header(vsock::OP_REQUEST, 0, 0), &[])?;
        let Some(h) = self.next_for(&mut c, Deadline::new(WAIT_LOG2))? else {
            return Err(text!(
                "virtio-vsock: no answer to the connection request to host port {port} within 2^{WAIT_LOG2} TSC cycles"
            ));
        };
        match h.op {
            vsock::OP_RESPONSE => {}
            vsock::OP_RST => {
                return Err(text!(
                    "virtio-vsock: connection refused: host port {port} answered RST"
                ))
            }
            op => {
                return Err(text!(
                    "virtio-vsock: host port {port} answered the request with {}",
                    vsock::op_name(op)
                ))
            }
        }
        say!("VSOCK connected to host port {port}");

        self.send_data(&mut c, vsock::PING)?;
        let mut echo = [0u8; vsock::PING.len()];
        let mut got = 0;
        let deadline = Deadline::new(WAIT_LOG2);
        while got < echo.len() {
            let Some(h) = self.next_for(&mut c, deadline)? else {
                return Err(text!(
                    "virtio-vsock: {got} of {} echo bytes from host port {port} within 2^{WAIT_LOG2} TSC cycles",
                    echo.len()
                ));
            };
            match h.op {
                vsock::OP_RW => {
                    let n = (h.len as usize).min(echo.len() - got);
                    echo[got..got + n].copy_from_slice(&self.payload[..n]);
                    got += n;
                    c.consumed(h.len);
                }
                vsock::OP_RST | vsock::OP_SHUTDOWN => {
                    return Err(text!(
                        "virtio-vsock: host port {port} closed after {got} of {} echo bytes",
                        echo.len()
                    ))
                }
                _ => {}
            }
        }
        if echo != vsock::PING {
            return Err(text!(
                "virtio-vsock: echo is \"{}\", sent \"{}\"",
                Ascii(&echo),
                Ascii(vsock::PING)
            ));
        }
        say!("VSOCK echo ok");
        if let Some(kib) = bulk_kib {
            self.send_bulk(&mut c, kib)?;
        }

        self.send(c.header(vsock::OP_SHUTDOWN, 0, vsock::SHUTDOWN_BOTH), &[])?;
        self.await_close(&mut c, WAIT_LOG2)
    }

    /// Part 2: accept one connection on guest port `port`, echo one line, close.
    fn accept(&mut self, port: u32) -> Result<(), LineBuf> {
        say!("vsock: waiting for a connection to guest port {port}");
        let deadline = Deadline::new(LONG_WAIT_LOG2);
        let req = loop {
            if let Some(h) = self.pending.take() {
                break h;
            }
            let Some(h) = self.recv(deadline)? else {
                return Err(text!(
                    "virtio-vsock: no connection request to guest port {port} within 2^{LONG_WAIT_LOG2} TSC cycles"
                ));
            };
            if h.is_stream_to(self.cid) && h.op == vsock::OP_REQUEST && h.dst_port == port {
                break h;
            }
            self.stray(&h)?;
        };
        let mut c = Conn::new(self.cid, port, req.src_port);
        c.update_peer_credit(&req);
        self.send(c.header(vsock::OP_RESPONSE, 0, 0), &[])?;
        say!("VSOCK accepted on port {port}");

        let mut line = LineCollector::<VSOCK_TX_MAX>::new();
        let deadline = Deadline::new(LONG_WAIT_LOG2);
        loop {
            let Some(h) = self.next_for(&mut c, deadline)? else {
                return Err(text!(
                    "virtio-vsock: no newline from host port {} within 2^{LONG_WAIT_LOG2} TSC cycles ({} bytes)",
                    c.peer_port,
                    line.bytes().len()
                ));
            };
            match h.op {
                vsock::OP_RW => {
                    c.consumed(h.len);
                    match line.push(&self.payload[..h.len as usize]) {
                        Collected::Line => break,
                        Collected::More => {}
                        Collected::Overflow => {
                            return Err(text!(
                                "virtio-vsock: more than {VSOCK_TX_MAX} bytes from host port {} without a newline",
                                c.peer_port
                            ))
                        }
                    }
                }
                vsock::OP_RST | vsock::OP_SHUTDOWN => {
                    return Err(text!(
                        "virtio-vsock: host port {} closed before sending a newline ({} bytes)",
                        c.peer_port,
                        line.bytes().len()
                    ))
                }
                _ => {}
            }
        }
        let data = line.bytes();
        self.send_data(&mut c, data)?;
        say!("VSOCK echoed {} bytes", data.len());
        self.await_close(&mut c, LONG_WAIT_LOG2)
    }
}

fn port_arg(key: &str, v: Option<u64>) -> Result<Option<u32>, LineBuf> {
    v.map(|p| u32::try_from(p).map_err(|_| text!("{key}={p} is not a 32-bit port number")))
        .transpose()
}

pub fn vsock(info: &BootInfo) -> Result<(), LineBuf> {
    let port = port_arg("vsock_port", info.args.vsock_port)?;
    let listen = port_arg("vsock_listen", info.args.vsock_listen)?;
    if port.is_none() && listen.is_none() {
        return Err(text!(
            "virtio-vsock needs vsock_port=<P> (connect) and/or vsock_listen=<Q> (accept)"
        ));
    }
    let mut v = Vsock::open(info, listen)?;
    if v.cid <= vsock::HOST_CID {
        return Err(text!(
            "virtio-vsock: guest cid {} is reserved (0, 1 and 2 are not guest cids)",
            v.cid
        ));
    }
    say!("VSOCK cid {}", v.cid);
    match port {
        Some(p) => v.connect(p, info.args.vsock_bulk_kib)?,
        None => say!("VSOCK skip connect (no vsock_port=)"),
    }
    match listen {
        Some(q) => v.accept(q)?,
        None => say!("VSOCK skip accept (no vsock_listen=)"),
    }
    v.dev.check_alive()
}
