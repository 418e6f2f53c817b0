//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2): the register file a driver
//! uses to discover, negotiate and configure a device and its queues.

use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use super::{Activation, IrqLine, QueueSnapshot, SharedDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::{lock, BusDevice, VmExitRequest};

pub const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0x4c41_4b41; // "AKAL"
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// The transport's registers, for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub features_select: u32,
    pub acked_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

pub struct MmioTransport {
    device: SharedDevice,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    /// The driver's queue configuration until activation hands it to the device.
    queues: Vec<Queue>,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: SharedDevice, mem: GuestMemoryMmap, irq: Arc<IrqLine>) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .into_iter()
            .filter_map(|max| Queue::new(max).ok())
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
            status: 0,
            config_generation: 0,
        }
    }

    pub fn device(&self) -> &SharedDevice {
        &self.device
    }

    fn activated(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues cannot change once the device runs.
        if self.activated() {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.queue_select = 0;
        self.irq.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let avail = lock(&self.device).avail_features();
            // Modern devices only, and nothing the device did not offer: otherwise FEATURES_OK
            // does not stick and the driver gives up, as the spec describes.
            if self.acked_features & !avail != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                self.status |= value & !STATUS_FEATURES_OK;
                return;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK != 0 {
            self.status = value;
            self.activate();
            return;
        }
        self.status = value & !STATUS_DRIVER_OK | (self.status & STATUS_DRIVER_OK);
    }

    fn activate(&mut self) {
        let all_valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        let activation = Activation {
            mem: self.mem.clone(),
            queues: self.queues.iter().map(super::clone_queue).collect(),
            irq: self.irq.clone(),
            acked_features: self.acked_features,
        };
        let result = if all_valid {
            lock(&self.device).activate(activation)
        } else {
            Err("a ready queue lies outside guest memory or is misaligned".into())
        };
        if let Err(e) = result {
            eprintln!("airlock-vmm: virtio device failed to activate: {e}");
            self.status |= STATUS_NEEDS_RESET;
            self.irq.trigger(super::INT_CONFIG_CHANGE);
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let device = lock(&self.device);
        match offset {
            0x000 => MMIO_MAGIC,
            0x004 => MMIO_VERSION,
            0x008 => device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.features_select {
                0 => device.avail_features() as u32,
                1 => (device.avail_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x044 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x060 => self.irq.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x014 => self.features_select = value,
            // Features are fixed once FEATURES_OK is set.
            0x020 if self.status & STATUS_FEATURES_OK == 0 => match self.acked_features_select {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                1 => {
                    self.acked_features =
                        (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x024 => self.acked_features_select = value,
            0x030 => self.queue_select = value,
            0x038 => {
                if let Some(q) = self.selected_queue() {
                    // An invalid size (0, above the maximum, not a power of two) is refused by
                    // the queue and shows up as an invalid queue at activation.
                    let _ = q.try_set_size(value as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            QUEUE_NOTIFY_OFFSET => {
                // KVM normally consumes these through the ioeventfd; this is the slow path.
                let device = lock(&self.device);
                if let Some(evt) = device.queue_events().get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x064 => self.irq.ack(value),
            0x070 => self.set_status(value),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    pub fn snapshot(&self) -> TransportSnapshot {
        let device = lock(&self.device);
        self.snapshot_with(&*device)
    }

    /// The snapshot, with the device already locked by the caller.
    pub fn snapshot_with(&self, device: &dyn super::VirtioDeviceSubscriber) -> TransportSnapshot {
        let queues = device.queues().unwrap_or(&self.queues);
        TransportSnapshot {
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
            queues: queues.iter().map(QueueSnapshot::of).collect(),
        }
    }

    /// Rebuilds the transport from a snapshot, re-activating the device if the driver had.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "the snapshot has {} queues for a device with {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        self.queues = s
            .queues
            .iter()
            .map(QueueSnapshot::restore)
            .collect::<Result<_, _>>()?;
        self.features_select = s.features_select;
        self.acked_features_select = s.acked_features_select;
        self.acked_features = s.acked_features;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        self.status = s.status;
        self.irq.trigger(0);
        self.irq.ack(u32::MAX);
        if s.interrupt_status != 0 {
            self.irq.trigger(s.interrupt_status);
        }
        if self.activated() && s.status & STATUS_NEEDS_RESET == 0 {
            let activation = Activation {
                mem: self.mem.clone(),
                queues: self.queues.iter().map(super::clone_queue).collect(),
                irq: self.irq.clone(),
                acked_features: self.acked_features,
            };
            let mut device = lock(&self.device);
            device.activate(activation)?;
            device.after_restore();
        }
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_register(offset)
        } else {
            0
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.to_le_bytes().get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest> {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_register(offset, value);
        }
        // Other widths are not valid on these registers (spec 4.2.2.2): ignored.
        None
    }
}

/// One MMIO transport, as a bus device.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

#[cfg(test)]
mod tests {
    use super::super::rng::Rng;
    use super::super::test_utils::guest_memory;
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn transport() -> MmioTransport {
        let rng: SharedDevice = Arc::new(Mutex::new(Rng::new().unwrap()));
        MmioTransport::new(
            rng,
            guest_memory(),
            Arc::new(IrqLine::new(EventFd::new(0).unwrap())),
        )
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features_hi: u32) {
        write(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, 0x24, 1);
        write(t, 0x20, features_hi);
        write(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    #[test]
    fn identifies_as_modern_virtio() {
        let mut t = transport();
        assert_eq!(read(&mut t, 0), MMIO_MAGIC);
        assert_eq!(read(&mut t, 4), 2);
        assert_eq!(read(&mut t, 8), super::super::TYPE_RNG);
        write(&mut t, 0x14, 1);
        assert_eq!(read(&mut t, 0x10), 1, "VERSION_1 offered");
        assert_eq!(read(&mut t, 0x34), u32::from(super::super::QUEUE_SIZE));
        // Unaligned or narrow register accesses read zero.
        let mut b = [0u8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let mut t = transport();
        negotiate(&mut t, 0);
        assert_eq!(
            read(&mut t, 0x70) & STATUS_FEATURES_OK,
            0,
            "legacy driver refused"
        );
        write(&mut t, 0x70, 0);
        negotiate(&mut t, 1 | 2);
        assert_eq!(
            read(&mut t, 0x70) & STATUS_FEATURES_OK,
            0,
            "unoffered bit refused"
        );
        write(&mut t, 0x70, 0);
        negotiate(&mut t, 1);
        assert_ne!(read(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn queue_outside_memory_fails_activation_with_needs_reset() {
        let mut t = transport();
        negotiate(&mut t, 1);
        write(&mut t, 0x30, 0);
        write(&mut t, 0x38, 16);
        write(&mut t, 0x80, 0xffff_0000);
        write(&mut t, 0x84, 0x10);
        write(&mut t, 0x44, 1);
        write(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_ne!(read(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        // Reset clears it and the device can be set up again.
        write(&mut t, 0x70, 0);
        assert_eq!(read(&mut t, 0x70), 0);
        assert_eq!(read(&mut t, 0x44), 0);
    }

    #[test]
    fn valid_setup_activates_and_queue_registers_freeze() {
        let mut t = transport();
        negotiate(&mut t, 1);
        write(&mut t, 0x30, 0);
        write(&mut t, 0x38, 16);
        write(&mut t, 0x80, 0x10_0000);
        write(&mut t, 0x90, 0x10_1000);
        write(&mut t, 0xa0, 0x10_2000);
        write(&mut t, 0x44, 1);
        write(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        let status = read(&mut t, 0x70);
        assert_ne!(status & STATUS_DRIVER_OK, 0);
        assert_eq!(status & STATUS_NEEDS_RESET, 0);
        let snap = t.snapshot();
        assert_eq!(snap.queues[0].desc_table, 0x10_0000);
        write(&mut t, 0x80, 0x20_0000);
        assert_eq!(t.snapshot().queues[0].desc_table, 0x10_0000);
        // A restored transport re-activates its device with the same queues.
        let mut fresh = transport();
        fresh.restore(&snap).unwrap();
        assert_eq!(fresh.snapshot(), snap);
    }
}
