//! Where the PCI root complex lives in the guest's address spaces. Nothing here is used unless a
//! PCI device exists, so a VM without one keeps the layout of `arch::layout` exactly.
//!
//! ```text
//! 0xd000_0000  boot timer / VM generation page, then virtio-mmio (one 4 KiB page each)
//! 0xd100_0000  32-bit PCI MMIO window (BARs below 4 GiB)            496 MiB
//! 0xf000_0000  ECAM (MMCONFIG) for bus 0                              1 MiB
//! 0xfec0_0000  IOAPIC            0xfee0_0000  LAPIC
//! max(64 GiB, next power of two above RAM)
//!              64-bit PCI MMIO window (large and prefetchable BARs) 512 GiB (clamped to the
//!              guest's physical address width)
//! port 0xcf8   configuration mechanism #1 (CONFIG_ADDRESS / CONFIG_DATA), 8 ports
//! port 0x1000  PCI I/O window up to 0xffff (I/O BARs)
//! 0x000e_0000  ACPI tables (RSDP first), in guest RAM that the e820 map leaves out
//! ```

use crate::arch::layout::{
    APIC_DEFAULT_PHYS_BASE, FIRST_ADDR_PAST_32BITS, IO_APIC_DEFAULT_PHYS_BASE, MMIO_DEVICES_START,
};
use crate::devices::virtio::attach::{FIRST_VIRTIO_IRQ, LAST_VIRTIO_IRQ};

/// The 32-bit MMIO window for BARs: above the virtio-mmio pages, below the ECAM.
pub const PCI_MMIO32_START: u64 = 0xd100_0000;
pub const PCI_MMIO32_END: u64 = PCI_ECAM_BASE;
/// ECAM: 4 KiB of configuration space per function, 32 devices x 8 functions on bus 0.
pub const PCI_ECAM_BASE: u64 = 0xf000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// Only bus 0 exists (no bridges).
pub const PCI_BUS_COUNT: u8 = 1;
/// Configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc..0xd00.
pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// The I/O window for I/O BARs (above every legacy port the VMM emulates).
pub const PCI_IO_START: u64 = 0x1000;
pub const PCI_IO_END: u64 = 0x1_0000;
/// The 64-bit window starts at least here and is this long when the guest's address width allows.
pub const PCI_MMIO64_MIN_START: u64 = 64 << 30;
pub const PCI_MMIO64_SIZE: u64 = 512 << 30;
/// The smallest 64-bit window accepted when the address width forces it shorter.
pub const PCI_MMIO64_MIN_SIZE: u64 = 4 << 30;
/// ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, MCFG), in the BIOS area below 1 MiB: it is guest
/// memory (KVM slot 0 starts at 0) but not e820 RAM, so Linux never allocates it.
pub const ACPI_TABLES_START: u64 = 0x000e_0000;
pub const ACPI_TABLES_SIZE: u64 = 0x2_0000;
/// The bus/device/function of the host bridge.
pub const HOST_BRIDGE_SLOT: u8 = 0;
/// Device slots on bus 0 (slot 0 is the host bridge).
pub const PCI_SLOTS: usize = 32;

// The windows stay clear of everything else in the 32-bit MMIO gap.
const _: () = assert!(
    PCI_MMIO32_START
        >= MMIO_DEVICES_START + (LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1) as u64 * 0x1000
);
const _: () = assert!(PCI_ECAM_BASE + PCI_ECAM_SIZE <= IO_APIC_DEFAULT_PHYS_BASE as u64);
const _: () = assert!((IO_APIC_DEFAULT_PHYS_BASE as u64) < APIC_DEFAULT_PHYS_BASE as u64);
const _: () = assert!(PCI_ECAM_BASE.is_multiple_of(PCI_ECAM_SIZE));
const _: () = assert!(PCI_MMIO32_END < FIRST_ADDR_PAST_32BITS);
const _: () = assert!(PCI_MMIO32_END <= PCI_ECAM_BASE);
const _: () = assert!(PCI_CONFIG_IO_BASE + PCI_CONFIG_IO_LEN <= PCI_IO_START);
const _: () = assert!(ACPI_TABLES_START >= crate::arch::layout::EBDA_START + 0x400);
const _: () = assert!(ACPI_TABLES_START + ACPI_TABLES_SIZE <= crate::arch::layout::HIMEM_START);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("the guest's physical address width ({phys_bits} bits) leaves no room for a 64-bit PCI window above its {ram_end:#x} bytes of RAM; give the VM less memory")]
    No64BitWindow { phys_bits: u8, ram_end: u64 },
    #[error("PCI BAR {what} of {size:#x} bytes does not fit in the {window} window ({free:#x} bytes left); {hint}")]
    BarDoesNotFit {
        what: String,
        size: u64,
        window: &'static str,
        free: u64,
        hint: &'static str,
    },
}

