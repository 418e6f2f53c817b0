//! MSI and MSI-X: the guest-visible MSI-X table and PBA, the MSI capability's registers, and the
//! vectors behind them (an eventfd and a KVM GSI routed to the guest's message each).
//!
//! KVM is reached through [`InterruptRouter`] so that all of this runs in unit tests with a
//! fake. A masked vector keeps its route but loses its irqfd; an interrupt raised meanwhile stays
//! counted in the eventfd, and KVM delivers it when the irqfd is registered again on unmask
//! (KVM_IRQFD checks for an already-signalled eventfd), which is the pending-bit behaviour.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub const MSIX_ENTRY_SIZE: u64 = 16;
pub const MSIX_ENTRY_MASKED: u32 = 1;
/// MSI-X message control bits.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
pub const MSIX_CTRL_TABLE_SIZE_MASK: u16 = 0x7ff;
/// MSI message control bits.
pub const MSI_CTRL_ENABLE: u16 = 1;
pub const MSI_CTRL_64BIT: u16 = 1 << 7;
pub const MSI_CTRL_PER_VECTOR_MASK: u16 = 1 << 8;

/// One MSI message: where the device writes and what.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("no free GSI for an MSI vector (KVM's routing table is full)")]
    NoFreeGsi,
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd for an interrupt vector: {0}")]
    EventFd(std::io::Error),
}

/// The KVM side of interrupt delivery: GSI routes to MSI messages, and irqfds. Implemented over
/// KVM by `crate::vfio::kvm::KvmInterruptRouter`, and by a recorder in tests.
pub trait InterruptRouter: Send + Sync {
    fn allocate_gsi(&self) -> Result<u32, IrqError>;
    /// Routes `gsi` to `msg` (adding or replacing its entry in the GSI routing table).
    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError>;
    fn remove_route(&self, gsi: u32) -> Result<(), IrqError>;
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError>;
    /// A level-triggered irqfd: KVM signals `resample` when the guest EOIs `gsi` (INTx).
    fn register_irqfd_with_resample(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), IrqError>;
}

/// One vector: the eventfd the device (or VFIO) signals, the GSI it is routed through, and
/// whether its irqfd is registered (unmasked).
pub struct Vector {
    pub event: EventFd,
    pub gsi: u32,
    pub message: Option<MsiMessage>,
    pub armed: bool,
}

/// A device's MSI or MSI-X vectors.
pub struct InterruptVectors {
    router: Arc<dyn InterruptRouter>,
    vectors: Vec<Vector>,
}

impl InterruptVectors {
    /// `count` vectors with eventfds and GSIs, none routed yet.
    pub fn new(router: Arc<dyn InterruptRouter>, count: usize) -> Result<Self, IrqError> {
        let mut vectors = Vec::with_capacity(count);
        for _ in 0..count {
            vectors.push(Vector {
                event: EventFd::new(libc::EFD_NONBLOCK).map_err(IrqError::EventFd)?,
                gsi: router.allocate_gsi()?,
                message: None,
                armed: false,
            });
        }
        Ok(InterruptVectors { router, vectors })
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Vector> {
        self.vectors.get(i)
    }

    /// The eventfds of the first `n` vectors, for VFIO_DEVICE_SET_IRQS.
    pub fn events(&self, n: usize) -> Vec<&EventFd> {
        self.vectors.iter().take(n).map(|v| &v.event).collect()
    }

    /// Brings vector `i` in line with the guest: routed to `message`, delivered unless `masked`.
    pub fn update(&mut self, i: usize, message: MsiMessage, masked: bool) -> Result<(), IrqError> {
        let router = self.router.clone();
        let Some(v) = self.vectors.get_mut(i) else {
            return Ok(());
        };
        if v.message != Some(message) {
            router.set_msi_route(v.gsi, message)?;
            v.message = Some(message);
        }
        match (masked, v.armed) {
            (false, false) => {
                router.register_irqfd(&v.event, v.gsi)?;
                v.armed = true;
            }
            (true, true) => {
                router.unregister_irqfd(&v.event, v.gsi)?;
                v.armed = false;
            }
            _ => {}
        }
        Ok(())
    }

    /// Disarms vector `i` and drops its route (the vector is disabled).
    pub fn disable(&mut self, i: usize) -> Result<(), IrqError> {
        let router = self.router.clone();
        let Some(v) = self.vectors.get_mut(i) else {
            return Ok(());
        };
        if v.armed {
            router.unregister_irqfd(&v.event, v.gsi)?;
            v.armed = false;
        }
        if v.message.take().is_some() {
            router.remove_route(v.gsi)?;
        }
        Ok(())
    }

    pub fn disable_all(&mut self) -> Result<(), IrqError> {
        (0..self.vectors.len()).try_for_each(|i| self.disable(i))
    }

    /// Raises vector `i` (emulated devices): the eventfd is the interrupt.
    pub fn trigger(&self, i: usize) {
        if let Some(v) = self.vectors.get(i) {
            let _ = v.event.write(1);
        }
    }
}

/// Where the MSI-X capability says the table and PBA are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability in configuration space.
    pub offset: usize,
    pub table_size: u16,
    pub table_bar: usize,
    pub table_offset: u64,
    pub pba_bar: usize,
    pub pba_offset: u64,
}

