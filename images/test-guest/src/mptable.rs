//! Intel MultiProcessor Specification 1.4 tables: the floating pointer ("_MP_") and
//! the configuration table ("PCMP"), reduced to the list of enabled CPUs.

use core::fmt;

/// Where the VMM puts the floating pointer (the top 1 KiB of base memory).
pub const SCAN_START: u64 = 0x9_fc00;
pub const SCAN_END: u64 = 0xa_0000;

pub const FLOATING_LEN: usize = 16;
pub const HEADER_LEN: usize = 44;

const PROCESSOR: u8 = 0;
const PROCESSOR_ENTRY_LEN: usize = 20;
const OTHER_ENTRY_LEN: usize = 8;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BSP: u8 = 1 << 1;

/// APIC ids are 8 bits in xAPIC mode.
pub const MAX_APIC_IDS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpError {
    NoFloatingPointer,
    FloatingChecksum { addr: u64 },
    DefaultConfiguration { feature: u8 },
    Signature,
    Length { len: usize },
    Checksum { sum: u8 },
    Truncated { index: usize },
    UnknownEntry { index: usize, kind: u8 },
    DuplicateApicId(u8),
    NoCpus,
}

impl fmt::Display for MpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MpError::NoFloatingPointer => write!(
                f,
                "MP table: no _MP_ floating pointer in [{SCAN_START:#x}, {SCAN_END:#x})"
            ),
            MpError::FloatingChecksum { addr } => {
                write!(f, "MP table: bad checksum on the _MP_ floating pointer at {addr:#x}")
            }
            MpError::DefaultConfiguration { feature } => write!(
                f,
                "MP table: no configuration table (default configuration {feature} is not supported)"
            ),
            MpError::Signature => write!(f, "MP table: configuration table lacks the PCMP signature"),
            MpError::Length { len } => write!(f, "MP table: bad configuration table length {len}"),
            MpError::Checksum { sum } => {
                write!(f, "MP table: configuration table checksum is {sum:#x}, not 0")
            }
            MpError::Truncated { index } => {
                write!(f, "MP table: entry {index} runs past the table length")
            }
            MpError::UnknownEntry { index, kind } => {
                write!(f, "MP table: entry {index} has unknown type {kind}")
            }
            MpError::DuplicateApicId(id) => {
                write!(f, "MP table: APIC id {id} is listed twice")
            }
            MpError::NoCpus => write!(f, "MP table: no enabled processor entries"),
        }
    }
}

/// The parts of the configuration table the guest uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpInfo {
    pub lapic_addr: u32,
    ids: [u8; MAX_APIC_IDS],
    n: usize,
    /// APIC ids of enabled entries flagged as the boot processor (there should be one).
    bsp: Option<u8>,
    bsp_flags: usize,
}

impl MpInfo {
    /// Enabled CPUs' APIC ids, in table order.
    pub fn cpus(&self) -> &[u8] {
        &self.ids[..self.n]
    }

    /// The boot processor's APIC id if exactly one enabled entry is flagged BSP.
    pub fn bsp(&self) -> Option<u8> {
        if self.bsp_flags == 1 {
            self.bsp
        } else {
            None
        }
    }

    pub fn bsp_flag_count(&self) -> usize {
        self.bsp_flags
    }
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

/// Scans `region` (which starts at physical `base`) on 16-byte boundaries for a
/// floating pointer with a valid checksum and returns the configuration table address.
pub fn find_floating_pointer(region: &[u8], base: u64) -> Result<u64, MpError> {
    let mut bad = None;
    for (i, fp) in region.chunks_exact(FLOATING_LEN).enumerate() {
        if &fp[..4] != b"_MP_" {
            continue;
        }
        if sum(fp) != 0 {
            bad.get_or_insert(base + (i * FLOATING_LEN) as u64);
            continue;
        }
        let table = u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]);
        if table == 0 {
            return Err(MpError::DefaultConfiguration { feature: fp[11] });
        }
        return Ok(u64::from(table));
    }
    Err(bad.map_or(MpError::NoFloatingPointer, |addr| {
        MpError::FloatingChecksum { addr }
    }))
}

