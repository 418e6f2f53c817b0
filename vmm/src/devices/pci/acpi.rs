//! ACPI tables that describe the PCI root complex to Linux, written only when a PCI device
//! exists: RSDP, XSDT, FADT (hardware-reduced), DSDT (the host bridge with its windows and INTx
//! routing, COM1, the i8042 and the ECAM reservation), MADT (every vCPU's LAPIC and the IOAPIC)
//! and MCFG (the ECAM base). Linux finds the RSDP through `boot_params.acpi_rsdp_addr`.
//!
//! Once Linux sees ACPI it takes CPUs and the IOAPIC from the MADT and ignores the MP table, and
//! it scans PCI only through the host bridge in the DSDT, so everything the MP table said is here.

use crate::vstate::memory::GuestMemoryMmap;
use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name,
    Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_TABLES_SIZE, ACPI_TABLES_START, PCI_BUS_COUNT, PCI_CONFIG_IO_BASE, PCI_ECAM_BASE,
    PCI_ECAM_SIZE, PCI_IO_END, PCI_IO_START, PCI_MMIO32_END, PCI_MMIO32_START,
};
use crate::arch::layout::{APIC_DEFAULT_PHYS_BASE, IO_APIC_DEFAULT_PHYS_BASE, ZERO_PAGE_START};

const OEM_ID: [u8; 6] = *b"AIRLCK";
const OEM_TABLE_ID: [u8; 8] = *b"AIRLOCKV";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: legacy devices present, 8042 present. Not "MSI not supported".
const IAPC_BOOT_ARCH: u16 = 0b11;
/// MADT flags: PCAT_COMPAT (KVM emulates the dual 8259).
const MADT_PCAT_COMPAT: u32 = 1;

