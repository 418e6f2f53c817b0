//! The pure parts of the `pci` scenario: ACPI RSDP/XSDT/MCFG checks over byte slices, ECAM
//! and configuration mechanism #1 (ports 0xcf8/0xcfc) addresses, BAR size and capability
//! decoding. The hardware side is in `pci_scenario.rs`.

use core::fmt;

use crate::fmt::Ascii;

/// The ACPI 2.0+ RSDP: signature, checksum (first 20 bytes), OEM id, revision, RSDT
/// address, length, XSDT address (+24), extended checksum (all 36 bytes), reserved.
pub const RSDP_LEN: usize = 36;
pub const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_V1_LEN: usize = 20;
const RSDP_REVISION: usize = 15;
const RSDP_XSDT: usize = 24;
/// Every system description table starts with this 36-byte header (length u32 at +4).
pub const SDT_HEADER_LEN: usize = 36;
/// Longest table the guest reads; the VMM's whole ACPI area is 128 KiB.
pub const MAX_TABLE_LEN: usize = 64 * 1024;
/// MCFG: header, 8 reserved bytes, then 16-byte allocations from +44.
const MCFG_FIRST_ALLOCATION: usize = 44;
const MCFG_ALLOCATION_LEN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    RsdpSignature([u8; 8]),
    RsdpChecksum(u8),
    RsdpExtendedChecksum(u8),
    RsdpRevision(u8),
    Signature { want: [u8; 4], got: [u8; 4] },
    Length { sig: [u8; 4], len: u32 },
    Checksum { sig: [u8; 4], sum: u8 },
    NoMcfgAllocation { len: usize },
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::RsdpSignature(s) => {
                write!(
                    f,
                    "RSDP signature is \"{}\", expected \"RSD PTR \"",
                    Ascii(s)
                )
            }
            AcpiError::RsdpChecksum(sum) => {
                write!(f, "RSDP checksum (first 20 bytes) sums to {sum:#x}, not 0")
            }
            AcpiError::RsdpExtendedChecksum(sum) => {
                write!(
                    f,
                    "RSDP extended checksum (36 bytes) sums to {sum:#x}, not 0"
                )
            }
            AcpiError::RsdpRevision(r) => write!(f, "RSDP revision is {r}, expected 2"),
            AcpiError::Signature { want, got } => write!(
                f,
                "table signature is \"{}\", expected \"{}\"",
                Ascii(got),
                Ascii(want)
            ),
            AcpiError::Length { sig, len } => write!(
                f,
                "{} length {len} is outside [{SDT_HEADER_LEN}, {MAX_TABLE_LEN}]",
                Ascii(sig)
            ),
            AcpiError::Checksum { sig, sum } => {
                write!(f, "{} checksum sums to {sum:#x}, not 0", Ascii(sig))
            }
            AcpiError::NoMcfgAllocation { len } => {
                write!(f, "MCFG of {len} bytes has no allocation entry")
            }
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | u64::from(u32_at(b, off + 4)) << 32
}

fn sig4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

/// The byte sum ACPI checksums are defined by (a valid table sums to 0).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

/// Checks a revision 2 RSDP (`RSDP_LEN` bytes) and returns its XSDT address.
pub fn rsdp_xsdt(rsdp: &[u8; RSDP_LEN]) -> Result<u64, AcpiError> {
    if &rsdp[..8] != RSDP_SIGNATURE {
        let mut s = [0; 8];
        s.copy_from_slice(&rsdp[..8]);
        return Err(AcpiError::RsdpSignature(s));
    }
    let sum = checksum(&rsdp[..RSDP_V1_LEN]);
    if sum != 0 {
        return Err(AcpiError::RsdpChecksum(sum));
    }
    let sum = checksum(rsdp);
    if sum != 0 {
        return Err(AcpiError::RsdpExtendedChecksum(sum));
    }
    if rsdp[RSDP_REVISION] != 2 {
        return Err(AcpiError::RsdpRevision(rsdp[RSDP_REVISION]));
    }
    Ok(u64_at(rsdp, RSDP_XSDT))
}

/// The signature of a table header (at least 4 bytes).
pub fn signature(header: &[u8]) -> [u8; 4] {
    sig4(header)
}

