//! virtio-vsock with Firecracker's host side over Unix sockets:
//! - host-initiated: connect to `uds_path`, write `CONNECT <port>\n`, read `OK <host port>\n`,
//!   then a byte stream to the guest's listener on `<port>`;
//! - guest-initiated: a guest connection to host port P is a connection to `<uds_path>_P`.
//!
//! Every connection has credit-based flow control in both directions: the guest never gets more
//! than it advertised room for, and data it sends is only acknowledged (fwd_cnt) once written to
//! the host socket. A connection whose host end stops reading holds at most `BUF_ALLOC` bytes.
//! After a restore every connection is gone, and the guest is told so with a transport-reset
//! event, as Firecracker does.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    read_config_bytes, Activation, IrqLine, VirtioDevice, INT_USED_RING, QUEUE_SIZE, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};

pub const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Room each connection offers the guest (bytes received but not yet written to the host).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload moved in one packet.
const MAX_PKT_PAYLOAD: usize = 64 << 10;
/// Host ports for host-initiated connections start here, as in Firecracker.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// `CONNECT <port>\n` is short; a peer that sends more without a newline is not speaking it.
const MAX_CONNECT_LINE: usize = 32;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}
// SAFETY: plain integers in a packed repr(C) struct: every byte pattern is valid.
unsafe impl ByteValued for PacketHeader {}
pub const HEADER_LEN: usize = std::mem::size_of::<PacketHeader>();

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest_cid must be 3 or more (0-2 are reserved), got {0}")]
    BadCid(u64),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the vsock eventfds: {0}")]
    EventFd(std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Connection {
    stream: UnixStream,
    state: ConnState,
    local_port: u32,
    /// The host side has data (edge-triggered readiness seen, not yet drained).
    readable: bool,
    /// The host side closed its end; tell the guest once.
    host_eof: bool,
    /// Bytes from the guest not yet accepted by the host socket.
    to_host: Vec<u8>,
    /// Every SHUTDOWN flag the guest has sent, over one packet or several: with RCV, nothing
    /// more is read for it; with both, the connection ends.
    guest_shutdown: u32,
    /// A SHUTDOWN came while `to_host` still held guest data: act on it once that data is
    /// written, so nothing the guest sent before its SHUTDOWN is lost.
    shutdown_after_flush: bool,
    /// Bytes from the host socket that arrived with its CONNECT line.
    to_guest_prefix: Vec<u8>,
    /// Credit: bytes given to the guest, and the guest's window.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes of guest data written to the host, and the value last told to the guest.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState, local_port: u32) -> Self {
        Connection {
            stream,
            state,
            local_port,
            readable: false,
            host_eof: false,
            to_host: Vec::new(),
            guest_shutdown: 0,
            shutdown_after_flush: false,
            to_guest_prefix: Vec::new(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
        }
    }

    /// How much more the guest can take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes what it can of `to_host`; returns false if the host end is gone.
    fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        true
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    irq: Arc<IrqLine>,
}

/// (host-side port, guest port).
type ConnKey = (u32, u32);

pub struct Vsock {
    guest_cid: u64,
    uds_path: String,
    listener: UnixListener,
    queue_evts: [EventFd; 3],
    active: Option<Active>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Host-initiated streams still sending their CONNECT line.
    handshakes: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    /// Control packets for the guest, sent before any data.
    control: VecDeque<PacketHeader>,
    next_local_port: u32,
    transport_reset_pending: bool,
}

fn header(src_port: u32, dst_cid: u64, dst_port: u32, op: u16) -> PacketHeader {
    PacketHeader {
        src_cid: HOST_CID,
        dst_cid,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// Parses `CONNECT <port>`.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line)
        .ok()?
        .trim_end_matches(['\n', '\r']);
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}

impl Vsock {
    pub fn new(guest_cid: u64, uds_path: &str) -> Result<Vsock, VsockError> {
        if guest_cid < 3 || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Listen {
            path: uds_path.to_string(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Listen {
                path: uds_path.to_string(),
                source,
            })?;
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_string(),
            listener,
            queue_evts: [evt()?, evt()?, evt()?],
            active: None,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            transport_reset_pending: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &str {
        &self.uds_path
    }

    fn reply(&mut self, key: ConnKey, op: u16, flags: u32) {
        let mut h = header(key.0, self.guest_cid, key.1, op);
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            h.fwd_cnt = c.fwd_cnt;
            c.fwd_cnt_sent = c.fwd_cnt;
        }
        self.control.push_back(h);
    }

    fn rst(&mut self, local_port: u32, guest_port: u32) {
        self.control
            .push_back(header(local_port, self.guest_cid, guest_port, OP_RST));
    }

    fn remove(&mut self, key: ConnKey, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_fd.remove(&c.stream.as_raw_fd());
            let _ = ops.remove(Events::empty(&c.stream));
        }
    }

    fn watch(ops: &mut EventOps, stream: &UnixStream, writable: bool) {
        let set = EventSet::IN
            | EventSet::EDGE_TRIGGERED
            | EventSet::READ_HANG_UP
            | if writable {
                EventSet::OUT
            } else {
                EventSet::empty()
            };
        if ops.add(Events::new(stream, set)).is_err() {
            let _ = ops.modify(Events::new(stream, set));
        }
    }

    /// The guest's SHUTDOWNs so far, once everything it sent before is with the host: both
    /// directions (in one packet or two) end the connection; SEND ends what the host reads; RCV
    /// makes the host's writes fail (no more data is read for the guest, see `process_rx`).
    fn apply_shutdown(&mut self, key: ConnKey, ops: &mut EventOps) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let flags = c.guest_shutdown;
        if flags == SHUTDOWN_RCV | SHUTDOWN_SEND {
            self.remove(key, ops);
            self.rst(key.0, key.1);
            return;
        }
        if flags & SHUTDOWN_SEND != 0 {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if flags & SHUTDOWN_RCV != 0 {
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
        }
    }

    /// One packet from the guest.
    fn handle_guest_packet(&mut self, h: PacketHeader, payload: &[u8], ops: &mut EventOps) {
        let (src_cid, dst_cid, type_) = (h.src_cid, h.dst_cid, h.type_);
        if src_cid != self.guest_cid || dst_cid != HOST_CID || type_ != TYPE_STREAM {
            return;
        }
        let key = (h.dst_port, h.src_port);
        let op = h.op;
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match op {
            OP_REQUEST => {
                if self.conns.contains_key(&key) {
                    return self.rst(key.0, key.1);
                }
                let path = format!("{}_{}", self.uds_path, key.0);
                match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                    Ok(stream) => {
                        Self::watch(ops, &stream, false);
                        self.by_fd.insert(stream.as_raw_fd(), key);
                        let mut c = Connection::new(stream, ConnState::Established, key.0);
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        self.conns.insert(key, c);
                        self.reply(key, OP_RESPONSE, 0);
                    }
                    Err(_) => self.rst(key.0, key.1),
                }
            }
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == ConnState::Connecting => {
                    c.state = ConnState::Established;
                    let ok = format!("OK {}\n", c.local_port);
                    c.to_host.splice(0..0, ok.bytes());
                    // The OK line is not guest data: it does not count towards fwd_cnt.
                    c.fwd_cnt = c.fwd_cnt.wrapping_sub(ok.len() as u32);
                    if !c.flush_to_host() {
                        self.remove(key, ops);
                        self.rst(key.0, key.1);
                    } else {
                        c.readable = true;
                    }
                }
                _ => self.rst(key.0, key.1),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return self.rst(key.0, key.1);
                };
                if c.state != ConnState::Established
                    || c.to_host.len() + payload.len() > BUF_ALLOC as usize
                {
                    // The guest ignored its credit: the connection cannot keep its promise.
                    self.remove(key, ops);
                    return self.rst(key.0, key.1);
                }
                c.to_host.extend_from_slice(payload);
                if !c.flush_to_host() {
                    self.remove(key, ops);
                    return self.rst(key.0, key.1);
                }
                let backlog = !c.to_host.is_empty();
                let stale = c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= BUF_ALLOC / 4;
                if backlog {
                    // Watch this connection's own fd for room: a clone would be a different fd,
                    // closed (and dropped from epoll) as soon as it went out of scope.
                    Self::watch(ops, &c.stream, true);
                }
                let shutdown_now = !backlog && std::mem::take(&mut c.shutdown_after_flush);
                if stale {
                    self.reply(key, OP_CREDIT_UPDATE, 0);
                }
                if shutdown_now {
                    self.apply_shutdown(key, ops);
                }
            }
            OP_CREDIT_UPDATE => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.readable = true;
                }
            }
            OP_CREDIT_REQUEST if self.conns.contains_key(&key) => {
                self.reply(key, OP_CREDIT_UPDATE, 0);
            }
            OP_SHUTDOWN => {
                let flags = h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                let Some(c) = self.conns.get_mut(&key) else {
                    if flags == SHUTDOWN_RCV | SHUTDOWN_SEND {
                        self.rst(key.0, key.1);
                    }
                    return;
                };
                c.guest_shutdown |= flags;
                if c.to_host.is_empty() {
                    self.apply_shutdown(key, ops);
                } else {
                    // Still writing what the guest sent before: later, from host_socket_event.
                    c.shutdown_after_flush = true;
                }
            }
            OP_RST => self.remove(key, ops),
            _ => {}
        }
    }

    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.clone();
        let mut payload = vec![0u8; MAX_PKT_PAYLOAD];
        let mut used = false;
        while let Some(chain) = active.queues[TX].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(&mem) {
                if let Ok(h) = reader.read_obj::<PacketHeader>() {
                    let len = h.len as usize;
                    if len <= MAX_PKT_PAYLOAD
                        && len <= reader.available_bytes()
                        && reader.read_exact(&mut payload[..len]).is_ok()
                    {
                        self.handle_guest_packet(h, &payload[..len], ops);
                    }
                }
            }
            if active.queues[TX].add_used(&mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        if used && active.queues[TX].needs_notification(&mem).unwrap_or(true) {
            active.irq.trigger(INT_USED_RING);
        }
        self.active = Some(active);
        self.process_rx(ops);
    }

    /// Fills the guest's receive buffers: control packets first, then data from host sockets
    /// that have something to say and credit to say it with.
    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.clone();
        let mut delivered = false;
        let mut buf = vec![0u8; MAX_PKT_PAYLOAD];
        let mut dead = Vec::new();
        'buffers: loop {
            // Pick what to send before taking a buffer, so no buffer is taken for nothing.
            let next = if let Some(h) = self.control.front().copied() {
                Some((h, None))
            } else {
                self.conns
                    .iter()
                    .find(|(_, c)| {
                        c.state == ConnState::Established
                            && c.readable
                            && !c.host_eof
                            && c.guest_shutdown & SHUTDOWN_RCV == 0
                            && c.peer_credit() > 0
                    })
                    .map(|(key, _)| (header(key.0, self.guest_cid, key.1, OP_RW), Some(*key)))
            };
            let Some((mut h, key)) = next else {
                break;
            };
            let Some(chain) = active.queues[RX].pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let Ok(mut writer) = chain.writer(&mem) else {
                let _ = active.queues[RX].add_used(&mem, head, 0);
                continue;
            };
            let room = writer.available_bytes().saturating_sub(HEADER_LEN);
            let mut len = 0usize;
            if let Some(key) = key {
                let Some(c) = self.conns.get_mut(&key) else {
                    active.queues[RX].go_to_previous_position();
                    continue;
                };
                let want = room.min(c.peer_credit() as usize).min(MAX_PKT_PAYLOAD);
                if want == 0 {
                    // A buffer with no room past the header: not a read of 0 bytes (that would
                    // look like the host's EOF). Data waits for a buffer that can hold some.
                    active.queues[RX].go_to_previous_position();
                    break 'buffers;
                }
                if !c.to_guest_prefix.is_empty() {
                    len = want.min(c.to_guest_prefix.len());
                    buf[..len].copy_from_slice(&c.to_guest_prefix[..len]);
                    c.to_guest_prefix.drain(..len);
                } else {
                    match c.stream.read(&mut buf[..want]) {
                        Ok(0) => {
                            c.host_eof = true;
                            c.readable = false;
                        }
                        Ok(n) => len = n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                        Err(_) => {
                            c.readable = false;
                            c.host_eof = true;
                        }
                    }
                }
                if len == 0 {
                    // Nothing after all: give the buffer back and look again.
                    active.queues[RX].go_to_previous_position();
                    if c.host_eof {
                        self.control.push_back({
                            let mut s = header(key.0, self.guest_cid, key.1, OP_SHUTDOWN);
                            s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                            s
                        });
                        dead.push(key);
                    }
                    continue 'buffers;
                }
                c.tx_cnt = c.tx_cnt.wrapping_add(len as u32);
                h.len = len as u32;
                h.fwd_cnt = c.fwd_cnt;
                c.fwd_cnt_sent = c.fwd_cnt;
            } else {
                self.control.pop_front();
                if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                    h.fwd_cnt = c.fwd_cnt;
                }
            }
            let ok = writer.write_obj(h).is_ok() && writer.write_all(&buf[..len]).is_ok();
            let written = if ok { (HEADER_LEN + len) as u32 } else { 0 };
            if active.queues[RX].add_used(&mem, head, written).is_err() {
                break;
            }
            delivered = true;
        }
        for key in dead {
            // The guest answers SHUTDOWN with RST; the host side is finished either way.
            if let Some(c) = self.conns.get(&key) {
                let _ = ops.remove(Events::empty(&c.stream));
            }
        }
        if delivered && active.queues[RX].needs_notification(&mem).unwrap_or(true) {
            active.irq.trigger(INT_USED_RING);
        }
        self.active = Some(active);
    }

    fn send_transport_reset(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        if let Some(chain) = active.queues[EVT].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let written = match chain.writer(&mem) {
                Ok(w) if w.clone().write_obj(EVENT_TRANSPORT_RESET).is_ok() => 4,
                _ => 0,
            };
            let _ = active.queues[EVT].add_used(&mem, head, written);
            active.irq.trigger(INT_USED_RING);
            self.transport_reset_pending = false;
        }
    }

    fn accept_host_connections(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            Self::watch(ops, &stream, false);
            self.handshakes
                .insert(stream.as_raw_fd(), (stream, Vec::new()));
        }
    }

    fn continue_handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some((mut stream, mut line)) = self.handshakes.remove(&fd) else {
            return;
        };
        let mut buf = [0u8; 64];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    let _ = ops.remove(Events::empty(&stream));
                    return;
                }
                Ok(n) => line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    let _ = ops.remove(Events::empty(&stream));
                    return;
                }
            }
            if line.contains(&b'\n') || line.len() > MAX_CONNECT_LINE {
                break;
            }
        }
        let Some(nl) = line.iter().position(|&b| b == b'\n') else {
            if line.len() > MAX_CONNECT_LINE {
                let _ = ops.remove(Events::empty(&stream));
            } else {
                self.handshakes.insert(fd, (stream, line));
            }
            return;
        };
        let Some(guest_port) = parse_connect(&line[..nl]) else {
            let _ = ops.remove(Events::empty(&stream));
            return;
        };
        let local_port = self.next_local_port;
        self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let key = (local_port, guest_port);
        let mut c = Connection::new(stream, ConnState::Connecting, local_port);
        c.to_guest_prefix = line[nl + 1..].to_vec();
        self.by_fd.insert(fd, key);
        self.conns.insert(key, c);
        self.control
            .push_back(header(local_port, self.guest_cid, guest_port, OP_REQUEST));
        self.process_rx(ops);
    }

    fn host_socket_event(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        if self.handshakes.contains_key(&fd) {
            return self.continue_handshake(fd, ops);
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::OUT) {
            if !c.flush_to_host() {
                self.remove(key, ops);
                self.rst(key.0, key.1);
                return self.process_rx(ops);
            }
            if c.to_host.is_empty() {
                let _ = ops.modify(Events::new(
                    &c.stream,
                    EventSet::IN | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP,
                ));
                let shutdown_now = std::mem::take(&mut c.shutdown_after_flush);
                // No credit for a connection about to end.
                if !(shutdown_now && c.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND) {
                    self.reply(key, OP_CREDIT_UPDATE, 0);
                }
                if shutdown_now {
                    self.apply_shutdown(key, ops);
                }
            } else if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= BUF_ALLOC / 4 {
                // Part of the backlog went out: a guest waiting for credit may go on now, not
                // only once the host has taken all of it.
                self.reply(key, OP_CREDIT_UPDATE, 0);
            }
        }
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            if let Some(c) = self.conns.get_mut(&key) {
                c.readable = true;
            }
        }
        self.process_rx(ops);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        if a.queues.len() != 3 {
            return Err("vsock needs rx, tx and event queues".into());
        }
        self.active = Some(Active {
            mem: a.mem,
            queues: a.queues,
            irq: a.irq,
        });
        if self.transport_reset_pending {
            self.send_transport_reset();
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        // Host ends of open connections are closed with them.
        self.conns.clear();
        self.by_fd.clear();
        self.control.clear();
    }
    fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }
    fn after_restore(&mut self) {
        self.transport_reset_pending = true;
        self.send_transport_reset();
    }
}

