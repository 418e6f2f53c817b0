//! Virtio 1.x core pieces that need no device: the `virtio_mmio.device=` command-line
//! tokens, feature negotiation, queue sizing, the split-virtqueue memory layout, and the
//! driver side of a split virtqueue (descriptor allocation, the available ring, the used
//! ring). The MMIO transport itself is in `virtio_mmio.rs` (guest only).
//!
//! The virtqueue works on raw memory through volatile accesses, so the host unit tests
//! can drive it with a simulated device.

use core::cell::UnsafeCell;
use core::fmt;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{fence, Ordering};

use crate::e820::{FOUR_GIB, MMIO_GAP_START};

// --- Device discovery on the command line --------------------------------------------

/// Key of the Linux command-line token describing one virtio-mmio device.
pub const MMIO_DEVICE_KEY: &[u8] = b"virtio_mmio.device=";
/// Registers up to and including ConfigGeneration; device config space follows.
pub const MMIO_CONFIG: u64 = 0x100;

/// One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioDeviceError<'a> {
    /// Not `<size>@<base>:<irq>[:<id>]` (the value after `=`).
    Malformed(&'a [u8]),
    /// Smaller than the register block.
    TooSmall(MmioDevice),
    /// Not inside the identity-mapped, uncached MMIO gap [0xd0000000, 4 GiB).
    OutsideGap(MmioDevice),
    /// Base not 4-byte aligned (the registers are 32-bit).
    Misaligned(MmioDevice),
}

impl fmt::Display for MmioDeviceError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = crate::fmt::Ascii(MMIO_DEVICE_KEY);
        match self {
            MmioDeviceError::Malformed(v) => write!(
                f,
                "command line: {key}{} is not <size>@<base>:<irq>",
                crate::fmt::Ascii(v)
            ),
            MmioDeviceError::TooSmall(d) => write!(
                f,
                "command line: virtio-mmio device at {:#x} is {:#x} bytes, less than the {MMIO_CONFIG:#x}-byte register block",
                d.base, d.size
            ),
            MmioDeviceError::OutsideGap(d) => write!(
                f,
                "command line: virtio-mmio device [{:#x}, +{:#x}) is not inside the MMIO gap [{MMIO_GAP_START:#x}, {FOUR_GIB:#x})",
                d.base, d.size
            ),
            MmioDeviceError::Misaligned(d) => write!(
                f,
                "command line: virtio-mmio device base {:#x} is not 4-byte aligned",
                d.base
            ),
        }
    }
}

