//! Starting application processors: INIT-SIPI-SIPI through the xAPIC, a real-mode
//! trampoline at 0x6000 that goes straight to long mode, and `ap_main`.

use core::arch::global_asm;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::arch::{self, RacyCell, GDT_CODE64, GDT_DATA, KERNEL_CS, KERNEL_DS};
use crate::fmt::LineBuf;
use crate::mptable::MpInfo;
use crate::{say, text};

/// Physical address of the trampoline: the only low memory the guest may use
/// (0x6000..0x7000); SIPI vector 0x06 starts APs at 0600:0000.
pub const TRAMPOLINE: u64 = 0x6000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;

/// CPUs the guest can run (BSP included); AP stacks are sized for this.
pub const MAX_CPUS: usize = 64;
pub const AP_STACK_SIZE: usize = 16 * 1024;

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = LAPIC + 0xf0;
const LAPIC_ICR_LOW: u64 = LAPIC + 0x300;
const LAPIC_ICR_HIGH: u64 = LAPIC + 0x310;
const ICR_INIT: u32 = 0x4500;
const ICR_SIPI: u32 = 0x4600;
const ICR_BUSY: u32 = 1 << 12;
/// APIC software enable, spurious vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;

/// Delays in TSC cycles. The TSC rate is unknown, and KVM handles INIT/SIPI without
/// real settling times, so these are only roughly the classic 10 ms / 200 us.
const INIT_DELAY: u64 = 1 << 24;
const SIPI_DELAY: u64 = 1 << 20;
const ICR_TIMEOUT: u64 = 1 << 28;
/// How long the BSP waits for one AP (a few seconds at any plausible TSC rate).
pub const AP_TIMEOUT_LOG2: u32 = 33;

// 16-bit entry: load the trampoline's own GDT, enable PAE, load CR3, set EFER.LME,
// then PE|PG together and far-jump straight into 64-bit code (no 32-bit stage).
// Code runs at 0x6000, not where it is linked, so every absolute address is
// `label - ap_tramp_start + 0x6000` (named with .set: memory operands take one
// symbol); DS is 0 so those work as real-mode offsets too.
global_asm!(
    r#"
    .pushsection .rodata.ap_trampoline, "a"
    .balign 16
    .globl ap_tramp_start
ap_tramp_start:
    .code16
    cli
    cld
    xor ax, ax
    mov ds, ax
    .set AP_TRAMP_GDTR, ap_tramp_gdtr - ap_tramp_start + {base}
    .set AP_TRAMP_CR3, ap_tramp_cr3 - ap_tramp_start + {base}
    .set AP_TRAMP_STACK, ap_tramp_stack - ap_tramp_start + {base}
    .set AP_TRAMP_ENTRY, ap_tramp_entry - ap_tramp_start + {base}
    lgdt [AP_TRAMP_GDTR]
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, dword ptr [AP_TRAMP_CR3]
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0x9fffffff
    or eax, 0x80000001
    mov cr0, eax
    // jmp far dword 0x08:ap_tramp_64 (o32 ljmp, written out to pin the encoding)
    .byte 0x66, 0xea
    .long ap_tramp_64 - ap_tramp_start + {base}
    .word {cs}
    .code64
ap_tramp_64:
    mov ax, {ds}
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov rsp, qword ptr [AP_TRAMP_STACK]
    mov rax, qword ptr [AP_TRAMP_ENTRY]
    call rax
    ud2

    .balign 8
ap_tramp_gdt:
    .quad 0
    .quad {code64}
    .quad {data}
ap_tramp_gdtr:
    .word 23
    .long ap_tramp_gdt - ap_tramp_start + {base}
    .balign 8
    .globl ap_tramp_cr3
ap_tramp_cr3:
    .long 0
    .long 0
    .globl ap_tramp_stack
ap_tramp_stack:
    .quad 0
    .globl ap_tramp_entry
ap_tramp_entry:
    .quad 0
    .globl ap_tramp_end
ap_tramp_end:
    .popsection
"#,
    base = const TRAMPOLINE,
    cs = const KERNEL_CS,
    ds = const KERNEL_DS,
    code64 = const GDT_CODE64,
    data = const GDT_DATA,
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_cr3: u8;
    static ap_tramp_stack: u8;
    static ap_tramp_entry: u8;
}

