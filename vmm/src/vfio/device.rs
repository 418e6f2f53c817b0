//! A passed-through PCI function on the VMM's bus.
//!
//! Configuration space: the VMM owns the BARs (addresses chosen by the VMM, sized the standard
//! way), the expansion ROM BAR (hidden: reads 0), the interrupt line and pin, and the MSI and
//! MSI-X capabilities (the guest's writes go to the VMM's copy; the VMM programs the host device
//! with VFIO_DEVICE_SET_IRQS and eventfds that are KVM irqfds). Every other byte, the command
//! register and the extended space included, goes to the device.
//!
//! BARs: the mmap'able parts of memory BARs become KVM memory slots at the guest's BAR address
//! (moved when the guest moves the BAR, dropped while memory decoding is off); the pages holding
//! the MSI-X table and PBA, non-mmap'able BARs and I/O BARs are trapped and forwarded.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::backend::{
    HostMapping, VfioBackend, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use super::{PassthroughError, PciAddress};
use crate::devices::pci::config::{
    capabilities, BarKind, BarSpec, BAR0, BAR_COUNT, CAP_ID_MSI, CAP_ID_MSIX, COMMAND, COMMAND_IO,
    COMMAND_MEMORY, CONFIG_SPACE_SIZE, EXT_CONFIG_SPACE_SIZE, INTERRUPT_LINE, INTERRUPT_PIN,
    ROM_BAR,
};
use crate::devices::pci::layout::WindowAllocator;
use crate::devices::pci::msi::{
    InterruptRouter, InterruptVectors, MsiCapability, MsixCapability, MsixTable,
};
use crate::devices::pci::root::{BarRange, PciDevice};

const PAGE: u64 = 4096;

/// Maps host memory into the guest (KVM memory slots), so tests can replace KVM.
pub trait GuestMapper: Send + Sync {
    fn allocate_slot(&self) -> u32;
    fn map(&self, slot: u32, gpa: u64, len: u64, host_addr: u64) -> Result<(), String>;
    fn unmap(&self, slot: u32) -> Result<(), String>;
}

/// The windows BARs are placed in.
pub struct BarWindows {
    pub mmio32: WindowAllocator,
    pub mmio64: WindowAllocator,
    pub io: WindowAllocator,
}

struct MmapPiece {
    offset: u64,
    len: u64,
    host: HostMapping,
    slot: u32,
    mapped_at: Option<u64>,
}

