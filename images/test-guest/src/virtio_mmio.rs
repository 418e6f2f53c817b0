//! The virtio-mmio transport, modern interface only (version 2, virtio 1.x): finding a
//! device from the `virtio_mmio.device=` tokens, the initialisation sequence (3.1.1),
//! queue setup, notification, config space, and polled completion with a TSC bound.
//! Nothing here enables or waits for interrupts.

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicU32, Ordering};

use crate::arch;
use crate::fmt::LineBuf;
use crate::virtio::{
    self, reg, status, Completed, MmioDevice, QueueMem, Virtqueue, MMIO_CONFIG, MMIO_VERSION_MODERN,
};
use crate::{say, text};

/// Bound on waiting for the device to finish one request: a few seconds at any
/// plausible TSC rate.
pub const WAIT_LOG2: u32 = 34;
/// Bound on waiting for something the host side starts (a connection, a frame).
pub const LONG_WAIT_LOG2: u32 = 35;
/// Bound on waiting for a reset (Status to read back 0).
const RESET_WAIT_LOG2: u32 = 30;
/// Config reads retried this often while ConfigGeneration keeps changing.
const CONFIG_TRIES: usize = 8;

/// Queues a device may use; one 4 KiB page each.
pub const MAX_QUEUES: usize = 3;

#[repr(C, align(4096))]
struct QueuePages([UnsafeCell<QueueMem>; MAX_QUEUES]);

// SAFETY: each page is handed out at most once (`CLAIMED`), to the one `Virtqueue` that
// uses it, on the BSP.
unsafe impl Sync for QueuePages {}

// In the no-init tail of .bss (link.ld): `Virtqueue::new` zeroes a page before use.
#[link_section = ".noinit.virtio_queues"]
static QUEUE_PAGES: QueuePages =
    QueuePages([const { UnsafeCell::new(QueueMem::ZERO) }; MAX_QUEUES]);
/// Bit i: queue page i is in use.
static CLAIMED: AtomicU32 = AtomicU32::new(0);

/// The outcome of feature negotiation.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub offered: u64,
    pub accepted: u64,
}

/// One virtio-mmio device being driven.
pub struct Transport {
    dev: MmioDevice,
    /// Scenario-style name used in messages, e.g. `virtio-blk`.
    label: &'static str,
    /// What the driver last wrote to Status.
    status: u32,
}

fn read_reg(d: &MmioDevice, off: u64) -> u32 {
    debug_assert!(off < MMIO_CONFIG || off < d.size);
    // SAFETY: `parse_mmio_device` checked [base, base + size) lies in the MMIO gap, which
    // the guest identity maps uncached; `off` is inside the device's register block or
    // config space (at least 0x100 bytes, also checked), 4-byte aligned.
    unsafe { arch::mmio_read32(d.base + off) }
}

impl Transport {
    fn read(&self, off: u64) -> u32 {
        read_reg(&self.dev, off)
    }

    fn write(&self, off: u64, value: u32) {
        debug_assert!(off < MMIO_CONFIG);
        // SAFETY: as in `read_reg`: a register of a device inside the identity-mapped,
        // uncached MMIO gap.
        unsafe { arch::mmio_write32(self.dev.base + off, value) };
    }

