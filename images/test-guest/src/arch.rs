//! x86_64 glue: the entry point, descriptor tables, exception stubs, port and MMIO
//! access, CPUID and the TSC.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::mem::size_of;

/// A static the guest mutates without a lock; every user explains in its `SAFETY:`
/// comment why no other CPU touches it at the same time (usually: the BSP writes it
/// before the APs start).
pub struct RacyCell<T>(UnsafeCell<T>);

// SAFETY: all accesses go through `get()` and are serialised by boot order, as
// argued at each use.
unsafe impl<T> Sync for RacyCell<T> {}

impl<T> RacyCell<T> {
    pub const fn new(v: T) -> Self {
        RacyCell(UnsafeCell::new(v))
    }

    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
/// Flat 64-bit code segment (L=1, P=1, DPL 0, execute/read).
pub const GDT_CODE64: u64 = 0x00af_9a00_0000_ffff;
/// Flat data segment (P=1, read/write, 4 GiB limit; ignored in 64-bit mode).
pub const GDT_DATA: u64 = 0x00cf_9200_0000_ffff;

static GDT: [u64; 3] = [0, GDT_CODE64, GDT_DATA];

/// 32 interrupt gates (16 bytes each), one per CPU exception vector.
static IDT: RacyCell<[u64; 64]> = RacyCell::new([0; 64]);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

extern "C" {
    /// First of 32 exception stubs, 16 bytes apart (see the `global_asm!` below).
    static exception_stubs: u8;
    static __image_start: u8;
    static __bss_end: u8;
}

// Entry. Boot state (Linux 64-bit boot protocol): long mode, the VMM's identity map,
// rsi = &boot_params, interrupts off, a small stack at 0x8ff0 that we abandon.
// The boot stack is outside .bss, so .bss can be zeroed before switching to the
// guest's own stack (which lives in the no-init tail of .bss).
global_asm!(
    r#"
    .pushsection .text.head, "ax"
    .globl __airlock_head
__airlock_head:
    // 0x100000: placeholder where a bzImage's 32-bit entry would be; never run.
    ud2
    .org 0x200, 0
    .globl _start
_start:
    // The ready signal comes first: it marks the moment the guest runs, which is what the VMM's
    // boot path is timed by. Everything after it runs at guest speed (on nested hosts ~1000x
    // slower than native). `mov eax, imm32` zero-extends, so rax = 0xd0000000 exactly.
    mov eax, 0xd0000000
    mov byte ptr [rax], 123
    cli
    cld
    mov r15, rsi
    // Zero .bss up to its no-init tail (stacks, page tables), 8 bytes at a time
    // (both ends are page aligned): string stores may be emulated per iteration.
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_zero_end]
    sub rcx, rdi
    shr rcx, 3
    xor eax, eax
    rep stosq
    lea rsp, [rip + bsp_stack_top]
    xor ebp, ebp
    mov rdi, r15
    call {kmain}
    ud2
    .popsection

    .pushsection .noinit.bsp_stack, "aw", @nobits
    .balign 4096
bsp_stack:
    .skip {stack_size}
bsp_stack_top:
    .popsection
"#,
    kmain = sym crate::kernel::kmain,
    stack_size = const BSP_STACK_SIZE,
);

pub const BSP_STACK_SIZE: usize = 64 * 1024;

// Exception stubs: one 16-byte stub per vector so the IDT can point at
// `exception_stubs + 16 * vector`. Vectors without a CPU-pushed error code push 0,
// so the common path sees the same frame: [vector, error code, rip, cs, rflags, ...].
global_asm!(
    r#"
    .pushsection .text.exceptions, "ax"
    .macro EXC_STUB vec
    .balign 16
    .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    push 0
    .endif
    push \vec
    jmp exception_common
    .endm

    .balign 16
    .globl exception_stubs
exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    EXC_STUB \v
    .endr

exception_common:
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    mov rdx, [rsp + 16]
    mov rcx, cr2
    and rsp, -16
    call {handler}
    ud2
    .popsection
"#,
    handler = sym crate::kernel::exception,
);

