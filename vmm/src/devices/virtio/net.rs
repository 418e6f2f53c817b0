//! virtio-net over a host TAP device. Frames pass through with their 12-byte virtio-net header
//! (the TAP is opened with IFF_VNET_HDR and that header size), so nothing is copied twice.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    drain_queue, read_config_bytes, Activation, IrqLine, VirtioDevice, INT_USED_RING, QUEUE_SIZE,
    TYPE_NET, VIRTIO_F_VERSION_1,
};

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// virtio 1.x's header (with num_buffers), in front of every frame on both queues.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame plus header a TAP hands over without offloads.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
const RX: usize = 0;
const TX: usize = 1;

// ioctl numbers from linux/if_tun.h: _IOW('T', nr, int).
const TUNSETIFF: u64 = 0x4004_54ca;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const IFNAMSIZ: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("TAP device name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot attach to TAP device {name}: {source} (does it exist, and is it a TAP, not a TUN, device?)")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("guest_mac {0:?} is not a MAC address like 06:00:ac:10:00:02")]
    BadMac(String),
    #[error("cannot create the interface's eventfds: {0}")]
    EventFd(std::io::Error),
}

pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(NetError::BadMac(text.to_string()));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(NetError::BadMac(text.to_string()));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| NetError::BadMac(text.to_string()))?;
    }
    Ok(mac)
}

/// Opens an existing TAP interface by name, non-blocking, with virtio-net headers.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(NetError::BadName(name.to_string()));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::OpenTun)?;
    // struct ifreq: the name, then the flags (a union padded to 40 bytes in all).
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    ifreq[IFNAMSIZ..IFNAMSIZ + 2]
        .copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    let attach_err = |source| NetError::Attach {
        name: name.to_string(),
        source,
    };
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which the 40-byte buffer holds.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) } < 0 {
        return Err(attach_err(std::io::Error::last_os_error()));
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr_len) } < 0 {
        return Err(attach_err(std::io::Error::last_os_error()));
    }
    Ok(tun)
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    irq: Arc<IrqLine>,
}

pub struct Net {
    iface_id: String,
    tap_name: String,
    tap: File,
    mac: Option<[u8; 6]>,
    config: [u8; 6],
    queue_evts: [EventFd; 2],
    active: Option<Active>,
    /// A frame read from the TAP that waits for the guest to post a receive buffer.
    pending_rx: Option<Vec<u8>>,
    rx_buf: Vec<u8>,
}

impl Net {
    pub fn new(iface_id: &str, tap_name: &str, mac: Option<[u8; 6]>) -> Result<Net, NetError> {
        let tap = open_tap(tap_name)?;
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            iface_id: iface_id.to_string(),
            tap_name: tap_name.to_string(),
            tap,
            mac,
            config: mac.unwrap_or([0; 6]),
            queue_evts: [evt()?, evt()?],
            active: None,
            pending_rx: None,
            rx_buf: vec![0u8; MAX_FRAME],
        })
    }

    pub fn iface_id(&self) -> &str {
        &self.iface_id
    }

    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let tap = &mut self.tap;
        let mut frame = vec![0u8; MAX_FRAME];
        let notify = drain_queue(&mut active.queues[TX], &mem, |chain| {
            let Ok(mut reader) = chain.reader(&mem) else {
                return 0;
            };
            let len = reader.available_bytes();
            if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len)
                || reader.read_exact(&mut frame[..len]).is_err()
            {
                return 0;
            }
            // A full TAP queue drops the frame, as a congested link would.
            let _ = tap.write(&frame[..len]);
            0
        });
        if notify {
            active.irq.trigger(INT_USED_RING);
        }
    }

    /// Moves frames from the TAP into the guest's receive buffers until either runs out.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut delivered = false;
        loop {
            let frame = match self.pending_rx.take() {
                Some(f) => f,
                None => match self.tap.read(&mut self.rx_buf) {
                    Ok(n) if n > 0 => self.rx_buf[..n].to_vec(),
                    _ => break,
                },
            };
            let Some(chain) = active.queues[RX].pop_descriptor_chain(&mem) else {
                self.pending_rx = Some(frame);
                break;
            };
            let head = chain.head_index();
            // Too small a buffer (or a bad one) loses this frame, not the queue.
            let written = chain
                .writer(&mem)
                .ok()
                .filter(|w| w.available_bytes() >= frame.len())
                .is_some_and(|mut w| w.write_all(&frame).is_ok());
            let len = if written { frame.len() as u32 } else { 0 };
            if active.queues[RX].add_used(&mem, head, len).is_err() {
                break;
            }
            delivered = true;
        }
        if delivered && active.queues[RX].needs_notification(&mem).unwrap_or(true) {
            active.irq.trigger(INT_USED_RING);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | if self.mac.is_some() {
                VIRTIO_NET_F_MAC
            } else {
                0
            }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        if a.queues.len() != 2 {
            return Err("net needs an rx and a tx queue".into());
        }
        self.active = Some(Active {
            mem: a.mem,
            queues: a.queues,
            irq: a.irq,
        });
        // The work itself happens on the device loop, never on the vCPU that activated us.
        self.kick_queues();
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.pending_rx = None;
    }
    fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }
}

const TOKEN_RX: u32 = 0;
const TOKEN_TX: u32 = 1;
const TOKEN_TAP: u32 = 2;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let results = [
            ops.add(Events::with_data(
                &self.queue_evts[RX],
                TOKEN_RX,
                EventSet::IN,
            )),
            ops.add(Events::with_data(
                &self.queue_evts[TX],
                TOKEN_TX,
                EventSet::IN,
            )),
            // Edge-triggered: a frame waiting for a guest buffer must not wake the loop forever.
            ops.add(Events::with_data(
                &self.tap,
                TOKEN_TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )),
        ];
        if results.iter().any(|r| r.is_err()) {
            eprintln!(
                "airlock-vmm: net {}: cannot watch its queues and TAP",
                self.iface_id
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_RX => {
                let _ = self.queue_evts[RX].read();
                self.process_rx();
            }
            TOKEN_TX => {
                let _ = self.queue_evts[TX].read();
                self.process_tx();
            }
            TOKEN_TAP => self.process_rx(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_or_are_refused() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02").unwrap(),
            [6, 0, 0xac, 0x10, 0, 2]
        );
        for bad in [
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "0g:00:ac:10:00:02",
            "6:00:ac:10:00:02",
            "",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tap_names_are_checked_before_the_kernel_sees_them() {
        assert!(matches!(open_tap(""), Err(NetError::BadName(_))));
        assert!(matches!(
            open_tap("a-name-that-is-too-long"),
            Err(NetError::BadName(_))
        ));
    }
}
