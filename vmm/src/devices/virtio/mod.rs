//! virtio devices over virtio-mmio (version 2, modern only). Each device is shared between its
//! MMIO transport, which the vCPU threads drive (registers, activation), and the device event
//! loop thread, which does the device's work: queue notifications arrive there through KVM
//! ioeventfds, and used-buffer interrupts leave through irqfds.

pub mod attach;
pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Queue size every device offers; drivers may choose less.
pub const QUEUE_SIZE: u16 = 256;

/// A device's interrupt line: the irqfd raising its GSI, and the InterruptStatus bits the driver
/// reads and acknowledges through the transport.
pub struct IrqLine {
    evt: EventFd,
    status: AtomicU32,
}

impl IrqLine {
    pub fn new(evt: EventFd) -> Self {
        IrqLine {
            evt,
            status: AtomicU32::new(0),
        }
    }

    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // A lost interrupt is recovered by the driver's own polling; nothing to do on failure.
        let _ = self.evt.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqLine>,
    pub acked_features: u64,
}

/// What a device with a single queue (block, rng) keeps while active.
pub(crate) struct SingleQueue {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub irq: Arc<IrqLine>,
}

impl SingleQueue {
    pub fn activate(a: Activation, device: &str) -> Result<SingleQueue, String> {
        let queue =
            (a.queues.into_iter().next()).ok_or_else(|| format!("{device} needs one queue"))?;
        Ok(SingleQueue {
            mem: a.mem,
            queue,
            irq: a.irq,
        })
    }
}

/// A virtio device's side of the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn avail_features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The eventfds KVM signals when the driver notifies each queue (registered as ioeventfds).
    fn queue_events(&self) -> &[EventFd];
    fn activate(&mut self, activation: Activation) -> Result<(), String>;
    /// Back to the state before activation (the driver wrote 0 to Status).
    fn reset(&mut self);
    /// The live queues, for snapshots (None before activation).
    fn queues(&self) -> Option<&[Queue]>;
    /// Wakes the device loop for every queue, e.g. for buffers the driver posted before
    /// activation.
    fn kick_queues(&self) {
        for evt in self.queue_events() {
            let _ = evt.write(1);
        }
    }
    /// Called after a restore, before the guest runs again: e.g. vsock tells the guest its
    /// connections are gone.
    fn after_restore(&mut self) {}
}

/// A device as both the transport and the event loop hold it.
pub type SharedDevice = Arc<Mutex<dyn VirtioDeviceSubscriber>>;

/// A virtio device that also handles its own events on the device loop.
pub trait VirtioDeviceSubscriber: VirtioDevice + event_manager::MutEventSubscriber {}
impl<T: VirtioDevice + event_manager::MutEventSubscriber> VirtioDeviceSubscriber for T {}

/// Copies `data.len()` bytes of a device's config space from `offset`; reads past the end read
/// zero, as the spec leaves them undefined and zero is the safe answer.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A queue's registers and positions, for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueueSnapshot {
    pub fn of(q: &Queue) -> Self {
        QueueSnapshot {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        }
    }

    pub fn restore(&self) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| format!("queue: {e:?}"))?;
        q.try_set_size(self.size)
            .map_err(|e| format!("queue size {}: {e:?}", self.size))?;
        q.set_desc_table_address(
            Some(self.desc_table as u32),
            Some((self.desc_table >> 32) as u32),
        );
        q.set_avail_ring_address(
            Some(self.avail_ring as u32),
            Some((self.avail_ring >> 32) as u32),
        );
        q.set_used_ring_address(
            Some(self.used_ring as u32),
            Some((self.used_ring >> 32) as u32),
        );
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_ready(self.ready);
        Ok(q)
    }
}

/// A copy of a queue's configuration and positions (Queue itself is not Clone).
pub fn clone_queue(q: &Queue) -> Queue {
    Queue::try_from(q.state()).expect("a queue's own state is valid")
}

/// A descriptor chain over the device's view of guest memory.
pub type Chain<'a> = virtio_queue::DescriptorChain<&'a GuestMemoryMmap>;

/// Hands every available chain to `handle`, which returns the bytes it wrote for the driver, and
/// returns each to the used ring. Returns whether the driver asked to be interrupted. A chain
/// `handle` cannot use is still returned (with length 0), so a hostile driver loses only its own
/// request; a broken avail ring stops the queue, as virtio-queue refuses to walk it.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut handle: impl FnMut(Chain<'_>) -> u32,
) -> bool {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = handle(chain);
        if queue.add_used(mem, head, len).is_err() {
            // The used ring is outside guest memory: nothing more can be returned.
            break;
        }
        used_any = true;
    }
    used_any && queue.needs_notification(mem).unwrap_or(true)
}

#[cfg(test)]
pub(crate) mod test_utils {
    use crate::vstate::memory::GuestMemoryMmap;
    use vm_memory::GuestAddress;

    pub fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }
}