impl MsixCapability {
    /// Parses the capability at `offset` from the dwords it is made of (header, table, PBA).
    pub fn parse(offset: usize, header: u32, table: u32, pba: u32) -> Self {
        MsixCapability {
            offset,
            table_size: ((header >> 16) as u16 & MSIX_CTRL_TABLE_SIZE_MASK) + 1,
            table_bar: (table & 7) as usize,
            table_offset: u64::from(table & !7),
            pba_bar: (pba & 7) as usize,
            pba_offset: u64::from(pba & !7),
        }
    }

    pub fn table_len(&self) -> u64 {
        u64::from(self.table_size) * MSIX_ENTRY_SIZE
    }

    pub fn pba_len(&self) -> u64 {
        u64::from(self.table_size).div_ceil(64) * 8
    }

    /// The capability body (after id and next) as an emulated device declares it.
    pub fn body(&self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[0..2].copy_from_slice(&(self.table_size - 1).to_le_bytes());
        b[2..6].copy_from_slice(&(self.table_offset as u32 | self.table_bar as u32).to_le_bytes());
        b[6..10].copy_from_slice(&(self.pba_offset as u32 | self.pba_bar as u32).to_le_bytes());
        b
    }

    /// The write mask of [`Self::body`]: only enable and function mask.
    pub fn body_wmask() -> [u8; 10] {
        let mut m = [0u8; 10];
        m[1] = 0xc0;
        m
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsixEntry {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl MsixEntry {
    pub fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_lo) | (u64::from(self.address_hi) << 32),
            data: self.data,
        }
    }
    pub fn masked(&self) -> bool {
        self.control & MSIX_ENTRY_MASKED != 0
    }
}

/// The guest-visible MSI-X table, PBA and control bits.
#[derive(Debug, Clone)]
pub struct MsixTable {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

impl MsixTable {
    /// Every entry starts masked, as the spec requires after reset.
    pub fn new(size: u16) -> Self {
        MsixTable {
            entries: vec![
                MsixEntry {
                    control: MSIX_ENTRY_MASKED,
                    ..Default::default()
                };
                usize::from(size)
            ],
            pending: vec![0; usize::from(size).div_ceil(64)],
            enabled: false,
            function_masked: false,
        }
    }

    /// Whether vector `i` may be delivered now.
    pub fn vector_masked(&self, i: usize) -> bool {
        self.function_masked || self.entries.get(i).is_none_or(MsixEntry::masked)
    }

