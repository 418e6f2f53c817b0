//! The KVM VM: memory slots, the in-kernel irqchip and PIT, interrupt lines.

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::KVM_TSS_ADDRESS;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm? `airlock-vmm check-host` tells)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("this host's KVM lacks a capability airlock-vmm needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM could not {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
}

const REQUIRED_CAPS: [(Cap, &str); 5] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

/// The VM-wide KVM state a snapshot carries: the in-kernel PICs and IOAPIC, the PIT, kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl Vm {
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("create a VM", e))?;
        Ok(Vm { kvm, fd })
    }

    /// Registers every guest memory region as a KVM slot. Call before the irqchip and vCPUs
    /// exist: afterwards each slot change waits on KVM's readers (milliseconds, not microseconds).
    pub fn register_memory(&self, mem: &GuestMemoryMmap, dirty_log: bool) -> Result<(), VmError> {
        let flags = if dirty_log {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).map_err(|_| {
                VmError::Kvm("map guest memory", kvm_ioctls::Error::new(libc::EFAULT))
            })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region maps memory owned by `mem`, which the VMM keeps alive for as long
            // as the VM exists.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(|e| VmError::Kvm("register guest memory", e))?;
        }
        Ok(())
    }

    /// The in-kernel LAPICs, IOAPIC and PIC, and the PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| VmError::Kvm("create the PIT", e))
    }

    /// An interrupt line: writing the returned eventfd raises `gsi`.
    pub fn irq_line(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
            VmError::Kvm(
                "create an eventfd",
                kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        })?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| VmError::Kvm("register an irqfd", e))?;
        Ok(evt)
    }

    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("report its supported CPUID", e))
    }

    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|e| VmError::Kvm("read the irqchip", e))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self
                .fd
                .get_pit2()
                .map_err(|e| VmError::Kvm("read the PIT", e))?,
            clock: self
                .fd
                .get_clock()
                .map_err(|e| VmError::Kvm("read kvmclock", e))?,
        })
    }

    /// Restores what [`Vm::save_state`] read. The irqchip and PIT must exist already.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| VmError::Kvm("restore the irqchip", e))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| VmError::Kvm("restore the PIT", e))?;
        // Flags describe how the clock was read (e.g. whether it was stable); KVM_SET_CLOCK
        // takes only the value.
        let clock = kvm_clock_data {
            flags: 0,
            ..state.clock
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| VmError::Kvm("restore kvmclock", e))
    }

    /// The MSRs this host's KVM can save and restore.
    pub fn msr_indices(&self) -> Vec<u32> {
        self.kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .unwrap_or_default()
    }

    /// Pages written since the last call (or since dirty logging began), one bitmap of 64-page
    /// words per memory slot: KVM's log of what the vCPUs wrote, joined with the memory's own
    /// bitmap of what the VMM's devices wrote (KVM does not see those). Reading clears both.
    pub fn dirty_bitmaps(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                let mut words = self
                    .fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|e| VmError::Kvm("read the dirty page log", e))?;
                // The mapping's own bitmap (the region's `bitmap()` is a slice view of it).
                let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
                let by_devices = mapping.bitmap().get_and_reset();
                for (word, device_word) in words.iter_mut().zip(by_devices) {
                    *word |= device_word;
                }
                Ok(words)
            })
            .collect()
    }

    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError::Kvm("create a vCPU", e))
    }
}

/// Lets the VMM exit without waiting for KVM to tear the VM down.
///
/// Destroying a VM with an in-kernel irqchip waits out an SRCU grace period: 16-24 ms of idle
/// wall time on the development hosts (no CPU is spent), and most of a short VMM run. A forked
/// child inherits this process's descriptors, closes its stdio so whoever reads our output sees
/// it end with us, waits until this process has exited (the pipe's write end closes), then exits
/// too: the last reference to the VM, and with it the wait, goes with the child. The child holds
/// nothing this process did not, for as long as the teardown takes. Call it right before exiting.
pub fn defer_kvm_teardown() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array we pass.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    let [read_end, write_end] = fds;
    // SAFETY: fork in a multi-threaded process: the child calls only async-signal-safe
    // functions (close, read, _exit) before it exits.
    match unsafe { libc::fork() } {
        0 => {
            let mut byte = 0u8;
            // SAFETY: closing and reading our own descriptors; _exit never returns.
            unsafe {
                libc::close(write_end);
                libc::close(0);
                libc::close(1);
                libc::close(2);
                while libc::read(read_end, (&mut byte as *mut u8).cast(), 1) < 0 {}
                libc::_exit(0);
            }
        }
        // On fork failure the teardown simply happens in this process, as it would anyway.
        _ => {
            // SAFETY: closing our own descriptor; the write end stays open until we exit.
            unsafe { libc::close(read_end) };
        }
    }
}
