//! Per-vCPU CPUID: the host's KVM-supported set, with the hypervisor bit, this vCPU's APIC id,
//! the VM's topology and Airlock's brand string.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// The brand string every vCPU reports (leaves 0x8000_0002..=0x8000_0004).
pub const BRAND_STRING: &str = "Airlock Virtual CPU";

/// How the VM's vCPUs are arranged: one package, `threads_per_core` threads per core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub vcpu_count: u8,
    pub threads_per_core: u8,
}

impl Topology {
    pub fn new(vcpu_count: u8, smt: bool) -> Self {
        let threads_per_core = if smt && vcpu_count > 1 { 2 } else { 1 };
        Topology {
            vcpu_count,
            threads_per_core,
        }
    }
}

/// Bits needed to number `n` things (the width of an APIC-id field).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_BRAND_FIRST: u32 = 0x8000_0002;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

fn topology_entry(function: u32, index: u32, apic_id: u32, topo: Topology) -> kvm_cpuid_entry2 {
    let threads = u32::from(topo.threads_per_core);
    let vcpus = u32::from(topo.vcpu_count);
    let (eax, ebx, level_type) = match index {
        0 => (id_bits(threads), threads, 1),
        1 => (id_bits(vcpus), vcpus, 2),
        _ => (0, 0, 0),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | (index & 0xff),
        edx: apic_id,
        ..Default::default()
    }
}

fn brand_registers() -> [u32; 12] {
    let mut bytes = [0u8; 48];
    bytes[..BRAND_STRING.len()].copy_from_slice(BRAND_STRING.as_bytes());
    let mut regs = [0u32; 12];
    for (i, chunk) in bytes.chunks_exact(4).enumerate() {
        regs[i] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    regs
}

/// The CPUID entries for the vCPU with index (and APIC id) `cpu_index`.
pub fn vcpu_cpuid(supported: &CpuId, cpu_index: u8, topo: Topology) -> CpuId {
    let apic_id = u32::from(cpu_index);
    let brand = brand_registers();
    let mut entries: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 4);
    let mut topology_leaves = Vec::new();
    for entry in supported.as_slice() {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                let logical = u32::from(topo.vcpu_count).next_power_of_two().min(255);
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (logical << 16);
                e.ecx |= ECX_HYPERVISOR;
                if topo.vcpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    u32::from(topo.vcpu_count)
                } else {
                    u32::from(topo.threads_per_core)
                };
                let cores = u32::from(topo.vcpu_count / topo.threads_per_core).max(1);
                e.eax = (e.eax & 0x3fff) | ((sharing - 1) << 14) | ((cores - 1) << 26);
            }
            // No PMU is promised to guests: a guest that probes it must find none.
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                if !topology_leaves.contains(&e.function) {
                    topology_leaves.push(e.function);
                }
                continue;
            }
            f if (LEAF_BRAND_FIRST..LEAF_BRAND_FIRST + 3).contains(&f) => {
                let base = ((f - LEAF_BRAND_FIRST) * 4) as usize;
                e.eax = brand[base];
                e.ebx = brand[base + 1];
                e.ecx = brand[base + 2];
                e.edx = brand[base + 3];
            }
            _ => {}
        }
        entries.push(e);
    }
    // Topology leaves are rebuilt whole: the host's describe the host, not this VM.
    for function in topology_leaves {
        for index in 0..3 {
            entries.push(topology_entry(function, index, apic_id, topo));
        }
    }
    CpuId::from_entries(&entries).unwrap_or_else(|_| supported.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    fn host() -> CpuId {
        let mut cache = entry(4, 0);
        cache.eax = 1 << 5 | 1;
        let mut l3 = entry(4, 3);
        l3.eax = 3 << 5 | 3;
        CpuId::from_entries(&[
            entry(0, 0),
            entry(1, 0),
            cache,
            l3,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0002, 0),
            entry(0x8000_0003, 0),
            entry(0x8000_0004, 0),
        ])
        .unwrap()
    }

    #[test]
    fn sets_hypervisor_bit_and_apic_id() {
        let cpuid = vcpu_cpuid(&host(), 3, Topology::new(4, false));
        let leaf1 = find(&cpuid, 1, 0);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_describes_the_vm() {
        let cpuid = vcpu_cpuid(&host(), 2, Topology::new(6, false));
        let smt = find(&cpuid, 0xb, 0);
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((smt.ebx, smt.eax, smt.edx), (1, 0, 2));
        assert_eq!((core.ebx, core.eax, core.edx), (6, 3, 2));
        assert_eq!((core.ecx >> 8) & 0xff, 2);
        assert_eq!(find(&cpuid, 0xb, 2).ebx, 0);
        let smt2 = vcpu_cpuid(&host(), 0, Topology::new(4, true));
        assert_eq!(find(&smt2, 0xb, 0).ebx, 2);
    }

    #[test]
    fn cache_leaves_share_by_level() {
        let cpuid = vcpu_cpuid(&host(), 0, Topology::new(8, false));
        let l1 = find(&cpuid, 4, 0);
        let l3 = find(&cpuid, 4, 3);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 7);
        assert_eq!(l3.eax >> 26, 7);
    }

    #[test]
    fn brand_string_is_airlock() {
        let cpuid = vcpu_cpuid(&host(), 0, Topology::new(1, false));
        let mut bytes = Vec::new();
        for f in 0x8000_0002..=0x8000_0004 {
            let e = find(&cpuid, f, 0);
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                bytes.extend_from_slice(&r.to_le_bytes());
            }
        }
        assert!(bytes.starts_with(BRAND_STRING.as_bytes()));
        assert_eq!(bytes[BRAND_STRING.len()], 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let cpuid = vcpu_cpuid(&host(), 0, Topology::new(1, true));
        assert_eq!(find(&cpuid, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(32), 5);
    }
}