#[repr(C, align(4096))]
struct ApStacks([[u8; AP_STACK_SIZE]; MAX_CPUS - 1]);

// Stack memory needs no zeroing, so it lives in the no-init tail of .bss (link.ld).
#[link_section = ".noinit.ap_stacks"]
static AP_STACKS: RacyCell<ApStacks> = RacyCell::new(ApStacks([[0; AP_STACK_SIZE]; MAX_CPUS - 1]));

/// The AP being started: its expected APIC id and its slot (stack and counter index).
static AP_EXPECTED: AtomicU32 = AtomicU32::new(0);
static AP_SLOT: AtomicUsize = AtomicUsize::new(0);
/// The APIC id the newest AP read from CPUID, or `NOBODY`.
static AP_ARRIVED: AtomicU32 = AtomicU32::new(NOBODY);
const NOBODY: u32 = u32::MAX;
/// APs that passed their check, as a count and as a bitmap of APIC ids.
static UP_COUNT: AtomicUsize = AtomicUsize::new(0);
static UP_MASK: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// APs count in `AP_COUNTERS` instead of idling (the `spin` scenario).
static AP_BUSY: AtomicBool = AtomicBool::new(false);

/// One cache line per AP so busy CPUs do not share lines.
#[repr(align(64))]
struct Counter(AtomicU64);
static AP_COUNTERS: [Counter; MAX_CPUS] = [const { Counter(AtomicU64::new(0)) }; MAX_CPUS];

/// What the APs do once up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ApWork {
    /// Spin on `pause`.
    Idle,
    /// Increment a private counter forever.
    Count,
}

/// Physical address in the installed trampoline of the asm label at `label`.
fn tramp_addr(label: *const u8) -> u64 {
    TRAMPOLINE + (label as u64 - core::ptr::addr_of!(ap_tramp_start) as u64)
}

/// Starts every enabled CPU in the MP table other than this one, one at a time.
/// Returns the number of CPUs running, this one included.
pub fn start_aps(mp: &MpInfo, work: ApWork) -> Result<usize, LineBuf> {
    let me = arch::apic_id();
    let cpus = mp.cpus();
    if !cpus.contains(&me) {
        return Err(text!(
            "BSP APIC id {me} is not an enabled CPU in the MP table"
        ));
    }
    if cpus.len() > MAX_CPUS {
        return Err(text!(
            "MP table lists {} CPUs, the guest supports {MAX_CPUS}",
            cpus.len()
        ));
    }
    if cpus.len() == 1 {
        return Ok(1);
    }
    AP_BUSY.store(work == ApWork::Count, Ordering::Release);
    install_trampoline()?;
    // SAFETY: the LAPIC page is identity mapped (uncached); SVR enables the APIC so
    // it can send IPIs.
    unsafe { arch::mmio_write32(LAPIC_SVR, SVR_ENABLE) };
    let mut slot = 0;
    for &id in cpus.iter().filter(|&&id| id != me) {
        start_ap(slot, id)?;
        slot += 1;
    }
    Ok(1 + slot)
}

fn install_trampoline() -> Result<(), LineBuf> {
    let start = core::ptr::addr_of!(ap_tramp_start) as u64;
    let end = core::ptr::addr_of!(ap_tramp_end) as u64;
    let len = (end - start) as usize;
    let cr3 = arch::read_cr3();
    if len > 0x1000 || cr3 >= 1 << 32 {
        return Err(text!(
            "AP trampoline: {len} bytes, CR3 {cr3:#x}: does not fit"
        ));
    }
    // SAFETY: 0x6000..0x7000 is reserved for the trampoline, identity mapped and not
    // used by anything else; no AP runs yet. The patched fields are inside the copy.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len);
        let cr3_field = tramp_addr(core::ptr::addr_of!(ap_tramp_cr3));
        core::ptr::write_volatile(cr3_field as *mut u32, cr3 as u32);
        let entry_field = tramp_addr(core::ptr::addr_of!(ap_tramp_entry));
        core::ptr::write_volatile(entry_field as *mut u64, ap_main as *const () as u64);
    }
    Ok(())
}