    /// Checks every `virtio_mmio.device=` device on the command line (magic, version)
    /// and returns the first with device id `want`. Devices with id 0 are placeholders
    /// and are skipped, like Linux does.
    pub fn find(cmdline: &[u8], want: u32, label: &'static str) -> Result<Transport, LineBuf> {
        let mut found = None;
        let mut count = 0;
        for d in virtio::mmio_devices(cmdline) {
            let d = d.map_err(|e| text!("{e}"))?;
            count += 1;
            let magic = read_reg(&d, reg::MAGIC);
            if magic != virtio::MAGIC {
                return Err(text!(
                    "virtio-mmio device at {:#x}: magic value {magic:#010x}, expected {:#010x} (\"virt\")",
                    d.base,
                    virtio::MAGIC
                ));
            }
            let version = read_reg(&d, reg::VERSION);
            if version == 1 {
                return Err(text!(
                    "virtio-mmio device at {:#x}: legacy interface (version 1); only version {MMIO_VERSION_MODERN} (virtio 1.x) is supported",
                    d.base
                ));
            }
            if version != MMIO_VERSION_MODERN {
                return Err(text!(
                    "virtio-mmio device at {:#x}: version {version}, expected {MMIO_VERSION_MODERN}",
                    d.base
                ));
            }
            let id = read_reg(&d, reg::DEVICE_ID);
            let vendor = read_reg(&d, reg::VENDOR_ID);
            say!(
                "virtio-mmio {:#x}@{:#x}:{}: device id {id} ({}), vendor {vendor:#x}",
                d.size,
                d.base,
                d.irq,
                virtio::device_name(id)
            );
            if id == want && found.is_none() {
                found = Some(d);
            }
        }
        let dev = found.ok_or_else(|| {
            text!(
                "no virtio-mmio device with device id {want} ({}) among the {count} virtio_mmio.device= tokens",
                virtio::device_name(want)
            )
        })?;
        Ok(Transport {
            dev,
            label,
            status: 0,
        })
    }

    fn set_status(&mut self, bits: u32) {
        self.status |= bits;
        self.write(reg::STATUS, self.status);
    }

    /// Sets FAILED (the spec asks for it when initialisation goes wrong) and returns
    /// `msg` prefixed with the device.
    fn fail(&mut self, msg: core::fmt::Arguments<'_>) -> LineBuf {
        self.set_status(status::FAILED);
        text!("{} at {:#x}: {msg}", self.label, self.dev.base)
    }