    /// Applies the guest's message control; returns true when enable or function mask changed.
    pub fn set_control(&mut self, control: u16) -> bool {
        let enabled = control & MSIX_CTRL_ENABLE != 0;
        let masked = control & MSIX_CTRL_FUNCTION_MASK != 0;
        let changed = enabled != self.enabled || masked != self.function_masked;
        self.enabled = enabled;
        self.function_masked = masked;
        changed
    }

    /// A read in the table. Accesses are dwords or qwords within one entry; others read ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let (index, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let Some(e) = self.entries.get(index) else {
            return;
        };
        if !matches!(data.len(), 4 | 8) || field % 4 != 0 || field + data.len() as u64 > 16 {
            return;
        }
        let words = [e.address_lo, e.address_hi, e.data, e.control];
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&words[field as usize / 4 + k].to_le_bytes());
        }
    }

    /// A write in the table; returns the entry it touched, if any.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
        let (index, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        if !matches!(data.len(), 4 | 8) || field % 4 != 0 || field + data.len() as u64 > 16 {
            return None;
        }
        let e = self.entries.get_mut(index)?;
        for (k, chunk) in data.chunks(4).enumerate() {
            let v = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            match field / 4 + k as u64 {
                0 => e.address_lo = v & !3,
                1 => e.address_hi = v,
                2 => e.data = v,
                // Only the mask bit of vector control is defined.
                _ => e.control = v & MSIX_ENTRY_MASKED,
            }
        }
        Some(index)
    }

    /// A read in the PBA (read-only for the guest).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = Vec::with_capacity(self.pending.len() * 8);
        for q in &self.pending {
            bytes.extend_from_slice(&q.to_le_bytes());
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    pub fn set_pending(&mut self, i: usize, pending: bool) {
        if let Some(q) = self.pending.get_mut(i / 64) {
            if pending {
                *q |= 1 << (i % 64);
            } else {
                *q &= !(1 << (i % 64));
            }
        }
    }
}

/// The layout of an MSI capability, from its message control word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCapability {
    pub offset: usize,
    pub is_64bit: bool,
    pub per_vector_mask: bool,
    /// Vectors the device can do (1, 2, 4 .. 32).
    pub max_vectors: u32,
}

impl MsiCapability {
    pub fn parse(offset: usize, control: u16) -> Self {
        MsiCapability {
            offset,
            is_64bit: control & MSI_CTRL_64BIT != 0,
            per_vector_mask: control & MSI_CTRL_PER_VECTOR_MASK != 0,
            max_vectors: 1 << ((control >> 1) & 7).min(5),
        }
    }

