//! The scenarios selected with `probe=`. Each returns `Ok` for `PROBE OK` or the
//! reason for `PROBE FAIL`; `triple-fault` and `exception` do not return. The virtio
//! device scenarios are in `virtio_scenarios.rs`.

use crate::arch;
use crate::cmdline::{self, Scenario};
use crate::e820::{self, MMIO_GAP_START};
use crate::fmt::{Ascii, LineBuf, Size};
use crate::kbd::CtrlAltDel;
use crate::kernel::BootInfo;
use crate::memtest;
use crate::mptable::{self, MpInfo};
use crate::pci_scenario;
use crate::smp::{self, ApWork};
use crate::virtio_scenarios;
use crate::{say, text};

pub fn run(s: Scenario, info: &BootInfo) -> Result<(), LineBuf> {
    match s {
        Scenario::Boot => boot(info),
        Scenario::Smp => smp(info),
        Scenario::Mem(mib) => mem(info, mib),
        Scenario::Spin => spin(info),
        Scenario::TripleFault => triple_fault(),
        Scenario::Exception => exception(),
        Scenario::Reboot => Ok(()),
        Scenario::VirtioBlk => virtio_scenarios::blk(info),
        Scenario::VirtioRng => virtio_scenarios::rng(info),
        Scenario::VirtioVsock => virtio_scenarios::vsock(info),
        Scenario::VirtioNet => virtio_scenarios::net(info),
        Scenario::Pci => pci_scenario::run(info),
    }
}

macro_rules! check {
    ($($arg:tt)*) => {
        say!("check ok: {}", format_args!($($arg)*))
    };
}

/// Reads and validates the MP table the VMM placed below 640 KiB.
fn read_mp_table() -> Result<MpInfo, LineBuf> {
    let scan_len = (mptable::SCAN_END - mptable::SCAN_START) as usize;
    // SAFETY: the top 1 KiB of base memory is guest RAM the VMM wrote the MP table
    // into; nothing writes it while the guest reads.
    let region = unsafe { core::slice::from_raw_parts(mptable::SCAN_START as *const u8, scan_len) };
    let addr =
        mptable::find_floating_pointer(region, mptable::SCAN_START).map_err(|e| text!("{e}"))?;
    let outside = |len: usize| addr == 0 || addr + len as u64 > MMIO_GAP_START;
    if outside(mptable::HEADER_LEN) {
        return Err(text!(
            "MP table: configuration table address {addr:#x} is not in low RAM"
        ));
    }
    let mut header = [0u8; mptable::HEADER_LEN];
    // SAFETY: checked above to be identity-mapped memory below the MMIO gap.
    unsafe {
        core::ptr::copy_nonoverlapping(addr as *const u8, header.as_mut_ptr(), header.len());
    }
    let len = mptable::table_len(&header).map_err(|e| text!("{e}"))?;
    if outside(len) {
        return Err(text!(
            "MP table: configuration table [{addr:#x}, +{len}) is not in low RAM"
        ));
    }
    // SAFETY: as above, for the table's full length.
    let table = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    let mp = mptable::parse_table(table).map_err(|e| text!("{e}"))?;
    say!(
        "MP table at {addr:#x}: {} CPUs, APIC ids {:?}, LAPIC at {:#x}",
        mp.cpus().len(),
        mp.cpus(),
        mp.lapic_addr
    );
    Ok(mp)
}

fn boot(info: &BootInfo) -> Result<(), LineBuf> {
    let map = &info.e820;
    say!("e820: {} entries", map.reported());
    for e in map.entries() {
        say!("e820: {e}");
    }
    e820::validate(map).map_err(|e| text!("{e}"))?;
    check!("e820 map is sorted and non-overlapping, with RAM at 0 and at 1 MiB");
    if let Some(mib) = info.args.expect_mem_mib {
        e820::check_layout(map, mib).map_err(|e| text!("{e}"))?;
        check!("e820 RAM layout matches {mib} MiB");
    }
    check_last_ram_byte(info)?;
    check_cmdline(info)?;
    check_cpuid()?;

    let mp = read_mp_table()?;
    let me = arch::apic_id();
    match mp.bsp() {
        Some(id) if id == me => check!("MP table flags APIC id {me} (this CPU) as the BSP"),
        _ => {
            return Err(text!(
                "MP table: {} enabled entries flagged BSP, expected exactly one with APIC id {me}",
                mp.bsp_flag_count()
            ))
        }
    }
    let ncpus = mp.cpus().len();
    if arch::cpuid(0, 0).eax >= 0xb {
        let logical = arch::cpuid(0xb, 1).ebx & 0xffff;
        if logical as usize != ncpus {
            return Err(text!(
                "CPUID.(0xb,1):EBX[15:0] is {logical}, MP table lists {ncpus} CPUs"
            ));
        }
        check!("CPUID leaf 0xb reports {logical} logical processors, as the MP table");
    } else {
        say!("CPUID leaf 0xb not present, topology check skipped");
    }
    if let Some(want) = info.args.expect_cpus {
        if ncpus as u64 != want {
            return Err(text!("MP table lists {ncpus} CPUs, expected {want}"));
        }
        check!("MP table lists {want} CPUs");
    }
    Ok(())
}

