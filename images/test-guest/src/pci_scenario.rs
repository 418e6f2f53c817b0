//! The `pci` scenario: finds ECAM through the ACPI RSDP, XSDT and MCFG, compares every slot
//! of bus 0 through ECAM and through ports 0xcf8/0xcfc, and checks the VMM's PCI test device
//! (capabilities, BAR sizing, BAR0 registers, BAR2 memory). Everything is polled.

use crate::arch;
use crate::e820::{FOUR_GIB, MMIO_GAP_START};
use crate::fmt::{Ascii, LineBuf, Size};
use crate::kernel::BootInfo;
use crate::pci::{self, McfgAllocation, RSDP_LEN, SDT_HEADER_LEN};
use crate::{say, text};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const SLOTS: u8 = 32;
/// Bus 0 needs 1 MiB of ECAM.
const ECAM_BUS_SIZE: u64 = 1 << 20;

const HOST_BRIDGE_ID: u32 = 0x0d57_8086;
const HOST_BRIDGE_CLASS: u32 = 0x06_0000;
const TEST_DEVICE_ID: u32 = 0x0005_1b36;
const TEST_DEVICE_CLASS: u32 = 0xff_0000;
const TEST_DEVICE_MAGIC: u32 = 0x4b43_4c41;
const VSEC_BODY: &[u8; 16] = b"AIRLOCK-PCI-TEST";

const COMMAND: u16 = 0x04;
const COMMAND_MEMORY: u16 = 1 << 1;
const STATUS_CAP_LIST: u32 = 1 << 4;
const BAR0: u16 = 0x10;
const BAR2: u16 = 0x18;
const BAR3: u16 = 0x1c;
const CAP_ID_MSIX: u8 = 0x11;
const EXT_CAP_ID_VSEC: u16 = 0x000b;
/// Where the guest moves BAR2 (the VMM puts it above 64 GiB, which the guest may not map).
const BAR2_ADDR: u32 = 0xe000_0000;

/// ACPI tables are in guest RAM below the MMIO gap.
fn check_ram(what: &str, addr: u64, len: usize) -> Result<(), LineBuf> {
    if addr == 0 || addr.saturating_add(len as u64) > MMIO_GAP_START {
        return Err(text!(
            "{what} at {addr:#x} (+{len}) is not in RAM below {MMIO_GAP_START:#x}"
        ));
    }
    Ok(())
}

fn copy_phys<const N: usize>(addr: u64) -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: callers checked [addr, addr + N) with `check_ram`: identity-mapped memory the
    // VMM wrote the ACPI tables into, which nothing writes while the guest reads.
    unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, b.as_mut_ptr(), N) };
    b
}

/// A whole checked table with signature `sig` at `addr`.
fn table(addr: u64, sig: &[u8; 4]) -> Result<&'static [u8], LineBuf> {
    let what = Ascii(sig);
    check_ram("ACPI table", addr, SDT_HEADER_LEN)?;
    let header = copy_phys::<SDT_HEADER_LEN>(addr);
    let len = pci::table_len(&header, sig).map_err(|e| text!("{what} at {addr:#x}: {e}"))?;
    check_ram("ACPI table", addr, len)?;
    // SAFETY: as in `copy_phys`, for the table's full length (checked just above).
    let t = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    pci::check_table(t).map_err(|e| text!("{what} at {addr:#x}: {e}"))?;
    Ok(t)
}

/// Step 1: RSDP -> XSDT -> MCFG.
fn find_mcfg(rsdp_addr: u64) -> Result<McfgAllocation, LineBuf> {
    if rsdp_addr == 0 {
        return Err(text!("no ACPI RSDP in boot_params"));
    }
    check_ram("ACPI RSDP", rsdp_addr, RSDP_LEN)?;
    let rsdp = copy_phys::<RSDP_LEN>(rsdp_addr);
    let xsdt_addr = pci::rsdp_xsdt(&rsdp).map_err(|e| text!("ACPI at {rsdp_addr:#x}: {e}"))?;
    let xsdt = table(xsdt_addr, b"XSDT")?;
    for addr in pci::xsdt_entries(xsdt) {
        check_ram("XSDT entry", addr, SDT_HEADER_LEN)?;
        if pci::signature(&copy_phys::<4>(addr)) == *b"MCFG" {
            let mcfg = table(addr, b"MCFG")?;
            return pci::mcfg_first(mcfg).map_err(|e| text!("at {addr:#x}: {e}"));
        }
    }
    Err(text!(
        "no MCFG among the {} XSDT entries (XSDT at {xsdt_addr:#x})",
        pci::xsdt_entries(xsdt).count()
    ))
}

