//! The guest physical memory map. Addresses follow Firecracker's x86_64 layout so that guests and
//! tools built for it find things where they expect them.

/// Boot GDT (four 8-byte entries) and an empty IDT right after it.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-map page tables built for the 64-bit entry: PML4, PDPT, then one PD per GiB mapped.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// GiB identity-mapped at boot: all of the 32-bit space, so the LAPIC, IOAPIC and MMIO devices are
/// reachable before the guest builds its own tables.
pub const BOOT_IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line and its maximum size (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table lives; RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: guest RAM never overlaps [MMIO_MEM_START, 4 GiB).
pub const MMIO_MEM_START: u64 = 0xd000_0000;
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// The "guest ready" boot timer: a guest writes [`BOOT_TIMER_MAGIC`] here when it has booted
/// (Firecracker's address and value, so `devmem 0xd0000000 8 123` works in either).
pub const BOOT_TIMER_ADDR: u64 = MMIO_MEM_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// First address available to MMIO devices after the boot timer.
pub const MMIO_DEVICES_START: u64 = MMIO_MEM_START + BOOT_TIMER_SIZE;
/// LAPIC and IOAPIC default physical bases.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// KVM needs three pages for the TSS on Intel; put them just below the 4 GiB boundary's BIOS area.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Largest guest the VMM accepts, in MiB (a bound on page-table and e820 sizes, not a host limit).
pub const MAX_MEM_SIZE_MIB: u64 = 1 << 20;

/// The guest RAM regions for `mem_size` bytes: low RAM up to the MMIO hole, the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_MEM_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_MEM_START),
            (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_MEM_START),
        ]
    }
}

/// One past the highest guest RAM address.
pub fn ram_end(mem_size: u64) -> u64 {
    ram_regions(mem_size)
        .last()
        .map(|&(start, len)| start + len)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_end(128 << 20), 128 << 20);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let size = 4u64 << 30;
        let regions = ram_regions(size);
        assert_eq!(regions[0], (0, MMIO_MEM_START));
        assert_eq!(regions[1], (1 << 32, size - MMIO_MEM_START));
        assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), size);
        assert_eq!(ram_end(size), (1 << 32) + size - MMIO_MEM_START);
    }

    #[test]
    fn hole_boundary_is_exact() {
        assert_eq!(ram_regions(MMIO_MEM_START).len(), 1);
        assert_eq!(ram_regions(MMIO_MEM_START + 4096).len(), 2);
    }
}
