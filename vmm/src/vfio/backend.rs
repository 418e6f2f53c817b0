//! The VFIO calls the passthrough device makes, behind a trait: [`super::real`] implements it over
//! vfio-ioctls; tests use [`fake::FakeVfio`], a device made of a saved configuration space.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// VFIO PCI region indexes: BAR0..5, expansion ROM, configuration space.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// VFIO PCI interrupt indexes.
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

/// A region: its size, whether it can be mmap'ed, and the mmap'able areas (offset, len) when
/// VFIO reports a sparse layout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionInfo {
    pub size: u64,
    pub mmap: bool,
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// Host memory mapped from a region; unmapped on drop.
pub struct HostMapping {
    pub addr: u64,
    pub len: u64,
    unmap: Option<Box<dyn FnOnce(u64, u64) + Send>>,
}

impl HostMapping {
    pub fn new(addr: u64, len: u64, unmap: Option<Box<dyn FnOnce(u64, u64) + Send>>) -> Self {
        HostMapping { addr, len, unmap }
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        if let Some(f) = self.unmap.take() {
            f(self.addr, self.len);
        }
    }
}

/// One VFIO device (and the container it is in, for DMA).
pub trait VfioBackend: Send + Sync {
    /// None where the device has no such region (or it is empty).
    fn region(&self, index: u32) -> Option<RegionInfo>;
    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]);
    fn write_region(&self, index: u32, offset: u64, data: &[u8]);
    /// Maps `len` bytes at `offset` of region `index` into this process.
    fn mmap_region(&self, index: u32, offset: u64, len: u64) -> io::Result<HostMapping>;
    /// How many interrupts of `index` (INTx, MSI, MSI-X) the device has.
    fn irq_count(&self, index: u32) -> u32;
    /// VFIO_DEVICE_SET_IRQS, ACTION_TRIGGER with one eventfd per vector from 0.
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;
    fn disable_irq(&self, index: u32) -> io::Result<()>;
    /// VFIO_DEVICE_SET_IRQS, ACTION_UNMASK with an eventfd: INTx is unmasked when it fires.
    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()>;
    /// Maps `[host_addr, host_addr + size)` for device DMA at IOVA `iova`.
    ///
    /// # Safety
    /// The range must stay mapped (and not be handed to anything else) until
    /// [`Self::dma_unmap`]: the device reads and writes it at any time.
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()>;
    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()>;
    fn reset(&self);
}

#[cfg(test)]
pub mod fake {
    //! A fake VFIO device from a configuration-space data file and BAR sizes.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub struct FakeState {
        pub config: Vec<u8>,
        pub config_writes: Vec<(u64, Vec<u8>)>,
        pub region_writes: Vec<(u32, u64, Vec<u8>)>,
        /// (index, number of eventfds) of each enable; (index, 0) for a disable.
        pub irqs: Vec<(u32, usize)>,
        pub intx_unmask: bool,
        pub dma: Vec<(u64, u64)>,
        pub mmaps: Vec<(u32, u64, u64)>,
        pub memory: BTreeMap<(u32, u64), u8>,
        pub active: Option<u32>,
    }

    pub struct FakeVfio {
        pub regions: Vec<Option<RegionInfo>>,
        pub irq_counts: [u32; 3],
        pub state: Mutex<FakeState>,
        /// Backing for mmaps (kept alive as long as the fake).
        backing: Mutex<Vec<Vec<u8>>>,
    }

    impl FakeVfio {
        /// `bars`: (index, size, mmap'able) of each BAR region.
        pub fn new(config: &[u8], bars: &[(u32, u64, bool)], irq_counts: [u32; 3]) -> Self {
            let mut regions = vec![None; 9];
            for &(i, size, mmap) in bars {
                regions[i as usize] = Some(RegionInfo {
                    size,
                    mmap,
                    sparse: None,
                });
            }
            regions[VFIO_PCI_CONFIG_REGION_INDEX as usize] = Some(RegionInfo {
                size: config.len() as u64,
                mmap: false,
                sparse: None,
            });
            FakeVfio {
                regions,
                irq_counts,
                state: Mutex::new(FakeState {
                    config: config.to_vec(),
                    ..Default::default()
                }),
                backing: Mutex::new(Vec::new()),
            }
        }

        /// BAR sizes from a sysfs `resource` file (start end flags per line).
        pub fn bars_from_resource(text: &str) -> Vec<(u32, u64, bool)> {
            text.lines()
                .take(6)
                .enumerate()
                .filter_map(|(i, l)| {
                    let v: Vec<u64> = l
                        .split_whitespace()
                        .map(|t| u64::from_str_radix(t.trim_start_matches("0x"), 16).unwrap())
                        .collect();
                    (v[0] != 0 || v[1] != 0).then(|| (i as u32, v[1] - v[0] + 1, v[2] & 1 == 0))
                })
                .collect()
        }
    }

    impl VfioBackend for FakeVfio {
        fn region(&self, index: u32) -> Option<RegionInfo> {
            self.regions.get(index as usize).cloned().flatten()
        }
        fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) {
            let s = self.state.lock().unwrap();
            for (i, b) in data.iter_mut().enumerate() {
                let o = offset + i as u64;
                *b = if index == VFIO_PCI_CONFIG_REGION_INDEX {
                    s.config.get(o as usize).copied().unwrap_or(0xff)
                } else {
                    s.memory.get(&(index, o)).copied().unwrap_or(0)
                };
            }
        }
        fn write_region(&self, index: u32, offset: u64, data: &[u8]) {
            let mut s = self.state.lock().unwrap();
            if index == VFIO_PCI_CONFIG_REGION_INDEX {
                s.config_writes.push((offset, data.to_vec()));
                for (i, b) in data.iter().enumerate() {
                    if let Some(c) = s.config.get_mut(offset as usize + i) {
                        *c = *b;
                    }
                }
            } else {
                s.region_writes.push((index, offset, data.to_vec()));
                for (i, b) in data.iter().enumerate() {
                    s.memory.insert((index, offset + i as u64), *b);
                }
            }
        }
        fn mmap_region(&self, index: u32, offset: u64, len: u64) -> io::Result<HostMapping> {
            let buf = vec![0u8; len as usize];
            let addr = buf.as_ptr() as u64;
            self.backing.lock().unwrap().push(buf);
            self.state.lock().unwrap().mmaps.push((index, offset, len));
            Ok(HostMapping::new(addr, len, None))
        }
        fn irq_count(&self, index: u32) -> u32 {
            self.irq_counts.get(index as usize).copied().unwrap_or(0)
        }
        fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            // vfio-pci refuses a second interrupt type while one is on.
            if s.active.is_some_and(|a| a != index) || fds.len() as u32 > self.irq_count(index) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            s.active = Some(index);
            s.irqs.push((index, fds.len()));
            Ok(())
        }
        fn disable_irq(&self, index: u32) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            if s.active == Some(index) {
                s.active = None;
            }
            s.irqs.push((index, 0));
            Ok(())
        }
        fn set_intx_unmask_fd(&self, _: &EventFd) -> io::Result<()> {
            self.state.lock().unwrap().intx_unmask = true;
            Ok(())
        }
        unsafe fn dma_map(&self, iova: u64, size: u64, _: u64) -> io::Result<()> {
            self.state.lock().unwrap().dma.push((iova, size));
            Ok(())
        }
        fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()> {
            self.state
                .lock()
                .unwrap()
                .dma
                .retain(|&d| d != (iova, size));
            Ok(())
        }
        fn reset(&self) {}
    }
}
