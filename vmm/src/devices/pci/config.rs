//! An emulated type-0 PCI configuration space (4 KiB, PCIe extended space included): registers
//! with per-byte write masks, BARs that size themselves the standard way (the guest writes all
//! ones and reads back the size mask), and capability lists (standard and extended).

/// Standard registers.
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const ROM_BAR: usize = 0x30;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// Configuration space sizes: conventional, and PCIe extended.
pub const CONFIG_SPACE_SIZE: usize = 256;
pub const EXT_CONFIG_SPACE_SIZE: usize = 4096;
pub const BAR_COUNT: usize = 6;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability ids.
pub const CAP_ID_PM: u8 = 0x01;
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_PCIE: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;
/// Extended capability id: vendor-specific (VSEC).
pub const EXT_CAP_ID_VSEC: u16 = 0x000b;

const FIRST_CAP_OFFSET: usize = 0x40;
const FIRST_EXT_CAP_OFFSET: usize = 0x100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// What a BAR decodes: its kind, size (a power of two) and whether it is prefetchable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

impl BarSpec {
    /// The flag bits in the low dword of the BAR register.
    pub fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => 1,
            BarKind::Mem32 => u32::from(self.prefetchable) << 3,
            BarKind::Mem64 => (u32::from(self.prefetchable) << 3) | 0b100,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("BAR{index}: {reason}")]
    Bar { index: usize, reason: String },
    #[error("no room for a {len}-byte capability in the configuration space")]
    NoRoomForCapability { len: usize },
}

/// The identity of a type-0 function.
#[derive(Debug, Clone, Copy, Default)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub revision: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 (none) or 1..=4 (INTA..INTD).
    pub interrupt_pin: u8,
}

/// An emulated configuration space.
#[derive(Clone)]
pub struct PciConfig {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    /// Bits cleared by writing 1 (status register error bits).
    w1c: Vec<u8>,
    bars: [Option<BarSpec>; BAR_COUNT],
    next_cap: usize,
    last_cap_next_ptr: usize,
    next_ext_cap: usize,
    last_ext_cap: Option<usize>,
}