    fn needs_reset(&self) -> bool {
        self.read(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK (3.1.1 steps 1-6).
    /// Accepts every `required` bit (failing if one is not offered) and the offered
    /// `optional` ones.
    pub fn begin(&mut self, required: u64, optional: u64) -> Result<Features, LineBuf> {
        self.status = 0;
        self.write(reg::STATUS, 0);
        let start = arch::rdtsc();
        while self.read(reg::STATUS) != 0 {
            if arch::rdtsc().wrapping_sub(start) >= 1 << RESET_WAIT_LOG2 {
                return Err(text!(
                    "{} at {:#x}: Status still {:#x} 2^{RESET_WAIT_LOG2} TSC cycles after reset",
                    self.label,
                    self.dev.base,
                    self.read(reg::STATUS)
                ));
            }
            arch::pause();
        }
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        let offered = u64::from(high) << 32 | u64::from(low);
        let accepted = match virtio::negotiate(offered, required, optional) {
            Ok(a) => a,
            Err(missing) => {
                return Err(self.fail(format_args!(
                    "device offers features {offered:#x}, lacking required {missing:#x}"
                )))
            }
        };
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, accepted as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.set_status(status::FEATURES_OK);
        let s = self.read(reg::STATUS);
        if s & status::FEATURES_OK == 0 {
            return Err(self.fail(format_args!(
                "FEATURES_OK did not stick (Status {s:#x}) after accepting features {accepted:#x}"
            )));
        }
        if s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(self.fail(format_args!(
                "DEVICE_NEEDS_RESET set during feature negotiation (Status {s:#x})"
            )));
        }
        say!(
            "{} at {:#x}: features offered {offered:#x}, accepted {accepted:#x}",
            self.label,
            self.dev.base
        );
        Ok(Features { offered, accepted })
    }

    /// Sets up queue `index` in its own static 4 KiB page (3.1.1 step 7, 4.2.3.2).
    pub fn setup_queue(&mut self, index: u16, name: &str) -> Result<Virtqueue, LineBuf> {
        let page = usize::from(index);
        if page >= MAX_QUEUES || CLAIMED.fetch_or(1 << page, Ordering::AcqRel) & 1 << page != 0 {
            return Err(text!(
                "{}: queue {index} ({name}) has no free queue page",
                self.label
            ));
        }
        self.write(reg::QUEUE_SEL, u32::from(index));
        if self.read(reg::QUEUE_READY) != 0 {
            return Err(self.fail(format_args!("queue {index} ({name}) is already ready")));
        }
        let max = self.read(reg::QUEUE_NUM_MAX);
        let Some(size) = virtio::choose_queue_size(max) else {
            return Err(self.fail(format_args!(
                "queue {index} ({name}) is not available (QueueNumMax 0)"
            )));
        };
        // SAFETY: page `index` was unclaimed until just now, so this queue is its only
        // user; the page is static, so it outlives the device's use of it.
        let vq = unsafe { Virtqueue::new(QUEUE_PAGES.0[page].get(), size) };
        let a = vq.addrs();
        self.write(reg::QUEUE_NUM, u32::from(size));
        self.write(reg::QUEUE_DESC_LOW, a.desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (a.desc >> 32) as u32);
        self.write(reg::QUEUE_DRIVER_LOW, a.avail as u32);
        self.write(reg::QUEUE_DRIVER_HIGH, (a.avail >> 32) as u32);
        self.write(reg::QUEUE_DEVICE_LOW, a.used as u32);
        self.write(reg::QUEUE_DEVICE_HIGH, (a.used >> 32) as u32);
        // The zeroed rings must be in memory before the device may look at them.
        fence(Ordering::SeqCst);
        self.write(reg::QUEUE_READY, 1);
        let ready = self.read(reg::QUEUE_READY);
        if ready != 1 {
            return Err(self.fail(format_args!(
                "queue {index} ({name}): QueueReady reads {ready} after writing 1"
            )));
        }
        say!(
            "{} queue {index} ({name}): size {size} (max {max}), desc {:#x}, avail {:#x}, used {:#x}",
            self.label,
            a.desc,
            a.avail,
            a.used
        );
        Ok(vq)
    }

    /// DRIVER_OK (3.1.1 step 8); the device is live afterwards.
    pub fn driver_ok(&mut self) -> Result<(), LineBuf> {
        self.set_status(status::DRIVER_OK);
        let s = self.read(reg::STATUS);
        if s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(self.fail(format_args!(
                "DEVICE_NEEDS_RESET set after DRIVER_OK (Status {s:#x})"
            )));
        }
        if s & status::DRIVER_OK == 0 {
            return Err(self.fail(format_args!("DRIVER_OK did not stick (Status {s:#x})")));
        }
        Ok(())
    }

    /// Tells the device queue `index` has new available buffers. `Virtqueue::add` fenced
    /// before its index store; this fence orders that store before the MMIO write.
    pub fn notify(&self, index: u16) {
        fence(Ordering::SeqCst);
        self.write(reg::QUEUE_NOTIFY, u32::from(index));
    }

    /// Acknowledges whatever interrupt the device raised (nothing is delivered: the guest
    /// never enables interrupts, but the device may keep its line asserted until then).
    fn ack_interrupt(&self) {
        let pending = self.read(reg::INTERRUPT_STATUS);
        if pending != 0 {
            self.write(reg::INTERRUPT_ACK, pending);
        }
    }

