//! Field offsets of Linux's `struct boot_params` (the "zero page") that the guest reads.

use crate::e820::{self, Entry};

pub const ZERO_PAGE_SIZE: usize = 4096;

const ACPI_RSDP_ADDR: usize = 0x070;
const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const CMDLINE_SIZE: usize = 0x238;
const E820_TABLE: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;

fn le<const N: usize>(zp: &[u8], off: usize) -> [u8; N] {
    let mut b = [0; N];
    b.copy_from_slice(&zp[off..off + N]);
    b
}

fn u32_at(zp: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(le(zp, off))
}

/// Physical address of the command line (`cmd_line_ptr | ext_cmd_line_ptr << 32`).
pub fn cmdline_ptr(zp: &[u8; ZERO_PAGE_SIZE]) -> u64 {
    u64::from(u32_at(zp, CMD_LINE_PTR)) | u64::from(u32_at(zp, EXT_CMD_LINE_PTR)) << 32
}

/// `acpi_rsdp_addr`: where the VMM put the ACPI RSDP (0: no ACPI tables).
pub fn acpi_rsdp_addr(zp: &[u8; ZERO_PAGE_SIZE]) -> u64 {
    u64::from_le_bytes(le(zp, ACPI_RSDP_ADDR))
}

pub fn cmdline_size(zp: &[u8; ZERO_PAGE_SIZE]) -> u32 {
    u32_at(zp, CMDLINE_SIZE)
}

/// The e820 map as the VMM wrote it. The count is kept as reported; only the first
/// [`e820::MAX_ENTRIES`] entries exist in the zero page.
pub fn e820(zp: &[u8; ZERO_PAGE_SIZE]) -> e820::Map {
    let reported = zp[E820_ENTRIES];
    let mut map = e820::Map::new(reported);
    for i in 0..usize::from(reported).min(e820::MAX_ENTRIES) {
        let off = E820_TABLE + i * E820_ENTRY_SIZE;
        map.push(Entry {
            addr: u64::from_le_bytes(le(zp, off)),
            size: u64::from_le_bytes(le(zp, off + 8)),
            kind: u32_at(zp, off + 16),
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields() {
        let mut zp = [0u8; ZERO_PAGE_SIZE];
        zp[CMD_LINE_PTR..CMD_LINE_PTR + 4].copy_from_slice(&0x20000u32.to_le_bytes());
        zp[EXT_CMD_LINE_PTR..EXT_CMD_LINE_PTR + 4].copy_from_slice(&1u32.to_le_bytes());
        zp[CMDLINE_SIZE..CMDLINE_SIZE + 4].copy_from_slice(&42u32.to_le_bytes());
        zp[E820_ENTRIES] = 2;
        zp[ACPI_RSDP_ADDR..ACPI_RSDP_ADDR + 8].copy_from_slice(&0xe_0000u64.to_le_bytes());
        let entries: [(u64, u64, u32); 2] = [(0, 0x9fc00, 1), (0x100000, 0x3f00000, 1)];
        for (i, (a, s, t)) in entries.iter().enumerate() {
            let off = E820_TABLE + i * E820_ENTRY_SIZE;
            zp[off..off + 8].copy_from_slice(&a.to_le_bytes());
            zp[off + 8..off + 16].copy_from_slice(&s.to_le_bytes());
            zp[off + 16..off + 20].copy_from_slice(&t.to_le_bytes());
        }
        assert_eq!(cmdline_ptr(&zp), 0x1_0002_0000);
        assert_eq!(cmdline_size(&zp), 42);
        assert_eq!(acpi_rsdp_addr(&zp), 0xe_0000);
        let map = e820(&zp);
        assert_eq!(map.reported(), 2);
        assert_eq!(
            map.entries(),
            &[
                Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: 1
                },
                Entry {
                    addr: 0x100000,
                    size: 0x3f00000,
                    kind: 1
                },
            ]
        );
    }

    #[test]
    fn oversized_count_is_clamped() {
        let mut zp = [0u8; ZERO_PAGE_SIZE];
        zp[E820_ENTRIES] = 200;
        let map = e820(&zp);
        assert_eq!(map.reported(), 200);
        assert_eq!(map.entries().len(), e820::MAX_ENTRIES);
    }
}
