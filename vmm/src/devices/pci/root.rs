//! The PCI root complex: bus 0 with a host bridge at 00:00.0, reached through configuration
//! mechanism #1 (ports 0xcf8/0xcfc) and ECAM, and the MMIO and I/O windows that route BAR
//! accesses to whichever device currently decodes the address.
//!
//! BAR relocation needs no bus changes: the whole window is one entry on the VMM's MMIO bus
//! ([`PciMmioWindow`]) and the root looks the address up in a map it rebuilds after every
//! configuration write. Passed-through BARs that are mapped straight into the guest never exit
//! to the VMM; their devices move their KVM memory slots themselves when the guest moves a BAR.

use std::sync::{Arc, Mutex};

use super::config::{BarKind, PciConfig, COMMAND_IO, COMMAND_MEMORY};
use super::layout::{HOST_BRIDGE_SLOT, PCI_SLOTS};
use crate::devices::bus::{lock, BusDevice, VmExitRequest};

/// Intel's id for a virtual PCIe host bridge, as Cloud Hypervisor and Firecracker use.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;

/// A decoded BAR: where the guest put it and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRange {
    pub bar: usize,
    pub base: u64,
    pub len: u64,
    /// I/O port space rather than memory.
    pub io: bool,
}

/// A function on the PCI bus. Offsets in configuration space are 0..4096; accesses come in 1,
/// 2 or 4 bytes, naturally aligned.
pub trait PciDevice: Send {
    /// Reads the dword at `reg * 4`.
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` at `offset`.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// The BARs that decode now (enabled in the command register, programmed, non-empty).
    fn bar_ranges(&self) -> Vec<BarRange>;
    /// An access `offset` bytes into BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// For messages: e.g. "vfio 0000:41:00.0".
    fn name(&self) -> String;
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The BAR ranges of an emulated config space that decode now: the usual helper for devices.
pub fn decoded_bars(config: &PciConfig) -> Vec<BarRange> {
    let cmd = config.command();
    (0..super::config::BAR_COUNT)
        .filter_map(|i| {
            let spec = config.bar_spec(i)?;
            let io = spec.kind == BarKind::Io;
            let enabled = if io {
                cmd & COMMAND_IO != 0
            } else {
                cmd & COMMAND_MEMORY != 0
            };
            let base = config.bar_address(i)?;
            // A BAR mid-sizing holds the size mask: Linux turns decoding off first, and a BAR
            // at 0 is unassigned.
            (enabled && base != 0).then_some(BarRange {
                bar: i,
                base,
                len: spec.size,
                io,
            })
        })
        .collect()
}

/// The host bridge at 00:00.0.
struct HostBridge {
    config: PciConfig,
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config.read_dword(reg)
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_ranges(&self) -> Vec<BarRange> {
        Vec::new()
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
    fn name(&self) -> String {
        "host bridge".into()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    #[error("PCI slot {0} is already taken")]
    SlotTaken(u8),
    #[error("all {PCI_SLOTS} slots of PCI bus 0 are taken")]
    BusFull,
}

struct Decode {
    base: u64,
    len: u64,
    io: bool,
    slot: usize,
    bar: usize,
}

/// Bus 0. Share it as `Arc<Mutex<PciRoot>>` between the config-space and window bus devices.
pub struct PciRoot {
    slots: Vec<Option<SharedPciDevice>>,
    decode: Vec<Decode>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = (0..PCI_SLOTS).map(|_| None).collect();
        let bridge = HostBridge {
            config: PciConfig::host_bridge(HOST_BRIDGE_VENDOR_ID, HOST_BRIDGE_DEVICE_ID),
        };
        slots[usize::from(HOST_BRIDGE_SLOT)] = Some(Arc::new(Mutex::new(bridge)));
        PciRoot {
            slots,
            decode: Vec::new(),
        }
    }

    /// Puts `device` in the first free slot and returns the slot (its device number).
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciRootError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciRootError::BusFull)?;
        self.slots[slot] = Some(device);
        self.rebuild_decode();
        Ok(slot as u8)
    }

    /// Puts `device` at `slot`.
    pub fn add_device_at(&mut self, slot: u8, device: SharedPciDevice) -> Result<(), PciRootError> {
        match self.slots.get_mut(usize::from(slot)) {
            Some(s @ None) => *s = Some(device),
            Some(Some(_)) => return Err(PciRootError::SlotTaken(slot)),
            None => return Err(PciRootError::BusFull),
        }
        self.rebuild_decode();
        Ok(())
    }

    /// The occupied slots (device numbers) and their devices.
    pub fn devices(&self) -> Vec<(u8, SharedPciDevice)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, d)| Some((i as u8, d.clone()?)))
            .collect()
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(device))?.as_ref()
    }

    /// A configuration read of `data.len()` (1, 2 or 4) bytes at `offset` of bus/device/function.
    /// Absent functions read all ones, as on real hardware.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        let Some(dev) = self.function(bus, device, function) else {
            return;
        };
        if !valid_access(offset, data.len()) {
            return;
        }
        let dword = lock(dev).read_config(offset / 4).to_le_bytes();
        let start = offset % 4;
        data.copy_from_slice(&dword[start..start + data.len()]);
    }

    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(dev) = self.function(bus, device, function) else {
            return;
        };
        if !valid_access(offset, data.len()) {
            return;
        }
        lock(dev).write_config(offset, data);
        // Any write may have moved a BAR or switched decoding.
        self.rebuild_decode();
    }

    fn rebuild_decode(&mut self) {
        let mut decode = Vec::new();
        for (slot, dev) in self.slots.iter().enumerate() {
            let Some(dev) = dev else { continue };
            for r in lock(dev).bar_ranges() {
                decode.push(Decode {
                    base: r.base,
                    len: r.len,
                    io: r.io,
                    slot,
                    bar: r.bar,
                });
            }
        }
        self.decode = decode;
    }

    fn find(&self, addr: u64, len: usize, io: bool) -> Option<(&SharedPciDevice, usize, u64)> {
        // The first match wins where a guest programs overlapping BARs.
        let d = self.decode.iter().find(|d| {
            d.io == io
                && addr >= d.base
                && addr
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= d.base + d.len)
        })?;
        Some((self.slots[d.slot].as_ref()?, d.bar, addr - d.base))
    }

    /// A BAR access at guest-physical (or port, with `io`) address `addr`; false where no BAR
    /// decodes it (the data then reads all ones).
    pub fn bar_read(&self, addr: u64, data: &mut [u8], io: bool) -> bool {
        match self.find(addr, data.len(), io) {
            Some((dev, bar, offset)) => {
                lock(dev).read_bar(bar, offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn bar_write(&self, addr: u64, data: &[u8], io: bool) -> bool {
        match self.find(addr, data.len(), io) {
            Some((dev, bar, offset)) => {
                lock(dev).write_bar(bar, offset, data);
                true
            }
            None => false,
        }
    }
}

fn valid_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) && offset + len <= 4096
}

pub type SharedPciRoot = Arc<Mutex<PciRoot>>;

/// Ports 0xcf8..0xd00: CONFIG_ADDRESS (enable bit 31, bus 23:16, device 15:11, function 10:8,
/// register 7:2) and CONFIG_DATA. Only the first 256 bytes of each function are reachable here.
pub struct PciConfigIo {
    root: SharedPciRoot,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: SharedPciRoot) -> Self {
        PciConfigIo { root, address: 0 }
    }

    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (a & 0xfc) as usize + data_offset as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let bytes = self.address.to_le_bytes();
                let o = offset as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(o + i).copied().unwrap_or(0xff);
                }
            }
            _ => match self.target(offset - 4) {
                Some((bus, dev, func, reg)) => {
                    lock(&self.root).config_read(bus, dev, func, reg, data)
                }
                None => data.fill(0xff),
            },
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest> {
        match offset {
            0..=3 => {
                let mut bytes = self.address.to_le_bytes();
                let o = offset as usize;
                for (i, b) in data.iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(o + i) {
                        *slot = *b;
                    }
                }
                // Bits 30:24 are reserved and 1:0 are zero in CONFIG_ADDRESS.
                self.address = u32::from_le_bytes(bytes) & 0x80ff_fffc;
            }
            _ => {
                if let Some((bus, dev, func, reg)) = self.target(offset - 4) {
                    lock(&self.root).config_write(bus, dev, func, reg, data);
                }
            }
        }
        None
    }
}

/// The ECAM window: offset = bus << 20 | device << 15 | function << 12 | register.
pub struct PciEcam {
    root: SharedPciRoot,
}

/// Splits an ECAM offset into (bus, device, function, register).
pub fn ecam_decode(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl PciEcam {
    pub fn new(root: SharedPciRoot) -> Self {
        PciEcam { root }
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        lock(&self.root).config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest> {
        let (bus, dev, func, reg) = ecam_decode(offset);
        lock(&self.root).config_write(bus, dev, func, reg, data);
        None
    }
}

/// One MMIO (or I/O) window on the VMM's bus, dispatching to BARs by their current addresses.
pub struct PciWindow {
    root: SharedPciRoot,
    base: u64,
    io: bool,
}

impl PciWindow {
    /// A memory window inserted on the MMIO bus at `base`.
    pub fn mmio(root: SharedPciRoot, base: u64) -> Self {
        PciWindow {
            root,
            base,
            io: false,
        }
    }

    /// The I/O window inserted on the port bus at `base`.
    pub fn io(root: SharedPciRoot, base: u64) -> Self {
        PciWindow {
            root,
            base,
            io: true,
        }
    }
}

impl BusDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.root).bar_read(self.base + offset, data, self.io);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest> {
        lock(&self.root).bar_write(self.base + offset, data, self.io);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{BarSpec, PciHeader, BAR0, COMMAND};
    use super::*;

    /// A device with one 4 KiB memory BAR that records accesses.
    struct Probe {
        config: PciConfig,
        log: Vec<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn read_config(&mut self, reg: usize) -> u32 {
            self.config.read_dword(reg)
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data)
        }
        fn bar_ranges(&self) -> Vec<BarRange> {
            decoded_bars(&self.config)
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.log.push((bar, offset, data.to_vec()));
        }
        fn name(&self) -> String {
            "probe".into()
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: 0x1b36,
            device_id: 0x0005,
            class: (0xff, 0, 0),
            ..Default::default()
        });
        let spec = BarSpec {
            kind: BarKind::Mem32,
            size: 0x1000,
            prefetchable: false,
        };
        config.add_bar(0, spec, 0xd100_0000).unwrap();
        let io = BarSpec {
            kind: BarKind::Io,
            size: 0x20,
            prefetchable: false,
        };
        config.add_bar(1, io, 0x1000).unwrap();
        Arc::new(Mutex::new(Probe {
            config,
            log: Vec::new(),
        }))
    }

    fn cf8(io: &mut PciConfigIo, dev: u32, reg: u32) {
        io.write(0, &(0x8000_0000 | dev << 11 | reg).to_le_bytes());
    }

    fn read32(io: &mut PciConfigIo, dev: u32, reg: u32) -> u32 {
        cf8(io, dev, reg);
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_and_empty_slots_through_cf8() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let mut io = PciConfigIo::new(root);
        assert_eq!(read32(&mut io, 0, 0), 0x0d57_8086);
        assert_eq!(read32(&mut io, 0, 8) >> 8, 0x06_0000);
        assert_eq!(read32(&mut io, 3, 0), u32::MAX);
        // Linux's conf1 probe: write 0x80000000, read it back.
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        // Disabled address: all ones.
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn sub_dword_config_accesses_use_the_port_offset() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        root.lock().unwrap().add_device(probe()).unwrap();
        let mut io = PciConfigIo::new(root);
        cf8(&mut io, 1, 0);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0005);
        let mut b = [0u8; 1];
        io.read(5, &mut b);
        assert_eq!(b, [0x1b]);
        // Interrupt line byte write at 0x3c through port 0xcfc.
        cf8(&mut io, 1, 0x3c);
        io.write(4, &[11]);
        assert_eq!(read32(&mut io, 1, 0x3c) & 0xff, 11);
    }

    #[test]
    fn ecam_decodes_bus_device_function_register() {
        assert_eq!(ecam_decode(0), (0, 0, 0, 0));
        assert_eq!(ecam_decode((1 << 15) | 0x104), (0, 1, 0, 0x104));
        assert_eq!(
            ecam_decode((3 << 20) | (31 << 15) | (7 << 12) | 0xffc),
            (3, 31, 7, 0xffc)
        );
        let root = Arc::new(Mutex::new(PciRoot::new()));
        root.lock().unwrap().add_device(probe()).unwrap();
        let mut ecam = PciEcam::new(root);
        let mut d = [0u8; 4];
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0005_1b36);
        // Function 1, bus 1: nothing there.
        ecam.read((1 << 15) | (1 << 12), &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read(1 << 20, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Misaligned accesses read all ones and write nothing.
        ecam.read((1 << 15) | 2, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn bars_decode_only_when_enabled_and_follow_relocation() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let dev = probe();
        let slot = root.lock().unwrap().add_device(dev.clone()).unwrap();
        assert_eq!(slot, 1);
        let mut ecam = PciEcam::new(root.clone());
        let mut window = PciWindow::mmio(root.clone(), 0xd100_0000);
        let mut ports = PciWindow::io(root.clone(), 0x1000);
        let mut d = [0u8; 1];
        window.read(0x10, &mut d);
        assert_eq!(
            d,
            [0xff],
            "memory decoding is off until the guest enables it"
        );
        let cmd = (1u32 << 15) | COMMAND as u32;
        ecam.write(u64::from(cmd), &(COMMAND_MEMORY | COMMAND_IO).to_le_bytes());
        window.read(0x10, &mut d);
        assert_eq!(d, [0x10]);
        ports.read(0x3, &mut d);
        assert_eq!(d, [0x13]);
        // Size, then move BAR0 to 0xd110_0000.
        let bar0 = (1u64 << 15) | BAR0 as u64;
        ecam.write(bar0, &u32::MAX.to_le_bytes());
        let mut v = [0u8; 4];
        ecam.read(bar0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0xffff_f000);
        ecam.write(bar0, &0xd110_0000u32.to_le_bytes());
        window.read(0x10, &mut d);
        assert_eq!(d, [0xff], "the old address no longer decodes");
        window.write(0x10_0008, &[7, 7]);
        assert_eq!(dev.lock().unwrap().log, vec![(0, 8, vec![7, 7])]);
        // An access straddling the end of the BAR is not routed.
        let mut w = [0u8; 4];
        assert!(!root.lock().unwrap().bar_read(0xd110_0ffe, &mut w, false));
    }

    #[test]
    fn slots_fill_in_order_and_refuse_duplicates() {
        let mut root = PciRoot::new();
        assert_eq!(root.add_device(probe()).unwrap(), 1);
        assert_eq!(
            root.add_device_at(1, probe()),
            Err(PciRootError::SlotTaken(1))
        );
        root.add_device_at(5, probe()).unwrap();
        assert_eq!(root.add_device(probe()).unwrap(), 2);
        for _ in 0..28 {
            root.add_device(probe()).unwrap();
        }
        assert_eq!(root.add_device(probe()), Err(PciRootError::BusFull));
        assert_eq!(root.devices().len(), 32);
    }
}
