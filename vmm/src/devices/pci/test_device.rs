//! The PCI test device: a small emulated function that the test guest's `pci` scenario finds on
//! bus 0 and checks through ECAM, with no host hardware. It uses the id QEMU documents for its PCI
//! test device, 1b36:0005 (class ff/00/00), for which Linux has no driver, so a Linux guest leaves
//! it alone; its registers are Airlock's own (below), not QEMU's.
//!
//! | where | what |
//! | --- | --- |
//! | config 0x40 | MSI-X capability: 2 vectors, table in BAR0 at 0x800, PBA in BAR0 at 0xc00 |
//! | config 0x100 | extended capability 0x000b (VSEC), version 1, body `AIRLOCK-PCI-TEST` (only through ECAM) |
//! | BAR0 (32-bit memory, 4 KiB) +0x0 | magic 0x4b434c41 (`ALCK`), read-only |
//! | BAR0 +0x4 | scratch register, read/write |
//! | BAR0 +0x8 | doorbell: writing N raises MSI-X vector N (pending bit if masked) |
//! | BAR0 +0xc | count of doorbell writes, read-only |
//! | BAR2 (64-bit prefetchable memory, 1 MiB) | read-only pattern: byte at offset o = (o * 7 + 3) mod 251 |

use super::config::{
    BarKind, BarSpec, ConfigSpaceError, PciConfig, PciHeader, CAP_ID_MSIX, EXT_CAP_ID_VSEC,
};
use super::layout::WindowAllocator;
use super::msi::{InterruptVectors, MsixCapability, MsixTable, MSIX_CTRL_ENABLE};
use super::root::{decoded_bars, BarRange, PciDevice};

pub const TEST_DEVICE_VENDOR_ID: u16 = 0x1b36;
pub const TEST_DEVICE_DEVICE_ID: u16 = 0x0005;
pub const TEST_DEVICE_MAGIC: u32 = 0x4b43_4c41;
pub const TEST_DEVICE_BAR0_SIZE: u64 = 0x1000;
pub const TEST_DEVICE_BAR2_SIZE: u64 = 1 << 20;
pub const TEST_DEVICE_MSIX_VECTORS: u16 = 2;
pub const TEST_DEVICE_VSEC: &[u8; 16] = b"AIRLOCK-PCI-TEST";
const MSIX_TABLE_OFFSET: u64 = 0x800;
const MSIX_PBA_OFFSET: u64 = 0xc00;

/// Byte `offset` of BAR2.
pub fn bar2_pattern(offset: u64) -> u8 {
    ((offset * 7 + 3) % 251) as u8
}

pub struct PciTestDevice {
    config: PciConfig,
    msix_cap: MsixCapability,
    msix: MsixTable,
    vectors: Option<InterruptVectors>,
    scratch: u32,
    doorbells: u32,
}