/// `boot_params` fields (Linux `arch/x86/include/uapi/asm/bootparam.h`).
const BP_ACPI_RSDP_ADDR: u64 = 0x070;
const BP_E820_ENTRIES: u64 = 0x1e8;
const BP_E820_TABLE: u64 = 0x2d0;
const E820_ENTRY_SIZE: u64 = 20;
const E820_MAX_ENTRIES_ZEROPAGE: u8 = 128;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit in the {ACPI_TABLES_SIZE:#x}-byte ACPI area")]
    TooBig(usize),
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(String),
    #[error("the e820 map in the zero page is full")]
    E820Full,
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct AcpiLayout {
    pub vcpu_count: u8,
    /// The IOAPIC's id (the MP table's: `arch::mptable::ioapic_id`).
    pub ioapic_id: u8,
    /// The 64-bit PCI MMIO window (start, len).
    pub mmio64: (u64, u64),
    /// INTx routing: (PCI slot, GSI); every pin of the slot goes to that GSI.
    pub intx: Vec<(u8, u32)>,
    /// Whether the VM has a PCI bus: without one there is no host bridge, ECAM or MCFG, and the
    /// tables exist for the MADT (Debian's cloud kernel has no MP-table parser:
    /// `CONFIG_X86_MPPARSE` is off, so only ACPI tells it about more than one vCPU).
    pub pci: bool,
}

impl AcpiLayout {
    /// The tables of a VM without PCI: the MADT, and the FADT and DSDT Linux expects with it.
    pub fn without_pci(vcpu_count: u8, ioapic_id: u8) -> AcpiLayout {
        AcpiLayout {
            vcpu_count,
            ioapic_id,
            mmio64: (0, 0),
            intx: vec![],
            pci: false,
        }
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: header, then `body`, with the length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(b"ALCK");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// The MADT: one enabled LAPIC per vCPU (APIC id = vCPU index) and the IOAPIC at GSI 0.
pub fn madt(vcpu_count: u8, ioapic_id: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..vcpu_count {
        body.extend_from_slice(&[0, 8, cpu, cpu]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    body.extend_from_slice(&[1, 12, ioapic_id, 0]);
    body.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    sdt(b"APIC", 4, &body)
}

/// The DSDT's AML: `\_SB.PCI0` (PNP0A08/PNP0A03, bus 0, the config ports, the I/O window, the
/// 32- and 64-bit memory windows, `_PRT`), `\_SB.MRES` (PNP0C02 reserving the ECAM), `\_SB.COM1`
/// and `\_SB.PS2K` (so Linux keeps the UART and the i8042 that the VMM emulates).
pub fn dsdt_aml(layout: &AcpiLayout) -> Vec<u8> {
    let (m64_start, m64_len) = layout.mmio64;
    let m64_len = m64_len.max(1);
    let bus = AddressSpace::<u16>::new_bus_number(0, u16::from(PCI_BUS_COUNT) - 1);
    let cfg_ports = IO::new(PCI_CONFIG_IO_BASE as u16, PCI_CONFIG_IO_BASE as u16, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0, (PCI_CONFIG_IO_BASE - 1) as u16, None);
    let io_high = AddressSpace::<u16>::new_io(PCI_IO_START as u16, (PCI_IO_END - 1) as u16, None);
    let mem32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_END - 1) as u32,
        None,
    );
    let mem64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::PreFetchable,
        true,
        m64_start,
        m64_start + m64_len - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mem32, &mem64]);

    // _PRT: Package { Package { 0xSSSSFFFF, pin, 0, GSI } ... } for pins A..D of each slot.
    let prt_values: Vec<(u32, u8, u32)> = layout
        .intx
        .iter()
        .flat_map(|&(slot, gsi)| {
            (0..4u8).map(move |pin| ((u32::from(slot) << 16) | 0xffff, pin, gsi))
        })
        .collect();
    let zero = aml::ZERO;
    let prt_entries: Vec<Package> = prt_values
        .iter()
        .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &zero, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_entries.iter().map(|p| p as &dyn Aml).collect();
    let prt = Package::new(prt_refs);

    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &aml::ZERO);
    let seg = Name::new("_SEG".into(), &aml::ZERO);
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let bbn = Name::new("_BBN".into(), &aml::ZERO);
    let crs_name = Name::new("_CRS".into(), &crs);
    let prt_name = Name::new("_PRT".into(), &prt);
    let pci0 = Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs_name, &prt_name],
    );

    let ecam = Memory32Fixed::new(false, PCI_ECAM_BASE as u32, PCI_ECAM_SIZE as u32);
    let mres_crs = ResourceTemplate::new(vec![&ecam]);
    let mres_hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let mres_uid = Name::new("_UID".into(), &1u8);
    let mres_crs_name = Name::new("_CRS".into(), &mres_crs);
    let mres = Device::new("MRES".into(), vec![&mres_hid, &mres_uid, &mres_crs_name]);

    let com1_io = IO::new(0x3f8, 0x3f8, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, 4);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &aml::ZERO);
    let com1_crs_name = Name::new("_CRS".into(), &com1_crs);
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs_name]);

    let kbd_data = IO::new(0x60, 0x60, 1, 1);
    let kbd_cmd = IO::new(0x64, 0x64, 1, 1);
    let kbd_irq = Interrupt::new(true, true, false, false, 1);
    let kbd_crs = ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = Name::new("_HID".into(), &EISAName::new("PNP0303"));
    let kbd_crs_name = Name::new("_CRS".into(), &kbd_crs);
    let ps2 = Device::new("PS2K".into(), vec![&kbd_hid, &kbd_crs_name]);

    let devices: Vec<&dyn Aml> = if layout.pci {
        vec![&pci0, &mres, &com1, &ps2]
    } else {
        vec![&com1, &ps2]
    };
    let sb = Scope::new(Path::new("\\_SB_"), devices);
    aml_bytes(&sb)
}

/// Every table, laid out from `base` with the RSDP first. Returns the bytes to copy to `base`.
pub fn build_tables(layout: &AcpiLayout, base: u64) -> Result<Vec<u8>, AcpiError> {
    let align = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(16), 0);
    let mut out = vec![0u8; Rsdp::len()];
    align(&mut out);

    let dsdt = sdt(b"DSDT", 2, &dsdt_aml(layout));
    let dsdt_addr = base + out.len() as u64;
    out.extend_from_slice(&dsdt);
    align(&mut out);

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    let fadt_addr = base + out.len() as u64;
    out.extend_from_slice(&aml_bytes(&fadt.finalize()));
    align(&mut out);

    let madt_addr = base + out.len() as u64;
    out.extend_from_slice(&madt(layout.vcpu_count, layout.ioapic_id));
    align(&mut out);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if layout.pci {
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(PCI_ECAM_BASE, 0, 0, PCI_BUS_COUNT - 1);
        xsdt.add_entry(base + out.len() as u64);
        out.extend_from_slice(&aml_bytes(&mcfg));
        align(&mut out);
    }
    let xsdt_addr = base + out.len() as u64;
    out.extend_from_slice(&aml_bytes(&xsdt));

    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    out[..rsdp.len()].copy_from_slice(&rsdp);
    if out.len() as u64 > ACPI_TABLES_SIZE {
        return Err(AcpiError::TooBig(out.len()));
    }
    Ok(out)
}