struct PtBar {
    spec: BarSpec,
    pieces: Vec<MmapPiece>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IrqMode {
    None,
    Intx,
    Msi(usize),
    Msix,
}

struct Intx {
    trigger: EventFd,
    resample: EventFd,
}

pub struct VfioPciDevice {
    addr: PciAddress,
    backend: Arc<dyn VfioBackend>,
    mapper: Arc<dyn GuestMapper>,
    config_size: usize,
    virt: Vec<u8>,
    wmask: Vec<u8>,
    owned: Vec<bool>,
    command: u16,
    bars: [Option<PtBar>; BAR_COUNT],
    msi: Option<(MsiCapability, InterruptVectors)>,
    msix: Option<(MsixCapability, MsixTable, InterruptVectors)>,
    intx: Option<Intx>,
    mode: IrqMode,
}

fn pages_excluding(area: (u64, u64), holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    // Page-aligned sub-ranges of `area` that do not touch any hole's pages.
    let mut out = vec![(
        area.0.next_multiple_of(PAGE),
        (area.0 + area.1) & !(PAGE - 1),
    )];
    for &(h, hl) in holes {
        if hl == 0 {
            continue;
        }
        let (hs, he) = (h & !(PAGE - 1), (h + hl).next_multiple_of(PAGE));
        out = out
            .into_iter()
            .flat_map(|(s, e)| {
                if he <= s || hs >= e {
                    vec![(s, e)]
                } else {
                    vec![(s, hs.max(s)), (he.min(e), e)]
                }
            })
            .collect();
    }
    out.into_iter()
        .filter(|(s, e)| e > s)
        .map(|(s, e)| (s, e - s))
        .collect()
}

impl VfioPciDevice {
    /// Reads the device's configuration space, places its BARs, virtualizes MSI/MSI-X, maps
    /// the mmap'able BAR parts (not yet into the guest: that follows the guest's command
    /// register) and, where the device has an interrupt pin and `intx_gsi` is given, wires INTx.
    pub fn new(
        addr: PciAddress,
        backend: Arc<dyn VfioBackend>,
        mapper: Arc<dyn GuestMapper>,
        router: Arc<dyn InterruptRouter>,
        windows: &mut BarWindows,
        intx_gsi: Option<u32>,
    ) -> Result<Self, PassthroughError> {
        let vfio =
            |what: &'static str, reason: String| PassthroughError::Vfio { addr, what, reason };
        let config_size = backend
            .region(VFIO_PCI_CONFIG_REGION_INDEX)
            .map(|r| r.size as usize)
            .ok_or_else(|| vfio("configuration space", "VFIO reports none".into()))?
            .clamp(CONFIG_SPACE_SIZE, EXT_CONFIG_SPACE_SIZE);
        let mut host = vec![0u8; EXT_CONFIG_SPACE_SIZE];
        backend.read_region(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut host[..config_size]);
        if host[0..2] == [0xff, 0xff] {
            return Err(vfio(
                "configuration space",
                "reads all ones: the device is gone or powered off".into(),
            ));
        }
        let mut dev = VfioPciDevice {
            addr,
            backend: backend.clone(),
            mapper,
            config_size,
            virt: host.clone(),
            wmask: vec![0; EXT_CONFIG_SPACE_SIZE],
            owned: vec![false; EXT_CONFIG_SPACE_SIZE],
            command: u16::from_le_bytes([host[COMMAND], host[COMMAND + 1]]),
            bars: Default::default(),
            msi: None,
            msix: None,
            intx: None,
            mode: IrqMode::None,
        };
        // The guest starts with decoding off, as after reset; the BARs are ours.
        dev.command &= !(COMMAND_IO | COMMAND_MEMORY);
        dev.own(ROM_BAR, &[0; 4], &[0; 4]);

        // MSI and MSI-X.
        let caps = capabilities(|o| host[o]);
        let mut msix_holes: Vec<(usize, u64, u64)> = Vec::new();
        for &(id, off) in &caps {
            match id {
                CAP_ID_MSI => {
                    let control = u16::from_le_bytes([host[off + 2], host[off + 3]]);
                    let cap = MsiCapability::parse(off, control);
                    let mut bytes = host[off..off + cap.len()].to_vec();
                    bytes[2] &= !1; // disabled
                    bytes[2] &= !0x70; // one vector enabled
                    dev.own(off, &bytes, &cap.wmask());
                    let count = (cap.max_vectors as usize)
                        .min(backend.irq_count(VFIO_PCI_MSI_IRQ_INDEX) as usize);
                    let vectors = InterruptVectors::new(router.clone(), count)
                        .map_err(|e| vfio("MSI vectors", e.to_string()))?;
                    dev.msi = Some((cap, vectors));
                }
                CAP_ID_MSIX => {
                    let dw = |o: usize| u32::from_le_bytes(host[o..o + 4].try_into().expect("4"));
                    let cap = MsixCapability::parse(off, dw(off), dw(off + 4), dw(off + 8));
                    let mut bytes = host[off..off + 12].to_vec();
                    bytes[3] &= !0xc0; // disabled, not function-masked
                    let mut mask = [0u8; 12];
                    mask[3] = 0xc0;
                    dev.own(off, &bytes, &mask);
                    msix_holes.push((cap.table_bar, cap.table_offset, cap.table_len()));
                    msix_holes.push((cap.pba_bar, cap.pba_offset, cap.pba_len()));
                    let vectors =
                        InterruptVectors::new(router.clone(), usize::from(cap.table_size))
                            .map_err(|e| vfio("MSI-X vectors", e.to_string()))?;
                    dev.msix = Some((cap, MsixTable::new(cap.table_size), vectors));
                }
                _ => {}
            }
        }

        // BARs.
        let mut i = 0;
        while i < BAR_COUNT {
            let reg = BAR0 + i * 4;
            let low = u32::from_le_bytes(host[reg..reg + 4].try_into().expect("4"));
            let region = backend.region(i as u32).filter(|r| r.size > 0);
            let Some(region) = region else {
                dev.own(reg, &[0; 4], &[0; 4]);
                i += 1;
                continue;
            };
            let kind = if low & 1 == 1 {
                BarKind::Io
            } else if (low >> 1) & 3 == 2 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            let spec = BarSpec {
                kind,
                size: region
                    .size
                    .next_power_of_two()
                    .max(if kind == BarKind::Io { 4 } else { 16 }),
                prefetchable: kind != BarKind::Io && low & 8 != 0,
            };
            let what = format!("{addr} BAR{i}");
            let window = match kind {
                BarKind::Io => &mut windows.io,
                BarKind::Mem32 => &mut windows.mmio32,
                BarKind::Mem64 => &mut windows.mmio64,
            };
            let min_align = if kind == BarKind::Io { 4 } else { PAGE };
            let base = window.allocate(&what, spec.size, min_align).map_err(|e| {
                PassthroughError::Layout {
                    addr,
                    reason: e.to_string(),
                }
            })?;
            let mask = !(spec.size - 1);
            let flag_bits: u32 = if kind == BarKind::Io { 0x3 } else { 0xf };
            let value = (base as u32 & !flag_bits) | spec.flags();
            dev.own(
                reg,
                &value.to_le_bytes(),
                &((mask as u32) & !flag_bits).to_le_bytes(),
            );
            if kind == BarKind::Mem64 {
                dev.own(
                    reg + 4,
                    &((base >> 32) as u32).to_le_bytes(),
                    &((mask >> 32) as u32).to_le_bytes(),
                );
            }
            let mut pieces = Vec::new();
            if kind != BarKind::Io && region.mmap {
                let areas = region.sparse.clone().unwrap_or(vec![(0, region.size)]);
                let holes: Vec<(u64, u64)> = msix_holes
                    .iter()
                    .filter(|(b, _, _)| *b == i)
                    .map(|&(_, o, l)| (o, l))
                    .collect();
                for area in areas {
                    for (offset, len) in pages_excluding(area, &holes) {
                        let host_map = backend
                            .mmap_region(i as u32, offset, len)
                            .map_err(|e| vfio("mmap of a BAR", e.to_string()))?;
                        pieces.push(MmapPiece {
                            offset,
                            len,
                            host: host_map,
                            slot: dev.mapper.allocate_slot(),
                            mapped_at: None,
                        });
                    }
                }
            }
            dev.bars[i] = Some(PtBar { spec, pieces });
            i += if kind == BarKind::Mem64 { 2 } else { 1 };
        }

        // INTx: only with a pin, a GSI for it and VFIO support.
        let pin = host[INTERRUPT_PIN];
        let intx_ok = pin != 0 && backend.irq_count(VFIO_PCI_INTX_IRQ_INDEX) > 0;
        dev.own(INTERRUPT_LINE, &[intx_gsi.unwrap_or(0) as u8], &[0xff]);
        match (intx_ok, intx_gsi) {
            (true, Some(gsi)) => {
                dev.own(INTERRUPT_PIN, &[pin], &[0]);
                let ev =
                    || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| vfio("INTx", e.to_string()));
                let intx = Intx {
                    trigger: ev()?,
                    resample: ev()?,
                };
                router
                    .register_irqfd_with_resample(&intx.trigger, &intx.resample, gsi)
                    .map_err(|e| vfio("INTx", e.to_string()))?;
                dev.intx = Some(intx);
                dev.enable_intx().map_err(|e| vfio("INTx", e))?;
            }
            _ => dev.own(INTERRUPT_PIN, &[0], &[0]),
        }
        Ok(dev)
    }