impl PciTestDevice {
    /// Places BAR0 in the 32-bit window and BAR2 in the 64-bit one; `vectors` (2 of them) make
    /// the doorbell raise real interrupts, and may be None where nothing listens.
    pub fn new(
        mmio32: &mut WindowAllocator,
        mmio64: &mut WindowAllocator,
        vectors: Option<InterruptVectors>,
    ) -> Result<Self, String> {
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: TEST_DEVICE_VENDOR_ID,
            device_id: TEST_DEVICE_DEVICE_ID,
            class: (0xff, 0x00, 0x00),
            revision: 1,
            subsystem_vendor_id: TEST_DEVICE_VENDOR_ID,
            subsystem_id: TEST_DEVICE_DEVICE_ID,
            interrupt_pin: 0,
        });
        let bar0 = mmio32
            .allocate("test device BAR0", TEST_DEVICE_BAR0_SIZE, 0x1000)
            .map_err(|e| e.to_string())?;
        let bar2 = mmio64
            .allocate("test device BAR2", TEST_DEVICE_BAR2_SIZE, 0x1000)
            .map_err(|e| e.to_string())?;
        let cfg_err = |e: ConfigSpaceError| e.to_string();
        config
            .add_bar(
                0,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: TEST_DEVICE_BAR0_SIZE,
                    prefetchable: false,
                },
                bar0,
            )
            .map_err(cfg_err)?;
        config
            .add_bar(
                2,
                BarSpec {
                    kind: BarKind::Mem64,
                    size: TEST_DEVICE_BAR2_SIZE,
                    prefetchable: true,
                },
                bar2,
            )
            .map_err(cfg_err)?;
        let msix_cap = MsixCapability {
            offset: 0,
            table_size: TEST_DEVICE_MSIX_VECTORS,
            table_bar: 0,
            table_offset: MSIX_TABLE_OFFSET,
            pba_bar: 0,
            pba_offset: MSIX_PBA_OFFSET,
        };
        let offset = config
            .add_capability(CAP_ID_MSIX, &msix_cap.body(), &MsixCapability::body_wmask())
            .map_err(cfg_err)?;
        config
            .add_ext_capability(EXT_CAP_ID_VSEC, 1, TEST_DEVICE_VSEC)
            .map_err(cfg_err)?;
        Ok(PciTestDevice {
            config,
            msix_cap: MsixCapability { offset, ..msix_cap },
            msix: MsixTable::new(TEST_DEVICE_MSIX_VECTORS),
            vectors,
            scratch: 0,
            doorbells: 0,
        })
    }

    fn sync_vectors(&mut self) {
        let Some(vectors) = self.vectors.as_mut() else {
            return;
        };
        for (i, e) in self.msix.entries.iter().enumerate() {
            let result = if self.msix.enabled {
                vectors.update(i, e.message(), self.msix.vector_masked(i))
            } else {
                vectors.disable(i)
            };
            if let Err(e) = result {
                eprintln!("airlock-vmm: PCI test device: MSI-X vector {i}: {e}");
            }
        }
    }

    fn ring(&mut self, vector: usize) {
        self.doorbells = self.doorbells.wrapping_add(1);
        if vector >= self.msix.entries.len() {
            return;
        }
        if !self.msix.enabled || self.msix.vector_masked(vector) {
            self.msix.set_pending(vector, true);
        } else if let Some(v) = &self.vectors {
            v.trigger(vector);
        }
    }
}

impl PciDevice for PciTestDevice {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config.read_dword(reg)
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.msix_cap.offset + 2;
        if offset < control + 2
            && offset + data.len() > control
            && self.msix.set_control(self.config.u16_at(control))
        {
            self.sync_vectors();
        }
    }

    fn bar_ranges(&self) -> Vec<BarRange> {
        decoded_bars(&self.config)
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match bar {
            0 if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix_cap.table_len())
                .contains(&offset) =>
            {
                self.msix.read_table(offset - MSIX_TABLE_OFFSET, data)
            }
            0 if offset >= MSIX_PBA_OFFSET => self.msix.read_pba(offset - MSIX_PBA_OFFSET, data),
            0 => {
                let regs = [TEST_DEVICE_MAGIC, self.scratch, 0, self.doorbells];
                let mut bytes = [0u8; 16];
                for (i, r) in regs.iter().enumerate() {
                    bytes[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
                }
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
                }
            }
            2 => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bar2_pattern(offset + i as u64);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.msix_cap.table_len()).contains(&offset) {
            if let Some(i) = self.msix.write_table(offset - MSIX_TABLE_OFFSET, data) {
                if self.msix.enabled {
                    let (msg, masked) =
                        (self.msix.entries[i].message(), self.msix.vector_masked(i));
                    if let Some(v) = self.vectors.as_mut() {
                        if let Err(e) = v.update(i, msg, masked) {
                            eprintln!("airlock-vmm: PCI test device: MSI-X vector {i}: {e}");
                        }
                    }
                }
            }
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        match offset {
            4 => self.scratch = v,
            8 => self.ring(v as usize),
            _ => {}
        }
    }

    fn name(&self) -> String {
        "PCI test device".into()
    }
}

/// Whether MSI-X is enabled in the test device's control word (for tests).
pub fn msix_enabled(control: u16) -> bool {
    control & MSIX_CTRL_ENABLE != 0
}