    /// Bytes the capability takes.
    pub fn len(&self) -> usize {
        let base = if self.is_64bit { 14 } else { 10 };
        if self.per_vector_mask {
            base + 10
        } else {
            base
        }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn data_offset(&self) -> usize {
        self.offset + if self.is_64bit { 12 } else { 8 }
    }

    pub fn mask_offset(&self) -> Option<usize> {
        self.per_vector_mask
            .then_some(self.offset + if self.is_64bit { 16 } else { 12 })
    }

    /// The write masks for the capability's bytes (relative to its offset): enable and multiple
    /// message enable, address, data, and the mask bits.
    pub fn wmask(&self) -> Vec<u8> {
        let mut m = vec![0u8; self.len()];
        m[2] = 0x71; // enable, MME
        m[4..8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        let data = self.data_offset() - self.offset;
        if self.is_64bit {
            m[8..12].fill(0xff);
        }
        m[data..data + 2].fill(0xff);
        if let Some(mask) = self.mask_offset() {
            let mo = mask - self.offset;
            m[mo..mo + 4].copy_from_slice(&(((1u64 << self.max_vectors) - 1) as u32).to_le_bytes());
        }
        m
    }

    /// The messages the capability describes, read from its bytes (`cap[0]` is the id byte):
    /// `(enabled vectors, per-vector messages, per-vector masked)`.
    pub fn messages(&self, cap: &[u8]) -> Vec<(MsiMessage, bool)> {
        let u16_at = |o: usize| u16::from_le_bytes([cap[o], cap[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(cap[o..o + 4].try_into().expect("4 bytes"));
        let control = u16_at(2);
        if control & MSI_CTRL_ENABLE == 0 {
            return Vec::new();
        }
        let enabled = (1u32 << ((control >> 4) & 7).min(5)).min(self.max_vectors);
        let mut address = u64::from(u32_at(4));
        if self.is_64bit {
            address |= u64::from(u32_at(8)) << 32;
        }
        let data = u32::from(u16_at(self.data_offset() - self.offset));
        let mask = self
            .mask_offset()
            .map(|o| u32_at(o - self.offset))
            .unwrap_or(0);
        (0..enabled)
            .map(|i| {
                // Multiple-message MSI: the device ORs the vector number into the low data bits.
                let msg = MsiMessage {
                    address,
                    data: (data & !(enabled - 1)) | i,
                };
                (msg, mask & (1 << i) != 0)
            })
            .collect()
    }
}

/// An [`InterruptRouter`] that records what it was asked, for tests.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct RecordingRouter {
        pub next_gsi: Mutex<u32>,
        pub routes: Mutex<std::collections::BTreeMap<u32, MsiMessage>>,
        pub armed: Mutex<std::collections::BTreeSet<u32>>,
        pub resample: Mutex<Vec<u32>>,
    }

    impl RecordingRouter {
        pub fn new() -> Arc<Self> {
            Arc::new(RecordingRouter {
                next_gsi: Mutex::new(24),
                ..Default::default()
            })
        }
    }

    impl InterruptRouter for RecordingRouter {
        fn allocate_gsi(&self) -> Result<u32, IrqError> {
            let mut g = self.next_gsi.lock().unwrap();
            *g += 1;
            Ok(*g - 1)
        }
        fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
            self.routes.lock().unwrap().insert(gsi, msg);
            Ok(())
        }
        fn remove_route(&self, gsi: u32) -> Result<(), IrqError> {
            self.routes.lock().unwrap().remove(&gsi);
            Ok(())
        }
        fn register_irqfd(&self, _: &EventFd, gsi: u32) -> Result<(), IrqError> {
            assert!(self.armed.lock().unwrap().insert(gsi), "irqfd {gsi} twice");
            Ok(())
        }
        fn unregister_irqfd(&self, _: &EventFd, gsi: u32) -> Result<(), IrqError> {
            assert!(
                self.armed.lock().unwrap().remove(&gsi),
                "irqfd {gsi} not armed"
            );
            Ok(())
        }
        fn register_irqfd_with_resample(
            &self,
            _: &EventFd,
            _: &EventFd,
            gsi: u32,
        ) -> Result<(), IrqError> {
            self.resample.lock().unwrap().push(gsi);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::RecordingRouter;
    use super::*;

    #[test]
    fn msix_table_entries_start_masked_and_take_dword_and_qword_writes() {
        let mut t = MsixTable::new(3);
        assert!((0..3).all(|i| t.vector_masked(i)));
        assert_eq!(t.write_table(16, &0xfee0_1004u32.to_le_bytes()), Some(1));
        assert_eq!(t.write_table(20, &0u32.to_le_bytes()), Some(1));
        assert_eq!(t.write_table(24, &0x4041u32.to_le_bytes()), Some(1));
        assert_eq!(t.write_table(28, &0u32.to_le_bytes()), Some(1));
        assert!(!t.vector_masked(1));
        // The low two address bits are reserved.
        assert_eq!(
            t.entries[1].message(),
            MsiMessage {
                address: 0xfee0_1004,
                data: 0x4041
            }
        );
        let mut q = [0u8; 8];
        t.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1004);
        t.write_table(32, &0x1234_5678_fee0_0000u64.to_le_bytes());
        assert_eq!(t.entries[2].address_hi, 0x1234_5678);
        // Past the table, odd sizes and straddling accesses are ignored.
        assert_eq!(t.write_table(48, &[0; 4]), None);
        assert_eq!(t.write_table(16, &[0; 2]), None);
        assert_eq!(t.write_table(28, &[0; 8]), None);
        let mut b = [0u8; 4];
        t.read_table(48, &mut b);
        assert_eq!(b, [0xff; 4]);
        // The function mask masks every vector.
        assert!(t.set_control(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK));
        assert!(t.vector_masked(1));
        assert!(!t.set_control(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK));
        t.set_pending(65, true);
        let mut p = [0u8; 8];
        t.read_pba(0, &mut p);
        assert_eq!(p, [0; 8]);
    }

    #[test]
    fn msix_capability_parses_a_real_virtio_net_device() {
        // tests/data/pci/1af4_1041_020000.bin: capability at 0x98 = 0x80020011, 0x8000, 0x48000.
        let c = MsixCapability::parse(0x98, 0x8002_0011, 0x8000, 0x0004_8000);
        assert_eq!(c.table_size, 3);
        assert_eq!((c.table_bar, c.table_offset), (0, 0x8000));
        assert_eq!((c.pba_bar, c.pba_offset), (0, 0x48000));
        assert_eq!(c.table_len(), 48);
        assert_eq!(c.pba_len(), 8);
        let body = c.body();
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2);
    }

    #[test]
    fn vectors_route_arm_and_disarm_through_the_router() {
        let router = RecordingRouter::new();
        let mut v = InterruptVectors::new(router.clone(), 2).unwrap();
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        v.update(0, msg, true).unwrap();
        assert_eq!(router.routes.lock().unwrap().get(&24), Some(&msg));
        assert!(router.armed.lock().unwrap().is_empty());
        v.update(0, msg, false).unwrap();
        assert!(router.armed.lock().unwrap().contains(&24));
        v.update(0, msg, false).unwrap(); // no double registration
        let moved = MsiMessage { data: 0x32, ..msg };
        v.update(0, moved, false).unwrap();
        assert_eq!(router.routes.lock().unwrap().get(&24), Some(&moved));
        v.update(0, moved, true).unwrap();
        assert!(router.armed.lock().unwrap().is_empty());
        v.update(1, msg, false).unwrap();
        v.disable_all().unwrap();
        assert!(router.routes.lock().unwrap().is_empty());
        assert!(router.armed.lock().unwrap().is_empty());
        v.trigger(0);
        assert_eq!(v.get(0).unwrap().event.read().unwrap(), 1);
    }

    #[test]
    fn msi_capability_messages_follow_multiple_message_enable() {
        // 64-bit, per-vector masking, 4 vectors capable (MMC = 2).
        let cap = MsiCapability::parse(0x50, MSI_CTRL_64BIT | MSI_CTRL_PER_VECTOR_MASK | (2 << 1));
        assert_eq!(cap.max_vectors, 4);
        assert_eq!(cap.len(), 24);
        assert_eq!(cap.data_offset(), 0x5c);
        assert_eq!(cap.mask_offset(), Some(0x60));
        let mut bytes = vec![0u8; cap.len()];
        bytes[0] = 5;
        // Enabled with MME = 1 (2 vectors), address 0xfee0_0000, data 0x40, vector 1 masked.
        bytes[2..4].copy_from_slice(&(MSI_CTRL_ENABLE | (1 << 4)).to_le_bytes());
        bytes[4..8].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        bytes[12..14].copy_from_slice(&0x41u16.to_le_bytes());
        bytes[16..20].copy_from_slice(&2u32.to_le_bytes());
        let m = cap.messages(&bytes);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].0.data, 0x40);
        assert_eq!(m[1].0.data, 0x41);
        assert!(!m[0].1 && m[1].1);
        bytes[2] = 0;
        assert!(cap.messages(&bytes).is_empty());
        let w = cap.wmask();
        assert_eq!(w[2], 0x71);
        assert_eq!(&w[16..20], &[0x0f, 0, 0, 0]);
        assert_eq!(&w[20..24], &[0, 0, 0, 0], "pending bits are read-only");
    }
}