/// The 64-bit MMIO window `(start, len)` for a guest whose RAM ends at `ram_end` and whose
/// physical addresses have `phys_bits` bits: from max(64 GiB, the next power of two at or above
/// the end of RAM), 512 GiB long, or as much of that as the address width allows (at least 4 GiB).
pub fn mmio64_window(ram_end: u64, phys_bits: u8) -> Result<(u64, u64), LayoutError> {
    let start = ram_end
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
        .max(PCI_MMIO64_MIN_START);
    let limit = if phys_bits >= 64 {
        u64::MAX
    } else {
        1u64 << phys_bits
    };
    let len = limit.saturating_sub(start).min(PCI_MMIO64_SIZE);
    if len < PCI_MMIO64_MIN_SIZE {
        return Err(LayoutError::No64BitWindow { phys_bits, ram_end });
    }
    // Keep the length a power of two so the largest BAR that fits is aligned at `start`.
    let len = 1u64 << (63 - len.leading_zeros());
    Ok((start, len))
}

/// The host CPU's physical address width (CPUID 0x80000008 EAX[7:0]); KVM gives guests the same.
#[allow(unused_unsafe)] // __cpuid is a safe function from Rust 1.87 on, unsafe before.
pub fn host_phys_bits() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID is always available on x86_64 and has no side effects.
        let max = unsafe { std::arch::x86_64::__cpuid(0x8000_0000) }.eax;
        if max >= 0x8000_0008 {
            // SAFETY: as above; the leaf exists (checked against the maximum extended leaf).
            return (unsafe { std::arch::x86_64::__cpuid(0x8000_0008) }.eax & 0xff) as u8;
        }
    }
    36
}

/// A bump allocator over one window; every allocation is naturally aligned to its size (BARs
/// must be), and sizes are powers of two.
#[derive(Debug, Clone)]
pub struct WindowAllocator {
    name: &'static str,
    next: u64,
    end: u64,
}

impl WindowAllocator {
    pub fn new(name: &'static str, start: u64, end: u64) -> Self {
        WindowAllocator {
            name,
            next: start,
            end,
        }
    }

    pub fn mmio32() -> Self {
        Self::new("32-bit MMIO", PCI_MMIO32_START, PCI_MMIO32_END)
    }

    pub fn io() -> Self {
        Self::new("I/O port", PCI_IO_START, PCI_IO_END)
    }

    pub fn mmio64(start: u64, len: u64) -> Self {
        Self::new("64-bit MMIO", start, start + len)
    }

    /// The name of the window, for messages.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Bytes left above the next free address.
    pub fn free(&self) -> u64 {
        self.end.saturating_sub(self.next)
    }

    /// Allocates `size` bytes (rounded up to a power of two, at least `min_align`) aligned to
    /// that size.
    pub fn allocate(&mut self, what: &str, size: u64, min_align: u64) -> Result<u64, LayoutError> {
        let size = size.max(min_align).max(1);
        let size = size.checked_next_power_of_two().unwrap_or(u64::MAX);
        let base = self
            .next
            .checked_add(size - 1)
            .map(|v| v & !(size - 1))
            .filter(|b| b.checked_add(size).is_some_and(|e| e <= self.end));
        match base {
            Some(base) => {
                self.next = base + size;
                Ok(base)
            }
            None => Err(LayoutError::BarDoesNotFit {
                what: what.to_string(),
                size,
                window: self.name,
                free: self.free(),
                hint: "pass fewer devices, or give the guest a wider physical address space",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window64_starts_at_64_gib_for_small_guests() {
        assert_eq!(mmio64_window(1 << 30, 46), Ok((64 << 30, 512 << 30)));
    }

    #[test]
    fn window64_moves_above_large_guests() {
        let (start, len) = mmio64_window((100 << 30) + 5, 46).unwrap();
        assert_eq!(start, 128 << 30);
        assert_eq!(len, 512 << 30);
        assert_eq!(start % len.min(start), 0);
    }

    #[test]
    fn window64_is_clamped_by_the_address_width() {
        // 39 bits = 512 GiB of address space: the window is 64..512 GiB rounded down to 256 GiB.
        let (start, len) = mmio64_window(2 << 30, 39).unwrap();
        assert_eq!((start, len), (64 << 30, 256 << 30));
        assert!(start + len <= 1 << 39);
        let err = mmio64_window(600 << 30, 39).unwrap_err();
        assert!(err.to_string().contains("39 bits"), "{err}");
    }

    #[test]
    fn allocations_are_naturally_aligned() {
        let mut w = WindowAllocator::mmio32();
        let a = w.allocate("a", 0x1000, 0x1000).unwrap();
        assert_eq!(a, PCI_MMIO32_START);
        let b = w.allocate("b", 16 << 20, 0x1000).unwrap();
        assert_eq!(b % (16 << 20), 0);
        assert!(b > a);
        let c = w.allocate("c", 0x100, 0x1000).unwrap();
        assert_eq!(c, b + (16 << 20));
        // Non-power-of-two sizes round up.
        let d = w.allocate("d", 0x1800, 0x1000).unwrap();
        assert_eq!(d % 0x2000, 0);
    }

    #[test]
    fn a_bar_larger_than_the_window_is_refused_with_its_name() {
        let mut w = WindowAllocator::mmio32();
        let err = w
            .allocate("0000:41:00.0 BAR1", 1 << 30, 0x1000)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("0000:41:00.0 BAR1") && msg.contains("32-bit"),
            "{msg}"
        );
        let mut w64 = WindowAllocator::mmio64(64 << 30, 512 << 30);
        assert_eq!(w64.allocate("gpu", 32 << 30, 0x1000).unwrap(), 64 << 30);
        assert_eq!(w64.allocate("gpu2", 32 << 30, 0x1000).unwrap(), 96 << 30);
    }
}
