//! virtio-rng: fills the guest's buffers from the host's random source (getrandom).

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    drain_queue, Activation, SingleQueue, VirtioDevice, INT_USED_RING, QUEUE_SIZE, TYPE_RNG,
    VIRTIO_F_VERSION_1,
};

/// Most bytes given per request: a driver asking for more gets this much and asks again.
const MAX_REQUEST: usize = 64 << 10;

pub struct Rng {
    queue_evts: [EventFd; 1],
    active: Option<SingleQueue>,
}

impl Rng {
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng {
            queue_evts: [EventFd::new(libc::EFD_NONBLOCK)?],
            active: None,
        })
    }

    fn fill(buf: &mut [u8]) -> bool {
        // SAFETY: getrandom writes at most buf.len() bytes into our buffer.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        n == buf.len() as isize
    }

    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let notify = drain_queue(&mut active.queue, &mem, |chain| {
            let Ok(mut writer) = chain.writer(&mem) else {
                return 0;
            };
            let len = writer.available_bytes().min(MAX_REQUEST);
            let mut buf = vec![0u8; len];
            if !Self::fill(&mut buf) || std::io::Write::write_all(&mut writer, &buf).is_err() {
                return 0;
            }
            len as u32
        });
        if notify {
            active.irq.trigger(INT_USED_RING);
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }
    fn activate(&mut self, a: Activation) -> Result<(), String> {
        self.active = Some(SingleQueue::activate(a, "rng")?);
        // Requests made before activation were waiting on the eventfd.
        // The work itself happens on the device loop, never on the vCPU that activated us.
        self.kick_queues();
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| std::slice::from_ref(&a.queue))
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            eprintln!("airlock-vmm: rng: cannot watch its queue: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_evts[0].as_raw_fd() {
            let _ = self.queue_evts[0].read();
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::guest_memory;
    use super::super::IrqLine;
    use super::*;
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;
    const F_NEXT: u16 = 1;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    #[test]
    fn fills_writable_buffers_and_drops_bad_ones() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        vq.build_desc_chain(&[desc(0x10_000, 64, F_WRITE, 0)])
            .unwrap();
        let mut rng = Rng::new().unwrap();
        let irq = Arc::new(IrqLine::new(EventFd::new(0).unwrap()));
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![vq.create_queue::<Queue>().unwrap()],
            irq: irq.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        rng.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 64);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x10_000)).unwrap();
        assert_ne!(buf, [0u8; 64]);
        assert_ne!(irq.status() & INT_USED_RING, 0);
    }

    #[test]
    fn hostile_chains_are_dropped_not_served() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // Outside guest memory; read-only; a loop of two descriptors.
        vq.add_desc_chains(&[desc(0x4000_0000, 64, F_WRITE, 0)], 0)
            .unwrap();
        let mut rng = Rng::new().unwrap();
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![vq.create_queue::<Queue>().unwrap()],
            irq: Arc::new(IrqLine::new(EventFd::new(0).unwrap())),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        rng.process_queue();
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        let _ = F_NEXT;
    }
}