#[cfg(test)]
mod tests {
    use super::super::config::{capabilities, ext_capabilities, BAR0, COMMAND, COMMAND_MEMORY};
    use super::super::layout::{PCI_MMIO32_START, PCI_MMIO64_MIN_START};
    use super::super::msi::fake::RecordingRouter;
    use super::super::root::{PciEcam, PciRoot, PciWindow};
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    fn setup() -> (Arc<Mutex<PciRoot>>, Arc<RecordingRouter>) {
        let router = RecordingRouter::new();
        let vectors = InterruptVectors::new(router.clone(), 2).unwrap();
        let mut m32 = WindowAllocator::mmio32();
        let mut m64 = WindowAllocator::mmio64(PCI_MMIO64_MIN_START, 512 << 30);
        let dev = PciTestDevice::new(&mut m32, &mut m64, Some(vectors)).unwrap();
        let root = Arc::new(Mutex::new(PciRoot::new()));
        root.lock()
            .unwrap()
            .add_device(Arc::new(Mutex::new(dev)))
            .unwrap();
        (root, router)
    }

    fn ecam_rd(e: &mut PciEcam, off: u64) -> u32 {
        let mut d = [0u8; 4];
        e.read((1 << 15) | off, &mut d);
        u32::from_le_bytes(d)
    }

    fn ecam_wr(e: &mut PciEcam, off: u64, v: u32) {
        e.write((1 << 15) | off, &v.to_le_bytes());
    }

    #[test]
    fn the_guest_view_through_ecam() {
        let (root, _) = setup();
        let mut e = PciEcam::new(root.clone());
        assert_eq!(ecam_rd(&mut e, 0), 0x0005_1b36);
        assert_eq!(ecam_rd(&mut e, 8) >> 8, 0xff_0000);
        assert_eq!(ecam_rd(&mut e, BAR0 as u64), PCI_MMIO32_START as u32);
        assert_eq!(ecam_rd(&mut e, BAR0 as u64 + 8), 0xc);
        assert_eq!(
            ecam_rd(&mut e, BAR0 as u64 + 12),
            (PCI_MMIO64_MIN_START >> 32) as u32
        );
        let dev = root.lock().unwrap().devices()[1].1.clone();
        let caps = capabilities(|o| {
            let mut d = dev.lock().unwrap();
            (d.read_config(o / 4) >> ((o % 4) * 8)) as u8
        });
        assert_eq!(caps, vec![(CAP_ID_MSIX, 0x40)]);
        let ext = ext_capabilities(|o| dev.lock().unwrap().read_config(o / 4));
        assert_eq!(ext, vec![(EXT_CAP_ID_VSEC, 1, 0x100)]);
        assert_eq!(ecam_rd(&mut e, 0x104), u32::from_le_bytes(*b"AIRL"));
    }

    #[test]
    fn registers_pattern_and_msix_doorbell() {
        let (root, router) = setup();
        let mut e = PciEcam::new(root.clone());
        ecam_wr(&mut e, COMMAND as u64, u32::from(COMMAND_MEMORY));
        let mut w = PciWindow::mmio(root.clone(), PCI_MMIO32_START);
        let mut d = [0u8; 4];
        w.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), TEST_DEVICE_MAGIC);
        w.write(4, &0x1234_5678u32.to_le_bytes());
        w.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
        let mut w64 = PciWindow::mmio(root.clone(), PCI_MMIO64_MIN_START);
        w64.read(0x1000, &mut d);
        assert_eq!(d[0], bar2_pattern(0x1000));
        assert_eq!(d[3], bar2_pattern(0x1003));

        // Doorbell while MSI-X is off: pending bit.
        w.write(8, &1u32.to_le_bytes());
        w.read(0xc00, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0b10);
        // Program vector 1, enable MSI-X, unmask: routed and armed.
        w.write(0x810, &0xfee0_0000u32.to_le_bytes());
        w.write(0x818, &0x45u32.to_le_bytes());
        ecam_wr(&mut e, 0x40, 0x8001_0011);
        assert!(router.armed.lock().unwrap().is_empty());
        w.write(0x81c, &0u32.to_le_bytes());
        assert_eq!(router.armed.lock().unwrap().len(), 1);
        assert_eq!(router.routes.lock().unwrap()[&25].data, 0x45);
        assert!(router.armed.lock().unwrap().contains(&25));
        w.write(8, &1u32.to_le_bytes());
        w.read(0xc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 2);
        // Disabling MSI-X drops the routes.
        ecam_wr(&mut e, 0x40, 0x0001_0011);
        assert!(router.routes.lock().unwrap().is_empty());
        assert!(msix_enabled(0x8001));
    }
}