/// Checks a table header's signature and returns the table's length.
pub fn table_len(header: &[u8; SDT_HEADER_LEN], want: &[u8; 4]) -> Result<usize, AcpiError> {
    let got = sig4(header);
    if &got != want {
        return Err(AcpiError::Signature { want: *want, got });
    }
    let len = u32_at(header, 4);
    if !(SDT_HEADER_LEN as u32..=MAX_TABLE_LEN as u32).contains(&len) {
        return Err(AcpiError::Length { sig: got, len });
    }
    Ok(len as usize)
}

/// Checks the checksum of a whole table (`table_len` bytes).
pub fn check_table(table: &[u8]) -> Result<(), AcpiError> {
    let sum = checksum(table);
    if sum != 0 {
        return Err(AcpiError::Checksum {
            sig: sig4(table),
            sum,
        });
    }
    Ok(())
}

/// The XSDT's table addresses (u64 each, from +36).
pub fn xsdt_entries(xsdt: &[u8]) -> impl Iterator<Item = u64> + '_ {
    xsdt[SDT_HEADER_LEN..].chunks_exact(8).map(|c| u64_at(c, 0))
}

/// One MCFG allocation: an ECAM region for buses `start_bus..=end_bus` of `segment`. `base`
/// is where bus 0 would be, whatever the start bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McfgAllocation {
    pub base: u64,
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// The first allocation of a (checked) MCFG.
pub fn mcfg_first(mcfg: &[u8]) -> Result<McfgAllocation, AcpiError> {
    let a = MCFG_FIRST_ALLOCATION;
    if mcfg.len() < a + MCFG_ALLOCATION_LEN {
        return Err(AcpiError::NoMcfgAllocation { len: mcfg.len() });
    }
    Ok(McfgAllocation {
        base: u64_at(mcfg, a),
        segment: u16::from_le_bytes([mcfg[a + 8], mcfg[a + 9]]),
        start_bus: mcfg[a + 10],
        end_bus: mcfg[a + 11],
    })
}

/// Offset of a configuration register in the ECAM region: bus << 20 | dev << 15 | fn << 12.
pub fn ecam_offset(bus: u8, dev: u8, func: u8, reg: u16) -> u64 {
    u64::from(bus) << 20
        | u64::from(dev & 0x1f) << 15
        | u64::from(func & 7) << 12
        | u64::from(reg & 0xfff)
}

/// CONFIG_ADDRESS (port 0xcf8) for a dword register below 0x100.
pub fn cf8_address(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
    0x8000_0000
        | u32::from(bus) << 16
        | u32::from(dev & 0x1f) << 11
        | u32::from(func & 7) << 8
        | u32::from(reg & 0xfc)
}

/// Size of a 32-bit memory BAR from what it reads after all ones were written (0: none).
pub fn bar_size32(readback: u32) -> u64 {
    let mask = readback & !0xf;
    if mask == 0 {
        0
    } else {
        u64::from((!mask).wrapping_add(1))
    }
}

/// Size of a 64-bit memory BAR pair from its low and high read-backs (0: none).
pub fn bar_size64(low: u32, high: u32) -> u64 {
    let mask = u64::from(high) << 32 | u64::from(low & !0xf);
    if mask == 0 {
        0
    } else {
        (!mask).wrapping_add(1)
    }
}

/// Memory BAR type bits [2:1] = 0b10: a 64-bit BAR.
pub fn bar_is_64bit(low: u32) -> bool {
    low & 0x7 == 0x4
}

/// Walks the capability list that starts at the pointer in config byte 0x34 and returns
/// the offset of the first capability `id`. `read` gives config byte `offset`.
pub fn find_capability(read: impl Fn(u8) -> u8, id: u8) -> Option<u8> {
    let mut ptr = read(0x34) & 0xfc;
    // At most 48 capabilities fit in 0x40..0x100; the bound also stops loops.
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        if read(ptr) == id {
            return Some(ptr);
        }
        ptr = read(ptr + 1) & 0xfc;
    }
    None
}

/// MSI-X message control: table size field (bits 10:0) + 1 vectors.
pub fn msix_vectors(control: u16) -> u16 {
    (control & 0x7ff) + 1
}

/// An MSI-X table or PBA dword: (BIR, offset in that BAR).
pub fn bir_offset(dword: u32) -> (u8, u32) {
    ((dword & 7) as u8, dword & !7)
}

