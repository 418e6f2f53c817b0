//! `airlock-vmm check-host`: what this host can run, measured rather than guessed.
//!
//! The decisive question is whether a Linux guest can run. Some hosts expose a
//! `/dev/kvm` that creates VMs and runs simple guests but cannot deliver external
//! interrupts (e.g. the paravirtual `kvm_pvm` hypervisor), so capability queries
//! alone are not enough: the check runs a tiny long-mode guest that takes IOAPIC
//! interrupts raised through an irqfd, and reports what happened.
//!
//! Every probe failure is data in the report; nothing here panics.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_void, CString};
use std::fmt::Display;
use std::fs;
use std::io;
use std::os::raw::{c_char, c_int};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_lapic_state, kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

/// The only KVM API version there has ever been; anything else is not KVM as we know it.
const KVM_API_VERSION: i32 = 12;

/// How long the interrupt probe may take before it is declared inconclusive. A few milliseconds
/// on hardware; nested hosts whose outer CPU is emulated (the test lab) need seconds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a timeout: how long to try to kick the vCPU thread out of KVM_RUN.
const KICK_BUDGET: Duration = Duration::from_millis(100);
/// Interrupt round trips ('S' counts as the first) that make the probe pass.
const PROBE_ROUND_TRIPS: u32 = 5;
/// The GSI (IOAPIC pin) the probe raises through its irqfd.
const PROBE_GSI: u32 = 5;
/// Debug port the probe guest writes its progress characters to.
const PROBE_PORT: u16 = 0xe9;
/// A probe slower than this (setup excluded) marks the host as slow in the verdict.
const SLOW_PROBE_US: u64 = 100_000;
/// Port the catch-all handlers write an unexpected vector's number to.
const STRAY_VECTOR_PORT: u16 = 0xea;

/// (name, capability, required for Linux guests)
const CAPABILITIES: &[(&str, Cap, bool)] = &[
    ("KVM_CAP_IRQCHIP", Cap::Irqchip, true),
    ("KVM_CAP_IOEVENTFD", Cap::Ioeventfd, true),
    ("KVM_CAP_IRQFD", Cap::Irqfd, true),
    ("KVM_CAP_USER_MEMORY", Cap::UserMemory, true),
    ("KVM_CAP_SET_TSS_ADDR", Cap::SetTssAddr, false),
    ("KVM_CAP_EXT_CPUID", Cap::ExtCpuid, true),
    ("KVM_CAP_MP_STATE", Cap::MpState, true),
    ("KVM_CAP_PIT2", Cap::Pit2, true),
    ("KVM_CAP_PIT_STATE2", Cap::PitState2, false),
    ("KVM_CAP_ADJUST_CLOCK", Cap::AdjustClock, false),
    ("KVM_CAP_VCPU_EVENTS", Cap::VcpuEvents, false),
    ("KVM_CAP_DEBUGREGS", Cap::Debugregs, false),
    ("KVM_CAP_XSAVE", Cap::Xsave, false),
    ("KVM_CAP_XCRS", Cap::Xcrs, false),
    ("KVM_CAP_TSC_DEADLINE_TIMER", Cap::TscDeadlineTimer, false),
    ("KVM_CAP_IMMEDIATE_EXIT", Cap::ImmediateExit, false),
    ("KVM_CAP_KVMCLOCK_CTRL", Cap::KvmclockCtrl, false),
];

/// Cgroup v1 controllers (directory names under the cgroup root, possibly comma-joined).
const V1_CONTROLLERS: &[&str] = &[
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];

// ---------------------------------------------------------------------------
// Report types
// ---------------------------------------------------------------------------

