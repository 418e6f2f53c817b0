//! virtio-vsock protocol pieces: the 44-byte packet header, one stream connection's
//! addressing and credit bookkeeping, and collecting a line of received data.

pub const HDR_LEN: usize = 44;
pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: no more receiving, no more sending.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Receive buffer space the guest advertises for each connection.
pub const BUF_ALLOC: u32 = 64 * 1024;
/// Payload bytes one receive buffer holds (after the header).
pub const RX_PAYLOAD: usize = 4096;
pub const RX_BUF_LEN: usize = HDR_LEN + RX_PAYLOAD;

/// Config space: `guest_cid` (le64) at offset 0.
pub const CONFIG_GUEST_CID: u64 = 0;

/// First port the guest uses for its own connections.
pub const FIRST_LOCAL_PORT: u32 = 1024;

pub const PING: &[u8] = b"ping from guest";

pub fn op_name(op: u16) -> &'static str {
    match op {
        OP_REQUEST => "REQUEST",
        OP_RESPONSE => "RESPONSE",
        OP_RST => "RST",
        OP_SHUTDOWN => "SHUTDOWN",
        OP_RW => "RW",
        OP_CREDIT_UPDATE => "CREDIT_UPDATE",
        OP_CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown op",
    }
}

/// `struct virtio_vsock_hdr`, little endian, packed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// `None` if `b` is shorter than a header.
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HDR_LEN {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    /// A host-to-guest stream packet addressed to us.
    pub fn is_stream_to(&self, guest_cid: u64) -> bool {
        self.kind == TYPE_STREAM && self.dst_cid == guest_cid && self.src_cid == HOST_CID
    }
}

/// One stream connection between (guest cid, `local_port`) and (host, `peer_port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    pub guest_cid: u64,
    pub local_port: u32,
    pub peer_port: u32,
    /// The peer's receive buffer and how much of what we sent it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Payload bytes we have sent.
    pub tx_cnt: u32,
    /// Payload bytes we have received and consumed (our `fwd_cnt`).
    pub fwd_cnt: u32,
}

impl Conn {
    pub fn new(guest_cid: u64, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            guest_cid,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
        }
    }

    /// A packet from us to the peer, carrying our current credit.
    pub fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: self.guest_cid,
            dst_cid: HOST_CID,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether `h` belongs to this connection.
    pub fn matches(&self, h: &Header) -> bool {
        h.is_stream_to(self.guest_cid)
            && h.dst_port == self.local_port
            && h.src_port == self.peer_port
    }

    /// Every packet from the peer carries its current credit.
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Bytes we may send now: the peer's buffer less what is in flight to it.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records `n` payload bytes sent.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Records `n` payload bytes received and consumed.
    pub fn consumed(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }
}

/// Byte `i` of a bulk transfer: a period of 251 (prime) so a lost, repeated or reordered
/// 4 KiB packet shows.
pub fn bulk_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// The guest's port for its own connection: the first one from 1024 that is not the
/// port it listens on.
pub fn local_port(listen: Option<u32>) -> u32 {
    if listen == Some(FIRST_LOCAL_PORT) {
        FIRST_LOCAL_PORT + 1
    } else {
        FIRST_LOCAL_PORT
    }
}

