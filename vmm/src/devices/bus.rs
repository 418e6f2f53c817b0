//! An address-range bus (one for port I/O, one for MMIO) that dispatches guest accesses.

use std::sync::{Arc, Mutex};

/// What a device write can ask of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExitRequest {
    /// The guest asked for a reboot (i8042 reset line): the VMM stops and exits 0.
    Reboot,
}

/// A device on a bus. `offset` is relative to the base address the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps a device already there")]
    Overlap { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices sorted by base address. Buses hold a handful of devices, so a linear scan is fastest.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |e: &Entry| end.is_none_or(|end| base < e.base + e.len && e.base < end);
        if self.entries.iter().any(overlaps) || end.is_none() {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        self.entries.sort_by_key(|e| e.base);
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        self.entries.iter().find_map(|e| {
            let offset = addr.checked_sub(e.base)?;
            (offset.checked_add(size as u64)? <= e.len).then_some((e, offset))
        })
    }

    /// Reads from the device at `addr`; returns false (and all-ones data, as on real hardware)
    /// where nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; writes to nothing are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<VmExitRequest> {
        let (entry, offset) = self.find(addr, data.len())?;
        let result = lock(&entry.device).write(offset, data);
        result
    }
}

/// Locks a device, recovering from a poisoned lock: device state is plain data, and one vCPU
/// thread's panic must not wedge every other vCPU.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest> {
            self.writes.push((offset, data.to_vec()));
            (data == [0xfe]).then_some(VmExitRequest::Reboot)
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(bus.write(0x3f8, &[1]), None);
        assert_eq!(bus.write(0x3f9, &[0xfe]), Some(VmExitRequest::Reboot));
        assert_eq!(bus.write(0x500, &[0xfe]), None);
        assert_eq!(
            dev.lock().unwrap().writes,
            vec![(0, vec![1]), (1, vec![0xfe])]
        );
    }

    #[test]
    fn access_straddling_the_end_is_not_routed() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x60, 1)
            .unwrap();
        let mut w = [0u8; 2];
        assert!(!bus.read(0x60, &mut w));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert!(bus.insert(d(), 0x10f, 1).is_err());
        assert!(bus.insert(d(), 0xf8, 0x9).is_err());
        assert!(bus.insert(d(), 0x200, 0).is_err());
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0x110, 1).unwrap();
    }
}