/// Everything `check-host` found, and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// Whether this host can run Linux guests (see `reason`).
    pub linux_guests: bool,
    /// The verdict in words: the first blocking cause, or why it works.
    pub reason: String,
    pub kvm: KvmReport,
    pub virtualization: Virtualization,
    pub interrupt_delivery: InterruptProbe,
    pub cgroups: Cgroups,
    pub userfaultfd: Userfaultfd,
    pub tap: DeviceNode,
    pub vhost: Vhost,
    pub vfio: Vfio,
    /// How long the whole check took.
    pub elapsed_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KvmReport {
    pub device: String,
    pub exists: bool,
    /// Opened read-write.
    pub opens: bool,
    pub error: Option<String>,
    pub api_version: Option<i32>,
    pub api_version_ok: bool,
    /// Every capability the VMM uses, by `KVM_CAP_*` name: present or not.
    pub capabilities: BTreeMap<String, bool>,
    /// Required capabilities (for Linux guests) that are absent.
    pub missing_required: Vec<String>,
    pub max_vcpus: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Virtualization {
    /// "hardware (vmx)", "hardware (svm)", "nested", "paravirtual (kvm_pvm)", "none" or "unknown".
    pub kind: String,
    /// Which of `vmx`, `svm`, `hypervisor` /proc/cpuinfo lists.
    pub cpu_flags: Vec<String>,
    /// `kvm` and `kvm_*` entries of /sys/module.
    pub kvm_modules: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeOutcome {
    Delivered,
    DoubleFault,
    GeneralProtectionFault,
    PageFault,
    /// The guest took a vector it did not expect (the number is in the detail).
    StrayVector,
    /// The guest's `int3` did not reach its IDT handler (Linux runs an int3 self-test at boot).
    SoftwareInterruptFailed,
    UnexpectedExit,
    KvmRunError,
    TimedOut,
    SetupFailed,
    NotRun,
}

/// Result of actually running a guest that takes IOAPIC interrupts.
#[derive(Debug, Clone, Serialize)]
pub struct InterruptProbe {
    pub works: bool,
    pub outcome: ProbeOutcome,
    pub detail: String,
    /// What the guest wrote to port 0xe9: 'S' started, 'I' interrupt handled,
    /// 'D'/'G'/'P' double fault / #GP / #PF handler reached.
    pub guest_output: String,
    /// VM creation and vCPU setup.
    pub setup_us: u64,
    /// From VM creation to a conclusive result (or the timeout).
    pub elapsed_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cgroups {
    /// "v2", "v1", "hybrid" (v1 controllers plus a cgroup2 mount) or "none".
    pub version: String,
    pub root: String,
    pub v1_controllers: Vec<String>,
    /// Where the cgroup2 hierarchy is mounted, if anywhere.
    pub v2_path: Option<String>,
    pub v2_controllers: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Userfaultfd {
    pub device: DeviceNode,
    pub syscall_works: bool,
    pub syscall_error: Option<String>,
    /// /proc/sys/vm/unprivileged_userfaultfd, when readable.
    pub unprivileged_userfaultfd: Option<u32>,
}

/// A device node: present, and whether it opens read-write.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceNode {
    pub path: String,
    pub exists: bool,
    pub opens: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Vhost {
    pub vsock: DeviceNode,
    pub net: DeviceNode,
}

#[derive(Debug, Clone, Serialize)]
pub struct Vfio {
    pub container: DeviceNode,
    /// An IOMMU is active: /sys/class/iommu or /sys/kernel/iommu_groups is non-empty.
    pub iommu_enabled: bool,
    pub iommu_units: Vec<String>,
    pub iommu_group_count: usize,
    pub iommu_groups: Vec<IommuGroup>,
    /// PCI devices bound to vfio-pci.
    pub vfio_pci_devices: Vec<VfioPciDevice>,
    /// Unexpected sysfs read errors (absence is not an error).
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IommuGroup {
    pub group: String,
    /// PCI addresses, e.g. "0000:01:00.0".
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VfioPciDevice {
    pub address: String,
    pub iommu_group: Option<String>,
    /// "vendor:device" in hex, e.g. "10de:1eb8".
    pub id: Option<String>,
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

/// Probes the host. Never panics: every failure is recorded in the report.
pub fn check_host() -> HostReport {
    let start = Instant::now();

    let (kvm, kvm_handle) = probe_kvm(Path::new("/dev/kvm"));
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let modules = dir_names(Path::new("/sys/module")).unwrap_or_default();
    let virtualization = virtualization_from(&cpuinfo, &modules);
    let interrupt_delivery = match &kvm_handle {
        Some(k) => interrupt_probe(k),
        None => InterruptProbe::not_run("not run: /dev/kvm is unavailable"),
    };
    drop(kvm_handle);

    let cgroups = cgroups_at(Path::new("/sys/fs/cgroup"));
    let userfaultfd = probe_userfaultfd();
    let tap = DeviceNode::probe(Path::new("/dev/net/tun"));
    let vhost = Vhost {
        vsock: DeviceNode::probe(Path::new("/dev/vhost-vsock")),
        net: DeviceNode::probe(Path::new("/dev/vhost-net")),
    };
    let vfio = vfio_scan(Path::new("/sys"), Path::new("/dev"));

    let (linux_guests, reason) = verdict(&kvm, &virtualization, &interrupt_delivery);
    HostReport {
        linux_guests,
        reason,
        kvm,
        virtualization,
        interrupt_delivery,
        cgroups,
        userfaultfd,
        tap,
        vhost,
        vfio,
        elapsed_us: micros(start.elapsed()),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// Verdict
// ---------------------------------------------------------------------------

/// The first blocking cause, phrased so the user knows what to do.
fn verdict(kvm: &KvmReport, virt: &Virtualization, probe: &InterruptProbe) -> (bool, String) {
    let hint = virtualization_hint(virt);
    let with_hint = |cause: String| match &hint {
        Some(h) => format!("{cause}; {h}"),
        None => cause,
    };

    if !kvm.exists {
        return (
            false,
            with_hint(format!(
                "{} does not exist: load kvm_intel or kvm_amd (with VT-x/AMD-V enabled in the firmware)",
                kvm.device
            )),
        );
    }
    if !kvm.opens {
        let err = kvm.error.as_deref().unwrap_or("unknown error");
        let advice = if err.contains("ermission denied") {
            ": run as root or as a member of the group that owns it (usually kvm)"
        } else {
            ""
        };
        return (
            false,
            format!("{} cannot be opened read-write ({err}){advice}", kvm.device),
        );
    }
    if !kvm.api_version_ok {
        let v = kvm
            .api_version
            .map_or_else(|| "unknown".to_string(), |v| v.to_string());
        return (
            false,
            format!(
                "KVM API version is {v}, not {KVM_API_VERSION}: this kernel's KVM is unsupported"
            ),
        );
    }
    if !kvm.missing_required.is_empty() {
        return (
            false,
            with_hint(format!(
                "KVM lacks required capabilities {}: use a newer kernel with full KVM support",
                kvm.missing_required.join(", ")
            )),
        );
    }
    if !probe.works {
        return (
            false,
            with_hint(format!(
                "interrupt delivery to a guest fails here ({})",
                probe.detail
            )),
        );
    }
    let mut reason = "hardware KVM with working interrupt delivery".to_string();
    if virt.kind == "nested" {
        reason =
            "nested KVM (this host is itself a virtual machine) with working interrupt delivery: \
                  Linux guests run, but expect them slower than on bare metal"
                .to_string();
    }
    let run_us = probe.elapsed_us.saturating_sub(probe.setup_us);
    if run_us > SLOW_PROBE_US {
        reason.push_str(&format!(
            "; slow: the interrupt probe ran {} ms (well under 10 ms on bare metal), so boots take \
             seconds to minutes: give the daemon a longer --agent-ready-timeout-s",
            run_us / 1000
        ));
    }
    (true, reason)
}

fn virtualization_hint(virt: &Virtualization) -> Option<String> {
    if virt.kind.starts_with("paravirtual") {
        Some(
            "this host's KVM is paravirtual (kvm_pvm), which cannot run Linux guests: \
             use a host with hardware virtualization (VT-x/AMD-V)"
                .to_string(),
        )
    } else if virt.kind == "nested" {
        Some(
            "this host is itself a virtual machine (nested virtualization): \
             use bare metal with VT-x/AMD-V if the outer hypervisor cannot pass this through"
                .to_string(),
        )
    } else if virt.kind == "none" {
        Some(
            "the CPU reports no vmx/svm flag: enable VT-x/AMD-V in the firmware \
             or use a host that has it"
                .to_string(),
        )
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// /dev/kvm and capabilities
// ---------------------------------------------------------------------------

fn probe_kvm(path: &Path) -> (KvmReport, Option<Kvm>) {
    let mut report = KvmReport {
        device: path.display().to_string(),
        exists: path.exists(),
        opens: false,
        error: None,
        api_version: None,
        api_version_ok: false,
        capabilities: BTreeMap::new(),
        missing_required: Vec::new(),
        max_vcpus: None,
    };
    if !report.exists {
        report.error = Some("no such device".to_string());
        return (report, None);
    }
    let cpath = match CString::new(path.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => {
            report.error = Some(e.to_string());
            return (report, None);
        }
    };
    // Opens O_RDWR | O_CLOEXEC.
    let kvm = match Kvm::new_with_path(cpath) {
        Ok(k) => k,
        Err(e) => {
            report.error = Some(e.to_string());
            return (report, None);
        }
    };
    report.opens = true;
    let version = kvm.get_api_version();
    report.api_version = Some(version);
    report.api_version_ok = version == KVM_API_VERSION;
    for &(name, cap, required) in CAPABILITIES {
        let present = kvm.check_extension(cap);
        report.capabilities.insert(name.to_string(), present);
        if required && !present {
            report.missing_required.push(name.to_string());
        }
    }
    report.max_vcpus = Some(kvm.get_max_vcpus());
    (report, Some(kvm))
}

// ---------------------------------------------------------------------------
// Virtualization kind
// ---------------------------------------------------------------------------

/// Classifies the virtualization from /proc/cpuinfo text and /sys/module entry names.
fn virtualization_from(cpuinfo: &str, modules: &[String]) -> Virtualization {
    // Only the "flags" key: newer kernels also have "vmx flags" lines.
    let flags: BTreeSet<&str> = cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .flat_map(|(_, v)| v.split_whitespace())
        .collect();
    let cpu_flags: Vec<String> = ["vmx", "svm", "hypervisor"]
        .iter()
        .filter(|f| flags.contains(**f))
        .map(|f| f.to_string())
        .collect();
    let mut kvm_modules: Vec<String> = modules
        .iter()
        .filter(|m| *m == "kvm" || m.starts_with("kvm_"))
        .cloned()
        .collect();
    kvm_modules.sort();
    kvm_modules.dedup();

    let has = |f: &str| flags.contains(f);
    // kvm_pvm first: it serves /dev/kvm without vmx/svm, whatever the flags say.
    let kind = if kvm_modules.iter().any(|m| m == "kvm_pvm") {
        "paravirtual (kvm_pvm)"
    } else if has("vmx") || has("svm") {
        if has("hypervisor") {
            "nested"
        } else if has("vmx") {
            "hardware (vmx)"
        } else {
            "hardware (svm)"
        }
    } else if flags.is_empty() {
        "unknown"
    } else {
        "none"
    };
    Virtualization {
        kind: kind.to_string(),
        cpu_flags,
        kvm_modules,
    }
}

// ---------------------------------------------------------------------------
// Interrupt-delivery probe (grown from shared/host-kvm/interrupt.c: it also masks the legacy
// PICs and takes an int3 first, as a Linux guest does, and reports stray vectors by number)
// ---------------------------------------------------------------------------

const PROBE_MEM_SIZE: usize = 16 << 20;
const TSS_ADDR: usize = 0xfffb_d000;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD_LOW: usize = 0x3000;
const IDT: usize = 0x4000;
const PD_3G: usize = 0x5000;
const GDT: usize = 0x500;
const IRQ_HANDLER: usize = 0x6000;
const FAULT_HANDLERS: usize = 0x6200;
const STACK_TOP: u64 = 0x7000;
const GUEST_TSS: usize = 0x7800;
const CODE: usize = 0x8000;
const STRAY_HANDLERS: usize = 0x9000;
const PROBE_VECTOR: usize = 0x30;
const IMAGE_SIZE: usize = 0x9800;
const INT3_HANDLER: usize = IRQ_HANDLER + 0x40;

/// Fault vectors whose handlers print a letter and halt: #DF, #GP, #PF.
const FAULTS: [(u8, usize); 3] = [(b'D', 8), (b'G', 13), (b'P', 14)];

/// 64-bit interrupt gate to `handler` in code segment 8.
fn idt_gate(handler: u64) -> (u64, u64) {
    let low = (handler & 0xffff) | (8 << 16) | (0x8e << 40) | (((handler >> 16) & 0xffff) << 48);
    (low, handler >> 32)
}

fn put(image: &mut [u8], at: usize, bytes: &[u8]) {
    // Offsets are constants inside IMAGE_SIZE (checked by the tests); never panic.
    if let Some(dst) = image.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn put_u64(image: &mut [u8], at: usize, v: u64) {
    put(image, at, &v.to_le_bytes());
}

/// The first IMAGE_SIZE bytes of guest memory: page tables, GDT, IDT, TSS,
/// handlers and code (interrupt.c's layout, plus the int3 and catch-all handlers).
fn probe_guest_image() -> Vec<u8> {
    let mut m = vec![0u8; IMAGE_SIZE];
    // Identity map: 16 MiB of RAM with 2 MiB pages, and 3-4 GiB (IOAPIC, LAPIC)
    // uncached through a PD rather than a 1 GiB page, which needs pdpe1gb.
    put_u64(&mut m, PML4, PDPT as u64 | 3);
    put_u64(&mut m, PDPT, PD_LOW as u64 | 3);
    put_u64(&mut m, PDPT + 3 * 8, PD_3G as u64 | 3);
    for i in 0..8u64 {
        put_u64(&mut m, PD_LOW + i as usize * 8, (i << 21) | 0x83);
    }
    for i in 0..512u64 {
        put_u64(
            &mut m,
            PD_3G + i as usize * 8,
            (0xc000_0000 + (i << 21)) | 0x83 | 0x10,
        );
    }
    // GDT: null, 64-bit code (8), data (16), TSS (24, two slots).
    put_u64(&mut m, GDT, 0);
    put_u64(&mut m, GDT + 8, 0x00af_9b00_0000_ffff);
    put_u64(&mut m, GDT + 16, 0x00cf_9300_0000_ffff);
    put_u64(
        &mut m,
        GDT + 24,
        0x67 | ((GUEST_TSS as u64 & 0xff_ffff) << 16) | (0x8b << 40),
    );
    put_u64(&mut m, GDT + 32, 0);
    // TSS.RSP0
    put_u64(&mut m, GUEST_TSS + 4, STACK_TOP);

    // Vector 0x30: out 0xe9,'I'; mov dword [0xfee000b0],0 (LAPIC EOI); iretq
    let (lo, hi) = idt_gate(IRQ_HANDLER as u64);
    put_u64(&mut m, IDT + PROBE_VECTOR * 16, lo);
    put_u64(&mut m, IDT + PROBE_VECTOR * 16 + 8, hi);
    put(
        &mut m,
        IRQ_HANDLER,
        &[
            0xb0, b'I', 0xe6, 0xe9, 0xb8, 0xb0, 0x00, 0xe0, 0xfe, 0xc7, 0x00, 0, 0, 0, 0, 0x48,
            0xcf,
        ],
    );
    // Vector 3 (int3): out 0xe9,'B'; iretq
    let (lo, hi) = idt_gate(INT3_HANDLER as u64);
    put_u64(&mut m, IDT + 3 * 16, lo);
    put_u64(&mut m, IDT + 3 * 16 + 8, hi);
    put(&mut m, INT3_HANDLER, &[0xb0, b'B', 0xe6, 0xe9, 0x48, 0xcf]);
    // Every other vector: out 0xea,<vector>; L: hlt; jmp L. A stray interrupt (from the legacy
    // PIC, say) is then reported by number instead of escalating to a #GP or #DF that looks
    // like a broken host.
    for vector in 0..256usize {
        if vector == 3 || vector == PROBE_VECTOR || FAULTS.iter().any(|&(_, v)| v == vector) {
            continue;
        }
        let at = STRAY_HANDLERS + vector * 8;
        put(
            &mut m,
            at,
            &[0xb0, vector as u8, 0xe6, 0xea, 0xf4, 0xeb, 0xfd],
        );
        let (lo, hi) = idt_gate(at as u64);
        put_u64(&mut m, IDT + vector * 16, lo);
        put_u64(&mut m, IDT + vector * 16 + 8, hi);
    }
    // Fault handlers: out 0xe9,<letter>; L: hlt; jmp L
    for (k, (letter, vector)) in FAULTS.iter().enumerate() {
        let at = FAULT_HANDLERS + k * 16;
        put(&mut m, at, &[0xb0, *letter, 0xe6, 0xe9, 0xf4, 0xeb, 0xfd]);
        let (lo, hi) = idt_gate(at as u64);
        put_u64(&mut m, IDT + vector * 16, lo);
        put_u64(&mut m, IDT + vector * 16 + 8, hi);
    }
    // Main code, in the order a Linux guest does the same things:
    //   mov al,0xff; out 0x21,al; out 0xa1,al            mask both 8259 PICs: the irqfd's GSI
    //                                                    also reaches the PIC, whose pin 5 would
    //                                                    arrive through LINT0 (ExtINT) as a stray
    //                                                    vector; Linux masks them for the IOAPIC
    //   int3                                             software interrupt -> 'B' (Linux's
    //                                                    int3 self-test needs this)
    //   mov eax,0xfee000f0; mov dword [rax],0x1ff       LAPIC SVR: enable
    //   mov eax,0xfec00000; mov dword [rax],0x1a        IOREGSEL = redir 5 low
    //   mov eax,0xfec00010; mov dword [rax],0x30        IOWIN = vector 0x30, edge, unmasked
    //   mov eax,0xfec00000; mov dword [rax],0x1b        IOREGSEL = redir 5 high
    //   mov eax,0xfec00010; mov dword [rax],0           IOWIN = destination APIC 0
    //   sti; out 0xe9,'S'; L: hlt; jmp L
    put(
        &mut m,
        CODE,
        &[
            0xb0, 0xff, 0xe6, 0x21, 0xe6, 0xa1, //
            0xcc, //
            0xb8, 0xf0, 0x00, 0xe0, 0xfe, 0xc7, 0x00, 0xff, 0x01, 0x00, 0x00, //
            0xb8, 0x00, 0x00, 0xc0, 0xfe, 0xc7, 0x00, 0x1a, 0x00, 0x00, 0x00, //
            0xb8, 0x10, 0x00, 0xc0, 0xfe, 0xc7, 0x00, 0x30, 0x00, 0x00, 0x00, //
            0xb8, 0x00, 0x00, 0xc0, 0xfe, 0xc7, 0x00, 0x1b, 0x00, 0x00, 0x00, //
            0xb8, 0x10, 0x00, 0xc0, 0xfe, 0xc7, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0xfb, 0xb0, b'S', 0xe6, 0xe9, 0xf4, 0xeb, 0xfd,
        ],
    );
    m
}

/// Long mode with paging, flat segments and the guest TSS, as interrupt.c sets them.
fn probe_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 8,
        present: 1,
        type_: 11,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 16,
        present: 1,
        type_: 3,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    };
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: GUEST_TSS as u64,
        limit: 0x67,
        selector: 24,
        present: 1,
        type_: 11,
        s: 0,
        ..Default::default()
    };
    s.gdt.base = GDT as u64;
    s.gdt.limit = 39;
    s.idt.base = IDT as u64;
    s.idt.limit = 0xfff;
    s.cr3 = PML4 as u64;
    s.cr4 = 0x20; // PAE
    s.cr0 = 0x8000_0011; // PG | ET | PE
    s.efer = 0x500; // LMA | LME
    s
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_MASK: u32 = 0x700;
const APIC_MODE_EXTINT: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x400;

fn lapic_reg(regs: &[c_char], off: usize) -> u32 {
    let b = |i: usize| regs.get(off + i).map_or(0, |&c| c as u8);
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [c_char], off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        if let Some(r) = regs.get_mut(off + i) {
            *r = *byte as c_char;
        }
    }
}

/// LINT0 = ExtINT, LINT1 = NMI, as firecracker and interrupt.c set them.
fn configure_lints(la: &mut kvm_lapic_state) {
    let lint0 = lapic_reg(&la.regs, APIC_LVT_LINT0);
    set_lapic_reg(
        &mut la.regs,
        APIC_LVT_LINT0,
        (lint0 & !APIC_MODE_MASK) | APIC_MODE_EXTINT,
    );
    let lint1 = lapic_reg(&la.regs, APIC_LVT_LINT1);
    set_lapic_reg(
        &mut la.regs,
        APIC_LVT_LINT1,
        (lint1 & !APIC_MODE_MASK) | APIC_MODE_NMI,
    );
}

/// The probe VM. Field order is drop order: the vCPU goes before the VM, and
/// guest memory is unmapped last.
struct ProbeVm {
    vcpu: VcpuFd,
    irq: EventFd,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    /// Non-fatal setup problems, reported alongside the result.
    notes: Vec<String>,
}

fn step<T, E: Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what} failed: {e}"))
}

impl ProbeVm {
    fn new(kvm: &Kvm, image: &[u8]) -> Result<Self, String> {
        let mut notes = Vec::new();
        let vm = step("KVM_CREATE_VM", kvm.create_vm())?;
        if let Err(e) = vm.set_tss_address(TSS_ADDR) {
            notes.push(format!("KVM_SET_TSS_ADDR failed: {e}"));
        }

        // Memory before the irqchip and vCPU: on some hosts a memslot added
        // afterwards costs ~50x more (KVM waits for its SRCU readers).
        let mem = step(
            "allocating guest memory",
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PROBE_MEM_SIZE)]),
        )?;
        step(
            "writing the guest image",
            mem.write_slice(image, GuestAddress(0)),
        )?;
        let host_addr = step(
            "locating guest memory",
            mem.get_host_address(GuestAddress(0)),
        )?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: PROBE_MEM_SIZE as u64,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: `host_addr` is the start of a PROBE_MEM_SIZE mapping owned by
        // `mem`, which lives in the returned ProbeVm and is dropped after the VM fd.
        step("KVM_SET_USER_MEMORY_REGION", unsafe {
            vm.set_user_memory_region(region)
        })?;

        step("KVM_CREATE_IRQCHIP", vm.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        if let Err(e) = vm.create_pit2(pit) {
            notes.push(format!("KVM_CREATE_PIT2 failed: {e}"));
        }

        let vcpu = step("KVM_CREATE_VCPU", vm.create_vcpu(0))?;
        let cpuid = step(
            "KVM_GET_SUPPORTED_CPUID",
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        step("KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
        let mut lapic = step("KVM_GET_LAPIC", vcpu.get_lapic())?;
        configure_lints(&mut lapic);
        step("KVM_SET_LAPIC", vcpu.set_lapic(&lapic))?;
        let sregs = step("KVM_GET_SREGS", vcpu.get_sregs())?;
        step("KVM_SET_SREGS", vcpu.set_sregs(&probe_sregs(sregs)))?;
        let regs = kvm_regs {
            rip: CODE as u64,
            rsp: STACK_TOP,
            rflags: 2,
            ..Default::default()
        };
        step("KVM_SET_REGS", vcpu.set_regs(&regs))?;

        let irq = step("eventfd", EventFd::new(libc::EFD_CLOEXEC))?;
        step("KVM_IRQFD", vm.register_irqfd(&irq, PROBE_GSI))?;

        Ok(ProbeVm {
            vcpu,
            irq,
            _vm: vm,
            _mem: mem,
            notes,
        })
    }

    /// Runs the guest until it is conclusive or `stop` is set.
    fn run(&mut self, stop: &AtomicBool, output: &Mutex<Vec<u8>>) -> VcpuEnd {
        let mut round_trips = 0u32;
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuEnd::Stopped;
            }
            // Owned summary of the exit, so the vCPU is free to query afterwards.
            let exit = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(PROBE_PORT, data)) => Exit::Debug(data.first().copied()),
                Ok(VcpuExit::IoOut(STRAY_VECTOR_PORT, data)) => {
                    return VcpuEnd::StrayVector(data.first().copied().unwrap_or(0));
                }
                Ok(VcpuExit::Hlt) => continue,
                Ok(VcpuExit::Shutdown) => {
                    Exit::Other("KVM_EXIT_SHUTDOWN (the guest triple-faulted)".to_string())
                }
                Ok(VcpuExit::InternalError) => Exit::Internal,
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return VcpuEnd::RunError(format!("KVM_RUN failed: {e}")),
            };
            let c = match exit {
                Exit::Debug(c) => c,
                Exit::Internal => {
                    let run = self.vcpu.get_kvm_run();
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel
                    // filled the `internal` member of the union.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    let what = if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                        " (emulation failure)"
                    } else {
                        ""
                    };
                    return VcpuEnd::Exit(format!(
                        "KVM_EXIT_INTERNAL_ERROR, suberror {suberror}{what}{}",
                        self.rip()
                    ));
                }
                Exit::Other(what) => return VcpuEnd::Exit(format!("{what}{}", self.rip())),
            };
            let Some(c) = c else {
                return VcpuEnd::Exit("an empty write to port 0xe9".to_string());
            };
            if let Ok(mut out) = output.lock() {
                out.push(c);
            }
            match c {
                b'B' => {}
                b'S' | b'I' => {
                    round_trips += 1;
                    if round_trips >= PROBE_ROUND_TRIPS {
                        return VcpuEnd::Delivered;
                    }
                    if let Err(e) = self.irq.write(1) {
                        return VcpuEnd::RunError(format!("writing the irqfd failed: {e}"));
                    }
                }
                b'D' | b'G' | b'P' => return VcpuEnd::Fault(c),
                _ => {
                    return VcpuEnd::Exit(format!(
                        "unexpected byte {c:#04x} on port {PROBE_PORT:#x}"
                    ))
                }
            }
        }
    }

    fn rip(&self) -> String {
        match self.vcpu.get_regs() {
            Ok(r) => format!(" at rip {:#x}", r.rip),
            Err(_) => String::new(),
        }
    }
}

enum Exit {
    Debug(Option<u8>),
    Internal,
    Other(String),
}

/// How the vCPU thread ended.
enum VcpuEnd {
    Delivered,
    Fault(u8),
    StrayVector(u8),
    Exit(String),
    RunError(String),
    Stopped,
}

impl InterruptProbe {
    fn not_run(detail: &str) -> Self {
        InterruptProbe {
            works: false,
            outcome: ProbeOutcome::NotRun,
            detail: detail.to_string(),
            guest_output: String::new(),
            setup_us: 0,
            elapsed_us: 0,
        }
    }
}

fn interrupt_probe(kvm: &Kvm) -> InterruptProbe {
    run_probe(kvm, &probe_guest_image(), PROBE_TIMEOUT)
}

/// Runs a probe guest on its own thread for at most `timeout` (plus a short
/// kick budget): the caller is never blocked on a stuck vCPU.
fn run_probe(kvm: &Kvm, image: &[u8], timeout: Duration) -> InterruptProbe {
    let start = Instant::now();
    let mut probe = InterruptProbe::not_run("");
    let mut vm = match ProbeVm::new(kvm, image) {
        Ok(vm) => vm,
        Err(e) => {
            probe.outcome = ProbeOutcome::SetupFailed;
            probe.detail = format!("the probe VM could not be set up: {e}");
            probe.elapsed_us = micros(start.elapsed());
            return probe;
        }
    };
    probe.setup_us = micros(start.elapsed());
    let notes = std::mem::take(&mut vm.notes);

    let stop = Arc::new(AtomicBool::new(false));
    let output = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let spawned = {
        let stop = Arc::clone(&stop);
        let output = Arc::clone(&output);
        thread::Builder::new()
            .name("check-host-vcpu".to_string())
            .spawn(move || {
                // The caller's mask may block the kick signal; this thread must see it.
                let _ = unblock_signal(kick_signal());
                let end = vm.run(&stop, &output);
                let _ = tx.send(end);
                // `vm` drops here, after the result is on its way.
            })
    };
    let handle = match spawned {
        Ok(h) => h,
        Err(e) => {
            probe.outcome = ProbeOutcome::SetupFailed;
            probe.detail = format!("could not start the vCPU thread: {e}");
            probe.elapsed_us = micros(start.elapsed());
            return probe;
        }
    };

    let remaining = timeout.saturating_sub(start.elapsed());
    let end = match rx.recv_timeout(remaining) {
        Ok(end) => {
            probe.elapsed_us = micros(start.elapsed());
            // The thread has sent its result and only drops the VM now.
            let _ = handle.join();
            end
        }
        Err(RecvTimeoutError::Timeout) => {
            probe.elapsed_us = micros(start.elapsed());
            stop.store(true, Ordering::Release);
            let stopped = kick_vcpu_thread(handle, &rx);
            let how = if stopped {
                "the vCPU thread was stopped"
            } else {
                "the vCPU thread could not be stopped and was left behind"
            };
            probe.outcome = ProbeOutcome::TimedOut;
            probe.detail =
                format!("timed out: nothing conclusive from the guest within {timeout:?}; {how}");
            VcpuEnd::Stopped
        }
        Err(RecvTimeoutError::Disconnected) => {
            probe.elapsed_us = micros(start.elapsed());
            let _ = handle.join();
            VcpuEnd::RunError("the vCPU thread ended without a result".to_string())
        }
    };

    let out = match output.lock() {
        Ok(o) => o.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let started = out.contains(&b'S');
    let int3_ok = out.contains(&b'B');
    let fault = |name: &str| {
        if started {
            format!("the guest took {name} on an IOAPIC interrupt")
        } else {
            format!("the guest took {name} before enabling interrupts")
        }
    };
    match end {
        VcpuEnd::Delivered => {
            probe.works = true;
            probe.outcome = ProbeOutcome::Delivered;
            probe.detail = format!(
                "delivered: {} interrupts on GSI {PROBE_GSI} (irqfd -> IOAPIC -> LAPIC -> vector {PROBE_VECTOR:#x}) reached the guest",
                PROBE_ROUND_TRIPS - 1
            );
        }
        VcpuEnd::Fault(c) => {
            let (outcome, name) = match c {
                b'D' => (ProbeOutcome::DoubleFault, "a double fault"),
                b'G' => (
                    ProbeOutcome::GeneralProtectionFault,
                    "a general-protection fault",
                ),
                _ => (ProbeOutcome::PageFault, "a page fault"),
            };
            probe.outcome = outcome;
            probe.detail = fault(name);
        }
        VcpuEnd::StrayVector(v) => {
            probe.outcome = ProbeOutcome::StrayVector;
            probe.detail = format!(
                "the guest took vector {v:#04x}, not the IOAPIC's {PROBE_VECTOR:#x}{}",
                if started {
                    ""
                } else {
                    ", before enabling interrupts"
                }
            );
        }
        VcpuEnd::Exit(what) if !int3_ok => {
            probe.outcome = ProbeOutcome::SoftwareInterruptFailed;
            probe.detail = format!(
                "a software interrupt (int3) did not reach the guest's IDT handler: the guest stopped with {what}"
            );
        }
        VcpuEnd::Exit(what) => {
            probe.outcome = ProbeOutcome::UnexpectedExit;
            probe.detail = format!("the guest stopped with {what}");
        }
        VcpuEnd::RunError(what) => {
            probe.outcome = ProbeOutcome::KvmRunError;
            probe.detail = what;
        }
        VcpuEnd::Stopped => {} // detail already set by the timeout path
    }
    if !notes.is_empty() {
        probe.detail = format!("{}; setup notes: {}", probe.detail, notes.join("; "));
    }
    probe.guest_output = out.escape_ascii().to_string();
    probe
}

/// The signal that interrupts KVM_RUN (SIGRTMIN, as firecracker uses for vCPU kicks).
fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {}

/// Makes sure the kick signal interrupts rather than kills: installs a no-op
/// handler unless the process already handles it (the VMM's own kick handler).
fn ensure_kick_handler() -> bool {
    let sig = kick_signal();
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only queries; the kernel writes the current one into `old`.
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: sigaction succeeded and initialized `old`; all-zero was valid anyway.
    let old = unsafe { old.assume_init() };
    match old.sa_sigaction {
        libc::SIG_DFL => register_signal_handler(sig, kick_handler).is_ok(),
        // Someone chose to ignore it: not ours to change, and it would not interrupt.
        libc::SIG_IGN => false,
        _ => true,
    }
}

/// Interrupts a vCPU thread that may be halted inside KVM_RUN. Returns whether it
/// ended within KICK_BUDGET; if not, it is detached and dies with the process.
fn kick_vcpu_thread(handle: JoinHandle<()>, rx: &Receiver<VcpuEnd>) -> bool {
    if !ensure_kick_handler() {
        return false;
    }
    let deadline = Instant::now() + KICK_BUDGET;
    // Repeat the signal: one sent just before the thread re-enters KVM_RUN is lost.
    while Instant::now() < deadline {
        let _ = handle.kill(kick_signal());
        if rx.recv_timeout(Duration::from_millis(5)).is_ok() {
            let _ = handle.join();
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------
// cgroups
// ---------------------------------------------------------------------------

/// Detects the cgroup layout under `root` (normally /sys/fs/cgroup).
fn cgroups_at(root: &Path) -> Cgroups {
    let mut v1 = BTreeSet::new();
    let mut error = None;
    match fs::read_dir(root) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                // A mounted v1 hierarchy has a `tasks` file; follows cpu -> cpu,cpuacct links.
                if !path.join("tasks").is_file() {
                    continue;
                }
                for part in name.split(',') {
                    if V1_CONTROLLERS.contains(&part) {
                        v1.insert(part.to_string());
                    }
                }
            }
        }
        Err(e) => error = Some(format!("{}: {e}", root.display())),
    }
    // cgroup2 at the root (unified) or at root/unified (systemd's hybrid layout).
    let v2_path = [root.to_path_buf(), root.join("unified")]
        .into_iter()
        .find(|p| p.join("cgroup.controllers").is_file());
    let v2_controllers = v2_path
        .as_ref()
        .and_then(|p| fs::read_to_string(p.join("cgroup.controllers")).ok())
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let version = match (v1.is_empty(), &v2_path) {
        (false, Some(_)) => "hybrid",
        (false, None) => "v1",
        (true, Some(_)) => "v2",
        (true, None) => "none",
    };
    Cgroups {
        version: version.to_string(),
        root: root.display().to_string(),
        v1_controllers: v1.into_iter().collect(),
        v2_path: v2_path.map(|p| p.display().to_string()),
        v2_controllers,
        error,
    }
}

// ---------------------------------------------------------------------------
// Device nodes, userfaultfd
// ---------------------------------------------------------------------------

impl DeviceNode {
    fn probe(path: &Path) -> DeviceNode {
        let exists = path.exists();
        let (opens, error) = if exists {
            // std opens with O_CLOEXEC; opening these nodes creates nothing lasting.
            match fs::OpenOptions::new().read(true).write(true).open(path) {
                Ok(_) => (true, None),
                Err(e) => (false, Some(e.to_string())),
            }
        } else {
            (false, None)
        };
        DeviceNode {
            path: path.display().to_string(),
            exists,
            opens,
            error,
        }
    }

    fn describe(&self) -> String {
        if !self.exists {
            format!("{} absent", self.path)
        } else if self.opens {
            format!("{} opens", self.path)
        } else {
            format!(
                "{} present but does not open ({})",
                self.path,
                self.error.as_deref().unwrap_or("unknown error")
            )
        }
    }
}

fn probe_userfaultfd() -> Userfaultfd {
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    let (syscall_works, syscall_error) = if fd >= 0 {
        // SAFETY: `fd` is a fresh descriptor that nothing else owns; OwnedFd closes it.
        drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        (true, None)
    } else {
        (false, Some(io::Error::last_os_error().to_string()))
    };
    Userfaultfd {
        device: DeviceNode::probe(Path::new("/dev/userfaultfd")),
        syscall_works,
        syscall_error,
        unprivileged_userfaultfd: fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    }
}

// ---------------------------------------------------------------------------
// VFIO and IOMMU
// ---------------------------------------------------------------------------

/// Sorted entry names of a directory; Ok(empty) when it does not exist.
fn dir_names(dir: &Path) -> Result<Vec<String>, String> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            Ok(names)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

fn link_basename(link: &Path) -> Option<String> {
    fs::read_link(link)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn read_hex_id(path: &Path) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    Some(s.strip_prefix("0x").unwrap_or(s).to_string())
}

/// IOMMU groups and vfio-pci bindings from sysfs under `sys` (normally /sys), and
/// the VFIO container node under `dev` (normally /dev).
fn vfio_scan(sys: &Path, dev: &Path) -> Vfio {
    let mut errors = Vec::new();
    let mut names = |dir: PathBuf| {
        dir_names(&dir).unwrap_or_else(|e| {
            errors.push(e);
            Vec::new()
        })
    };

    let iommu_units = names(sys.join("class/iommu"));
    let groups_dir = sys.join("kernel/iommu_groups");
    let mut group_ids = names(groups_dir.clone());
    // Numeric order: "2" before "10".
    group_ids.sort_by_key(|g| (g.parse::<u64>().unwrap_or(u64::MAX), g.clone()));
    let iommu_groups: Vec<IommuGroup> = group_ids
        .into_iter()
        .map(|g| {
            let devices = names(groups_dir.join(&g).join("devices"));
            IommuGroup { group: g, devices }
        })
        .collect();

    let pci_dir = sys.join("bus/pci/devices");
    let vfio_pci_devices = names(pci_dir.clone())
        .into_iter()
        .filter_map(|address| {
            let dev_dir = pci_dir.join(&address);
            if link_basename(&dev_dir.join("driver")).as_deref() != Some("vfio-pci") {
                return None;
            }
            let id = match (
                read_hex_id(&dev_dir.join("vendor")),
                read_hex_id(&dev_dir.join("device")),
            ) {
                (Some(v), Some(d)) => Some(format!("{v}:{d}")),
                _ => None,
            };
            Some(VfioPciDevice {
                iommu_group: link_basename(&dev_dir.join("iommu_group")),
                address,
                id,
            })
        })
        .collect();

    Vfio {
        container: DeviceNode::probe(&dev.join("vfio/vfio")),
        iommu_enabled: !iommu_units.is_empty() || !iommu_groups.is_empty(),
        iommu_units,
        iommu_group_count: iommu_groups.len(),
        iommu_groups,
        vfio_pci_devices,
        errors,
    }
}

// ---------------------------------------------------------------------------
// Text rendering
// ---------------------------------------------------------------------------

fn list_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_string()
    } else {
        items.join(", ")
    }
}

impl HostReport {
    /// Human-readable report: one line per item, ending with the verdict line.
    pub fn render_text(&self) -> String {
        let mut lines = Vec::new();
        let k = &self.kvm;
        if k.opens {
            let version = k.api_version.map_or("?".to_string(), |v| v.to_string());
            let ok = if k.api_version_ok {
                "ok"
            } else {
                "UNSUPPORTED"
            };
            lines.push(format!(
                "kvm: {} opens read-write, API version {version} ({ok}), max vCPUs {}",
                k.device,
                k.max_vcpus.map_or("?".to_string(), |v| v.to_string())
            ));
        } else if k.exists {
            lines.push(format!(
                "kvm: {} does not open read-write: {}",
                k.device,
                k.error.as_deref().unwrap_or("unknown error")
            ));
        } else {
            lines.push(format!("kvm: {} does not exist", k.device));
        }
        for &(name, _, required) in CAPABILITIES {
            if let Some(present) = k.capabilities.get(name) {
                lines.push(format!(
                    "kvm capability {name}: {}{}",
                    if *present { "present" } else { "ABSENT" },
                    if required { " (required)" } else { "" }
                ));
            }
        }

        let v = &self.virtualization;
        lines.push(format!(
            "virtualization: {} (cpu flags: {}; kvm modules: {})",
            v.kind,
            list_or(&v.cpu_flags, "no vmx/svm/hypervisor"),
            list_or(&v.kvm_modules, "none")
        ));

        let p = &self.interrupt_delivery;
        lines.push(format!(
            "interrupt delivery: {}: {} (guest output \"{}\", setup {} us, total {} us)",
            if p.works { "works" } else { "FAILS" },
            p.detail,
            p.guest_output,
            p.setup_us,
            p.elapsed_us
        ));

        let c = &self.cgroups;
        let v2 = match &c.v2_path {
            Some(path) => format!(
                "cgroup2 at {path} with controllers: {}",
                list_or(&c.v2_controllers, "none")
            ),
            None => "no cgroup2 mount".to_string(),
        };
        lines.push(format!(
            "cgroups: {} (v1 controllers: {}; {v2}){}",
            c.version,
            list_or(&c.v1_controllers, "none"),
            c.error
                .as_ref()
                .map_or(String::new(), |e| format!(" [error: {e}]"))
        ));

        let u = &self.userfaultfd;
        lines.push(format!(
            "userfaultfd: {}; syscall {}; vm.unprivileged_userfaultfd = {}",
            u.device.describe(),
            if u.syscall_works {
                "works".to_string()
            } else {
                format!(
                    "fails ({})",
                    u.syscall_error.as_deref().unwrap_or("unknown error")
                )
            },
            u.unprivileged_userfaultfd
                .map_or("unknown".to_string(), |v| v.to_string())
        ));
        lines.push(format!("tap: {}", self.tap.describe()));
        lines.push(format!(
            "vhost: {}; {}",
            self.vhost.vsock.describe(),
            self.vhost.net.describe()
        ));

        let f = &self.vfio;
        lines.push(format!(
            "vfio: {}; IOMMU {} ({} IOMMU groups, IOMMU units: {}); {} devices bound to vfio-pci",
            f.container.describe(),
            if f.iommu_enabled { "on" } else { "off" },
            f.iommu_group_count,
            list_or(&f.iommu_units, "none"),
            f.vfio_pci_devices.len()
        ));
        for d in &f.vfio_pci_devices {
            let group = d.iommu_group.as_deref().unwrap_or("?");
            let members = f
                .iommu_groups
                .iter()
                .find(|g| g.group == group)
                .map_or(String::new(), |g| {
                    format!(" (group members: {})", g.devices.join(", "))
                });
            lines.push(format!(
                "vfio-pci device {} [{}]: IOMMU group {group}{members}",
                d.address,
                d.id.as_deref().unwrap_or("?:?")
            ));
        }
        for e in &f.errors {
            lines.push(format!("vfio: sysfs error: {e}"));
        }

        lines.push(format!(
            "verdict: Linux guests {}: {}",
            if self.linux_guests { "YES" } else { "NO" },
            self.reason
        ));
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fresh, unique scratch directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::AtomicU32;
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "airlock-check-host-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    fn mods(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const CPUINFO_PVM: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr pae hypervisor lahf_lm\n\
        bugs\t\t: spectre_v1\n\nprocessor\t: 1\n\
        flags\t\t: fpu vme de pse tsc msr pae hypervisor lahf_lm\n";

    #[test]
    fn virtualization_kinds() {
        let bare_intel = "flags\t\t: fpu vmx sse2\nvmx flags\t: vnmi ept\n";
        let v = virtualization_from(bare_intel, &mods(&["kvm", "kvm_intel", "ext4"]));
        assert_eq!(v.kind, "hardware (vmx)");
        assert_eq!(v.cpu_flags, vec!["vmx"]);
        assert_eq!(v.kvm_modules, vec!["kvm", "kvm_intel"]);

        let v = virtualization_from("flags : fpu svm\n", &mods(&["kvm_amd", "kvm"]));
        assert_eq!(v.kind, "hardware (svm)");
        assert_eq!(v.kvm_modules, vec!["kvm", "kvm_amd"]);

        let v = virtualization_from("flags : fpu vmx hypervisor\n", &mods(&["kvm_intel"]));
        assert_eq!(v.kind, "nested");
        assert_eq!(v.cpu_flags, vec!["vmx", "hypervisor"]);

        let v = virtualization_from(CPUINFO_PVM, &mods(&["kvm", "kvm_pvm", "kvmgt_not"]));
        assert_eq!(v.kind, "paravirtual (kvm_pvm)");
        assert_eq!(v.cpu_flags, vec!["hypervisor"]);
        assert_eq!(v.kvm_modules, vec!["kvm", "kvm_pvm"]);

        // "vmx flags" alone is not the flags line.
        let v = virtualization_from("flags : fpu\nvmx flags : ept\n", &[]);
        assert_eq!(v.kind, "none");
        assert!(v.cpu_flags.is_empty());

        assert_eq!(virtualization_from("", &[]).kind, "unknown");
    }

    #[test]
    fn cgroup_layouts() {
        // v1 with a combined cpu,cpuacct mount and its symlinks, plus systemd's
        // named hierarchy (not a controller) and hybrid cgroup2 at unified/.
        let t = TempDir::new("cg-hybrid");
        for d in ["memory", "cpu,cpuacct", "pids", "systemd"] {
            write(&t.0.join(d).join("tasks"), "");
        }
        symlink(t.0.join("cpu,cpuacct"), t.0.join("cpu")).expect("symlink");
        write(&t.0.join("unified/cgroup.controllers"), "\n");
        let c = cgroups_at(&t.0);
        assert_eq!(c.version, "hybrid");
        assert_eq!(c.v1_controllers, vec!["cpu", "cpuacct", "memory", "pids"]);
        assert_eq!(c.v2_path, Some(t.0.join("unified").display().to_string()));
        assert!(c.v2_controllers.is_empty());

        // Pure v1.
        let t = TempDir::new("cg-v1");
        write(&t.0.join("memory/tasks"), "");
        fs::create_dir_all(t.0.join("blkio")).expect("mkdir"); // unmounted: no tasks
        let c = cgroups_at(&t.0);
        assert_eq!(c.version, "v1");
        assert_eq!(c.v1_controllers, vec!["memory"]);
        assert_eq!(c.v2_path, None);

        // Unified v2; child cgroups named like controllers are not v1.
        let t = TempDir::new("cg-v2");
        write(
            &t.0.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        );
        write(&t.0.join("memory/cgroup.procs"), "");
        let c = cgroups_at(&t.0);
        assert_eq!(c.version, "v2");
        assert!(c.v1_controllers.is_empty());
        assert_eq!(
            c.v2_controllers,
            vec!["cpuset", "cpu", "io", "memory", "pids"]
        );

        let c = cgroups_at(&t.0.join("nonexistent"));
        assert_eq!(c.version, "none");
        assert!(c.error.is_some());
    }

    #[test]
    fn vfio_fake_sysfs() {
        let t = TempDir::new("vfio");
        let sys = t.0.join("sys");
        let dev = t.0.join("dev");
        write(&sys.join("class/iommu/dmar0/uevent"), "");
        // Groups 2 and 10, with devices as symlinks into the PCI device tree.
        let pci = sys.join("bus/pci/devices");
        for (group, addrs) in [
            ("10", vec!["0000:02:00.0"]),
            ("2", vec!["0000:01:00.0", "0000:01:00.1"]),
        ] {
            let gdir = sys.join("kernel/iommu_groups").join(group).join("devices");
            fs::create_dir_all(&gdir).expect("mkdir");
            for a in addrs {
                let ddir = pci.join(a);
                fs::create_dir_all(&ddir).expect("mkdir");
                symlink(&ddir, gdir.join(a)).expect("symlink");
                symlink(
                    sys.join("kernel/iommu_groups").join(group),
                    ddir.join("iommu_group"),
                )
                .expect("symlink");
            }
        }
        let drivers = sys.join("bus/pci/drivers");
        fs::create_dir_all(drivers.join("vfio-pci")).expect("mkdir");
        fs::create_dir_all(drivers.join("snd_hda_intel")).expect("mkdir");
        let d0 = pci.join("0000:01:00.0");
        symlink(drivers.join("vfio-pci"), d0.join("driver")).expect("symlink");
        write(&d0.join("vendor"), "0x10de\n");
        write(&d0.join("device"), "0x1eb8\n");
        let d1 = pci.join("0000:01:00.1");
        symlink(drivers.join("snd_hda_intel"), d1.join("driver")).expect("symlink");
        // 02:00.0 has no driver at all.
        write(&dev.join("vfio/vfio"), "");

        let v = vfio_scan(&sys, &dev);
        assert!(v.errors.is_empty(), "{:?}", v.errors);
        assert!(v.container.exists);
        assert!(v.iommu_enabled);
        assert_eq!(v.iommu_units, vec!["dmar0"]);
        assert_eq!(v.iommu_group_count, 2);
        assert_eq!(v.iommu_groups[0].group, "2");
        assert_eq!(
            v.iommu_groups[0].devices,
            vec!["0000:01:00.0", "0000:01:00.1"]
        );
        assert_eq!(v.iommu_groups[1].group, "10");
        assert_eq!(v.vfio_pci_devices.len(), 1);
        let d = &v.vfio_pci_devices[0];
        assert_eq!(d.address, "0000:01:00.0");
        assert_eq!(d.iommu_group.as_deref(), Some("2"));
        assert_eq!(d.id.as_deref(), Some("10de:1eb8"));

        // Nothing there at all: no IOMMU, no errors.
        let empty = TempDir::new("vfio-empty");
        let v = vfio_scan(&empty.0, &empty.0);
        assert!(!v.iommu_enabled && !v.container.exists && v.errors.is_empty());
        assert_eq!(v.iommu_group_count, 0);
    }

    #[test]
    fn probe_guest_image_layout() {
        let m = probe_guest_image();
        let u64_at = |a: usize| u64::from_le_bytes(m[a..a + 8].try_into().expect("8 bytes"));
        assert_eq!(u64_at(0x1000), 0x2003);
        assert_eq!(u64_at(0x2000), 0x3003);
        assert_eq!(u64_at(0x2018), 0x5003);
        assert_eq!(u64_at(0x3000 + 7 * 8), (7 << 21) | 0x83);
        assert_eq!(u64_at(0x5000 + 511 * 8), 0xffe0_0000 | 0x93);
        assert_eq!(u64_at(0x508), 0x00af_9b00_0000_ffff);
        assert_eq!(u64_at(0x518), 0x0000_8b00_7800_0067);
        assert_eq!(u64_at(0x7804), 0x7000);
        // IDT gates: vector 0x30 -> 0x6000, #DF -> 0x6200, #GP -> 0x6210, #PF -> 0x6220.
        for (vector, handler) in [(0x30, 0x6000u64), (8, 0x6200), (13, 0x6210), (14, 0x6220)] {
            let lo = u64_at(0x4000 + vector * 16);
            assert_eq!(lo & 0xffff, handler, "vector {vector:#x}");
            assert_eq!((lo >> 16) & 0xffff, 8);
            assert_eq!((lo >> 40) & 0xff, 0x8e);
            assert_eq!(u64_at(0x4000 + vector * 16 + 8), 0);
        }
        assert_eq!(
            &m[0x6210..0x6217],
            &[0xb0, b'G', 0xe6, 0xe9, 0xf4, 0xeb, 0xfd]
        );
        // The PICs are masked and int3 taken before anything else.
        assert_eq!(
            &m[0x8000..0x8007],
            &[0xb0, 0xff, 0xe6, 0x21, 0xe6, 0xa1, 0xcc]
        );
        assert_eq!(
            &m[0x803e..0x8046],
            &[0xfb, 0xb0, b'S', 0xe6, 0xe9, 0xf4, 0xeb, 0xfd]
        );
        // int3 -> 'B' and back; every vector without its own handler reports its number.
        assert_eq!(u64_at(0x4000 + 3 * 16) & 0xffff, 0x6040);
        assert_eq!(&m[0x6040..0x6046], &[0xb0, b'B', 0xe6, 0xe9, 0x48, 0xcf]);
        for vector in [0usize, 5, 0x20, 0x2f, 0x31, 0xff] {
            let lo = u64_at(0x4000 + vector * 16);
            let at = 0x9000 + vector * 8;
            assert_eq!(lo & 0xffff, at as u64 & 0xffff, "vector {vector:#x}");
            assert_eq!(&m[at..at + 4], &[0xb0, vector as u8, 0xe6, 0xea]);
        }

        let s = probe_sregs(kvm_sregs::default());
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (8, 1, 0));
        assert_eq!((s.ss.selector, s.ss.db, s.tr.base), (16, 1, 0x7800));
        assert_eq!(
            (s.cr0, s.cr3, s.cr4, s.efer),
            (0x8000_0011, 0x1000, 0x20, 0x500)
        );
    }

    #[test]
    fn lapic_lints() {
        let mut la = kvm_lapic_state::default();
        set_lapic_reg(&mut la.regs, APIC_LVT_LINT0, 0x0001_0000); // masked, fixed
        set_lapic_reg(&mut la.regs, APIC_LVT_LINT1, 0x0001_0200);
        configure_lints(&mut la);
        assert_eq!(lapic_reg(&la.regs, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&la.regs, APIC_LVT_LINT1), 0x0001_0400);
    }

    fn kvm_ok() -> KvmReport {
        KvmReport {
            device: "/dev/kvm".into(),
            exists: true,
            opens: true,
            error: None,
            api_version: Some(12),
            api_version_ok: true,
            capabilities: BTreeMap::new(),
            missing_required: vec![],
            max_vcpus: Some(1024),
        }
    }

    #[test]
    fn verdicts() {
        let pvm = virtualization_from(CPUINFO_PVM, &mods(&["kvm", "kvm_pvm"]));
        let hw = virtualization_from("flags : vmx\n", &mods(&["kvm", "kvm_intel"]));
        let mut df =
            InterruptProbe::not_run("the guest took a double fault on an IOAPIC interrupt");
        df.outcome = ProbeOutcome::DoubleFault;
        let (ok, reason) = verdict(&kvm_ok(), &pvm, &df);
        assert!(!ok);
        assert_eq!(
            reason,
            "interrupt delivery to a guest fails here (the guest took a double fault on an \
             IOAPIC interrupt); this host's KVM is paravirtual (kvm_pvm), which cannot run \
             Linux guests: use a host with hardware virtualization (VT-x/AMD-V)"
        );

        let mut good = InterruptProbe::not_run("delivered");
        good.works = true;
        assert_eq!(
            verdict(&kvm_ok(), &hw, &good),
            (
                true,
                "hardware KVM with working interrupt delivery".to_string()
            )
        );

        let mut missing = kvm_ok();
        missing.exists = false;
        missing.opens = false;
        let (ok, reason) = verdict(&missing, &hw, &good);
        assert!(!ok && reason.starts_with("/dev/kvm does not exist"));

        let mut denied = kvm_ok();
        denied.opens = false;
        denied.error = Some("Permission denied (os error 13)".into());
        let (ok, reason) = verdict(&denied, &hw, &good);
        assert!(!ok && reason.contains("group"), "{reason}");

        let mut old = kvm_ok();
        old.api_version = Some(11);
        old.api_version_ok = false;
        assert!(verdict(&old, &hw, &good).1.contains("version is 11"));

        let mut caps = kvm_ok();
        caps.missing_required = vec!["KVM_CAP_IRQFD".into()];
        let (ok, reason) = verdict(&caps, &hw, &good);
        assert!(!ok && reason.contains("KVM_CAP_IRQFD"));
    }

    #[test]
    fn probe_times_out_and_stops_a_halted_vcpu() {
        let Ok(kvm) = Kvm::new() else {
            // Straight to stderr, in the one format tests/run-all.sh lists.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "NOT RUN probe_times_out_and_stops_a_halted_vcpu: /dev/kvm unavailable"
            );
            return;
        };
        // cli; hlt; jmp: the vCPU halts inside KVM_RUN with nothing to wake it.
        let mut image = probe_guest_image();
        put(&mut image, CODE, &[0xfa, 0xf4, 0xeb, 0xfd]);
        let timeout = Duration::from_millis(200);
        let t = Instant::now();
        let p = run_probe(&kvm, &image, timeout);
        let took = t.elapsed();
        println!("{p:?} in {took:?}");
        assert_eq!(p.outcome, ProbeOutcome::TimedOut, "{}", p.detail);
        assert!(!p.works);
        assert!(p.detail.contains("was stopped"), "{}", p.detail);
        assert!(took < timeout + KICK_BUDGET + Duration::from_millis(100));
    }

    #[test]
    fn check_host_on_this_machine() {
        let t = Instant::now();
        let report = check_host();
        let took = t.elapsed();
        let json = serde_json::to_value(&report).expect("serializes");
        println!("{}", serde_json::to_string_pretty(&json).expect("pretty"));
        println!("{}", report.render_text());
        println!("check_host() took {took:?}");

        let linux = json["linux_guests"]
            .as_bool()
            .expect("linux_guests is a bool");
        let reason = json["reason"].as_str().expect("reason is a string");
        assert!(!reason.is_empty());
        assert!(report
            .render_text()
            .trim_end()
            .lines()
            .last()
            .unwrap_or("")
            .starts_with("verdict:"));
        // The probe is bounded: its timeout plus the kick budget plus setup slack.
        assert!(
            took < PROBE_TIMEOUT + Duration::from_secs(3),
            "took {took:?}"
        );

        if Path::new("/sys/module/kvm_pvm").exists() {
            assert!(
                !linux,
                "kvm_pvm host reported as able to run Linux: {reason}"
            );
            assert!(!report.interrupt_delivery.works);
            assert_eq!(report.virtualization.kind, "paravirtual (kvm_pvm)");
        }
    }
}