fn send_ipi(apic_id: u8, icr_low: u32) {
    let wait_idle = || {
        let start = arch::rdtsc();
        // SAFETY: reading the identity-mapped LAPIC ICR.
        while unsafe { arch::mmio_read32(LAPIC_ICR_LOW) } & ICR_BUSY != 0
            && arch::rdtsc().wrapping_sub(start) < ICR_TIMEOUT
        {
            arch::pause();
        }
    };
    wait_idle();
    // SAFETY: writing the identity-mapped LAPIC ICR; the high half (destination) goes
    // first because writing the low half sends the IPI.
    unsafe {
        arch::mmio_write32(LAPIC_ICR_HIGH, u32::from(apic_id) << 24);
        arch::mmio_write32(LAPIC_ICR_LOW, icr_low);
    }
    wait_idle();
}

fn start_ap(slot: usize, id: u8) -> Result<(), LineBuf> {
    let stack_top = AP_STACKS.get() as u64 + (slot as u64 + 1) * AP_STACK_SIZE as u64;
    // SAFETY: the trampoline is installed and no AP is running it now (each AP has
    // left it before the BSP starts the next one).
    unsafe {
        let field = tramp_addr(core::ptr::addr_of!(ap_tramp_stack));
        core::ptr::write_volatile(field as *mut u64, stack_top);
    }
    AP_EXPECTED.store(u32::from(id), Ordering::Release);
    AP_SLOT.store(slot, Ordering::Release);
    AP_ARRIVED.store(NOBODY, Ordering::Release);
    let before = UP_COUNT.load(Ordering::Acquire);
    fence(Ordering::SeqCst);

    send_ipi(id, ICR_INIT);
    arch::delay(INIT_DELAY);
    send_ipi(id, ICR_SIPI | SIPI_VECTOR);
    arch::delay(SIPI_DELAY);
    send_ipi(id, ICR_SIPI | SIPI_VECTOR);

    let start = arch::rdtsc();
    loop {
        if UP_COUNT.load(Ordering::Acquire) > before {
            return Ok(());
        }
        let arrived = AP_ARRIVED.load(Ordering::Acquire);
        if arrived != NOBODY && arrived != u32::from(id) {
            return Err(text!(
                "AP started for APIC id {id} reports initial APIC id {arrived}"
            ));
        }
        if arch::rdtsc().wrapping_sub(start) >= 1 << AP_TIMEOUT_LOG2 {
            return Err(text!(
                "AP with APIC id {id} did not come up within 2^{AP_TIMEOUT_LOG2} TSC cycles"
            ));
        }
        arch::pause();
    }
}

/// Whether the AP with `apic_id` has come up.
pub fn is_up(apic_id: u8) -> bool {
    UP_MASK[usize::from(apic_id / 64)].load(Ordering::Acquire) & 1 << (apic_id % 64) != 0
}

/// Sum of the `spin` counters of all APs.
pub fn ap_count_total() -> u64 {
    AP_COUNTERS
        .iter()
        .map(|c| c.0.load(Ordering::Relaxed))
        .fold(0, u64::wrapping_add)
}

/// AP entry from the trampoline: 64-bit mode, trampoline GDT, own stack.
extern "C" fn ap_main() -> ! {
    arch::load_descriptor_tables();
    let id = arch::apic_id();
    let slot = AP_SLOT.load(Ordering::Acquire);
    let expected = AP_EXPECTED.load(Ordering::Acquire);
    AP_ARRIVED.store(u32::from(id), Ordering::Release);
    if u32::from(id) != expected {
        // The BSP reports the mismatch.
        park();
    }
    // Print before signalling, so the line is out before the BSP moves on.
    say!("CPU {id} up");
    UP_MASK[usize::from(id / 64)].fetch_or(1 << (id % 64), Ordering::AcqRel);
    UP_COUNT.fetch_add(1, Ordering::AcqRel);
    if AP_BUSY.load(Ordering::Acquire) {
        let c = &AP_COUNTERS[slot].0;
        loop {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    park()
}

/// Spins forever without halting (no interrupts will ever wake a halted CPU).
fn park() -> ! {
    loop {
        arch::pause();
    }
}
