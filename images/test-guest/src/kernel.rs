//! Boot flow on the BSP, the final `PROBE` report, and the exception and panic paths.

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::arch::{self, RacyCell};
use crate::bootparams::{self, ZERO_PAGE_SIZE};
use crate::cmdline::{self, Args};
use crate::e820::{self, FOUR_GIB, MMIO_GAP_START};
use crate::fmt::{Ascii, LineBuf};
use crate::paging::{self, GIB, MAX_GIB};
use crate::{say, scenario, text};

/// Longest command line the guest reads.
const CMDLINE_MAX: usize = 4096;

/// Scenario name used in reports before the command line is parsed, or without `probe=`.
const NO_SCENARIO: &[u8] = b"(none)";

/// What the BSP learned from the boot parameters.
pub struct BootInfo {
    pub e820: e820::Map,
    /// Command line without its NUL (empty when there is none).
    pub cmdline: &'static [u8],
    pub cmdline_ptr: u64,
    pub cmdline_size: u32,
    /// A NUL was found within the first `cmdline_size` bytes.
    pub cmdline_terminated: bool,
    pub args: Args<'static>,
    /// End of the identity map (a multiple of 1 GiB).
    pub mapped_top: u64,
    /// `boot_params.acpi_rsdp_addr` (0 when the VMM wrote no ACPI tables).
    pub acpi_rsdp_addr: u64,
}

#[repr(C, align(4096))]
struct PageTables {
    pml4: [u64; 512],
    pdpt: [u64; 512],
    pds: [[u64; 512]; MAX_GIB],
}

// In the no-init tail of .bss (see link.ld): not zeroed at boot, despite the zero
// initialiser. Nothing reads it before `paging::fill` writes every entry the CPU can
// reach.
#[link_section = ".noinit.page_tables"]
static TABLES: RacyCell<PageTables> = RacyCell::new(PageTables {
    pml4: [0; 512],
    pdpt: [0; 512],
    pds: [[0; 512]; MAX_GIB],
});
static ZERO_PAGE: RacyCell<[u8; ZERO_PAGE_SIZE]> = RacyCell::new([0; ZERO_PAGE_SIZE]);
static CMDLINE: RacyCell<[u8; CMDLINE_MAX]> = RacyCell::new([0; CMDLINE_MAX]);

static SCENARIO_PTR: AtomicUsize = AtomicUsize::new(0);
static SCENARIO_LEN: AtomicUsize = AtomicUsize::new(0);
static FINISHED: AtomicBool = AtomicBool::new(false);

fn scenario_name() -> &'static [u8] {
    let ptr = SCENARIO_PTR.load(Ordering::Acquire);
    if ptr == 0 {
        return NO_SCENARIO;
    }
    // SAFETY: set once from a `&'static [u8]` (into CMDLINE) by `set_scenario_name`;
    // the length is stored before the pointer is published.
    unsafe { core::slice::from_raw_parts(ptr as *const u8, SCENARIO_LEN.load(Ordering::Acquire)) }
}

fn set_scenario_name(name: &'static [u8]) {
    SCENARIO_LEN.store(name.len(), Ordering::Release);
    SCENARIO_PTR.store(name.as_ptr() as usize, Ordering::Release);
}

/// Rust entry on the BSP, called from `_start` on the guest's own stack with .bss zeroed.
pub extern "C" fn kmain(boot_params: u64) -> ! {
    // The ready signal was sent by `_start` (arch.rs), before anything else ran.
    // `probe=reboot` stops here, before the guest's own (slow) setup.
    // SAFETY: the VMM's boot identity map covers the zero page and the command line.
    if unsafe { early_probe_is_reboot(boot_params) } {
        set_scenario_name(b"reboot");
        finish(Ok(()));
    }
    arch::init_idt();
    arch::load_descriptor_tables();
    let (image_start, image_end) = arch::image_range();
    say!(
        "airlock-test-guest: image [{image_start:#x}, {image_end:#x}), boot_params at {boot_params:#x}"
    );

    // SAFETY: the BSP runs alone; ZERO_PAGE is only written here. The VMM's identity
    // map covers boot_params (0x7000), which is 4 KiB of guest RAM.
    let zp = unsafe {
        let zp = &mut *ZERO_PAGE.get();
        core::ptr::copy_nonoverlapping(boot_params as *const u8, zp.as_mut_ptr(), ZERO_PAGE_SIZE);
        &*zp
    };
    let map = bootparams::e820(zp);
    let gib = paging::gib_to_map(map.top_of_ram());
    build_page_tables(gib);
    let mapped_top = gib as u64 * GIB;

    let (cmdline, cmdline_terminated) = read_cmdline(
        bootparams::cmdline_ptr(zp),
        bootparams::cmdline_size(zp),
        mapped_top,
    );
    let args = cmdline::parse(cmdline);
    if let Some(name) = args.probe {
        set_scenario_name(name);
    }

    say!(
        "ready: {gib} GiB identity mapped, command line \"{}\"",
        Ascii(cmdline)
    );

    let info = BootInfo {
        e820: map,
        cmdline,
        cmdline_ptr: bootparams::cmdline_ptr(zp),
        cmdline_size: bootparams::cmdline_size(zp),
        cmdline_terminated,
        args,
        mapped_top,
        acpi_rsdp_addr: bootparams::acpi_rsdp_addr(zp),
    };
    if let Some(e) = args.error {
        finish(Err(text!("{e}")));
    }
    let Some(probe) = args.probe else {
        finish(Err(text!("no probe=<scenario> on the command line")));
    };
    let Some(s) = cmdline::parse_scenario(probe) else {
        finish(Err(text!("unknown scenario \"{}\"", Ascii(probe))));
    };
    finish(scenario::run(s, &info))
}