    fn own(&mut self, off: usize, bytes: &[u8], mask: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            self.virt[off + i] = *b;
            self.wmask[off + i] = mask.get(i).copied().unwrap_or(0);
            self.owned[off + i] = true;
        }
    }

    fn enable_intx(&mut self) -> Result<(), String> {
        let Some(intx) = &self.intx else {
            return Ok(());
        };
        self.backend
            .enable_irq(VFIO_PCI_INTX_IRQ_INDEX, &[&intx.trigger])
            .and_then(|_| self.backend.set_intx_unmask_fd(&intx.resample))
            .map_err(|e| e.to_string())?;
        self.mode = IrqMode::Intx;
        Ok(())
    }

    /// Turns off whatever interrupt type is on (vfio-pci allows one at a time).
    fn disable_irqs(&mut self) -> Result<(), String> {
        let index = match self.mode {
            IrqMode::None => return Ok(()),
            IrqMode::Intx => VFIO_PCI_INTX_IRQ_INDEX,
            IrqMode::Msi(_) => VFIO_PCI_MSI_IRQ_INDEX,
            IrqMode::Msix => VFIO_PCI_MSIX_IRQ_INDEX,
        };
        self.backend.disable_irq(index).map_err(|e| e.to_string())?;
        match self.mode {
            IrqMode::Msi(_) => {
                if let Some((_, v)) = &mut self.msi {
                    v.disable_all().map_err(|e| e.to_string())?;
                }
            }
            IrqMode::Msix => {
                if let Some((_, _, v)) = &mut self.msix {
                    v.disable_all().map_err(|e| e.to_string())?;
                }
            }
            _ => {}
        }
        self.mode = IrqMode::None;
        Ok(())
    }

    fn update_msi(&mut self) -> Result<(), String> {
        let Some((cap, _)) = &self.msi else {
            return Ok(());
        };
        let cap = *cap;
        let messages = cap.messages(&self.virt[cap.offset..cap.offset + cap.len()]);
        if messages.is_empty() {
            if matches!(self.mode, IrqMode::Msi(_)) {
                self.disable_irqs()?;
                self.enable_intx()?;
            }
            return Ok(());
        }
        let n = messages
            .len()
            .min(self.msi.as_ref().map_or(0, |(_, v)| v.len()));
        if self.mode != IrqMode::Msi(n) {
            self.disable_irqs()?;
            let (_, vectors) = self.msi.as_ref().expect("checked");
            self.backend
                .enable_irq(VFIO_PCI_MSI_IRQ_INDEX, &vectors.events(n))
                .map_err(|e| e.to_string())?;
            self.mode = IrqMode::Msi(n);
        }
        let (_, vectors) = self.msi.as_mut().expect("checked");
        for (i, (msg, masked)) in messages.into_iter().take(n).enumerate() {
            vectors.update(i, msg, masked).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn update_msix(&mut self) -> Result<(), String> {
        let Some((cap, table, _)) = &mut self.msix else {
            return Ok(());
        };
        let off = cap.offset;
        table.set_control(u16::from_le_bytes([self.virt[off + 2], self.virt[off + 3]]));
        let enabled = table.enabled;
        if !enabled {
            if self.mode == IrqMode::Msix {
                self.disable_irqs()?;
                self.enable_intx()?;
            }
            return Ok(());
        }
        if self.mode != IrqMode::Msix {
            self.disable_irqs()?;
            let (cap, _, vectors) = self.msix.as_ref().expect("checked");
            self.backend
                .enable_irq(
                    VFIO_PCI_MSIX_IRQ_INDEX,
                    &vectors.events(usize::from(cap.table_size)),
                )
                .map_err(|e| e.to_string())?;
            self.mode = IrqMode::Msix;
        }
        let (_, table, vectors) = self.msix.as_mut().expect("checked");
        for i in 0..table.entries.len() {
            vectors
                .update(i, table.entries[i].message(), table.vector_masked(i))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Brings the KVM slots of mmap'ed BAR parts in line with the guest's BARs and command.
    fn update_mappings(&mut self) {
        let mem_on = self.command & COMMAND_MEMORY != 0;
        for i in 0..BAR_COUNT {
            let base = self.bar_address(i);
            let Some(bar) = &mut self.bars[i] else {
                continue;
            };
            let aligned = base.is_some_and(|b| b != 0 && b % bar.spec.size == 0);
            for p in &mut bar.pieces {
                let want = (mem_on && aligned).then(|| base.unwrap_or(0) + p.offset);
                if want == p.mapped_at {
                    continue;
                }
                if p.mapped_at.take().is_some() {
                    if let Err(e) = self.mapper.unmap(p.slot) {
                        eprintln!("airlock-vmm: vfio {}: {e}", self.addr);
                    }
                }
                if let Some(gpa) = want {
                    match self.mapper.map(p.slot, gpa, p.len, p.host.addr) {
                        Ok(()) => p.mapped_at = Some(gpa),
                        Err(e) => eprintln!("airlock-vmm: vfio {}: {e}", self.addr),
                    }
                }
            }
        }
    }

    /// The address the guest gave BAR `i`.
    pub fn bar_address(&self, i: usize) -> Option<u64> {
        let bar = self.bars.get(i)?.as_ref()?;
        let reg = BAR0 + i * 4;
        let low = u32::from_le_bytes(self.virt[reg..reg + 4].try_into().expect("4"));
        Some(match bar.spec.kind {
            BarKind::Io => u64::from(low & !3),
            BarKind::Mem32 => u64::from(low & !0xf),
            BarKind::Mem64 => {
                let high = u32::from_le_bytes(self.virt[reg + 4..reg + 8].try_into().expect("4"));
                u64::from(low & !0xf) | (u64::from(high) << 32)
            }
        })
    }

    fn msix_part(&self, bar: usize, offset: u64, len: usize) -> Option<(bool, u64)> {
        let (cap, _, _) = self.msix.as_ref()?;
        let end = offset + len as u64;
        if bar == cap.table_bar
            && offset >= cap.table_offset
            && end <= cap.table_offset + cap.table_len()
        {
            return Some((true, offset - cap.table_offset));
        }
        if bar == cap.pba_bar && offset >= cap.pba_offset && end <= cap.pba_offset + cap.pba_len() {
            return Some((false, offset - cap.pba_offset));
        }
        None
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config(&mut self, reg: usize) -> u32 {
        let off = reg * 4;
        if off + 4 > self.config_size {
            return u32::MAX;
        }
        let mut bytes = [0u8; 4];
        if (off..off + 4).any(|o| !self.owned[o]) {
            self.backend
                .read_region(VFIO_PCI_CONFIG_REGION_INDEX, off as u64, &mut bytes);
        }
        for (i, b) in bytes.iter_mut().enumerate() {
            if self.owned[off + i] {
                *b = self.virt[off + i];
            }
        }
        if off == COMMAND {
            // Memory and I/O decoding as the guest set them.
            let cmd = u16::from_le_bytes([bytes[0], bytes[1]]);
            let cmd = (cmd & !(COMMAND_IO | COMMAND_MEMORY))
                | (self.command & (COMMAND_IO | COMMAND_MEMORY));
            bytes[0..2].copy_from_slice(&cmd.to_le_bytes());
        }
        u32::from_le_bytes(bytes)
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        if offset + data.len() > self.config_size {
            return;
        }
        let mut run: Option<(usize, Vec<u8>)> = None;
        let flush = |run: &mut Option<(usize, Vec<u8>)>| {
            if let Some((o, bytes)) = run.take() {
                self.backend
                    .write_region(VFIO_PCI_CONFIG_REGION_INDEX, o as u64, &bytes);
            }
        };
        for (i, &v) in data.iter().enumerate() {
            let o = offset + i;
            if self.owned[o] {
                flush(&mut run);
                let m = self.wmask[o];
                self.virt[o] = (self.virt[o] & !m) | (v & m);
            } else {
                match &mut run {
                    Some((_, bytes)) => bytes.push(v),
                    None => run = Some((o, vec![v])),
                }
            }
        }
        flush(&mut run);
        let touches =
            |start: usize, len: usize| offset < start + len && start < offset + data.len();
        if touches(COMMAND, 2) {
            let mut cmd = self.command.to_le_bytes();
            for (i, &v) in data.iter().enumerate() {
                let o = offset + i;
                if (COMMAND..COMMAND + 2).contains(&o) {
                    cmd[o - COMMAND] = v;
                }
            }
            self.command = u16::from_le_bytes(cmd);
        }
        let mut result = Ok(());
        if let Some((cap, _)) = &self.msi {
            if touches(cap.offset, cap.len()) {
                result = self.update_msi();
            }
        }
        if let Some((cap, _, _)) = &self.msix {
            if touches(cap.offset + 2, 2) {
                result = result.and(self.update_msix());
            }
        }
        if let Err(e) = result {
            eprintln!("airlock-vmm: vfio {}: interrupts: {e}", self.addr);
        }
        if touches(COMMAND, 2) || touches(BAR0, BAR_COUNT * 4) {
            self.update_mappings();
        }
    }

    fn bar_ranges(&self) -> Vec<BarRange> {
        (0..BAR_COUNT)
            .filter_map(|i| {
                let bar = self.bars[i].as_ref()?;
                let io = bar.spec.kind == BarKind::Io;
                let on = self.command & if io { COMMAND_IO } else { COMMAND_MEMORY } != 0;
                let base = self.bar_address(i)?;
                (on && base != 0).then_some(BarRange {
                    bar: i,
                    base,
                    len: bar.spec.size,
                    io,
                })
            })
            .collect()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_part(bar, offset, data.len()) {
            Some((true, o)) => {
                if let Some((_, table, _)) = &self.msix {
                    table.read_table(o, data);
                }
            }
            // The PBA is read from the device: it knows what is pending.
            _ => self.backend.read_region(bar as u32, offset, data),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_part(bar, offset, data.len()) {
            Some((true, o)) => {
                let mode = self.mode;
                let Some((_, table, vectors)) = &mut self.msix else {
                    return;
                };
                if let Some(i) = table.write_table(o, data) {
                    if mode == IrqMode::Msix {
                        let (msg, masked) = (table.entries[i].message(), table.vector_masked(i));
                        if let Err(e) = vectors.update(i, msg, masked) {
                            eprintln!("airlock-vmm: vfio {}: MSI-X vector {i}: {e}", self.addr);
                        }
                    }
                }
            }
            Some((false, _)) => {} // the PBA is read-only
            None => self.backend.write_region(bar as u32, offset, data),
        }
    }

    fn name(&self) -> String {
        format!("vfio {}", self.addr)
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        let _ = self.disable_irqs();
        for bar in self.bars.iter_mut().flatten() {
            for p in &mut bar.pieces {
                if p.mapped_at.take().is_some() {
                    let _ = self.mapper.unmap(p.slot);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::backend::fake::FakeVfio;
    use super::*;
    use crate::devices::pci::layout::{PCI_MMIO32_END, PCI_MMIO32_START, PCI_MMIO64_MIN_START};
    use crate::devices::pci::msi::fake::RecordingRouter;
    use crate::devices::pci::msi::MSIX_CTRL_ENABLE;

    const VIRTIO_NET: &[u8] = include_bytes!("../../../tests/data/pci/1af4_1041_020000.bin");
    const VIRTIO_NET_RES: &str = include_str!("../../../tests/data/pci/1af4_1041_020000.resource");
    const HOST_BRIDGE: &[u8] = include_bytes!("../../../tests/data/pci/8086_0d57_060000.bin");

    #[derive(Default)]
    struct Slots {
        next: Mutex<u32>,
        mapped: Mutex<std::collections::BTreeMap<u32, (u64, u64)>>,
    }

    impl GuestMapper for Slots {
        fn allocate_slot(&self) -> u32 {
            let mut n = self.next.lock().unwrap();
            *n += 1;
            *n + 15
        }
        fn map(&self, slot: u32, gpa: u64, len: u64, _: u64) -> Result<(), String> {
            assert!(self
                .mapped
                .lock()
                .unwrap()
                .insert(slot, (gpa, len))
                .is_none());
            Ok(())
        }
        fn unmap(&self, slot: u32) -> Result<(), String> {
            assert!(self.mapped.lock().unwrap().remove(&slot).is_some());
            Ok(())
        }
    }

    fn windows() -> BarWindows {
        BarWindows {
            mmio32: WindowAllocator::mmio32(),
            mmio64: WindowAllocator::mmio64(PCI_MMIO64_MIN_START, 512 << 30),
            io: WindowAllocator::io(),
        }
    }

    struct Rig {
        dev: VfioPciDevice,
        fake: Arc<FakeVfio>,
        router: Arc<RecordingRouter>,
        slots: Arc<Slots>,
    }

    fn rig(config: &[u8], bars: &[(u32, u64, bool)], irqs: [u32; 3], gsi: Option<u32>) -> Rig {
        let fake = Arc::new(FakeVfio::new(config, bars, irqs));
        let router = RecordingRouter::new();
        let slots = Arc::new(Slots::default());
        let dev = VfioPciDevice::new(
            "0000:41:00.0".parse().unwrap(),
            fake.clone(),
            slots.clone(),
            router.clone(),
            &mut windows(),
            gsi,
        )
        .unwrap();
        Rig {
            dev,
            fake,
            router,
            slots,
        }
    }

    fn virtio_net() -> Rig {
        let bars = FakeVfio::bars_from_resource(VIRTIO_NET_RES);
        assert_eq!(bars, vec![(0, 0x80000, true)]);
        rig(VIRTIO_NET, &bars, [1, 0, 3], None)
    }

    fn w32(d: &mut VfioPciDevice, off: usize, v: u32) {
        d.write_config(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_passes_through_and_bars_are_virtualized() {
        let Rig { mut dev, fake, .. } = virtio_net();
        assert_eq!(dev.read_config(0), 0x1041_1af4);
        assert_eq!(dev.read_config(2), 0x0200_0001);
        // BAR0: 64-bit, placed in the 64-bit window, not the host's address.
        assert_eq!(dev.read_config(4), (PCI_MMIO64_MIN_START as u32) | 0x4);
        assert_eq!(dev.read_config(5), (PCI_MMIO64_MIN_START >> 32) as u32);
        w32(&mut dev, BAR0, u32::MAX);
        w32(&mut dev, BAR0 + 4, u32::MAX);
        assert_eq!(dev.read_config(4), 0xfff8_0004);
        assert_eq!(dev.read_config(5), u32::MAX);
        // Unimplemented BARs and the ROM read 0 after sizing.
        w32(&mut dev, BAR0 + 8, u32::MAX);
        assert_eq!(dev.read_config(6), 0);
        w32(&mut dev, ROM_BAR, u32::MAX);
        assert_eq!(dev.read_config(ROM_BAR / 4), 0);
        // None of that reached the device; a plain register does.
        assert!(fake.state.lock().unwrap().config_writes.is_empty());
        dev.write_config(0x0c, &[0x10]);
        assert_eq!(
            fake.state.lock().unwrap().config_writes,
            vec![(0x0c, vec![0x10])]
        );
        // Beyond a 256-byte space: all ones.
        assert_eq!(dev.read_config(0x40), u32::MAX);
    }

    #[test]
    fn msix_capability_is_virtualized_and_the_table_trapped() {
        let Rig {
            mut dev,
            fake,
            router,
            slots,
        } = virtio_net();
        // The host has MSI-X enabled (control 0x8002); the guest sees it disabled.
        assert_eq!(dev.read_config(0x98 / 4), 0x0002_0011);
        // The mmap'ed parts skip the table and PBA pages.
        let pieces: Vec<(u64, u64)> = fake
            .state
            .lock()
            .unwrap()
            .mmaps
            .iter()
            .map(|m| (m.1, m.2))
            .collect();
        assert_eq!(
            pieces,
            vec![(0, 0x8000), (0x9000, 0x3f000), (0x49000, 0x37000)]
        );
        // Enable memory decoding: three slots at BAR0 + offsets.
        dev.write_config(COMMAND, &(COMMAND_MEMORY | 4).to_le_bytes());
        let mapped: Vec<(u64, u64)> = slots.mapped.lock().unwrap().values().copied().collect();
        assert_eq!(
            mapped,
            vec![
                (PCI_MMIO64_MIN_START, 0x8000),
                (PCI_MMIO64_MIN_START + 0x9000, 0x3f000),
                (PCI_MMIO64_MIN_START + 0x49000, 0x37000)
            ]
        );
        // The command register reaches the device.
        assert_eq!(
            fake.state.lock().unwrap().config_writes.last().unwrap().0,
            COMMAND as u64
        );
        // Enable MSI-X (function-masked), program vector 1, unmask.
        dev.write_config(0x9a, &(MSIX_CTRL_ENABLE | 1 << 14).to_le_bytes());
        assert_eq!(fake.state.lock().unwrap().irqs, vec![(2, 3)]);
        dev.write_bar(0, 0x8010, &0xfee0_0000u32.to_le_bytes());
        dev.write_bar(0, 0x8018, &0x4021u32.to_le_bytes());
        dev.write_bar(0, 0x801c, &0u32.to_le_bytes());
        assert!(
            router.armed.lock().unwrap().is_empty(),
            "function mask holds"
        );
        dev.write_config(0x9a, &MSIX_CTRL_ENABLE.to_le_bytes());
        assert_eq!(
            router
                .armed
                .lock()
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            vec![25]
        );
        assert_eq!(router.routes.lock().unwrap()[&25].data, 0x4021);
        let mut d = [0u8; 4];
        dev.read_bar(0, 0x8018, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4021);
        // Table writes never reach the device; other BAR0 accesses do (trapped pages).
        assert!(fake.state.lock().unwrap().region_writes.is_empty());
        dev.write_bar(0, 0x8800, &[1, 2, 3, 4]);
        assert_eq!(
            fake.state.lock().unwrap().region_writes,
            vec![(0, 0x8800, vec![1, 2, 3, 4])]
        );
        // Disable MSI-X: VFIO told, routes gone.
        dev.write_config(0x9a, &0u16.to_le_bytes());
        assert_eq!(fake.state.lock().unwrap().irqs.last(), Some(&(2, 0)));
        assert!(router.routes.lock().unwrap().is_empty());
    }

    #[test]
    fn relocating_a_bar_moves_its_slots() {
        let Rig { mut dev, slots, .. } = virtio_net();
        dev.write_config(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        // Linux turns decoding off, sizes, programs, turns it back on.
        dev.write_config(COMMAND, &0u16.to_le_bytes());
        assert!(slots.mapped.lock().unwrap().is_empty());
        w32(&mut dev, BAR0, 0x0010_0000);
        w32(&mut dev, BAR0 + 4, 0x20);
        dev.write_config(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        let base = (0x20u64 << 32) | 0x10_0000;
        let first = slots.mapped.lock().unwrap().values().next().copied();
        assert_eq!(first, Some((base, 0x8000)));
        assert_eq!(
            dev.bar_ranges(),
            vec![BarRange {
                bar: 0,
                base,
                len: 0x80000,
                io: false
            }]
        );
        // Address bits below the BAR's size are not writable.
        w32(&mut dev, BAR0, 0x0010_0000 | 0x1000);
        assert_eq!(dev.bar_address(0), Some(base));
    }

    #[test]
    fn extended_space_of_a_pcie_function_passes_through() {
        let Rig { mut dev, .. } = rig(HOST_BRIDGE, &[], [0, 0, 0], None);
        assert_eq!(dev.read_config(0), 0x0d57_8086);
        assert_eq!(dev.read_config(0x100 / 4), 0);
        assert_eq!(dev.read_config(0xffc / 4), 0);
        assert!(dev.bar_ranges().is_empty());
    }

    /// A device with a 64-bit MSI capability (4 vectors) and an interrupt pin, no MSI-X.
    fn msi_config() -> Vec<u8> {
        let mut c = VIRTIO_NET.to_vec();
        c[0x34] = 0x40;
        c[0x3d] = 1;
        c[0x40..0x58].fill(0);
        c[0x40] = CAP_ID_MSI;
        c[0x41] = 0;
        c[0x42..0x44].copy_from_slice(&(0x80u16 | 0x100 | (2 << 1)).to_le_bytes());
        c
    }

    #[test]
    fn intx_first_then_msi_and_back() {
        let bars = FakeVfio::bars_from_resource(VIRTIO_NET_RES);
        let Rig {
            mut dev,
            fake,
            router,
            ..
        } = rig(&msi_config(), &bars, [1, 4, 0], Some(23));
        assert_eq!(*router.resample.lock().unwrap(), vec![23]);
        assert_eq!(fake.state.lock().unwrap().irqs, vec![(0, 1)]);
        assert!(fake.state.lock().unwrap().intx_unmask);
        assert_eq!(dev.read_config(0x3c / 4) & 0xffff, 0x0117);
        // Enable 2 vectors (MME=1) at 0xfee00000 data 0x30.
        w32(&mut dev, 0x44, 0xfee0_0000);
        dev.write_config(0x4c, &0x30u16.to_le_bytes());
        dev.write_config(0x42, &(1u16 | 1 << 4).to_le_bytes());
        assert_eq!(
            fake.state.lock().unwrap().irqs,
            vec![(0, 1), (0, 0), (1, 2)]
        );
        assert_eq!(router.routes.lock().unwrap()[&25].data, 0x31);
        assert_eq!(router.armed.lock().unwrap().len(), 2);
        // Mask vector 1 with the per-vector mask bits.
        w32(&mut dev, 0x50, 2);
        assert_eq!(router.armed.lock().unwrap().len(), 1);
        // Disable MSI: INTx again.
        dev.write_config(0x42, &0u16.to_le_bytes());
        assert_eq!(fake.state.lock().unwrap().irqs[3..], [(1, 0), (0, 1)]);
        assert!(router.routes.lock().unwrap().is_empty());
    }

    #[test]
    fn no_gsi_for_intx_hides_the_pin() {
        let bars = FakeVfio::bars_from_resource(VIRTIO_NET_RES);
        let Rig { mut dev, fake, .. } = rig(&msi_config(), &bars, [1, 4, 0], None);
        assert_eq!(dev.read_config(0x3c / 4) >> 8 & 0xff, 0);
        assert!(fake.state.lock().unwrap().irqs.is_empty());
    }

    #[test]
    fn every_collected_virtio_device_gets_a_virtualized_msix_capability() {
        let files: [(&[u8], &str); 5] = [
            (VIRTIO_NET, VIRTIO_NET_RES),
            (
                include_bytes!("../../../tests/data/pci/1af4_1042_018000.bin"),
                include_str!("../../../tests/data/pci/1af4_1042_018000.resource"),
            ),
            (
                include_bytes!("../../../tests/data/pci/1af4_1044_ffff00.bin"),
                include_str!("../../../tests/data/pci/1af4_1044_ffff00.resource"),
            ),
            (
                include_bytes!("../../../tests/data/pci/1af4_1045_ffff00.bin"),
                include_str!("../../../tests/data/pci/1af4_1045_ffff00.resource"),
            ),
            (
                include_bytes!("../../../tests/data/pci/1af4_1053_ffff00.bin"),
                include_str!("../../../tests/data/pci/1af4_1053_ffff00.resource"),
            ),
        ];
        for (config, resource) in files {
            let bars = FakeVfio::bars_from_resource(resource);
            let Rig { mut dev, .. } = rig(config, &bars, [1, 0, 8], None);
            let id = dev.read_config(0);
            assert_eq!(id & 0xffff, 0x1af4);
            let space: Vec<u8> = (0..64)
                .flat_map(|r| dev.read_config(r).to_le_bytes())
                .collect();
            let caps = capabilities(|o| space[o]);
            let (_, msix) = *caps.iter().find(|(c, _)| *c == CAP_ID_MSIX).expect("MSI-X");
            let control = dev.read_config(msix / 4) >> 16;
            assert_eq!(control & 0xc000, 0, "{id:#x}: guest sees MSI-X off");
            // Every BAR the host has is placed and sizes like the host's.
            for (i, size, _) in bars {
                let reg = BAR0 / 4 + i as usize;
                dev.write_config(reg * 4, &u32::MAX.to_le_bytes());
                let low = dev.read_config(reg) & !0xf;
                assert_eq!(low, !(size as u32 - 1) & !0xf, "{id:#x} BAR{i}");
            }
        }
    }

    /// A real GPU: NVIDIA Quadro P1000 (GP107GL, 10de:1cb1) as its owner dumped it under vfio-pci
    /// (tests/data/pci/README.md says where from). 32-bit BAR0, two 64-bit prefetchable BARs, an
    /// I/O BAR, a ROM, MSI enabled by the host, PCI Express, and a vendor capability at 0xb4 that
    /// is not linked into the list.
    const QUADRO_P1000: &[u8] = include_bytes!("../../../tests/data/pci/10de_1cb1_030000.bin");
    const QUADRO_P1000_RES: &str =
        include_str!("../../../tests/data/pci/10de_1cb1_030000.resource");

    #[test]
    fn a_gpu_config_space_is_virtualized() {
        let bars = FakeVfio::bars_from_resource(QUADRO_P1000_RES);
        assert_eq!(
            bars,
            vec![
                (0, 16 << 20, true),
                (1, 256 << 20, true),
                (3, 32 << 20, true),
                (5, 128, false)
            ]
        );
        let Rig {
            mut dev,
            fake,
            router,
            slots,
        } = rig(QUADRO_P1000, &bars, [1, 1, 0], Some(23));
        assert_eq!(dev.read_config(0), 0x1cb1_10de);
        assert_eq!(dev.read_config(2), 0x0300_00a1, "VGA controller, rev a1");
        // The BARs are ours: window addresses, never the host's 0x383f_e000_0000.
        let bar0 = dev.bar_address(0).unwrap();
        assert!(
            (PCI_MMIO32_START..PCI_MMIO32_END).contains(&bar0),
            "{bar0:#x}"
        );
        assert_eq!(dev.read_config(4), bar0 as u32, "32-bit, not prefetchable");
        for bar in [1, 3] {
            let addr = dev.bar_address(bar).unwrap();
            assert!(addr >= PCI_MMIO64_MIN_START, "BAR{bar} at {addr:#x}");
            assert_eq!(
                dev.read_config(4 + bar),
                addr as u32 | 0xc,
                "64-bit prefetchable"
            );
            assert_eq!(dev.read_config(5 + bar), (addr >> 32) as u32);
        }
        assert_eq!(dev.read_config(9) & 0x3, 0x1, "BAR5 is I/O");
        // Sizing, as Linux does it: all ones, read back the size mask.
        for (reg, want) in [
            (4, 0xff00_0000u32),
            (5, 0xf000_000c),
            (6, u32::MAX),
            (7, 0xfe00_000c),
            (8, u32::MAX),
            (9, 0xffff_ff81),
        ] {
            w32(&mut dev, reg * 4, u32::MAX);
            assert_eq!(dev.read_config(reg), want, "BAR register {reg}");
        }
        w32(&mut dev, ROM_BAR, u32::MAX);
        assert_eq!(dev.read_config(ROM_BAR / 4), 0, "the ROM is hidden");
        // The guest's list: power management, MSI, PCI Express; MSI starts disabled though the
        // host had it on (control 0x0081), and there is no MSI-X.
        let space: Vec<u8> = (0..64)
            .flat_map(|r| dev.read_config(r).to_le_bytes())
            .collect();
        let caps = capabilities(|o| space[o]);
        assert_eq!(caps, vec![(0x01, 0x60), (CAP_ID_MSI, 0x68), (0x10, 0x78)]);
        assert_eq!(dev.read_config(0x68 / 4), 0x0080_7805);
        // Pin A on the GSI the VMM gave it; INTx armed at VFIO with a resample fd.
        assert_eq!(dev.read_config(0x3c / 4) & 0xffff, 0x0117);
        assert_eq!(*router.resample.lock().unwrap(), vec![23]);
        assert_eq!(fake.state.lock().unwrap().irqs, vec![(0, 1)]);
        // The driver enables MSI (64-bit address, no per-vector mask): INTx off, one vector routed.
        w32(&mut dev, 0x6c, 0xfee0_1000);
        w32(&mut dev, 0x70, 0);
        dev.write_config(0x74, &0x41u16.to_le_bytes());
        dev.write_config(0x6a, &1u16.to_le_bytes());
        assert_eq!(
            fake.state.lock().unwrap().irqs,
            vec![(0, 1), (0, 0), (1, 1)]
        );
        let routes = router.routes.lock().unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes.values().next().unwrap().data, 0x41);
        drop(routes);
        // Memory decoding maps BAR0, BAR1 and BAR3 whole (no MSI-X table to trap).
        dev.write_config(COMMAND, &(COMMAND_MEMORY | COMMAND_IO | 4).to_le_bytes());
        let mut mapped: Vec<u64> = slots.mapped.lock().unwrap().values().map(|m| m.1).collect();
        mapped.sort_unstable();
        assert_eq!(mapped, vec![16 << 20, 32 << 20, 256 << 20]);
    }

    #[test]
    fn page_exclusion() {
        assert_eq!(
            pages_excluding((0, 0x4000), &[(0x1000, 0x10)]),
            vec![(0, 0x1000), (0x2000, 0x2000)]
        );
        assert_eq!(pages_excluding((0, 0x800), &[]), vec![]);
        assert_eq!(pages_excluding((0, 0x2000), &[(0, 0x2000)]), vec![]);
    }
}