/// Linux `simple_strtoull(s, &end, 0)`: `0x` hex, leading `0` octal, else decimal.
/// Returns the value and the rest of the text; `None` without digits or on overflow.
fn parse_c_number(s: &[u8]) -> Option<(u64, &[u8])> {
    let (radix, digits) = if let Some(hex) = s
        .strip_prefix(b"0x")
        .or_else(|| s.strip_prefix(b"0X"))
        .filter(|h| h.first().is_some_and(u8::is_ascii_hexdigit))
    {
        (16, hex)
    } else if s.len() > 1 && s[0] == b'0' && s[1].is_ascii_digit() {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let n = digits
        .iter()
        .take_while(|&&b| (b as char).is_digit(radix))
        .count();
    if n == 0 {
        return None;
    }
    let mut v = 0u64;
    for &b in &digits[..n] {
        let d = (b as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some((v, &digits[n..]))
}

/// Linux `memparse`: a C number with an optional K/M/G/T/P/E suffix (either case).
fn parse_memsize(s: &[u8]) -> Option<(u64, &[u8])> {
    let (v, rest) = parse_c_number(s)?;
    let shift = match rest.first().map(u8::to_ascii_uppercase) {
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'P') => 50,
        Some(b'E') => 60,
        _ => return Some((v, rest)),
    };
    let scaled = v.checked_mul(1u64 << shift)?;
    Some((scaled, &rest[1..]))
}

/// Parses the value of a `virtio_mmio.device=` token the way Linux's virtio_mmio driver
/// does (`memparse` for the size, then `@%lli:%u` and an optional `:%d` device id, with
/// nothing after it), and checks the range is one this guest can reach.
pub fn parse_mmio_device(value: &[u8]) -> Result<MmioDevice, MmioDeviceError<'_>> {
    let malformed = MmioDeviceError::Malformed(value);
    let (size, rest) = parse_memsize(value).ok_or(malformed)?;
    let rest = rest.strip_prefix(b"@").ok_or(malformed)?;
    let (base, rest) = parse_c_number(rest).ok_or(malformed)?;
    let rest = rest.strip_prefix(b":").ok_or(malformed)?;
    let irq_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let irq = crate::cmdline::parse_u64(&rest[..irq_len])
        .and_then(|v| u32::try_from(v).ok())
        .ok_or(malformed)?;
    let rest = &rest[irq_len..];
    if let Some(id) = rest.strip_prefix(b":") {
        let id = id.strip_prefix(b"-").unwrap_or(id);
        if crate::cmdline::parse_u64(id).is_none() {
            return Err(malformed);
        }
    } else if !rest.is_empty() {
        return Err(malformed);
    }
    let d = MmioDevice { base, size, irq };
    if size < MMIO_CONFIG {
        return Err(MmioDeviceError::TooSmall(d));
    }
    if base % 4 != 0 {
        return Err(MmioDeviceError::Misaligned(d));
    }
    let end = base.saturating_add(size);
    if base < MMIO_GAP_START || end > FOUR_GIB {
        return Err(MmioDeviceError::OutsideGap(d));
    }
    Ok(d)
}

/// Every `virtio_mmio.device=` token on the command line, in order.
pub fn mmio_devices(
    line: &[u8],
) -> impl Iterator<Item = Result<MmioDevice, MmioDeviceError<'_>>> + '_ {
    crate::cmdline::tokens(line)
        .filter_map(|t| t.strip_prefix(MMIO_DEVICE_KEY))
        .map(parse_mmio_device)
}

// --- Registers, status, features ------------------------------------------------------

/// virtio-mmio register offsets (virtio 1.x, 4.2.2), all 32-bit.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// "virt", little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) virtio-mmio interface; version 1 is the legacy one.
pub const MMIO_VERSION_MODERN: u32 = 2;

pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLOCK: u32 = 2;
pub const DEVICE_ENTROPY: u32 = 4;
pub const DEVICE_VSOCK: u32 = 19;

pub fn device_name(id: u32) -> &'static str {
    match id {
        0 => "no device",
        DEVICE_NET => "network",
        DEVICE_BLOCK => "block",
        DEVICE_ENTROPY => "entropy",
        DEVICE_VSOCK => "vsock",
        _ => "other",
    }
}

/// Device status bits (2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

pub const F_VERSION_1: u64 = 1 << 32;

/// The feature set to write back: every `required` bit and the offered `optional` ones.
/// `Err` carries the required bits the device does not offer.
pub fn negotiate(offered: u64, required: u64, optional: u64) -> Result<u64, u64> {
    let missing = required & !offered;
    if missing != 0 {
        return Err(missing);
    }
    Ok(required | (offered & optional))
}

// --- Split virtqueue layout -----------------------------------------------------------

/// Largest queue size the guest uses (the static rings are sized for it).
pub const QUEUE_SIZE_MAX: u16 = 16;
const QMAX: usize = QUEUE_SIZE_MAX as usize;

/// The queue size to write to QueueNum: the largest power of two (split virtqueues need
/// one) not above the device's QueueNumMax or [`QUEUE_SIZE_MAX`]; `None` if the device
/// reports 0 (queue not available).
pub fn choose_queue_size(num_max: u32) -> Option<u16> {
    let n = num_max.min(u32::from(QUEUE_SIZE_MAX));
    if n == 0 {
        return None;
    }
    Some(1 << (31 - n.leading_zeros()))
}