/// Reads `probe=` straight from the VMM's zero page and command line, without copying them.
///
/// # Safety
/// `boot_params` must point at the zero page, and the command line it names must be mapped.
unsafe fn early_probe_is_reboot(boot_params: u64) -> bool {
    // SAFETY: the caller guarantees the zero page is mapped; the fields are plain u32s.
    let (ptr, size) = unsafe {
        let zp = boot_params as *const u8;
        (
            core::ptr::read_unaligned(zp.add(0x228) as *const u32),
            core::ptr::read_unaligned(zp.add(0x238) as *const u32),
        )
    };
    if ptr == 0 || size == 0 || size > 4096 {
        return false;
    }
    // SAFETY: the caller guarantees the command line is mapped; its size is bounded above.
    let raw = unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, size as usize) };
    let line = cmdline::until_nul(raw).unwrap_or(raw);
    cmdline::parse(line).probe == Some(b"reboot")
}

fn build_page_tables(gib: usize) {
    // SAFETY: the BSP runs alone and TABLES is only written here. The new tables
    // identity map at least 4 GiB, which covers the image, its stack and the MMIO
    // gap, so loading CR3 changes no translation in use.
    unsafe {
        let t = &mut *TABLES.get();
        let pdpt = core::ptr::addr_of!(t.pdpt) as u64;
        let pds = core::ptr::addr_of!(t.pds) as u64;
        paging::fill(&mut t.pml4, &mut t.pdpt, &mut t.pds, pdpt, pds, gib);
        arch::load_cr3(core::ptr::addr_of!(t.pml4) as u64);
    }
}

/// Copies the command line into .bss. Returns it without the NUL, and whether a NUL
/// was found within `size` bytes. With `size` 0 the guest still looks for a NUL in
/// the first 4 KiB so a scenario can run, but `boot` reports the missing size.
fn read_cmdline(ptr: u64, size: u32, mapped_top: u64) -> (&'static [u8], bool) {
    let limit = if size == 0 {
        CMDLINE_MAX
    } else {
        (size as usize).min(CMDLINE_MAX)
    };
    let end = ptr.saturating_add(limit as u64);
    let in_gap = ptr < FOUR_GIB && end > MMIO_GAP_START;
    if ptr == 0 || end > mapped_top || in_gap {
        return (&[], false);
    }
    // SAFETY: the BSP runs alone and CMDLINE is only written here; [ptr, end) is
    // identity mapped RAM outside the MMIO gap.
    let buf = unsafe { &mut *CMDLINE.get() };
    let mut len = 0;
    let mut terminated = false;
    while len < limit {
        // SAFETY: see above; volatile because this is memory the VMM wrote.
        let b = unsafe { core::ptr::read_volatile((ptr + len as u64) as *const u8) };
        if b == 0 {
            terminated = size != 0;
            break;
        }
        buf[len] = b;
        len += 1;
    }
    (&buf[..len], terminated)
}

/// Prints the single final `PROBE` line and requests a reboot. Only the first caller
/// reports; any other CPU that gets here parks.
pub fn finish(result: Result<(), LineBuf>) -> ! {
    if FINISHED.swap(true, Ordering::AcqRel) {
        arch::halt_forever();
    }
    let name = Ascii(scenario_name());
    let line = match result {
        Ok(()) => text!("PROBE OK {name}"),
        Err(reason) => text!("PROBE FAIL {name}: {}", Ascii(reason.as_bytes())),
    };
    crate::console::print_forced(&line);
    arch::request_reboot()
}

/// Called by the exception stubs (any CPU) with the vector, error code (0 when the
/// CPU pushes none), faulting RIP and CR2.
pub extern "C" fn exception(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    if FINISHED.load(Ordering::Acquire) {
        arch::halt_forever();
    }
    crate::console::print_forced(&text!(
        "exception {vector} on APIC id {}: rip {rip:#x} error code {error:#x} cr2 {cr2:#x}",
        arch::apic_id()
    ));
    finish(Err(text!(
        "exception {vector} at rip {rip:#x} (error code {error:#x})"
    )))
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if let Some(loc) = info.location() {
        crate::console::print_forced(&text!(
            "panic at {}:{}:{} on APIC id {}",
            loc.file(),
            loc.line(),
            loc.column(),
            arch::apic_id()
        ));
    }
    finish(Err(text!("panic: {}", info.message())))
}