/// Writes the tables at [`ACPI_TABLES_START`]; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, layout: &AcpiLayout) -> Result<u64, AcpiError> {
    let bytes = build_tables(layout, ACPI_TABLES_START)?;
    mem.write_slice(&bytes, GuestAddress(ACPI_TABLES_START))
        .map_err(|e| AcpiError::Write(e.to_string()))?;
    Ok(ACPI_TABLES_START)
}

/// Finishes the zero page for a VM with PCI, after `arch::boot::write_boot_params`: sets
/// `acpi_rsdp_addr` and appends `reserved` (addr, len) ranges to the e820 map as reserved (the
/// ECAM must be, for Linux's early MMCONFIG check).
pub fn patch_zero_page(
    mem: &GuestMemoryMmap,
    rsdp_addr: u64,
    reserved: &[(u64, u64)],
) -> Result<(), AcpiError> {
    let w = |e: vm_memory::GuestMemoryError| AcpiError::Write(e.to_string());
    let zp = GuestAddress(ZERO_PAGE_START);
    mem.write_obj(rsdp_addr, zp.unchecked_add_raw(BP_ACPI_RSDP_ADDR))
        .map_err(w)?;
    let mut count: u8 = mem
        .read_obj(zp.unchecked_add_raw(BP_E820_ENTRIES))
        .map_err(w)?;
    for &(addr, len) in reserved {
        if count >= E820_MAX_ENTRIES_ZEROPAGE {
            return Err(AcpiError::E820Full);
        }
        let mut entry = [0u8; E820_ENTRY_SIZE as usize];
        entry[0..8].copy_from_slice(&addr.to_le_bytes());
        entry[8..16].copy_from_slice(&len.to_le_bytes());
        entry[16..20].copy_from_slice(&E820_RESERVED.to_le_bytes());
        let at = zp.unchecked_add_raw(BP_E820_TABLE + u64::from(count) * E820_ENTRY_SIZE);
        mem.write_slice(&entry, at).map_err(w)?;
        count += 1;
    }
    mem.write_obj(count, zp.unchecked_add_raw(BP_E820_ENTRIES))
        .map_err(w)?;
    Ok(())
}

trait AddRaw {
    fn unchecked_add_raw(self, off: u64) -> GuestAddress;
}