/// Configuration space of bus 0, function 0 of each device, through ECAM.
struct Ecam(u64);

impl Ecam {
    fn addr(&self, dev: u8, reg: u16) -> u64 {
        self.0 + pci::ecam_offset(0, dev, 0, reg)
    }

    fn read32(&self, dev: u8, reg: u16) -> u32 {
        // SAFETY: `run` checked the ECAM region for bus 0 lies in the MMIO gap, which the guest
        // identity maps uncached; `reg` is dword aligned and below 0x1000.
        unsafe { arch::mmio_read32(self.addr(dev, reg & !3)) }
    }

    fn read8(&self, dev: u8, reg: u16) -> u8 {
        (self.read32(dev, reg) >> ((reg & 3) * 8)) as u8
    }

    fn write32(&self, dev: u8, reg: u16, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { arch::mmio_write32(self.addr(dev, reg & !3), value) }
    }

    fn write16(&self, dev: u8, reg: u16, value: u16) {
        // SAFETY: as in `read32`, for a 2-byte aligned register.
        unsafe { arch::mmio_write16(self.addr(dev, reg & !1), value) }
    }
}

fn cf8_read32(dev: u8, reg: u8) -> u32 {
    arch::outl(CONFIG_ADDRESS, pci::cf8_address(0, dev, 0, reg));
    arch::inl(CONFIG_DATA)
}

/// The test device's BAR0 registers (and BAR2 memory), in the identity-mapped uncached gap.
fn bar_read32(addr: u64) -> u32 {
    // SAFETY: `addr` is inside a BAR the guest checked to lie in the MMIO gap [0xd0000000,
    // 4 GiB), identity mapped uncached; the device's registers are plain loads.
    unsafe { arch::mmio_read32(addr) }
}

pub fn run(info: &BootInfo) -> Result<(), LineBuf> {
    // 1. ECAM from ACPI.
    let mcfg = find_mcfg(info.acpi_rsdp_addr)?;
    say!(
        "PCI MCFG ecam {:#x} buses {}-{}",
        mcfg.base,
        mcfg.start_bus,
        mcfg.end_bus
    );
    if mcfg.segment != 0 || mcfg.start_bus != 0 {
        return Err(text!(
            "MCFG allocation is segment {} buses {}-{}: bus 0 of segment 0 is not covered",
            mcfg.segment,
            mcfg.start_bus,
            mcfg.end_bus
        ));
    }
    let end = mcfg.base.checked_add(ECAM_BUS_SIZE);
    if mcfg.base < MMIO_GAP_START
        || end.is_none_or(|e| e > FOUR_GIB)
        || !mcfg.base.is_multiple_of(4096)
    {
        return Err(text!(
            "ECAM for bus 0 at {:#x} is not page aligned inside the MMIO gap [{MMIO_GAP_START:#x}, {FOUR_GIB:#x})",
            mcfg.base
        ));
    }
    let ecam = Ecam(mcfg.base);

    // 2. Every slot through both mechanisms.
    let mut bridge = None;
    let mut test_dev = None;
    for dev in 0..SLOTS {
        let e = ecam.read32(dev, 0);
        let c = cf8_read32(dev, 0);
        if e != c {
            return Err(text!(
                "00:{dev:02x}.0 register 0: ECAM reads {e:#010x}, cf8/cfc reads {c:#010x}"
            ));
        }
        if e & 0xffff == 0xffff {
            continue;
        }
        let class = ecam.read32(dev, 8) >> 8;
        say!(
            "PCI 00:{dev:02x}.0 [{:04x}:{:04x}] class {class:06x}",
            e & 0xffff,
            e >> 16
        );
        if dev == 0 {
            bridge = Some((e, class));
        }
        if e == TEST_DEVICE_ID && test_dev.is_none() {
            test_dev = Some((dev, class));
        }
    }
    say!("PCI cf8 and ECAM agree on {SLOTS} slots");
    match bridge {
        Some((HOST_BRIDGE_ID, HOST_BRIDGE_CLASS)) => {}
        Some((id, class)) => {
            return Err(text!(
                "00:00.0 is [{:04x}:{:04x}] class {class:06x}, expected the host bridge [8086:0d57] class 060000",
                id & 0xffff,
                id >> 16
            ))
        }
        None => return Err(text!("no host bridge [8086:0d57] at 00:00.0")),
    }
    let dev = match test_dev {
        Some((dev, TEST_DEVICE_CLASS)) => dev,
        Some((dev, class)) => {
            return Err(text!(
                "test device 00:{dev:02x}.0 [1b36:0005] has class {class:06x}, expected ff0000"
            ))
        }
        None => return Err(text!("no test device [1b36:0005] on bus 0")),
    };

    check_capabilities(&ecam, dev)?;
    size_bars(&ecam, dev)?;
    check_bar0(&ecam, dev)?;
    check_bar2()
}