/// Collects received stream bytes until a newline arrives.
pub struct LineCollector<const N: usize> {
    buf: [u8; N],
    len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collected {
    /// No newline yet.
    More,
    /// A newline arrived; everything collected so far is the line (it may go on after
    /// the newline, to the end of the packet that carried it).
    Line,
    /// More than `N` bytes without a newline.
    Overflow,
}

impl<const N: usize> LineCollector<N> {
    pub const fn new() -> Self {
        LineCollector {
            buf: [0; N],
            len: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) -> Collected {
        if self.len + data.len() > N {
            return Collected::Overflow;
        }
        self.buf[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
        if data.contains(&b'\n') {
            Collected::Line
        } else {
            Collected::More
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Default for LineCollector<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 5000,
            len: 15,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let b = h.encode();
        let mut want = [0u8; HDR_LEN];
        want[0] = 3;
        want[8] = 2;
        want[16..18].copy_from_slice(&1024u16.to_le_bytes());
        want[20..22].copy_from_slice(&5000u16.to_le_bytes());
        want[24] = 15;
        want[28] = 1;
        want[30] = 5;
        want[38] = 1; // 65536
        want[40] = 7;
        assert_eq!(b, want);
        assert_eq!(Header::decode(&b), Some(h));
        assert_eq!(Header::decode(&b[..43]), None);
        // Payload after the header is ignored by decode.
        let mut with_payload = [0u8; HDR_LEN + 4];
        with_payload[..HDR_LEN].copy_from_slice(&b);
        assert_eq!(Header::decode(&with_payload), Some(h));
    }

    #[test]
    fn header_round_trips_extremes() {
        let h = Header {
            src_cid: u64::MAX,
            dst_cid: 0x0102_0304_0506_0708,
            src_port: u32::MAX,
            dst_port: 0x0a0b_0c0d,
            len: 0x1122_3344,
            kind: 0xfffe,
            op: 0x8001,
            flags: 0xdead_beef,
            buf_alloc: 1,
            fwd_cnt: u32::MAX,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        assert_eq!(&h.encode()[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn connection_matching_and_headers() {
        let c = Conn::new(3, 1024, 5000);
        let h = c.header(OP_REQUEST, 0, 0);
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (3, HOST_CID, 1024, 5000)
        );
        assert_eq!(
            (h.kind, h.buf_alloc, h.fwd_cnt),
            (TYPE_STREAM, BUF_ALLOC, 0)
        );
        let reply = Header {
            src_cid: HOST_CID,
            dst_cid: 3,
            src_port: 5000,
            dst_port: 1024,
            kind: TYPE_STREAM,
            op: OP_RESPONSE,
            ..Header::default()
        };
        assert!(c.matches(&reply));
        assert!(!c.matches(&Header {
            src_port: 5001,
            ..reply
        }));
        assert!(!c.matches(&Header {
            dst_port: 1025,
            ..reply
        }));
        assert!(!c.matches(&Header {
            dst_cid: 4,
            ..reply
        }));
        assert!(!c.matches(&Header {
            src_cid: 1,
            ..reply
        }));
        assert!(!c.matches(&Header { kind: 2, ..reply }));
    }

    #[test]
    fn credit() {
        let mut c = Conn::new(3, 1024, 5000);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 0,
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 100);
        c.sent(60);
        assert_eq!(c.peer_credit(), 40);
        c.sent(40);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 70,
            ..Header::default()
        });
        assert_eq!(c.peer_credit(), 70);
        // Counters wrap.
        c.tx_cnt = 5;
        c.peer_fwd_cnt = u32::MAX - 4;
        assert_eq!(c.peer_credit(), 90);
        // A peer that shrinks its buffer below what is in flight gives no credit.
        c.peer_buf_alloc = 5;
        assert_eq!(c.peer_credit(), 0);
        c.consumed(15);
        c.consumed(2);
        assert_eq!(c.header(OP_RW, 0, 0).fwd_cnt, 17);
    }

    #[test]
    fn local_ports() {
        assert_eq!(local_port(None), 1024);
        assert_eq!(local_port(Some(5000)), 1024);
        assert_eq!(local_port(Some(1024)), 1025);
    }

    #[test]
    fn collects_lines() {
        let mut l = LineCollector::<8>::new();
        assert_eq!(l.push(b"ab"), Collected::More);
        assert_eq!(l.push(b""), Collected::More);
        assert_eq!(l.push(b"c\nd"), Collected::Line);
        assert_eq!(l.bytes(), b"abc\nd");
        let mut l = LineCollector::<4>::new();
        assert_eq!(l.push(b"abcd"), Collected::More);
        assert_eq!(l.push(b"\n"), Collected::Overflow);
        assert_eq!(l.bytes(), b"abcd");
        assert_eq!(LineCollector::<4>::new().push(b"\n"), Collected::Line);
    }

    #[test]
    fn op_names() {
        assert_eq!(op_name(OP_CREDIT_REQUEST), "CREDIT_REQUEST");
        assert_eq!(op_name(0), "unknown op");
    }
}