impl AddRaw for GuestAddress {
    fn unchecked_add_raw(self, off: u64) -> GuestAddress {
        GuestAddress(self.0 + off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> AcpiLayout {
        AcpiLayout {
            vcpu_count: 2,
            ioapic_id: 3,
            mmio64: (64 << 30, 512 << 30),
            intx: vec![(1, 23)],
            pci: true,
        }
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// Follows RSDP -> XSDT -> tables the way Linux does, checking every checksum.
    fn tables(bytes: &[u8], base: u64) -> Vec<([u8; 4], Vec<u8>)> {
        assert_eq!(&bytes[0..8], b"RSD PTR ");
        assert_eq!(bytes[0..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(bytes[0..36].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let at = |addr: u64| (addr - base) as usize;
        let table = |addr: u64| {
            let o = at(addr);
            let len = u32_at(bytes, o + 4) as usize;
            let t = bytes[o..o + len].to_vec();
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
            t
        };
        let xsdt = table(u64_at(bytes, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        let mut out = Vec::new();
        for i in 0..(xsdt.len() - 36) / 8 {
            let t = table(u64_at(&xsdt, 36 + i * 8));
            out.push((t[0..4].try_into().unwrap(), t));
        }
        out
    }

    /// A VM without PCI still gets its vCPUs in a MADT (and the FADT and DSDT that come with
    /// it), with no host bridge, ECAM or MCFG.
    #[test]
    fn tables_without_pci_describe_cpus_only() {
        let base = ACPI_TABLES_START;
        let bytes = build_tables(&AcpiLayout::without_pci(4, 5), base).unwrap();
        let ts = tables(&bytes, base);
        let names: Vec<&[u8; 4]> = ts.iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec![b"FACP", b"APIC"]);
        assert_eq!(ts[1].1, madt(4, 5));
        let dsdt_addr = u64_at(&ts[0].1, 140);
        let o = (dsdt_addr - base) as usize;
        let dsdt = &bytes[o..o + u32_at(&bytes, o + 4) as usize];
        let has = |name: &[u8]| dsdt.windows(name.len()).any(|w| w == name);
        assert!(has(b"COM1") && has(b"PS2K"));
        assert!(!has(b"PCI0") && !has(b"MRES"));
    }

    #[test]
    fn rsdp_xsdt_and_every_table_are_consistent() {
        let base = ACPI_TABLES_START;
        let bytes = build_tables(&layout(), base).unwrap();
        let ts = tables(&bytes, base);
        let names: Vec<&[u8; 4]> = ts.iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec![b"FACP", b"APIC", b"MCFG"]);
        // FADT: hardware-reduced, MSI allowed, DSDT reachable and valid.
        let fadt = &ts[0].1;
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch & (1 << 3), 0, "MSI must not be disabled");
        let dsdt_addr = u64_at(fadt, 140);
        let o = (dsdt_addr - base) as usize;
        assert_eq!(&bytes[o..o + 4], b"DSDT");
        let len = u32_at(&bytes, o + 4) as usize;
        assert_eq!(
            bytes[o..o + len]
                .iter()
                .fold(0u8, |a, b| a.wrapping_add(*b)),
            0
        );
        // MCFG: one allocation, the ECAM base, segment 0, buses 0..0.
        let mcfg = &ts[2].1;
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(mcfg, 44), PCI_ECAM_BASE);
        assert_eq!(&mcfg[54..56], &[0, 0]);
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic() {
        let m = madt(3, 3);
        assert_eq!(u32_at(&m, 36), APIC_DEFAULT_PHYS_BASE);
        let mut o = 44;
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        while o < m.len() {
            match m[o] {
                0 => lapics.push((m[o + 3], u32_at(&m, o + 4))),
                1 => ioapics.push((m[o + 2], u32_at(&m, o + 4))),
                t => panic!("unexpected MADT entry {t}"),
            }
            o += usize::from(m[o + 1]);
        }
        assert_eq!(lapics, vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(ioapics, vec![(3, IO_APIC_DEFAULT_PHYS_BASE)]);
    }

    #[test]
    fn dsdt_names_the_host_bridge_windows_and_routing() {
        let aml = dsdt_aml(&layout());
        let has = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"_PRT") && has(b"_CRS") && has(b"MRES") && has(b"PS2K"));
        // PNP0A08 as an EISA id.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x08]));
        // The 64-bit window's bounds appear as QWords, the ECAM base as a DWord.
        assert!(has(&(64u64 << 30).to_le_bytes()));
        assert!(has(&((576u64 << 30) - 1).to_le_bytes()));
        assert!(has(&(PCI_ECAM_BASE as u32).to_le_bytes()));
        // _PRT entry for slot 1: 0x0001ffff.
        assert!(has(&0x0001_ffffu32.to_le_bytes()));
    }

    #[test]
    fn zero_page_gets_the_rsdp_and_reserved_ranges() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let zp = GuestAddress(ZERO_PAGE_START);
        mem.write_obj(2u8, zp.unchecked_add_raw(BP_E820_ENTRIES))
            .unwrap();
        let rsdp = write_tables(&mem, &layout()).unwrap();
        patch_zero_page(&mem, rsdp, &[(PCI_ECAM_BASE, PCI_ECAM_SIZE)]).unwrap();
        let r: u64 = mem
            .read_obj(zp.unchecked_add_raw(BP_ACPI_RSDP_ADDR))
            .unwrap();
        assert_eq!(r, ACPI_TABLES_START);
        let n: u8 = mem.read_obj(zp.unchecked_add_raw(BP_E820_ENTRIES)).unwrap();
        assert_eq!(n, 3);
        let e = zp.unchecked_add_raw(BP_E820_TABLE + 2 * E820_ENTRY_SIZE);
        let addr: u64 = mem.read_obj(e).unwrap();
        let kind: u32 = mem.read_obj(e.unchecked_add_raw(16)).unwrap();
        assert_eq!((addr, kind), (PCI_ECAM_BASE, E820_RESERVED));
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