/// A PCIe extended capability header: (id, version, next offset).
pub fn ext_cap_header(dword: u32) -> (u16, u8, u16) {
    (
        (dword & 0xffff) as u16,
        (dword >> 16 & 0xf) as u8,
        (dword >> 20) as u16,
    )
}

/// The test device's BAR2 contents: byte at offset o = (o * 7 + 3) mod 251.
pub fn bar2_pattern(offset: u64) -> u8 {
    ((offset * 7 + 3) % 251) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix_checksum(table: &mut [u8], at: usize) {
        table[at] = 0;
        table[at] = 0u8.wrapping_sub(checksum(table));
    }

    fn rsdp(xsdt: u64) -> [u8; RSDP_LEN] {
        let mut r = [0u8; RSDP_LEN];
        r[..8].copy_from_slice(RSDP_SIGNATURE);
        r[9..15].copy_from_slice(b"AIRLCK");
        r[15] = 2;
        r[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
        r[24..32].copy_from_slice(&xsdt.to_le_bytes());
        let v1 = checksum(&r[..20]);
        r[8] = 0u8.wrapping_sub(v1);
        fix_checksum(&mut r, 32);
        r
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> ([u8; 128], usize) {
        let mut t = [0u8; 128];
        let len = SDT_HEADER_LEN + body.len();
        t[..4].copy_from_slice(sig);
        t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        t[8] = 1;
        t[SDT_HEADER_LEN..len].copy_from_slice(body);
        fix_checksum(&mut t[..len], 9);
        (t, len)
    }

    #[test]
    fn rsdp_checks() {
        let good = rsdp(0xe_0100);
        assert_eq!(rsdp_xsdt(&good), Ok(0xe_0100));
        let mut r = good;
        r[0] = b'X';
        assert!(matches!(rsdp_xsdt(&r), Err(AcpiError::RsdpSignature(_))));
        let mut r = good;
        r[10] ^= 1;
        assert!(matches!(rsdp_xsdt(&r), Err(AcpiError::RsdpChecksum(_))));
        let mut r = good;
        r[24] ^= 1;
        assert!(matches!(
            rsdp_xsdt(&r),
            Err(AcpiError::RsdpExtendedChecksum(_))
        ));
        // Revision 0 with both checksums right.
        let mut r = good;
        r[15] = 0;
        r[8] = 0;
        r[8] = 0u8.wrapping_sub(checksum(&r[..20]));
        fix_checksum(&mut r, 32);
        assert_eq!(rsdp_xsdt(&r), Err(AcpiError::RsdpRevision(0)));
    }

    #[test]
    fn xsdt_and_mcfg() {
        let mut body = [0u8; 24];
        for (i, a) in [0xe_0200u64, 0xe_0300, 0xe_0400].iter().enumerate() {
            body[i * 8..i * 8 + 8].copy_from_slice(&a.to_le_bytes());
        }
        let (x, len) = table(b"XSDT", &body);
        let mut header = [0u8; SDT_HEADER_LEN];
        header.copy_from_slice(&x[..SDT_HEADER_LEN]);
        assert_eq!(table_len(&header, b"XSDT"), Ok(60));
        assert_eq!(
            table_len(&header, b"MCFG"),
            Err(AcpiError::Signature {
                want: *b"MCFG",
                got: *b"XSDT"
            })
        );
        assert_eq!(check_table(&x[..len]), Ok(()));
        let entries: [u64; 3] = {
            let mut e = [0; 3];
            for (d, s) in e.iter_mut().zip(xsdt_entries(&x[..len])) {
                *d = s;
            }
            e
        };
        assert_eq!(entries, [0xe_0200, 0xe_0300, 0xe_0400]);
        assert_eq!(xsdt_entries(&x[..len]).count(), 3);
        let mut bad = x;
        bad[40] ^= 0x10;
        assert!(matches!(
            check_table(&bad[..len]),
            Err(AcpiError::Checksum {
                sig: [b'X', b'S', b'D', b'T'],
                ..
            })
        ));
        let mut h = header;
        h[4..8].copy_from_slice(&20u32.to_le_bytes());
        assert!(matches!(
            table_len(&h, b"XSDT"),
            Err(AcpiError::Length { len: 20, .. })
        ));

        let mut body = [0u8; 24];
        body[8..16].copy_from_slice(&0xf000_0000u64.to_le_bytes());
        body[18] = 0;
        body[19] = 0;
        let (m, len) = table(b"MCFG", &body);
        assert_eq!(len, 60);
        assert_eq!(check_table(&m[..len]), Ok(()));
        assert_eq!(
            mcfg_first(&m[..len]),
            Ok(McfgAllocation {
                base: 0xf000_0000,
                segment: 0,
                start_bus: 0,
                end_bus: 0
            })
        );
        assert_eq!(
            mcfg_first(&m[..44]),
            Err(AcpiError::NoMcfgAllocation { len: 44 })
        );
    }

    #[test]
    fn config_addresses() {
        assert_eq!(ecam_offset(0, 0, 0, 0), 0);
        assert_eq!(ecam_offset(0, 1, 0, 0x100), 0x8100);
        assert_eq!(ecam_offset(0, 31, 0, 0), 31 << 15);
        assert_eq!(ecam_offset(2, 3, 4, 0xffc), 0x21_cffc);
        assert_eq!(cf8_address(0, 0, 0, 0), 0x8000_0000);
        assert_eq!(cf8_address(0, 1, 0, 8), 0x8000_0808);
        assert_eq!(cf8_address(0, 31, 0, 0x3e), 0x8000_f83c);
        assert_eq!(cf8_address(1, 2, 3, 4), 0x8001_1304);
    }

    #[test]
    fn bar_sizes() {
        assert_eq!(bar_size32(0xffff_f000), 0x1000);
        assert_eq!(bar_size32(0xfff0_0008), 1 << 20);
        assert_eq!(bar_size32(0), 0);
        assert_eq!(bar_size64(0xfff0_000c, 0xffff_ffff), 1 << 20);
        assert_eq!(bar_size64(0x0000_000c, 0xffff_fff0), 1 << 36);
        assert_eq!(bar_size64(0, 0), 0);
        assert!(bar_is_64bit(0xfff0_000c));
        assert!(bar_is_64bit(0x4));
        assert!(!bar_is_64bit(0xffff_f000));
        assert!(!bar_is_64bit(0x8));
    }

    #[test]
    fn capabilities() {
        let mut cfg = [0u8; 256];
        cfg[0x34] = 0x40;
        cfg[0x40] = 0x11;
        cfg[0x41] = 0x50;
        cfg[0x50] = 0x05;
        assert_eq!(find_capability(|o| cfg[o as usize], 0x11), Some(0x40));
        assert_eq!(find_capability(|o| cfg[o as usize], 0x05), Some(0x50));
        assert_eq!(find_capability(|o| cfg[o as usize], 0x10), None);
        // A loop ends.
        cfg[0x51] = 0x40;
        assert_eq!(find_capability(|o| cfg[o as usize], 0x10), None);
        cfg[0x34] = 0;
        assert_eq!(find_capability(|o| cfg[o as usize], 0x11), None);

        assert_eq!(msix_vectors(0x0001), 2);
        assert_eq!(msix_vectors(0x8001), 2);
        assert_eq!(msix_vectors(0x07ff), 2048);
        assert_eq!(bir_offset(0x800), (0, 0x800));
        assert_eq!(bir_offset(0xc02), (2, 0xc00));
        assert_eq!(ext_cap_header(0x0001_000b), (0x000b, 1, 0));
        assert_eq!(ext_cap_header(0x1402_0001), (0x0001, 2, 0x140));
    }

    #[test]
    fn pattern() {
        assert_eq!(bar2_pattern(0), 3);
        assert_eq!(bar2_pattern(1), 10);
        assert_eq!(bar2_pattern(0xfff), ((0xfff * 7 + 3) % 251) as u8);
        assert_eq!(bar2_pattern(0x80000), ((0x80000u64 * 7 + 3) % 251) as u8);
    }

    #[test]
    fn messages() {
        let e = AcpiError::Checksum {
            sig: *b"MCFG",
            sum: 0x12,
        };
        assert_eq!(
            crate::text!("{e}").as_bytes(),
            b"MCFG checksum sums to 0x12, not 0"
        );
    }
}