fn check_last_ram_byte(info: &BootInfo) -> Result<(), LineBuf> {
    let Some(top) = info.e820.highest_ram() else {
        return Err(text!("e820: no RAM"));
    };
    let last = top.end() - 1;
    if last >= info.mapped_top {
        return Err(text!(
            "highest RAM byte {last:#x} is above the {} the guest maps",
            Size(info.mapped_top)
        ));
    }
    let p = last as *mut u8;
    // SAFETY: `last` is RAM per e820 and identity mapped; the original byte is put back.
    let (old, new, back) = unsafe {
        let old = core::ptr::read_volatile(p);
        let new = !old;
        core::ptr::write_volatile(p, new);
        let back = core::ptr::read_volatile(p);
        core::ptr::write_volatile(p, old);
        (old, new, back)
    };
    if back != new {
        return Err(text!(
            "last RAM byte {last:#x}: wrote {new:#x} over {old:#x}, read back {back:#x}"
        ));
    }
    check!("wrote and read back the last RAM byte at {last:#x}");
    Ok(())
}

fn check_cmdline(info: &BootInfo) -> Result<(), LineBuf> {
    if !cmdline::tokens(info.cmdline).any(|t| t == b"probe=boot") {
        return Err(text!(
            "command line \"{}\" lacks probe=boot",
            Ascii(info.cmdline)
        ));
    }
    if !info.cmdline_terminated {
        return Err(text!(
            "command line at {:#x} has no NUL within cmdline_size {}",
            info.cmdline_ptr,
            info.cmdline_size
        ));
    }
    check!(
        "command line at {:#x} has probe=boot and a NUL within cmdline_size {}",
        info.cmdline_ptr,
        info.cmdline_size
    );
    Ok(())
}