const TOKEN_LISTENER: u32 = 3;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let _ = ops.add(Events::with_data(evt, i as u32, EventSet::IN));
        }
        let _ = ops.add(Events::with_data(
            &self.listener,
            TOKEN_LISTENER,
            EventSet::IN,
        ));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_evts[RX].as_raw_fd() {
            let _ = self.queue_evts[RX].read();
            self.process_rx(ops);
        } else if fd == self.queue_evts[TX].as_raw_fd() {
            let _ = self.queue_evts[TX].read();
            self.process_tx(ops);
        } else if fd == self.queue_evts[EVT].as_raw_fd() {
            let _ = self.queue_evts[EVT].read();
            if self.transport_reset_pending {
                self.send_transport_reset();
            }
        } else if fd == self.listener.as_raw_fd() {
            self.accept_host_connections(ops);
        } else {
            self.host_socket_event(fd, events.event_set(), ops);
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
#[path = "vsock_rig.rs"]
mod vsock_rig;

#[cfg(test)]
mod tests {
    use super::vsock_rig::{guest_header, VsockRig, RIG_MEM_SIZE};
    use super::*;
    use std::io::BufRead;
    use std::path::PathBuf;
    use vm_memory::GuestAddress;

    const CID: u64 = 3;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("airlock-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RIG_MEM_SIZE)]).unwrap()
    }

    /// Makes the device's socket for `key` take at most a few KiB the host has not read, so a
    /// backlog builds at once whatever the host's default buffer sizes.
    fn shrink_send_buffer(rig: &VsockRig, key: ConnKey) {
        let v = rig.vsock.lock().unwrap();
        let fd = v.conns[&key].stream.as_raw_fd();
        let size: libc::c_int = 4096;
        // SAFETY: setsockopt on an open socket with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    fn backlog(rig: &VsockRig, key: ConnKey) -> Option<usize> {
        let v = rig.vsock.lock().unwrap();
        v.conns.get(&key).map(|c| c.to_host.len())
    }

    /// A scratch directory with the device's socket path in it and a host listener for port 5000.
    fn host_port_5000(tag: &str) -> (PathBuf, PathBuf, UnixListener) {
        let dir = scratch(tag);
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
        (dir, uds, listener)
    }

    fn rig_at<'a>(mem: &'a GuestMemoryMmap, uds: &std::path::Path) -> VsockRig<'a> {
        VsockRig::new(mem, Vsock::new(CID, uds.to_str().unwrap()).unwrap())
    }

    /// Guest port `port` connects to host port 5000; returns the host's end.
    fn connect_to_5000(rig: &mut VsockRig, listener: &UnixListener, port: u32) -> UnixStream {
        rig.send(guest_header(CID, port, 5000, OP_REQUEST, 0), &[]);
        assert_eq!({ rig.receive(1)[0].0.op }, OP_RESPONSE);
        listener.accept().unwrap().0
    }

    /// The answer to `h`, as the guest sends it.
    fn answer(h: &PacketHeader, op: u16, len: u32) -> PacketHeader {
        guest_header(CID, h.dst_port, h.src_port, op, len)
    }

    /// 16 guest connections to one host port and 8 host connections to 8 guest ports, all open
    /// at once, their packets interleaved: every byte reaches its own stream.
    #[test]
    fn many_connections_at_once_keep_their_streams_apart() {
        const GUEST_CONNS: u32 = 16;
        const ROUNDS: u32 = 4;
        const HOST_CONNS: u32 = 8;
        let (dir, uds, listener) = host_port_5000("many");
        // Each guest connection's host end echoes the 5-byte chunks it gets, then reports them.
        let echoes = std::thread::spawn(move || {
            let streams: Vec<_> = (0..GUEST_CONNS)
                .map(|_| listener.accept().unwrap().0)
                .collect();
            let threads: Vec<_> = streams
                .into_iter()
                .map(|mut s| {
                    std::thread::spawn(move || {
                        let mut got = vec![0u8; (5 * ROUNDS) as usize];
                        s.read_exact(&mut got).unwrap();
                        s.write_all(&got).unwrap();
                        String::from_utf8(got).unwrap()
                    })
                })
                .collect();
            let mut all: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            all.sort();
            all
        });
        let mem = guest_memory();
        let mut rig = rig_at(&mem, &uds);

        // Guest-initiated: open all, then send ROUNDS chunks on each, interleaved.
        for k in 0..GUEST_CONNS {
            rig.send(guest_header(CID, 2000 + k, 5000, OP_REQUEST, 0), &[]);
        }
        let mut responses: Vec<u32> = rig
            .receive(GUEST_CONNS as usize)
            .iter()
            .map(|(h, _)| {
                assert_eq!({ h.op }, OP_RESPONSE);
                h.dst_port
            })
            .collect();
        responses.sort_unstable();
        assert_eq!(responses, (2000..2000 + GUEST_CONNS).collect::<Vec<_>>());
        let chunk = |k: u32, r: u32| format!("{k:02}:{r}|");
        for r in 0..ROUNDS {
            for k in 0..GUEST_CONNS {
                let data = chunk(k, r);
                let h = guest_header(CID, 2000 + k, 5000, OP_RW, data.len() as u32);
                rig.send(h, data.as_bytes());
            }
        }
        let mut back: HashMap<u32, Vec<u8>> = HashMap::new();
        let want = (5 * ROUNDS) as usize;
        while back.len() < GUEST_CONNS as usize || back.values().any(|v| v.len() < want) {
            for (h, payload) in rig.receive(1) {
                if h.op == OP_RW {
                    back.entry(h.dst_port).or_default().extend(payload);
                }
            }
        }
        for k in 0..GUEST_CONNS {
            let expected: String = (0..ROUNDS).map(|r| chunk(k, r)).collect();
            assert_eq!(
                back[&(2000 + k)],
                expected.as_bytes(),
                "guest port {}",
                2000 + k
            );
        }
        let mut expected: Vec<String> = (0..GUEST_CONNS)
            .map(|k| (0..ROUNDS).map(|r| chunk(k, r)).collect())
            .collect();
        expected.sort();
        assert_eq!(echoes.join().unwrap(), expected, "what each host end read");

        // Host-initiated, all at once: CONNECT, OK, a line each way.
        rig.reset_rings();
        let hosts: Vec<_> = (0..HOST_CONNS)
            .map(|k| {
                let uds = uds.clone();
                std::thread::spawn(move || {
                    let mut s = UnixStream::connect(&uds).unwrap();
                    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                        .unwrap();
                    writeln!(s, "CONNECT {}", 7000 + k).unwrap();
                    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
                    let mut ok = String::new();
                    reader.read_line(&mut ok).unwrap();
                    assert!(ok.starts_with("OK "), "{ok:?}");
                    writeln!(s, "host {k}").unwrap();
                    let mut echo = String::new();
                    reader.read_line(&mut echo).unwrap();
                    echo
                })
            })
            .collect();
        // A line may come in pieces (one packet per write on the host end).
        let mut lines: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut echoed = 0;
        while echoed < HOST_CONNS {
            for (h, payload) in rig.receive(1) {
                match h.op {
                    OP_REQUEST => {
                        assert!((7000..7000 + HOST_CONNS).contains(&{ h.dst_port }));
                        rig.send(answer(&h, OP_RESPONSE, 0), &[]);
                    }
                    OP_RW => {
                        let line = lines.entry(h.dst_port).or_default();
                        line.extend(payload);
                        if line.last() != Some(&b'\n') {
                            continue;
                        }
                        let k = h.dst_port - 7000;
                        assert_eq!(line, format!("host {k}\n").as_bytes());
                        let reply = format!("guest {k}\n");
                        rig.send(answer(&h, OP_RW, reply.len() as u32), reply.as_bytes());
                        echoed += 1;
                    }
                    _ => {}
                }
            }
        }
        // Keep serving the loop until every host end has its line.
        let mut echoes: Vec<String> = Vec::new();
        for t in hosts {
            while !t.is_finished() {
                rig.run_once(10);
            }
            echoes.push(t.join().unwrap());
        }
        for (k, line) in echoes.iter().enumerate() {
            assert_eq!(line, &format!("guest {k}\n"));
        }
        drop(rig);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The host end stops reading with guest data still in the device: a partial flush tells the
    /// guest it has credit again, and a SHUTDOWN waits for the data sent before it, then ends
    /// the connection with one RST, every byte delivered.
    #[test]
    fn shutdown_waits_for_the_backlog_and_partial_flushes_return_credit() {
        const SENT: usize = 3 * (64 << 10);
        let (dir, uds, listener) = host_port_5000("backlog");
        let mem = guest_memory();
        let mut rig = rig_at(&mem, &uds);
        let key = (5000, 2000);
        let mut host_end = connect_to_5000(&mut rig, &listener, 2000);
        shrink_send_buffer(&rig, key);
        let data: Vec<u8> = (0..SENT).map(|i| (i % 251) as u8).collect();
        for block in data.chunks(64 << 10) {
            rig.send(
                guest_header(CID, 2000, 5000, OP_RW, block.len() as u32),
                block,
            );
        }
        rig.flush_tx();
        let held = backlog(&rig, key).unwrap();
        assert!(held > 128 << 10, "the device holds {held} bytes");

        // The host takes 96 KiB: more than a quarter window leaves the backlog, which does not
        // empty, and the guest hears of it.
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 96 << 10];
            host_end.read_exact(&mut got).unwrap();
            (host_end, got)
        });
        let mut credit = None;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while credit.is_none() {
            assert!(std::time::Instant::now() < deadline, "no credit update");
            credit = rig
                .receive(1)
                .into_iter()
                .find(|(h, _)| h.op == OP_CREDIT_UPDATE && h.fwd_cnt >= 64 << 10)
                .map(|(h, _)| h.fwd_cnt);
        }
        while !reader.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the host got no 96 KiB"
            );
            rig.run_once(10);
        }
        let (mut host_end, mut got) = reader.join().unwrap();
        assert!(
            backlog(&rig, key).unwrap() > 0,
            "credit came before the backlog emptied"
        );

        // SHUTDOWN both ways while the device still holds data: no RST yet.
        let mut shutdown = guest_header(CID, 2000, 5000, OP_SHUTDOWN, 0);
        shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        rig.send(shutdown, &[]);
        rig.flush_tx();
        for _ in 0..5 {
            rig.run_once(10);
        }
        let early: Vec<u16> = rig.take_received().iter().map(|(h, _)| h.op).collect();
        assert!(
            !early.contains(&OP_RST),
            "RST before the data was written: {early:?}"
        );
        assert!(
            backlog(&rig, key).is_some(),
            "connection dropped with data held"
        );

        // The host reads the rest: all of it arrives, then the connection ends with one RST.
        let rest = std::thread::spawn(move || {
            host_end.read_to_end(&mut got).unwrap();
            got
        });
        let mut rsts = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while backlog(&rig, key).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the connection stays with {:?} bytes held",
                backlog(&rig, key)
            );
            rig.run_once(10);
            rsts += rig
                .take_received()
                .iter()
                .filter(|(h, _)| h.op == OP_RST)
                .count();
        }
        for _ in 0..5 {
            rig.run_once(10);
        }
        rsts += rig
            .take_received()
            .iter()
            .filter(|(h, _)| h.op == OP_RST)
            .count();
        assert_eq!(rsts, 1);
        assert!(
            rest.join().unwrap() == data,
            "the host got other bytes than the guest sent"
        );
        assert!(credit.is_some());
        drop(rig);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// SHUTDOWN(SEND) and SHUTDOWN(RCV) in two packets end the connection as one with both would.
    #[test]
    fn a_split_shutdown_ends_the_connection() {
        let (dir, uds, listener) = host_port_5000("split");
        let mem = guest_memory();
        let mut rig = rig_at(&mem, &uds);
        let mut host_end = connect_to_5000(&mut rig, &listener, 2000);
        for flags in [SHUTDOWN_SEND, SHUTDOWN_RCV] {
            let mut h = guest_header(CID, 2000, 5000, OP_SHUTDOWN, 0);
            h.flags = flags;
            rig.send(h, &[]);
        }
        let got = rig.receive(1);
        assert_eq!(({ got[0].0.op }, { got[0].0.dst_port }), (OP_RST, 2000));
        assert!(backlog(&rig, (5000, 2000)).is_none());
        let mut rest = Vec::new();
        host_end.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(rig);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Packets for nothing, from the wrong cid, of the wrong type, too long for their buffer, or
    /// beyond the credit the device gave: a RST or nothing, never a crash or a stuck device.
    #[test]
    fn stray_and_hostile_packets_get_rst_or_nothing() {
        let (dir, uds, listener) = host_port_5000("hostile");
        let mem = guest_memory();
        let mut rig = rig_at(&mem, &uds);
        let quiet = |rig: &mut VsockRig| {
            for _ in 0..5 {
                rig.run_once(10);
            }
            rig.take_received()
        };

        // Data for a connection that does not exist, and a request to a port nobody listens on.
        for (h, what) in [
            (
                guest_header(CID, 2000, 5000, OP_RW, 3),
                "RW without a connection",
            ),
            (
                guest_header(CID, 2001, 6000, OP_REQUEST, 0),
                "REQUEST to a closed port",
            ),
        ] {
            rig.send(h, b"abc");
            let got = rig.receive(1);
            let (r, _) = &got[0];
            assert_eq!(
                ({ r.op }, { r.src_port }, { r.dst_port }),
                (OP_RST, h.dst_port, h.src_port),
                "{what}"
            );
        }
        // Wrong source cid, wrong destination, a datagram type: ignored.
        let mut wrong_cid = guest_header(CID + 1, 2000, 5000, OP_REQUEST, 0);
        rig.send(wrong_cid, &[]);
        wrong_cid = guest_header(CID, 2000, 5000, OP_REQUEST, 0);
        wrong_cid.dst_cid = 7;
        rig.send(wrong_cid, &[]);
        let mut dgram = guest_header(CID, 2000, 5000, OP_REQUEST, 0);
        dgram.type_ = 2;
        rig.send(dgram, &[]);
        rig.flush_tx();
        assert!(quiet(&mut rig).is_empty());
        // A header claiming more payload than its descriptor holds: dropped.
        rig.send(guest_header(CID, 2000, 5000, OP_RW, 60_000), b"short");
        rig.flush_tx();
        assert!(quiet(&mut rig).is_empty());

        // A real connection, then the same REQUEST again: RST.
        let host_end = connect_to_5000(&mut rig, &listener, 2002);
        rig.send(guest_header(CID, 2002, 5000, OP_REQUEST, 0), &[]);
        assert_eq!({ rig.receive(1)[0].0.op }, OP_RST);

        // Ignoring credit: the host end does not read, the guest keeps sending 64 KiB packets
        // past the 256 KiB window. The device resets the connection rather than buffer without
        // bound, and closes the host end.
        let mut flooded = connect_to_5000(&mut rig, &listener, 2003);
        shrink_send_buffer(&rig, (5000, 2003));
        let block = vec![0x5au8; 64 << 10];
        let mut rst = false;
        for _ in 0..16 {
            rig.send(
                guest_header(CID, 2003, 5000, OP_RW, block.len() as u32),
                &block,
            );
            rig.flush_tx();
            rst |= rig
                .take_received()
                .iter()
                .any(|(h, _)| h.op == OP_RST && h.dst_port == 2003);
            if rst {
                break;
            }
        }
        assert!(rst, "1 MiB sent into a 256 KiB window without a RST");
        flooded.set_nonblocking(false).unwrap();
        let mut sink = Vec::new();
        flooded.read_to_end(&mut sink).unwrap();
        assert!(sink.len() <= 1 << 20);
        drop(host_end);
        drop(rig);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn header_is_44_bytes() {
        assert_eq!(HEADER_LEN, 44);
    }

    #[test]
    fn connect_lines_parse() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        for bad in [
            &b"CONNECT\n"[..],
            b"connect 52\n",
            b"CONNECT -1\n",
            b"CONNECT 99999999999\n",
            b"\xff\n",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn credit_never_goes_negative() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, ConnState::Established, 1);
        c.peer_buf_alloc = 100;
        c.tx_cnt = 60;
        c.peer_fwd_cnt = 10;
        assert_eq!(c.peer_credit(), 50);
        c.tx_cnt = 200;
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap: 10 sent past the wrap, 5 acknowledged before it.
        c.tx_cnt = 10;
        c.peer_fwd_cnt = u32::MAX - 4;
        assert_eq!(c.peer_credit(), 100 - 15);
    }

    #[test]
    fn reserved_cids_and_bad_paths_are_refused() {
        assert!(matches!(
            Vsock::new(2, "/tmp/x"),
            Err(VsockError::BadCid(2))
        ));
        assert!(matches!(
            Vsock::new(3, "/nonexistent/dir/v.sock"),
            Err(VsockError::Listen { .. })
        ));
    }
}