/// Step 3: MSI-X capability and the vendor-specific extended capability.
fn check_capabilities(ecam: &Ecam, dev: u8) -> Result<(), LineBuf> {
    let status = ecam.read32(dev, COMMAND) >> 16;
    if status & STATUS_CAP_LIST == 0 {
        return Err(text!(
            "test device status {status:#06x} lacks the capabilities list bit (4)"
        ));
    }
    let at = pci::find_capability(|o| ecam.read8(dev, u16::from(o)), CAP_ID_MSIX);
    match at {
        Some(0x40) => {}
        Some(o) => {
            return Err(text!(
                "test device MSI-X capability at {o:#x}, expected 0x40"
            ))
        }
        None => {
            return Err(text!(
                "test device has no MSI-X capability (capability pointer {:#x})",
                ecam.read8(dev, 0x34)
            ))
        }
    }
    let control = (ecam.read32(dev, 0x40) >> 16) as u16;
    let vectors = pci::msix_vectors(control);
    let table = pci::bir_offset(ecam.read32(dev, 0x44));
    let pba = pci::bir_offset(ecam.read32(dev, 0x48));
    if vectors != 2 || table != (0, 0x800) || pba != (0, 0xc00) {
        return Err(text!(
            "test device MSI-X: {vectors} vectors (control {control:#06x}), table BIR {} offset {:#x}, PBA BIR {} offset {:#x}; expected 2 vectors, table BIR 0 offset 0x800, PBA BIR 0 offset 0xc00",
            table.0,
            table.1,
            pba.0,
            pba.1
        ));
    }
    let header = ecam.read32(dev, 0x100);
    let (id, version, next) = pci::ext_cap_header(header);
    if (id, version, next) != (EXT_CAP_ID_VSEC, 1, 0) {
        return Err(text!(
            "test device extended capability at 0x100 is {header:#010x} (id {id:#06x}, version {version}, next {next:#x}), expected id 0x000b version 1 next 0"
        ));
    }
    let mut body = [0u8; 16];
    for (i, chunk) in body.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&ecam.read32(dev, 0x104 + 4 * i as u16).to_le_bytes());
    }
    if &body != VSEC_BODY {
        return Err(text!(
            "test device bytes 0x104..0x114 read \"{}\", expected \"AIRLOCK-PCI-TEST\"",
            Ascii(&body)
        ));
    }
    Ok(())
}

/// Writes all ones to a BAR, reads it back, restores the old value (memory decoding is off).
fn probe_bar(ecam: &Ecam, dev: u8, reg: u16) -> (u32, u32) {
    let old = ecam.read32(dev, reg);
    ecam.write32(dev, reg, u32::MAX);
    let mask = ecam.read32(dev, reg);
    ecam.write32(dev, reg, old);
    (old, mask)
}