/// Bytes the spec gives each part of a split virtqueue of `n` entries (2.7): descriptor
/// table, available ring (flags, idx, ring, used_event), used ring (flags, idx, ring,
/// avail_event).
pub const fn ring_sizes(n: usize) -> (usize, usize, usize) {
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

#[repr(C)]
pub struct AvailRing {
    pub flags: u16,
    pub idx: u16,
    pub ring: [u16; QMAX],
    pub used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

#[repr(C, align(4))]
pub struct UsedRing {
    pub flags: u16,
    pub idx: u16,
    pub ring: [UsedElem; QMAX],
    pub avail_event: u16,
}

/// One split virtqueue's rings in one 4 KiB-aligned page: the descriptor table at offset
/// 0 (16-byte aligned), then the available ring (2-byte aligned) and the used ring
/// (4-byte aligned). A queue of size n < [`QUEUE_SIZE_MAX`] uses the first n entries of
/// each array; the device never touches `used_event`/`avail_event` because EVENT_IDX is
/// not negotiated.
#[repr(C, align(4096))]
pub struct QueueMem {
    pub desc: [Desc; QMAX],
    pub avail: AvailRing,
    pub used: UsedRing,
}

// The rings hold what the spec's formulas ask for, at the alignments it requires, in one
// page (checked at build time; the tests check the exact offsets).
const _: () = {
    let (desc, avail, used) = ring_sizes(QMAX);
    assert!(core::mem::size_of::<[Desc; QMAX]>() >= desc);
    assert!(core::mem::size_of::<AvailRing>() >= avail);
    assert!(core::mem::size_of::<UsedRing>() >= used);
    assert!(core::mem::offset_of!(QueueMem, desc) % 16 == 0);
    assert!(core::mem::offset_of!(QueueMem, avail) % 2 == 0);
    assert!(core::mem::offset_of!(QueueMem, used) % 4 == 0);
    assert!(core::mem::size_of::<QueueMem>() == 4096);
};

impl QueueMem {
    pub const ZERO: QueueMem = QueueMem {
        desc: [Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        }; QMAX],
        avail: AvailRing {
            flags: 0,
            idx: 0,
            ring: [0; QMAX],
            used_event: 0,
        },
        used: UsedRing {
            flags: 0,
            idx: 0,
            ring: [UsedElem { id: 0, len: 0 }; QMAX],
            avail_event: 0,
        },
    };
}

/// Guest-physical addresses of the three parts (identity mapping: the pointers' values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

// --- Split virtqueue, driver side -----------------------------------------------------

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`); otherwise device-readable.
    pub device_writes: bool,
}

#[cfg(test)]
impl Buf {
    pub const fn readable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            device_writes: false,
        }
    }

    pub const fn writable(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            device_writes: true,
        }
    }
}

/// A chain the device has finished with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    /// What the driver passed to [`Virtqueue::add`] for this chain.
    pub token: usize,
    /// Bytes the device wrote into the chain's device-writable buffers.
    pub len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// A chain needs `need` descriptors, `free` are free.
    Full { need: usize, free: usize },
    /// An empty chain, or a buffer of length 0.
    EmptyBuffer,
    /// The device returned an id that is not the head of a chain in flight.
    BadUsedId(u32),
    /// The used index moved further ahead than there are entries.
    UsedIdxJump { last: u16, now: u16 },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Full { need, free } => {
                write!(f, "queue full: chain needs {need} descriptors, {free} free")
            }
            QueueError::EmptyBuffer => write!(f, "empty chain or zero-length buffer"),
            QueueError::BadUsedId(id) => write!(
                f,
                "device returned used id {id}, not the head of a chain in flight"
            ),
            QueueError::UsedIdxJump { last, now } => write!(
                f,
                "used idx went from {last} to {now}, more than the queue size"
            ),
        }
    }
}

const NO_NEXT: u16 = u16::MAX;

/// The driver's view of one split virtqueue. Chains are added with [`Virtqueue::add`] and
/// reaped with [`Virtqueue::pop_used`]; the caller notifies the device in between.
pub struct Virtqueue {
    mem: *mut QueueMem,
    size: u16,
    /// Bit i set: descriptor i is free.
    free: u32,
    /// Heads of chains the device owns.
    in_flight: u32,
    /// The driver's own copy of each descriptor's link (the device must not change the
    /// table, but the driver does not rely on that).
    next: [u16; QMAX],
    token: [usize; QMAX],
    avail_idx: u16,
    last_used: u16,
}

impl Virtqueue {
    /// Zeroes `mem` and takes it over as a queue of `size` entries (a power of two,
    /// 1..=[`QUEUE_SIZE_MAX`]). The available ring asks for no interrupts: the guest polls.
    ///
    /// # Safety
    /// `mem` must be valid for reads and writes for as long as the queue (and the device)
    /// uses it, and nothing else may access it meanwhile.
    pub unsafe fn new(mem: *mut QueueMem, size: u16) -> Virtqueue {
        assert!(
            size.is_power_of_two() && size <= QUEUE_SIZE_MAX,
            "bad queue size {size}"
        );
        // SAFETY: the caller guarantees `mem` is valid and exclusively ours; volatile
        // because the device reads this memory.
        unsafe {
            core::ptr::write_bytes(mem, 0, 1);
            core::ptr::write_volatile(addr_of_mut!((*mem).avail.flags), AVAIL_F_NO_INTERRUPT);
        }
        fence(Ordering::SeqCst);
        Virtqueue {
            mem,
            size,
            free: (1u32 << size) - 1,
            in_flight: 0,
            next: [NO_NEXT; QMAX],
            token: [0; QMAX],
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn num_free(&self) -> usize {
        self.free.count_ones() as usize
    }

    /// Chains the device holds.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count_ones() as usize
    }

    /// Where the three parts are (the guest identity maps RAM, so these are physical).
    pub fn addrs(&self) -> RingAddrs {
        let base = self.mem as u64;
        RingAddrs {
            desc: base + core::mem::offset_of!(QueueMem, desc) as u64,
            avail: base + core::mem::offset_of!(QueueMem, avail) as u64,
            used: base + core::mem::offset_of!(QueueMem, used) as u64,
        }
    }

    /// Writes a descriptor chain for `bufs` and publishes its head in the available ring
    /// (with a fence before the index store). Returns the head; the caller then notifies.
    pub fn add(&mut self, bufs: &[Buf], token: usize) -> Result<u16, QueueError> {
        if bufs.is_empty() || bufs.iter().any(|b| b.len == 0) {
            return Err(QueueError::EmptyBuffer);
        }
        if bufs.len() > self.num_free() {
            return Err(QueueError::Full {
                need: bufs.len(),
                free: self.num_free(),
            });
        }
        // Take the lowest free descriptors.
        let mut ids = [0u16; QMAX];
        let mut mask = self.free;
        for id in ids.iter_mut().take(bufs.len()) {
            *id = mask.trailing_zeros() as u16;
            mask &= mask - 1;
        }
        self.free = mask;
        for (i, b) in bufs.iter().enumerate() {
            let id = ids[i];
            let last = i + 1 == bufs.len();
            let next = if last { NO_NEXT } else { ids[i + 1] };
            self.next[usize::from(id)] = next;
            let desc = Desc {
                addr: b.addr,
                len: b.len,
                flags: if b.device_writes { DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { DESC_F_NEXT },
                next: if last { 0 } else { next },
            };
            // SAFETY: `mem` is valid (see `new`); id < size <= QMAX.
            unsafe {
                core::ptr::write_volatile(addr_of_mut!((*self.mem).desc[usize::from(id)]), desc)
            };
        }
        let head = ids[0];
        self.token[usize::from(head)] = token;
        self.in_flight |= 1 << head;
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: as above; slot < size.
        unsafe { core::ptr::write_volatile(addr_of_mut!((*self.mem).avail.ring[slot]), head) };
        // The descriptors and the ring entry must be visible before the new index.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(addr_of_mut!((*self.mem).avail.idx), self.avail_idx) };
        Ok(head)
    }

    /// The device's used index (volatile read).
    pub fn used_idx(&self) -> u16 {
        // SAFETY: `mem` is valid (see `new`).
        unsafe { core::ptr::read_volatile(addr_of!((*self.mem).used.idx)) }
    }

    /// Our shadow of the available index (what the device has been given).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Takes the next used entry, if the device has returned one, and frees its chain.
    pub fn pop_used(&mut self) -> Result<Option<Completed>, QueueError> {
        let now = self.used_idx();
        if now == self.last_used {
            return Ok(None);
        }
        let ahead = now.wrapping_sub(self.last_used);
        if ahead > self.size {
            return Err(QueueError::UsedIdxJump {
                last: self.last_used,
                now,
            });
        }
        // Read the entry (and, for the caller, the buffers) only after seeing the index.
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: `mem` is valid (see `new`); slot < size.
        let elem = unsafe { core::ptr::read_volatile(addr_of!((*self.mem).used.ring[slot])) };
        if elem.id >= u32::from(self.size) || self.in_flight & 1 << elem.id == 0 {
            return Err(QueueError::BadUsedId(elem.id));
        }
        self.last_used = self.last_used.wrapping_add(1);
        let head = elem.id as u16;
        self.in_flight &= !(1 << head);
        let mut id = head;
        for _ in 0..self.size {
            self.free |= 1 << id;
            id = self.next[usize::from(id)];
            if id == NO_NEXT {
                break;
            }
        }
        Ok(Some(Completed {
            token: self.token[usize::from(head)],
            len: elem.len,
        }))
    }
}

// --- Memory shared with a device -----------------------------------------------------

/// A static buffer the guest shares with a device. It is only ever accessed through
/// bounds-checked volatile reads and writes (never through references), so the compiler
/// neither caches its contents nor assumes the device left them alone.
#[repr(C, align(64))]
pub struct DmaBuf<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: the virtio scenarios run on the BSP alone, and every access is a volatile
// access through a raw pointer, so no reference to the contents ever exists.
unsafe impl<const N: usize> Sync for DmaBuf<N> {}

impl<const N: usize> DmaBuf<N> {
    pub const fn new() -> Self {
        DmaBuf(UnsafeCell::new([0; N]))
    }

    /// Physical address (the guest identity maps RAM; on the host, the virtual address).
    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }

    fn check(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= N),
            "DMA access [{off}, +{len}) outside a {N}-byte buffer"
        );
    }

    /// The descriptor for `len` bytes at `off`.
    pub fn buf(&self, off: usize, len: usize, device_writes: bool) -> Buf {
        self.check(off, len);
        let len = u32::try_from(len).expect("DMA buffer length fits in u32");
        Buf {
            addr: self.addr() + off as u64,
            len,
            device_writes,
        }
    }

    pub fn write(&self, off: usize, data: &[u8]) {
        self.check(off, data.len());
        let base = self.0.get() as *mut u8;
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: in bounds (checked above); see the `Sync` impl for exclusivity.
            unsafe { core::ptr::write_volatile(base.add(off + i), b) };
        }
    }

    pub fn fill(&self, off: usize, len: usize, byte: u8) {
        self.check(off, len);
        let base = self.0.get() as *mut u8;
        for i in off..off + len {
            // SAFETY: in bounds (checked above); see the `Sync` impl for exclusivity.
            unsafe { core::ptr::write_volatile(base.add(i), byte) };
        }
    }

    pub fn read(&self, off: usize, out: &mut [u8]) {
        self.check(off, out.len());
        let base = self.0.get() as *const u8;
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above); see the `Sync` impl for exclusivity.
            *b = unsafe { core::ptr::read_volatile(base.add(off + i)) };
        }
    }
}

impl<const N: usize> Default for DmaBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

// --- Small checks shared by the scenarios ---------------------------------------------

/// The entropy device's two buffers must each hold something other than zeros, and
/// differ from each other.
pub fn check_random(a: &[u8], b: &[u8]) -> Result<(), &'static str> {
    if a.iter().all(|&x| x == 0) {
        return Err("first buffer is all zero");
    }
    if b.iter().all(|&x| x == 0) {
        return Err("second buffer is all zero");
    }
    let n = a.len().min(b.len());
    if a[..n] == b[..n] {
        return Err("the two buffers are equal");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn parses_linux_device_tokens() {
        let d = |base, size, irq| MmioDevice { base, size, irq };
        assert_eq!(
            parse_mmio_device(b"4K@0xd0001000:5"),
            Ok(d(0xd000_1000, 0x1000, 5))
        );
        assert_eq!(
            parse_mmio_device(b"0x1000@0xd0002000:6"),
            Ok(d(0xd000_2000, 0x1000, 6))
        );
        assert_eq!(
            parse_mmio_device(b"4k@0XD0003000:7:2"),
            Ok(d(0xd000_3000, 0x1000, 7))
        );
        assert_eq!(
            parse_mmio_device(b"512@3489665024:12"),
            Ok(d(0xd000_1000, 512, 12))
        );
        assert_eq!(
            parse_mmio_device(b"1M@0xd0100000:3"),
            Ok(d(0xd010_0000, 1 << 20, 3))
        );
        // Octal, as Linux's base-0 parsing reads it.
        assert_eq!(
            parse_mmio_device(b"010000@0xd0000100:1"),
            Ok(d(0xd000_0100, 0x1000, 1))
        );
    }

    #[test]
    fn rejects_bad_device_tokens() {
        for bad in [
            &b""[..],
            b"4K",
            b"4K@",
            b"4K@0xd0001000",
            b"4K@0xd0001000:",
            b"4K@0xd0001000:x",
            b"4K@0xd0001000:5x",
            b"4K@0xd0001000:5:",
            b"4K@0xd0001000:5:1:2",
            b"@0xd0001000:5",
            b"4Q@0xd0001000:5",
            b"4K@0x:5",
            b"4K 0xd0001000:5",
            b"4K@0xd0001000:99999999999",
            b"99999999999999999999@0xd0001000:5",
            b"64E@0xd0001000:5",
        ] {
            assert_eq!(
                parse_mmio_device(bad),
                Err(MmioDeviceError::Malformed(bad)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let d = |base, size| MmioDevice { base, size, irq: 5 };
        assert_eq!(
            parse_mmio_device(b"0x80@0xd0001000:5"),
            Err(MmioDeviceError::TooSmall(d(0xd000_1000, 0x80)))
        );
        assert_eq!(
            parse_mmio_device(b"4K@0xd0001002:5"),
            Err(MmioDeviceError::Misaligned(d(0xd000_1002, 0x1000)))
        );
        assert_eq!(
            parse_mmio_device(b"4K@0xc0001000:5"),
            Err(MmioDeviceError::OutsideGap(d(0xc000_1000, 0x1000)))
        );
        assert_eq!(
            parse_mmio_device(b"8K@0xfffff000:5"),
            Err(MmioDeviceError::OutsideGap(d(0xffff_f000, 0x2000)))
        );
        assert_eq!(
            parse_mmio_device(b"4K@0xfffffffffffff000:5"),
            Err(MmioDeviceError::OutsideGap(d(
                0xffff_ffff_ffff_f000,
                0x1000
            )))
        );
        assert!(parse_mmio_device(b"4K@0xfffff000:5").is_ok());
    }

    #[test]
    fn finds_device_tokens_in_order() {
        let line = b"console=ttyS0 virtio_mmio.device=4K@0xd0001000:5 probe=virtio-blk \
                     virtio_mmio.device=bad virtio_mmio.devices=x virtio_mmio.device=4K@0xd0002000:6";
        let v: Vec<_> = mmio_devices(line).collect();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].unwrap().base, 0xd000_1000);
        assert_eq!(v[1], Err(MmioDeviceError::Malformed(b"bad")));
        assert_eq!(v[2].unwrap().irq, 6);
        assert_eq!(mmio_devices(b"probe=boot").count(), 0);
        let msg = crate::text!("{}", v[1].unwrap_err());
        assert_eq!(
            msg.as_bytes(),
            b"command line: virtio_mmio.device=bad is not <size>@<base>:<irq>"
        );
    }

    #[test]
    fn negotiates_features() {
        let mac = 1 << 5;
        let flush = 1 << 9;
        let offered = F_VERSION_1 | mac | flush | 1 << 28 | 1 << 29;
        assert_eq!(negotiate(offered, F_VERSION_1, 0), Ok(F_VERSION_1));
        assert_eq!(
            negotiate(offered, F_VERSION_1 | mac, 0),
            Ok(F_VERSION_1 | mac)
        );
        assert_eq!(
            negotiate(offered, F_VERSION_1, flush | 1 << 7),
            Ok(F_VERSION_1 | flush)
        );
        assert_eq!(negotiate(mac, F_VERSION_1, 0), Err(F_VERSION_1));
        assert_eq!(negotiate(F_VERSION_1, F_VERSION_1 | mac, 0), Err(mac));
    }

    #[test]
    fn queue_sizes() {
        assert_eq!(choose_queue_size(0), None);
        assert_eq!(choose_queue_size(1), Some(1));
        assert_eq!(choose_queue_size(3), Some(2));
        assert_eq!(choose_queue_size(10), Some(8));
        assert_eq!(choose_queue_size(16), Some(16));
        assert_eq!(choose_queue_size(256), Some(16));
        assert_eq!(choose_queue_size(u32::MAX), Some(16));
    }

    #[test]
    fn ring_layout_meets_the_spec() {
        let (d, a, u) = ring_sizes(QMAX);
        assert_eq!((d, a, u), (256, 38, 134));
        assert_eq!(size_of::<Desc>(), 16);
        assert_eq!(size_of::<UsedElem>(), 8);
        assert!(size_of::<[Desc; QMAX]>() >= d);
        assert!(size_of::<AvailRing>() >= a);
        assert!(size_of::<UsedRing>() >= u);
        // Each part at its required alignment, all in one 4 KiB page.
        assert_eq!(align_of::<QueueMem>(), 4096);
        assert_eq!(size_of::<QueueMem>(), 4096);
        assert_eq!(offset_of!(QueueMem, desc) % 16, 0);
        assert_eq!(offset_of!(QueueMem, avail) % 2, 0);
        assert_eq!(offset_of!(QueueMem, used) % 4, 0);
        assert_eq!(offset_of!(QueueMem, avail), 256);
        assert_eq!(offset_of!(QueueMem, used), 296);
        assert!(offset_of!(QueueMem, used) + u <= 4096);
        // The fields inside the rings are where the spec puts them.
        assert_eq!(offset_of!(AvailRing, idx), 2);
        assert_eq!(offset_of!(AvailRing, ring), 4);
        assert_eq!(offset_of!(UsedRing, idx), 2);
        assert_eq!(offset_of!(UsedRing, ring), 4);
        assert_eq!(offset_of!(Desc, len), 8);
        assert_eq!(offset_of!(Desc, flags), 12);
        assert_eq!(offset_of!(Desc, next), 14);
    }

    /// A device that walks the available ring the way a VMM does: it reads the chain,
    /// hands each buffer to `f`, and publishes the returned length in the used ring.
    struct SimDevice {
        mem: *mut QueueMem,
        size: u16,
        last_avail: u16,
        used_idx: u16,
    }

    impl SimDevice {
        fn new(q: &Virtqueue) -> Self {
            SimDevice {
                mem: q.mem,
                size: q.size,
                last_avail: 0,
                used_idx: 0,
            }
        }

        /// Serves every available chain; returns how many.
        fn serve(&mut self, mut f: impl FnMut(&[Desc]) -> u32) -> usize {
            let mut n = 0;
            // SAFETY: the test owns `mem` (a live Box) and runs single-threaded.
            unsafe {
                let avail = core::ptr::read_volatile(addr_of!((*self.mem).avail.idx));
                while self.last_avail != avail {
                    let slot = usize::from(self.last_avail % self.size);
                    let head = (*self.mem).avail.ring[slot];
                    let mut chain = Vec::new();
                    let mut id = head;
                    loop {
                        let d = (*self.mem).desc[usize::from(id)];
                        chain.push(d);
                        if d.flags & DESC_F_NEXT == 0 {
                            break;
                        }
                        id = d.next;
                        assert!(chain.len() <= usize::from(self.size), "descriptor loop");
                    }
                    let len = f(&chain);
                    let uslot = usize::from(self.used_idx % self.size);
                    (*self.mem).used.ring[uslot] = UsedElem {
                        id: u32::from(head),
                        len,
                    };
                    self.used_idx = self.used_idx.wrapping_add(1);
                    core::ptr::write_volatile(addr_of_mut!((*self.mem).used.idx), self.used_idx);
                    self.last_avail = self.last_avail.wrapping_add(1);
                    n += 1;
                }
            }
            n
        }
    }

    fn new_queue(size: u16) -> (Box<QueueMem>, Virtqueue) {
        let mut mem = Box::new(QueueMem::ZERO);
        // Garbage the queue must clear.
        mem.used.idx = 77;
        mem.desc[3].flags = 0xffff;
        // SAFETY: the Box outlives the queue in every test.
        let q = unsafe { Virtqueue::new(&mut *mem, size) };
        (mem, q)
    }

    #[test]
    fn new_queue_is_clean() {
        let (mem, q) = new_queue(8);
        assert_eq!(mem.used.idx, 0);
        assert_eq!(mem.desc[3], Desc::default());
        assert_eq!(mem.avail.flags, AVAIL_F_NO_INTERRUPT);
        assert_eq!(q.num_free(), 8);
        let a = q.addrs();
        let base = &*mem as *const QueueMem as u64;
        assert_eq!(base % 4096, 0);
        assert_eq!((a.desc, a.avail, a.used), (base, base + 256, base + 296));
    }

    #[test]
    fn chains_round_trip_through_a_device() {
        let (mem, mut q) = new_queue(4);
        let mut data = [0u8; 8];
        let hdr = [1u8, 2, 3];
        let bufs = [
            Buf::readable(hdr.as_ptr() as u64, 3),
            Buf::writable(data.as_mut_ptr() as u64, 8),
            Buf::writable(0x5000, 1),
        ];
        let head = q.add(&bufs, 42).unwrap();
        assert_eq!(head, 0);
        assert_eq!(q.num_free(), 1);
        assert_eq!(mem.avail.idx, 1);
        assert_eq!(mem.avail.ring[0], 0);
        assert_eq!(
            mem.desc[0],
            Desc {
                addr: hdr.as_ptr() as u64,
                len: 3,
                flags: DESC_F_NEXT,
                next: 1
            }
        );
        assert_eq!(mem.desc[1].flags, DESC_F_NEXT | DESC_F_WRITE);
        assert_eq!(mem.desc[1].next, 2);
        assert_eq!(mem.desc[2].flags, DESC_F_WRITE);
        assert_eq!(q.pop_used(), Ok(None));

        let mut dev = SimDevice::new(&q);
        let served = dev.serve(|chain| {
            assert_eq!(chain.len(), 3);
            // SAFETY: the chain's addresses point at the test's live buffers.
            let h = unsafe { core::slice::from_raw_parts(chain[0].addr as *const u8, 3) };
            let d = unsafe { core::slice::from_raw_parts_mut(chain[1].addr as *mut u8, 8) };
            for (i, b) in d.iter_mut().enumerate() {
                *b = h[i % 3] * 10;
            }
            8
        });
        assert_eq!(served, 1);
        assert_eq!(q.pop_used(), Ok(Some(Completed { token: 42, len: 8 })));
        assert_eq!(data, [10, 20, 30, 10, 20, 30, 10, 20]);
        assert_eq!(q.num_free(), 4);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.pop_used(), Ok(None));
    }

    #[test]
    fn full_and_empty_chains_are_refused() {
        let (_mem, mut q) = new_queue(2);
        let b = Buf::writable(0x1000, 8);
        assert_eq!(q.add(&[], 0), Err(QueueError::EmptyBuffer));
        assert_eq!(
            q.add(&[Buf::readable(0x1000, 0)], 0),
            Err(QueueError::EmptyBuffer)
        );
        assert_eq!(
            q.add(&[b, b, b], 0),
            Err(QueueError::Full { need: 3, free: 2 })
        );
        q.add(&[b], 0).unwrap();
        q.add(&[b], 1).unwrap();
        assert_eq!(q.add(&[b], 2), Err(QueueError::Full { need: 1, free: 0 }));
        assert_eq!(q.in_flight(), 2);
    }

    #[test]
    fn completions_out_of_order_and_index_wraparound() {
        let (mem, mut q) = new_queue(4);
        let mut dev = SimDevice::new(&q);
        // Many more requests than 2^16 so both indices wrap.
        for i in 0..70_000usize {
            q.add(&[Buf::readable(0x1000, 4), Buf::writable(0x2000, 4)], i)
                .unwrap();
            q.add(&[Buf::writable(0x3000, 16)], i + 1_000_000).unwrap();
            assert_eq!(dev.serve(|c| c.iter().map(|d| d.len).sum()), 2);
            assert_eq!(q.pop_used(), Ok(Some(Completed { token: i, len: 8 })));
            assert_eq!(
                q.pop_used(),
                Ok(Some(Completed {
                    token: i + 1_000_000,
                    len: 16
                }))
            );
            assert_eq!(q.num_free(), 4);
        }
        assert_eq!(q.avail_idx(), (140_000 % 65_536) as u16);
        assert_eq!(mem.used.idx, q.avail_idx());

        // A device completing the second chain first.
        let (mem, mut q) = new_queue(4);
        let a = q.add(&[Buf::writable(0x1000, 4)], 1).unwrap();
        let b = q.add(&[Buf::writable(0x2000, 4)], 2).unwrap();
        // SAFETY: test-owned memory, single-threaded.
        unsafe {
            let m = &*mem as *const QueueMem as *mut QueueMem;
            (*m).used.ring[0] = UsedElem {
                id: u32::from(b),
                len: 3,
            };
            (*m).used.ring[1] = UsedElem {
                id: u32::from(a),
                len: 4,
            };
            (*m).used.idx = 2;
        }
        assert_eq!(q.pop_used(), Ok(Some(Completed { token: 2, len: 3 })));
        assert_eq!(q.pop_used(), Ok(Some(Completed { token: 1, len: 4 })));
    }

    #[test]
    fn bad_device_behaviour_is_reported() {
        let (mem, mut q) = new_queue(4);
        let m = &*mem as *const QueueMem as *mut QueueMem;
        q.add(&[Buf::writable(0x1000, 4)], 1).unwrap();
        // SAFETY: test-owned memory, single-threaded.
        unsafe {
            (*m).used.ring[0] = UsedElem { id: 3, len: 4 };
            (*m).used.idx = 1;
        }
        assert_eq!(q.pop_used(), Err(QueueError::BadUsedId(3)));
        // SAFETY: as above.
        unsafe {
            (*m).used.ring[0] = UsedElem { id: 9, len: 4 };
        }
        assert_eq!(q.pop_used(), Err(QueueError::BadUsedId(9)));
        // SAFETY: as above.
        unsafe { (*m).used.idx = 5 };
        assert_eq!(
            q.pop_used(),
            Err(QueueError::UsedIdxJump { last: 0, now: 5 })
        );
    }

    #[test]
    fn dma_buffers() {
        let b = DmaBuf::<16>::new();
        b.write(2, b"abc");
        b.fill(5, 3, 7);
        let mut out = [0u8; 9];
        b.read(0, &mut out);
        assert_eq!(out, [0, 0, b'a', b'b', b'c', 7, 7, 7, 0]);
        assert_eq!(b.addr() % 64, 0);
        assert_eq!(
            b.buf(4, 12, true),
            Buf {
                addr: b.addr() + 4,
                len: 12,
                device_writes: true
            }
        );
    }

    #[test]
    #[should_panic(expected = "outside a 16-byte buffer")]
    fn dma_bounds_are_checked() {
        DmaBuf::<16>::new().write(15, b"ab");
    }

    #[test]
    fn random_buffers() {
        assert_eq!(check_random(&[1, 2], &[3, 4]), Ok(()));
        assert!(check_random(&[0, 0], &[3, 4]).is_err());
        assert!(check_random(&[1, 2], &[0, 0]).is_err());
        assert!(check_random(&[1, 2], &[1, 2]).is_err());
        assert!(check_random(&[1, 2, 3], &[1, 2]).is_err());
        assert!(check_random(&[], &[1]).is_err());
    }
}