/// The base table length from a configuration table header, once its signature is right.
pub fn table_len(header: &[u8; HEADER_LEN]) -> Result<usize, MpError> {
    if &header[..4] != b"PCMP" {
        return Err(MpError::Signature);
    }
    let len = usize::from(u16::from_le_bytes([header[4], header[5]]));
    if len < HEADER_LEN {
        return Err(MpError::Length { len });
    }
    Ok(len)
}

/// Parses a whole configuration table (`table` is exactly its base table length).
pub fn parse_table(table: &[u8]) -> Result<MpInfo, MpError> {
    let header: &[u8; HEADER_LEN] = table
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(MpError::Length { len: table.len() })?;
    let len = table_len(header)?;
    if len != table.len() {
        return Err(MpError::Length { len });
    }
    let s = sum(table);
    if s != 0 {
        return Err(MpError::Checksum { sum: s });
    }
    let count = usize::from(u16::from_le_bytes([table[34], table[35]]));
    let mut info = MpInfo {
        lapic_addr: u32::from_le_bytes([table[36], table[37], table[38], table[39]]),
        ids: [0; MAX_APIC_IDS],
        n: 0,
        bsp: None,
        bsp_flags: 0,
    };
    let mut seen = [false; MAX_APIC_IDS];
    let mut off = HEADER_LEN;
    for index in 0..count {
        let kind = *table.get(off).ok_or(MpError::Truncated { index })?;
        let entry_len = match kind {
            PROCESSOR => PROCESSOR_ENTRY_LEN,
            1..=4 => OTHER_ENTRY_LEN,
            _ => return Err(MpError::UnknownEntry { index, kind }),
        };
        let entry = table
            .get(off..off + entry_len)
            .ok_or(MpError::Truncated { index })?;
        off += entry_len;
        if kind != PROCESSOR || entry[3] & CPU_ENABLED == 0 {
            continue;
        }
        let id = entry[1];
        if seen[usize::from(id)] {
            return Err(MpError::DuplicateApicId(id));
        }
        seen[usize::from(id)] = true;
        info.ids[info.n] = id;
        info.n += 1;
        if entry[3] & CPU_BSP != 0 {
            info.bsp = Some(id);
            info.bsp_flags += 1;
        }
    }
    if info.n == 0 {
        return Err(MpError::NoCpus);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a valid table like Firecracker's: `cpus` processors, a bus, an IOAPIC,
    /// and 2 interrupt entries; returns (floating pointer region, table).
    pub fn build(cpus: &[(u8, u8)], table_addr: u32) -> ([u8; 1024], Vec<u8>) {
        let mut t = vec![0u8; HEADER_LEN];
        t[..4].copy_from_slice(b"PCMP");
        t[6] = 4;
        t[36..40].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        let mut count = 0u16;
        for &(id, flags) in cpus {
            let mut e = [0u8; 20];
            e[0] = 0;
            e[1] = id;
            e[2] = 0x14;
            e[3] = flags;
            t.extend_from_slice(&e);
            count += 1;
        }
        for kind in 1..=4u8 {
            t.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
            count += 1;
        }
        let len = t.len() as u16;
        t[4..6].copy_from_slice(&len.to_le_bytes());
        t[34..36].copy_from_slice(&count.to_le_bytes());
        t[7] = 0u8.wrapping_sub(sum(&t));

        let mut region = [0u8; 1024];
        let fp = &mut region[0x10..0x20];
        fp[..4].copy_from_slice(b"_MP_");
        fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
        fp[8] = 1;
        fp[9] = 4;
        fp[10] = 0u8.wrapping_sub(sum(fp));
        (region, t)
    }

    #[test]
    fn parses_valid_table() {
        let (region, t) = build(&[(0, 3), (1, 1), (2, 0), (5, 1)], 0x9fc40);
        assert_eq!(find_floating_pointer(&region, SCAN_START), Ok(0x9fc40));
        let header: [u8; HEADER_LEN] = t[..HEADER_LEN].try_into().unwrap();
        assert_eq!(table_len(&header), Ok(t.len()));
        let info = parse_table(&t).unwrap();
        assert_eq!(info.cpus(), &[0, 1, 5]);
        assert_eq!(info.bsp(), Some(0));
        assert_eq!(info.lapic_addr, 0xfee0_0000);
    }

    #[test]
    fn floating_pointer_errors() {
        assert_eq!(
            find_floating_pointer(&[0u8; 1024], SCAN_START),
            Err(MpError::NoFloatingPointer)
        );
        let (mut region, _) = build(&[(0, 3)], 0x9fc40);
        region[0x1c] ^= 1;
        assert_eq!(
            find_floating_pointer(&region, SCAN_START),
            Err(MpError::FloatingChecksum {
                addr: SCAN_START + 0x10
            })
        );
        // Not on a 16-byte boundary: not found.
        let (good, _) = build(&[(0, 3)], 0x9fc40);
        let mut shifted = [0u8; 1024];
        shifted[0x18..0x28].copy_from_slice(&good[0x10..0x20]);
        assert_eq!(
            find_floating_pointer(&shifted, SCAN_START),
            Err(MpError::NoFloatingPointer)
        );
        let (mut region, _) = build(&[(0, 3)], 0);
        region[0x1b] = 5;
        region[0x1a] = 0;
        region[0x1a] = 0u8.wrapping_sub(sum(&region[0x10..0x20]));
        assert_eq!(
            find_floating_pointer(&region, SCAN_START),
            Err(MpError::DefaultConfiguration { feature: 5 })
        );
    }

    #[test]
    fn table_errors() {
        let (_, t) = build(&[(0, 3), (1, 1)], 0x9fc40);
        let mut bad = t.clone();
        bad[50] ^= 0x40;
        assert!(matches!(parse_table(&bad), Err(MpError::Checksum { .. })));
        let mut bad = t.clone();
        bad[0] = b'X';
        assert_eq!(parse_table(&bad), Err(MpError::Signature));
        assert_eq!(
            parse_table(&t[..t.len() - 1]),
            Err(MpError::Length { len: t.len() })
        );
        assert_eq!(parse_table(&t[..10]), Err(MpError::Length { len: 10 }));

        // An entry count that runs past the end.
        let mut bad = t.clone();
        bad[34] += 1;
        bad[7] = bad[7].wrapping_sub(1);
        assert_eq!(parse_table(&bad), Err(MpError::Truncated { index: 6 }));

        let mut bad = t.clone();
        bad[HEADER_LEN] = 9;
        bad[7] = bad[7].wrapping_sub(9);
        assert_eq!(
            parse_table(&bad),
            Err(MpError::UnknownEntry { index: 0, kind: 9 })
        );

        let (_, t) = build(&[(0, 3), (0, 1)], 0x9fc40);
        assert_eq!(parse_table(&t), Err(MpError::DuplicateApicId(0)));
        let (_, t) = build(&[(0, 0)], 0x9fc40);
        assert_eq!(parse_table(&t), Err(MpError::NoCpus));
    }

    #[test]
    fn bsp_flag() {
        let (_, t) = build(&[(0, 1), (1, 1)], 0x9fc40);
        let info = parse_table(&t).unwrap();
        assert_eq!((info.bsp(), info.bsp_flag_count()), (None, 0));
        let (_, t) = build(&[(0, 3), (1, 3)], 0x9fc40);
        let info = parse_table(&t).unwrap();
        assert_eq!((info.bsp(), info.bsp_flag_count()), (None, 2));
    }
}
