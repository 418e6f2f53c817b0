//! A vCPU's complete architectural state, as KVM exposes it, for snapshots.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Saved in this order and restored in the order [`VcpuState::restore`] uses, which follows
/// Firecracker's: CPUID first, MSRs after the LAPIC, events last.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
#[error("vCPU {index}: cannot {what}: {source}")]
pub struct VcpuStateError {
    pub index: u8,
    pub what: &'static str,
    pub source: kvm_ioctls::Error,
}

/// MSRs KVM reports but refuses to read or write on some hosts are skipped one by one: a failed
/// KVM_GET_MSRS stops at the first refused index.
fn readable_msrs(fd: &VcpuFd, indices: &[u32]) -> Vec<kvm_msr_entry> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let read = fd.get_msrs(&mut msrs).unwrap_or(0);
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the index KVM refused and go on after it.
        rest = &rest[(read + 1).min(rest.len())..];
    }
    saved
}

/// KVM's MSR lists hold at most this many entries per call.
const MSR_BATCH: usize = 256;

impl VcpuState {
    pub fn save(index: u8, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
        let err = |what| {
            move |source| VcpuStateError {
                index,
                what,
                source,
            }
        };
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(err("read CPUID"))?;
        let mut msrs = Vec::new();
        for batch in msr_indices.chunks(MSR_BATCH) {
            msrs.extend(readable_msrs(fd, batch));
        }
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(err("read MP state"))?,
            regs: fd.get_regs().map_err(err("read registers"))?,
            sregs: fd.get_sregs().map_err(err("read special registers"))?,
            xsave: fd.get_xsave().map_err(err("read XSAVE state"))?,
            xcrs: fd.get_xcrs().map_err(err("read XCRs"))?,
            debug_regs: fd.get_debug_regs().map_err(err("read debug registers"))?,
            lapic: fd.get_lapic().map_err(err("read the LAPIC"))?,
            msrs,
            vcpu_events: fd.get_vcpu_events().map_err(err("read pending events"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    pub fn restore(&self, index: u8, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let err = |what| {
            move |source| VcpuStateError {
                index,
                what,
                source,
            }
        };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError {
            index,
            what: "rebuild CPUID",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        fd.set_cpuid2(&cpuid).map_err(err("set CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            // A host with another TSC frequency may refuse; the guest's kvmclock copes.
            let _ = fd.set_tsc_khz(khz);
        }
        fd.set_mp_state(self.mp_state)
            .map_err(err("set MP state"))?;
        fd.set_regs(&self.regs).map_err(err("set registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(err("set special registers"))?;
        // SAFETY: the buffer is a whole kvm_xsave read from KVM by VcpuState::save, at the legacy
        // 4 KiB size that KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err("set XSAVE state"))?;
        fd.set_xcrs(&self.xcrs).map_err(err("set XCRs"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(err("set debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(err("set the LAPIC"))?;
        for batch in self.msrs.chunks(MSR_BATCH) {
            let msrs = Msrs::from_entries(batch).map_err(|_| VcpuStateError {
                index,
                what: "rebuild MSRs",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
            let set = fd.set_msrs(&msrs).map_err(err("set MSRs"))?;
            if set != batch.len() {
                return Err(VcpuStateError {
                    index,
                    what: "set every saved MSR (this host's KVM refused one)",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(err("set pending events"))?;
        Ok(())
    }
}