impl PciConfig {
    pub fn new(h: &PciHeader) -> Self {
        let mut c = PciConfig {
            bytes: vec![0; EXT_CONFIG_SPACE_SIZE],
            wmask: vec![0; EXT_CONFIG_SPACE_SIZE],
            w1c: vec![0; EXT_CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            next_cap: FIRST_CAP_OFFSET,
            last_cap_next_ptr: CAPABILITIES_POINTER,
            next_ext_cap: FIRST_EXT_CAP_OFFSET,
            last_ext_cap: None,
        };
        c.set_u16(VENDOR_ID, h.vendor_id);
        c.set_u16(DEVICE_ID, h.device_id);
        c.bytes[REVISION_ID] = h.revision;
        c.bytes[CLASS_PROG_IF] = h.class.2;
        c.bytes[CLASS_PROG_IF + 1] = h.class.1;
        c.bytes[CLASS_PROG_IF + 2] = h.class.0;
        c.set_u16(SUBSYSTEM_VENDOR_ID, h.subsystem_vendor_id);
        c.set_u16(SUBSYSTEM_ID, h.subsystem_id);
        c.bytes[INTERRUPT_PIN] = h.interrupt_pin;
        // Command: I/O, memory, bus master, INTx disable (and the parity/SERR enables).
        let cmd_mask = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.set_wmask_u16(COMMAND, cmd_mask | (1 << 6) | (1 << 8));
        // Status: the error bits are write-1-to-clear.
        c.w1c[STATUS + 1] = 0xf9;
        c.wmask[INTERRUPT_LINE] = 0xff;
        // Cache line size and latency timer are plain read/write registers.
        c.wmask[0x0c] = 0xff;
        c.wmask[0x0d] = 0xff;
        c
    }

    /// A host bridge (class 06/00/00) with no BARs.
    pub fn host_bridge(vendor_id: u16, device_id: u16) -> Self {
        PciConfig::new(&PciHeader {
            vendor_id,
            device_id,
            class: (0x06, 0x00, 0x00),
            ..Default::default()
        })
    }

    /// Declares BAR `index` (a 64-bit BAR takes `index` and `index + 1`) at `address`.
    pub fn add_bar(
        &mut self,
        index: usize,
        spec: BarSpec,
        address: u64,
    ) -> Result<(), ConfigSpaceError> {
        let err = |reason: &str| ConfigSpaceError::Bar {
            index,
            reason: reason.to_string(),
        };
        let slots = if spec.kind == BarKind::Mem64 { 2 } else { 1 };
        if index + slots > BAR_COUNT {
            return Err(err("past the last BAR register"));
        }
        if (index..index + slots).any(|i| self.bars[i].is_some() || self.is_upper_half(i)) {
            return Err(err("already in use"));
        }
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        if !spec.size.is_power_of_two() || spec.size < min {
            return Err(err(
                "size must be a power of two of at least 16 bytes (4 for I/O)",
            ));
        }
        if spec.kind != BarKind::Mem64 && spec.size > 1 << 31 {
            return Err(err("a 32-bit BAR cannot be larger than 2 GiB"));
        }
        if address & (spec.size - 1) != 0 {
            return Err(err("address not aligned to the BAR's size"));
        }
        let mask = !(spec.size - 1);
        let reg = BAR0 + index * 4;
        let low_flag_bits = if spec.kind == BarKind::Io { 0x3 } else { 0xf };
        self.set_u32(reg, (address as u32 & !low_flag_bits) | spec.flags());
        self.set_wmask_u32(reg, mask as u32 & !low_flag_bits);
        if spec.kind == BarKind::Mem64 {
            self.set_u32(reg + 4, (address >> 32) as u32);
            self.set_wmask_u32(reg + 4, (mask >> 32) as u32);
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0 && self.bars[index - 1].is_some_and(|b| b.kind == BarKind::Mem64)
    }

    /// The BAR declared at `index` (None for the upper half of a 64-bit BAR).
    pub fn bar_spec(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` is programmed with (the flag bits masked off).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar_spec(index)?;
        let reg = BAR0 + index * 4;
        let low = self.u32_at(reg);
        Some(match spec.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Mem32 => u64::from(low & !0xf),
            BarKind::Mem64 => u64::from(low & !0xf) | (u64::from(self.u32_at(reg + 4)) << 32),
        })
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Appends a standard capability (`body` follows the id and next-pointer bytes; `wmask`
    /// covers `body`, or is empty for a read-only capability). Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        wmask: &[u8],
    ) -> Result<usize, ConfigSpaceError> {
        let len = (2 + body.len()).next_multiple_of(4);
        let offset = self.next_cap;
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::NoRoomForCapability { len });
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + 2 + body.len()].copy_from_slice(body);
        for (i, m) in wmask.iter().enumerate().take(body.len()) {
            self.wmask[offset + 2 + i] = *m;
        }
        self.bytes[self.last_cap_next_ptr] = offset as u8;
        self.last_cap_next_ptr = offset + 1;
        self.next_cap = offset + len;
        let status = self.u16_at(STATUS) | STATUS_CAP_LIST;
        self.set_u16(STATUS, status);
        Ok(offset)
    }

    /// Appends a PCIe extended capability at 0x100 and up. Returns its offset.
    pub fn add_ext_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
    ) -> Result<usize, ConfigSpaceError> {
        let len = (4 + body.len()).next_multiple_of(4);
        let offset = self.next_ext_cap;
        if offset + len > EXT_CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::NoRoomForCapability { len });
        }
        self.set_u32(offset, u32::from(id) | (u32::from(version & 0xf) << 16));
        self.bytes[offset + 4..offset + 4 + body.len()].copy_from_slice(body);
        if let Some(prev) = self.last_ext_cap {
            let header = self.u32_at(prev) | ((offset as u32) << 20);
            self.set_u32(prev, header);
        }
        self.last_ext_cap = Some(offset);
        self.next_ext_cap = offset + len;
        Ok(offset)
    }

    /// Reads the dword at `reg * 4`.
    pub fn read_dword(&self, reg: usize) -> u32 {
        let off = reg * 4;
        if off + 4 > self.bytes.len() {
            return u32::MAX;
        }
        self.u32_at(off)
    }

    /// A guest write of `data` at `offset`, through the write masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset + i;
            if o >= self.bytes.len() {
                break;
            }
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (v & m);
            self.bytes[o] &= !(self.w1c[o] & v);
        }
    }

    /// Device-side access (not through the masks).
    pub fn u8_at(&self, off: usize) -> u8 {
        self.bytes[off]
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().expect("4 bytes"))
    }
    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.bytes[off] = v;
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_wmask_u16(&mut self, off: usize, v: u16) {
        self.wmask[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_wmask_u32(&mut self, off: usize, v: u32) {
        self.wmask[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// The whole space, for tests and for copying.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Walks a standard capability list in `read(offset) -> byte` form: `(id, offset)` pairs. Stops
/// at a loop or a pointer into the header, as Linux does.
pub fn capabilities(read: impl Fn(usize) -> u8) -> Vec<(u8, usize)> {
    let status = u16::from(read(STATUS)) | (u16::from(read(STATUS + 1)) << 8);
    let mut caps = Vec::new();
    if status & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut ptr = usize::from(read(CAPABILITIES_POINTER) & 0xfc);
    while ptr >= FIRST_CAP_OFFSET && caps.len() < 48 {
        if caps.iter().any(|&(_, o)| o == ptr) {
            break;
        }
        caps.push((read(ptr), ptr));
        ptr = usize::from(read(ptr + 1) & 0xfc);
    }
    caps
}

/// Walks the PCIe extended capability list from 0x100: `(id, version, offset)`.
pub fn ext_capabilities(read_dword: impl Fn(usize) -> u32) -> Vec<(u16, u8, usize)> {
    let mut caps = Vec::new();
    let mut ptr = FIRST_EXT_CAP_OFFSET;
    while (FIRST_EXT_CAP_OFFSET..EXT_CONFIG_SPACE_SIZE).contains(&ptr) && caps.len() < 128 {
        let header = read_dword(ptr);
        if header == 0 || header == u32::MAX {
            break;
        }
        caps.push((header as u16, ((header >> 16) & 0xf) as u8, ptr));
        ptr = (header >> 20) as usize & 0xffc;
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> PciConfig {
        PciConfig::new(&PciHeader {
            vendor_id: 0x1b36,
            device_id: 0x0005,
            class: (0xff, 0, 0),
            interrupt_pin: 1,
            ..Default::default()
        })
    }

    fn write32(c: &mut PciConfig, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = dev();
        write32(&mut c, 0, 0xdead_beef);
        assert_eq!(c.read_dword(0), 0x0005_1b36);
        write32(&mut c, 8, 0);
        assert_eq!(c.read_dword(2) >> 8, 0xff_0000);
        c.write(INTERRUPT_PIN, &[4]);
        assert_eq!(c.u8_at(INTERRUPT_PIN), 1);
        c.write(INTERRUPT_LINE, &[9]);
        assert_eq!(c.u8_at(INTERRUPT_LINE), 9);
    }

    #[test]
    fn command_keeps_only_implemented_bits_and_status_errors_clear_on_write() {
        let mut c = dev();
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.command(),
            COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE | 0x140
        );
        c.set_u16(STATUS, 0x8000 | STATUS_CAP_LIST);
        c.write(STATUS, &0x8010u16.to_le_bytes());
        assert_eq!(c.u16_at(STATUS), STATUS_CAP_LIST);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = dev();
        let spec32 = BarSpec {
            kind: BarKind::Mem32,
            size: 0x1000,
            prefetchable: false,
        };
        c.add_bar(0, spec32, 0xd100_0000).unwrap();
        write32(&mut c, BAR0, u32::MAX);
        assert_eq!(c.read_dword(4), 0xffff_f000);
        write32(&mut c, BAR0, 0xd200_0000);
        assert_eq!(c.bar_address(0), Some(0xd200_0000));

        let spec64 = BarSpec {
            kind: BarKind::Mem64,
            size: 16 << 30,
            prefetchable: true,
        };
        c.add_bar(2, spec64, 64 << 30).unwrap();
        assert_eq!(c.read_dword(6), 0xc);
        assert_eq!(c.read_dword(7), 16);
        write32(&mut c, BAR0 + 8, u32::MAX);
        write32(&mut c, BAR0 + 12, u32::MAX);
        assert_eq!(c.read_dword(6), 0xc);
        assert_eq!(c.read_dword(7), 0xffff_fffc);
        // Relocation.
        write32(&mut c, BAR0 + 8, 0);
        write32(&mut c, BAR0 + 12, 0x20);
        assert_eq!(c.bar_address(2), Some(128 << 30));
        assert_eq!(c.bar_address(3), None);

        let io = BarSpec {
            kind: BarKind::Io,
            size: 0x80,
            prefetchable: false,
        };
        c.add_bar(5, io, 0x1000).unwrap();
        write32(&mut c, BAR0 + 20, u32::MAX);
        assert_eq!(c.read_dword(9), 0xffff_ff81);
        // Unused BARs and the ROM BAR read 0 after sizing: not implemented.
        write32(&mut c, BAR0 + 4, u32::MAX);
        assert_eq!(c.read_dword(5), 0);
        write32(&mut c, ROM_BAR, u32::MAX);
        assert_eq!(c.read_dword(ROM_BAR / 4), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = dev();
        let mk = |kind, size| BarSpec {
            kind,
            size,
            prefetchable: false,
        };
        assert!(c.add_bar(0, mk(BarKind::Mem32, 0x1800), 0).is_err());
        assert!(c.add_bar(0, mk(BarKind::Mem32, 0x1000), 0x800).is_err());
        assert!(c.add_bar(5, mk(BarKind::Mem64, 0x1000), 0).is_err());
        c.add_bar(0, mk(BarKind::Mem64, 0x1000), 0).unwrap();
        let e = c.add_bar(1, mk(BarKind::Mem32, 0x1000), 0).unwrap_err();
        assert!(e.to_string().contains("BAR1"), "{e}");
    }

    #[test]
    fn capability_lists_chain_and_are_walkable() {
        let mut c = dev();
        let a = c.add_capability(CAP_ID_VENDOR, &[4, 0xaa], &[]).unwrap();
        let b = c.add_capability(CAP_ID_MSIX, &[0; 10], &[0, 0xc0]).unwrap();
        assert_eq!((a, b), (0x40, 0x44));
        assert_eq!(c.u8_at(CAPABILITIES_POINTER), 0x40);
        assert_ne!(c.u16_at(STATUS) & STATUS_CAP_LIST, 0);
        let caps = capabilities(|o| c.u8_at(o));
        assert_eq!(caps, vec![(CAP_ID_VENDOR, 0x40), (CAP_ID_MSIX, 0x44)]);
        // Only the masked bits of a capability are writable.
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(c.u16_at(b + 2), 0xc000);

        c.add_ext_capability(EXT_CAP_ID_VSEC, 1, &[1, 2, 3, 4])
            .unwrap();
        c.add_ext_capability(EXT_CAP_ID_VSEC, 1, &[5, 6, 7, 8])
            .unwrap();
        let ext = ext_capabilities(|o| c.u32_at(o));
        assert_eq!(
            ext,
            vec![(EXT_CAP_ID_VSEC, 1, 0x100), (EXT_CAP_ID_VSEC, 1, 0x108)]
        );
    }

    #[test]
    fn a_looping_capability_list_terminates() {
        let mut space = vec![0u8; 256];
        space[STATUS] = STATUS_CAP_LIST as u8;
        space[CAPABILITIES_POINTER] = 0x40;
        space[0x40] = CAP_ID_PM;
        space[0x41] = 0x50;
        space[0x50] = CAP_ID_MSI;
        space[0x51] = 0x40;
        let caps = capabilities(|o| space[o]);
        assert_eq!(caps, vec![(CAP_ID_PM, 0x40), (CAP_ID_MSI, 0x50)]);
    }
}
