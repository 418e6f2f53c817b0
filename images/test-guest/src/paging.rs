//! Identity page tables with 2 MiB pages: one PML4 entry, one PDPT, one page
//! directory per GiB.

use crate::e820::{FOUR_GIB, MMIO_GAP_START};

/// The guest maps at most this much (its tables live in .bss, one PD per GiB).
pub const MAX_GIB: usize = 64;
pub const GIB: u64 = 1 << 30;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;

/// GiB to map: at least 4 (the MMIO gap and the LAPIC/IOAPIC live below 4 GiB),
/// enough to cover the top of RAM, at most [`MAX_GIB`].
pub fn gib_to_map(top_of_ram: u64) -> usize {
    let gib = top_of_ram.div_ceil(GIB).max(FOUR_GIB / GIB);
    gib.min(MAX_GIB as u64) as usize
}

/// The 2 MiB page-directory entry mapping `phys`. Device memory (the MMIO gap up to
/// 4 GiB) is uncached so MMIO writes are not merged or delayed.
pub fn pd_entry(phys: u64) -> u64 {
    let cache = if (MMIO_GAP_START..FOUR_GIB).contains(&phys) {
        WRITE_THROUGH | CACHE_DISABLE
    } else {
        0
    };
    phys | PRESENT | WRITABLE | HUGE | cache
}

/// Points `entry` at the next-level table at `phys`.
pub fn table_entry(phys: u64) -> u64 {
    debug_assert_eq!(phys % 4096, 0);
    phys | PRESENT | WRITABLE
}

/// Fills the tables to identity map `gib` GiB. `pdpt_phys`/`pds_phys` are the physical
/// addresses of `pdpt` and `pds[0]` (the PDs are contiguous, 4 KiB each). Every entry
/// the CPU can reach is written; page directories past `gib` are left as they are
/// (nothing points at them), so the tables need not start zeroed.
pub fn fill(
    pml4: &mut [u64; 512],
    pdpt: &mut [u64; 512],
    pds: &mut [[u64; 512]],
    pdpt_phys: u64,
    pds_phys: u64,
    gib: usize,
) {
    pml4.fill(0);
    pdpt.fill(0);
    pml4[0] = table_entry(pdpt_phys);
    for (g, pd) in pds.iter_mut().enumerate().take(gib) {
        pdpt[g] = table_entry(pds_phys + g as u64 * 4096);
        for (i, e) in pd.iter_mut().enumerate() {
            *e = pd_entry(g as u64 * GIB + i as u64 * (2 << 20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gib_rounding() {
        assert_eq!(gib_to_map(0), 4);
        assert_eq!(gib_to_map(128 << 20), 4);
        assert_eq!(gib_to_map(4 * GIB), 4);
        assert_eq!(gib_to_map(4 * GIB + 1), 5);
        assert_eq!(gib_to_map((1 << 32) + 0x3000_0000), 5);
        assert_eq!(gib_to_map(64 * GIB), 64);
        assert_eq!(gib_to_map(1 << 40), 64);
    }

    #[test]
    fn entries() {
        assert_eq!(pd_entry(0), 0x83);
        assert_eq!(pd_entry(0x20_0000), 0x20_0083);
        assert_eq!(pd_entry(0xcfe0_0000), 0xcfe0_0083);
        assert_eq!(pd_entry(0xd000_0000), 0xd000_009b);
        assert_eq!(pd_entry(0xfee0_0000), 0xfee0_009b);
        assert_eq!(pd_entry(1 << 32), (1 << 32) | 0x83);
        assert_eq!(table_entry(0x20_3000), 0x20_3003);
    }

    #[test]
    fn fills_identity_map() {
        let mut pml4 = [0xffu64; 512];
        let mut pdpt = [0xffu64; 512];
        let mut pds = vec![[0xffu64; 512]; 6];
        fill(&mut pml4, &mut pdpt, &mut pds, 0x1000, 0x2000, 5);
        assert_eq!(pml4[0], 0x1003);
        assert!(pml4[1..].iter().all(|&e| e == 0));
        for (g, &e) in pdpt.iter().take(5).enumerate() {
            assert_eq!(e, 0x2003 + g as u64 * 4096);
        }
        assert!(pdpt[5..].iter().all(|&e| e == 0));
        assert_eq!(pds[0][1], 0x20_0083);
        assert_eq!(pds[4][511] & !0xfff, 5 * GIB - (2 << 20));
        // Unreachable directories are not touched.
        assert!(pds[5].iter().all(|&e| e == 0xff));
        // Every mapped address translates to itself.
        for addr in [0u64, 0x10_0000, 0xd000_0000, 0xfee0_0000, 4 * GIB + 12345] {
            let pd = &pds[(addr / GIB) as usize];
            let e = pd[((addr % GIB) >> 21) as usize];
            assert_eq!((e & !0x1f_ffff & !(1 << 63)) | (addr & 0x1f_ffff), addr);
        }
    }
}