fn regs_bytes(regs: [u32; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    for (chunk, r) in out.chunks_exact_mut(4).zip(regs) {
        chunk.copy_from_slice(&r.to_le_bytes());
    }
    out
}

fn check_cpuid() -> Result<(), LineBuf> {
    let leaf1 = arch::cpuid(1, 0);
    if leaf1.ecx & 1 << 31 == 0 {
        return Err(text!("CPUID.1:ECX[31] (hypervisor present) is clear"));
    }
    check!("CPUID.1:ECX[31] hypervisor bit set");

    let hv = arch::cpuid(0x4000_0000, 0);
    let sig = regs_bytes([hv.ebx, hv.ecx, hv.edx, 0]);
    if &sig[..12] != b"KVMKVMKVM\0\0\0" {
        return Err(text!(
            "CPUID 0x40000000 signature is \"{}\", expected KVMKVMKVM",
            Ascii(&sig[..12])
        ));
    }
    check!(
        "CPUID 0x40000000 signature KVMKVMKVM (max leaf {:#x})",
        hv.eax
    );

    let id = leaf1.ebx >> 24;
    if id != 0 {
        return Err(text!(
            "CPUID.1:EBX[31:24] (initial APIC id) is {id} on the BSP, expected 0"
        ));
    }
    check!("boot CPU initial APIC id 0");

    let max_ext = arch::cpuid(0x8000_0000, 0).eax;
    if max_ext < 0x8000_0004 {
        return Err(text!(
            "CPUID max extended leaf {max_ext:#x} has no brand string"
        ));
    }
    let mut brand = [0u8; 48];
    for (i, chunk) in brand.chunks_exact_mut(16).enumerate() {
        let r = arch::cpuid(0x8000_0002 + i as u32, 0);
        chunk.copy_from_slice(&regs_bytes([r.eax, r.ebx, r.ecx, r.edx]));
    }
    let brand = cmdline::until_nul(&brand).unwrap_or(&brand);
    if !brand.starts_with(b"Airlock") {
        return Err(text!(
            "CPUID brand string is \"{}\", expected it to start with Airlock",
            Ascii(brand)
        ));
    }
    check!("CPUID brand string \"{}\"", Ascii(brand));
    Ok(())
}

fn smp(info: &BootInfo) -> Result<(), LineBuf> {
    let mp = read_mp_table()?;
    let n = smp::start_aps(&mp, ApWork::Idle)?;
    let me = arch::apic_id();
    if let Some(id) = mp.cpus().iter().find(|&&id| id != me && !smp::is_up(id)) {
        return Err(text!("APIC id {id} is not marked up"));
    }
    if let Some(want) = info.args.expect_cpus {
        if n as u64 != want {
            return Err(text!("{n} CPUs up, expected {want}"));
        }
    }
    say!("SMP {n} cpus up");
    Ok(())
}

/// Writes the memory pattern over `mib` MiB of free RAM above the guest image.
fn fill_memory(info: &BootInfo, mib: u64) -> Result<memtest::Plan, LineBuf> {
    let bytes = mib << 20;
    // Everything the guest uses above 1 MiB lies below the end of its .bss.
    let (_, image_end) = arch::image_range();
    let free = e820::free_ranges(&info.e820, image_end, info.mapped_top);
    let plan = memtest::plan(free, bytes).map_err(|available| {
        text!(
            "only {} of free RAM (above {image_end:#x}, below {:#x}), asked for {mib} MiB",
            Size(available),
            info.mapped_top
        )
    })?;
    for &(start, end) in plan.ranges() {
        say!("mem: testing [{start:#x}, {end:#x})");
    }
    for &(start, end) in plan.ranges() {
        // SAFETY: [start, end) is 8-byte aligned e820 RAM above the guest image,
        // identity mapped, and used by nothing else while this slice lives.
        let words = unsafe {
            core::slice::from_raw_parts_mut(start as *mut u64, ((end - start) / 8) as usize)
        };
        memtest::fill(words, start);
    }
    Ok(plan)
}

/// Reads back what [`fill_memory`] wrote.
fn verify_memory(plan: &memtest::Plan, mib: u64) -> Result<(), LineBuf> {
    let mut sum = 0u64;
    for &(start, end) in plan.ranges() {
        // SAFETY: as in fill_memory; the writing slices are gone.
        let words = unsafe {
            core::slice::from_raw_parts(start as *const u64, ((end - start) / 8) as usize)
        };
        let s = memtest::verify(words, start).map_err(|m| {
            text!(
                "mismatch at {:#x}: wrote {:#018x}, read {:#018x}",
                m.addr,
                m.want,
                m.got
            )
        })?;
        sum = sum.wrapping_add(s);
    }
    say!("mem: verified {mib} MiB, checksum {sum:#018x}");
    Ok(())
}

fn mem(info: &BootInfo, mib: u64) -> Result<(), LineBuf> {
    let plan = fill_memory(info, mib)?;
    verify_memory(&plan, mib)
}

/// The VMM's VM generation register: zero after a cold boot, a fresh random value after each
/// restore or fork.
const VM_GENERATION_MMIO: u64 = 0xd000_0010;

fn vm_generation() -> (u64, u64) {
    // SAFETY: the register is MMIO in the gap below 4 GiB, identity mapped uncached; reading it
    // has no side effects.
    unsafe {
        (
            core::ptr::read_volatile(VM_GENERATION_MMIO as *const u64),
            core::ptr::read_volatile((VM_GENERATION_MMIO + 8) as *const u64),
        )
    }
}

const I8042_STATUS: u16 = 0x64;
const I8042_DATA: u16 = 0x60;
const I8042_OUTPUT_FULL: u8 = 1 << 0;
const SPIN_PRINT_CYCLES: u64 = 1 << 24;
/// Each i8042 poll is a VM exit, so poll 16 times per print, not continuously.
const SPIN_POLL_CYCLES: u64 = SPIN_PRINT_CYCLES / 16;

/// Drains the i8042 output buffer; true once Delete (`0xe0 0x71`) arrives.
fn poll_ctrl_alt_del(cad: &mut CtrlAltDel) -> bool {
    // Bounded so a device that always reports "full" cannot stall the loop.
    for _ in 0..64 {
        if arch::inb(I8042_STATUS) & I8042_OUTPUT_FULL == 0 {
            break;
        }
        if cad.feed(arch::inb(I8042_DATA)) {
            return true;
        }
    }
    false
}

fn spin(info: &BootInfo) -> Result<(), LineBuf> {
    let filled = match info.args.fill_mib {
        Some(mib) => Some((fill_memory(info, mib)?, mib)),
        None => None,
    };
    let mp = read_mp_table()?;
    let k = smp::start_aps(&mp, ApWork::Count)?;
    say!("SPIN start cpus={k}");
    let mut generation = vm_generation();
    let mut cad = CtrlAltDel::default();
    let mut n = 0u64;
    loop {
        n += 1;
        // A restore or fork changes the generation: a real guest would reseed and fix its clock.
        let now = vm_generation();
        if now != generation {
            generation = now;
            say!("GENERATION {:016x}{:016x}", now.1, now.0);
        }
        say!("SPIN {n}");
        let start = arch::rdtsc();
        loop {
            if poll_ctrl_alt_del(&mut cad) {
                say!("spin: APs counted {} iterations", smp::ap_count_total());
                say!("CTRL-ALT-DEL received");
                if let Some((plan, mib)) = &filled {
                    verify_memory(plan, *mib)?;
                }
                return Ok(());
            }
            let elapsed = arch::rdtsc().wrapping_sub(start);
            if elapsed >= SPIN_PRINT_CYCLES {
                break;
            }
            arch::delay(SPIN_POLL_CYCLES.min(SPIN_PRINT_CYCLES - elapsed));
        }
    }
}

fn triple_fault() -> Result<(), LineBuf> {
    say!("triple fault now");
    arch::load_empty_idt();
    arch::ud2();
    Err(text!("still running after ud2 with an empty IDT"))
}

fn exception() -> Result<(), LineBuf> {
    say!("raising #UD (ud2)");
    arch::ud2();
    Err(text!("ud2 returned"))
}