/// Step 4: BAR sizing with memory decoding off, then BAR2 moved to 0xe0000000.
fn size_bars(ecam: &Ecam, dev: u8) -> Result<(), LineBuf> {
    let command = ecam.read32(dev, COMMAND) as u16;
    ecam.write16(dev, COMMAND, command & !COMMAND_MEMORY);

    let (old0, mask0) = probe_bar(ecam, dev, BAR0);
    let now0 = ecam.read32(dev, BAR0);
    if mask0 != 0xffff_f000 || now0 != old0 {
        return Err(text!(
            "test device BAR0 ({old0:#010x}) read {mask0:#010x} after writing all ones (expected 0xfffff000), {now0:#010x} after restoring"
        ));
    }

    let (old2, old3) = (ecam.read32(dev, BAR2), ecam.read32(dev, BAR3));
    ecam.write32(dev, BAR2, u32::MAX);
    ecam.write32(dev, BAR3, u32::MAX);
    let (mask2, mask3) = (ecam.read32(dev, BAR2), ecam.read32(dev, BAR3));
    ecam.write32(dev, BAR2, old2);
    ecam.write32(dev, BAR3, old3);
    let (now2, now3) = (ecam.read32(dev, BAR2), ecam.read32(dev, BAR3));
    if (mask2, mask3) != (0xfff0_000c, 0xffff_ffff) || (now2, now3) != (old2, old3) {
        return Err(text!(
            "test device BAR2/BAR3 ({old3:#010x}_{old2:08x}) read {mask3:#010x}_{mask2:08x} after writing all ones (expected 0xffffffff_fff0000c), {now3:#010x}_{now2:08x} after restoring"
        ));
    }

    ecam.write32(dev, BAR2, BAR2_ADDR);
    ecam.write32(dev, BAR3, 0);
    let (now2, now3) = (ecam.read32(dev, BAR2), ecam.read32(dev, BAR3));
    if (now2, now3) != (BAR2_ADDR | 0xc, 0) {
        return Err(text!(
            "test device BAR2/BAR3 read {now3:#010x}_{now2:08x} after programming {BAR2_ADDR:#x}"
        ));
    }
    let width = if pci::bar_is_64bit(mask2) {
        "64-bit"
    } else {
        "32-bit"
    };
    say!(
        "PCI BAR0 {}, BAR2 {} {width}",
        Size(pci::bar_size32(mask0)),
        Size(pci::bar_size64(mask2, mask3))
    );
    Ok(())
}

/// Step 5: memory decoding on, BAR0's registers and the MSI-X pending bit.
fn check_bar0(ecam: &Ecam, dev: u8) -> Result<(), LineBuf> {
    let command = ecam.read32(dev, COMMAND) as u16;
    ecam.write16(dev, COMMAND, command | COMMAND_MEMORY);
    let bar0 = u64::from(ecam.read32(dev, BAR0) & !0xf);
    let bar2 = u64::from(BAR2_ADDR);
    let overlaps_bar2 = bar0 < bar2 + (1 << 20) && bar2 < bar0 + 0x1000;
    if bar0 < MMIO_GAP_START || bar0 + 0x1000 > FOUR_GIB || overlaps_bar2 {
        return Err(text!(
            "test device BAR0 at {bar0:#x} is not inside the MMIO gap [{MMIO_GAP_START:#x}, {FOUR_GIB:#x}) clear of BAR2"
        ));
    }
    let magic = bar_read32(bar0);
    if magic != TEST_DEVICE_MAGIC {
        return Err(text!(
            "test device BAR0 {bar0:#x} +0 reads {magic:#010x}, expected {TEST_DEVICE_MAGIC:#010x}"
        ));
    }
    // SAFETY: BAR0's scratch register, inside the checked BAR in the uncached MMIO gap.
    unsafe { arch::mmio_write32(bar0 + 4, 0xa5a5_5a5a) };
    let scratch = bar_read32(bar0 + 4);
    if scratch != 0xa5a5_5a5a {
        return Err(text!(
            "test device scratch register (BAR0 +4) reads {scratch:#010x} after writing 0xa5a55a5a"
        ));
    }
    // SAFETY: BAR0's doorbell register, as above.
    unsafe { arch::mmio_write32(bar0 + 8, 1) };
    let count = bar_read32(bar0 + 0xc);
    // SAFETY: the PBA in BAR0 at 0xc00, as above.
    let pba = unsafe { arch::mmio_read64(bar0 + 0xc00) };
    if count != 1 || pba & 1 << 1 == 0 {
        return Err(text!(
            "test device after ringing doorbell 1: count (BAR0 +0xc) {count}, expected 1; PBA {pba:#x}, expected bit 1 set"
        ));
    }
    say!("PCI BAR0 registers ok");
    Ok(())
}

/// Step 6: BAR2's read-only pattern at its new address.
fn check_bar2() -> Result<(), LineBuf> {
    for o in [0u64, 1, 0xfff, 0x8_0000] {
        let addr = u64::from(BAR2_ADDR) + o;
        // SAFETY: inside the 1 MiB BAR2 the guest placed at 0xe0000000, in the uncached gap.
        let got = unsafe { arch::mmio_read8(addr) };
        let want = pci::bar2_pattern(o);
        if got != want {
            return Err(text!(
                "test device BAR2 byte {o:#x} (at {addr:#x}) reads {got:#04x}, expected {want:#04x}"
            ));
        }
    }
    say!("PCI BAR2 memory ok");
    Ok(())
}