/// Loads the guest's GDT (reloading every segment register) and IDT. Used by the
/// BSP and by each AP.
pub fn load_descriptor_tables() {
    let gdtr = DescriptorPointer {
        limit: (size_of::<[u64; 3]>() - 1) as u16,
        base: GDT.as_ptr() as u64,
    };
    let idtr = DescriptorPointer {
        limit: (size_of::<[u64; 64]>() - 1) as u16,
        base: IDT.get() as u64,
    };
    // SAFETY: the GDT is static and has flat code/data descriptors at the selectors
    // loaded here; CS is reloaded with a far return to a label just after it. The IDT
    // is static; its gates are filled by `init_idt` before anything can fault into
    // them meaningfully (a zero gate still faults into a triple fault, not UB).
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:x}, {ds}",
            "mov ds, {tmp:x}",
            "mov es, {tmp:x}",
            "mov ss, {tmp:x}",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cs = const KERNEL_CS,
            ds = const KERNEL_DS,
            tmp = out(reg) _,
        );
    }
}

/// Fills the IDT with interrupt gates to the exception stubs. BSP only, before APs run.
pub fn init_idt() {
    let stubs = core::ptr::addr_of!(exception_stubs) as u64;
    // SAFETY: called once by the BSP before any AP starts; nothing else accesses the IDT.
    let idt = unsafe { &mut *IDT.get() };
    for v in 0..32u64 {
        let handler = stubs + 16 * v;
        // Interrupt gate: present, DPL 0, type 0xE, selector KERNEL_CS, IST 0.
        idt[2 * v as usize] = (handler & 0xffff)
            | u64::from(KERNEL_CS) << 16
            | 0x8e00u64 << 32
            | (handler >> 16 & 0xffff) << 48;
        idt[2 * v as usize + 1] = handler >> 32;
    }
}

/// Loads an IDT with limit 0: any exception now escalates to a triple fault.
pub fn load_empty_idt() {
    let idtr = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: loading an empty IDT only changes what happens on the next exception.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(nostack)) };
}

/// Raises #UD.
pub fn ud2() {
    // SAFETY: the resulting exception is the point; the handler never returns here.
    unsafe { asm!("ud2", options(nomem, nostack)) };
}

/// Physical range of the loaded image including .bss: [0x100000, end of .bss).
pub fn image_range() -> (u64, u64) {
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__bss_end) as u64,
    )
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: the guest only touches its own devices (COM1, i8042); port writes have
    // no effect on memory safety.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; reads from the i8042 only consume its queued byte.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb` (PCI configuration mechanism #1).
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`; reading CONFIG_DATA has no side effects.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// # Safety
/// `addr` must be a mapped device register (or memory) that may be written.
pub unsafe fn mmio_write16(addr: u64, value: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) };
}

/// # Safety
/// `addr` must be a mapped device register (or memory) that may be read.
pub unsafe fn mmio_read64(addr: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// # Safety
/// `addr` must be a mapped device register (or memory) that may be written.
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) };
}

/// # Safety
/// `addr` must be a mapped device register (or memory) that may be read.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// # Safety
/// `addr` must be a mapped device register (or memory) that may be read.
pub unsafe fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx);
    // SAFETY: CPUID has no side effects; rbx is reserved by LLVM, so it is saved
    // in a scratch register around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        );
    }
    Cpuid { eax, ebx, ecx, edx }
}

/// This CPU's initial APIC id (CPUID.1:EBX[31:24]).
pub fn apic_id() -> u8 {
    (cpuid(1, 0).ebx >> 24) as u8
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading the TSC has no side effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

pub fn pause() {
    core::hint::spin_loop();
}

/// Busy-waits `cycles` TSC cycles.
pub fn delay(cycles: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        pause();
    }
}

/// # Safety
/// `pml4` must be the physical address of valid page tables that identity map all
/// code, data and stacks in use.
pub unsafe fn load_cr3(pml4: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Stops this CPU for good. Interrupts stay disabled, so `hlt` never resumes.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: halting with interrupts off only parks this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Asks the VMM to reboot (i8042 pulse-reset command), then stops.
pub fn request_reboot() -> ! {
    outb(0x64, 0xfe);
    halt_forever()
}