    /// Takes one used buffer from queue `index` if there is one.
    pub fn poll(
        &self,
        vq: &mut Virtqueue,
        index: u16,
        name: &str,
    ) -> Result<Option<Completed>, LineBuf> {
        match vq.pop_used() {
            Ok(Some(c)) => {
                self.ack_interrupt();
                Ok(Some(c))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(text!(
                "{} at {:#x}: queue {index} ({name}): {e}",
                self.label,
                self.dev.base
            )),
        }
    }

    /// Polls queue `index` for a used buffer for at most 2^`log2` TSC cycles.
    pub fn wait(
        &self,
        vq: &mut Virtqueue,
        index: u16,
        name: &str,
        log2: u32,
    ) -> Result<Completed, LineBuf> {
        let start = arch::rdtsc();
        loop {
            if let Some(c) = self.poll(vq, index, name)? {
                return Ok(c);
            }
            if arch::rdtsc().wrapping_sub(start) >= 1 << log2 {
                return Err(self.timeout(vq, index, name, log2));
            }
            arch::pause();
        }
    }

    /// The report for a queue that did not complete in time.
    pub fn timeout(&self, vq: &Virtqueue, index: u16, name: &str, log2: u32) -> LineBuf {
        let s = self.read(reg::STATUS);
        let reset = if s & status::DEVICE_NEEDS_RESET != 0 {
            ", DEVICE_NEEDS_RESET"
        } else {
            ""
        };
        text!(
            "{} at {:#x}: queue {index} ({name}): no used buffer within 2^{log2} TSC cycles ({} chains in flight, avail idx {}, used idx {}, Status {s:#x}{reset})",
            self.label,
            self.dev.base,
            vq.in_flight(),
            vq.avail_idx(),
            vq.used_idx()
        )
    }

    /// Fails if the device has flagged DEVICE_NEEDS_RESET.
    pub fn check_alive(&self) -> Result<(), LineBuf> {
        if self.needs_reset() {
            return Err(text!(
                "{} at {:#x}: DEVICE_NEEDS_RESET set",
                self.label,
                self.dev.base
            ));
        }
        Ok(())
    }

    fn config_addr(&self, off: u64, width: u64) -> Result<u64, LineBuf> {
        let end = MMIO_CONFIG + off + width;
        if end > self.dev.size {
            return Err(text!(
                "{} at {:#x}: config field [{off:#x}, +{width}) is beyond the {:#x}-byte MMIO window",
                self.label,
                self.dev.base,
                self.dev.size
            ));
        }
        Ok(self.dev.base + MMIO_CONFIG + off)
    }

    /// Reads config space with `read`, retrying while ConfigGeneration changes (4.2.2.2).
    fn config_read<T>(&self, read: impl Fn() -> T) -> Result<T, LineBuf> {
        for _ in 0..CONFIG_TRIES {
            let before = self.read(reg::CONFIG_GENERATION);
            let v = read();
            if self.read(reg::CONFIG_GENERATION) == before {
                return Ok(v);
            }
        }
        Err(text!(
            "{} at {:#x}: ConfigGeneration changed on each of {CONFIG_TRIES} reads",
            self.label,
            self.dev.base
        ))
    }

    /// A 64-bit config field, as two aligned 32-bit reads (low word first), which is the
    /// access width the spec requires for 64-bit fields over MMIO.
    pub fn config_u64(&self, off: u64) -> Result<u64, LineBuf> {
        let addr = self.config_addr(off, 8)?;
        self.config_read(|| {
            // SAFETY: inside the device's window in the identity-mapped, uncached MMIO
            // gap (checked by `config_addr`), 4-byte aligned (base and offset are).
            let (lo, hi) = unsafe { (arch::mmio_read32(addr), arch::mmio_read32(addr + 4)) };
            u64::from(hi) << 32 | u64::from(lo)
        })
    }

    /// `N` byte-wide config fields.
    pub fn config_bytes<const N: usize>(&self, off: u64) -> Result<[u8; N], LineBuf> {
        let addr = self.config_addr(off, N as u64)?;
        self.config_read(|| {
            let mut b = [0u8; N];
            for (i, v) in b.iter_mut().enumerate() {
                // SAFETY: inside the device's window in the identity-mapped, uncached
                // MMIO gap (checked by `config_addr`).
                *v = unsafe { arch::mmio_read8(addr + i as u64) };
            }
            b
        })
    }
}
