//! The Intel MultiProcessor Specification 1.4 table, which tells the test guest (and kernels built
//! with CONFIG_X86_MPPARSE) how many vCPUs there are and where the IOAPIC is. Placed at the start of
//! the EBDA, where Linux scans for the "_MP_" floating pointer. Debian's cloud kernel reads only
//! ACPI's MADT, which VMs with PCI get (`devices::pci::acpi`); see the README's open bug.

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_START, IO_APIC_DEFAULT_PHYS_BASE};

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("the MP table supports 1 to 254 vCPUs, not {0}")]
    TooManyCpus(u8),
    #[error("the MP table ({0} bytes) does not fit in guest memory at the EBDA")]
    NotEnoughMemory(usize),
}

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MPC_SPEC_1_4: u8 = 4;
const APIC_VERSION: u8 = 0x14;
/// IOAPIC inputs announced to the guest: Linux's legacy IRQs 0..24.
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Stepping, model and family of a generic Pentium-class CPU, and its FPU/APIC feature flags.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's id comes after every vCPU's APIC id.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

/// Builds the floating pointer and configuration table for `num_cpus` vCPUs (APIC ids
/// 0..num_cpus), to be placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic = ioapic_id(num_cpus);
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, APIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_INTSRC, MP_IRQ_INT, 0, 0, 0, pin, ioapic, pin]);
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(num_cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let table_len = MPC_HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_1_4);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"AIRLOCK ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length and checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE + table_len);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((base + MPF_SIZE as u64) as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, MPC_SPEC_1_4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// Writes the MP table for `num_cpus` vCPUs at the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| MpTableError::NotEnoughMemory(bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid() {
        for cpus in [1u8, 2, 4, 32] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
        }
    }

    #[test]
    fn lists_every_cpu_once_with_bsp_first() {
        let t = build(4, EBDA_START).unwrap();
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        let mut off = MPC_HEADER_SIZE;
        let mut cpus = Vec::new();
        for _ in 0..count {
            match table[off] {
                ENTRY_PROCESSOR => {
                    cpus.push((table[off + 1], table[off + 3]));
                    off += 20;
                }
                _ => off += 8,
            }
        }
        assert_eq!(off, table.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn fits_below_one_mib_for_max_cpus() {
        let t = build(32, EBDA_START).unwrap();
        assert!(EBDA_START + (t.len() as u64) < 0x10_0000);
    }

    #[test]
    fn refuses_zero_cpus() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(255, EBDA_START).is_err());
    }
}
