//! The KVM side of passthrough: the GSI routing table (KVM's default irqchip routes plus one MSI
//! route per vector), irqfds, and memory slots for BARs mapped straight into the guest.

use std::collections::BTreeMap;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_userspace_memory_region, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::device::GuestMapper;
use crate::devices::pci::msi::{InterruptRouter, IrqError, MsiMessage};

/// IOAPIC pins; GSIs below this are KVM's default irqchip routes, MSI GSIs come after.
pub const IOAPIC_PINS: u32 = 24;
/// KVM_MAX_IRQ_ROUTES on x86.
pub const MAX_ROUTES: u32 = 4096;
/// The first KVM memory slot for BAR mappings (guest RAM takes slots 0 and 1).
pub const FIRST_BAR_SLOT: u32 = 16;

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> IrqError {
    move |e| IrqError::Kvm {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// A second handle on the VM (a dup of its fd) that devices can keep.
pub fn shared_vm_fd(kvm: &Kvm, vm: &VmFd) -> Result<Arc<VmFd>, String> {
    // SAFETY: dup of a valid fd; the result is checked before use.
    let fd = unsafe { libc::dup(vm.as_raw_fd()) };
    if fd < 0 {
        return Err(format!(
            "cannot duplicate the VM fd: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a freshly duplicated KVM VM fd that nothing else owns.
    unsafe { kvm.create_vmfd_from_rawfd(fd) }
        .map(Arc::new)
        .map_err(|e| format!("cannot use the duplicated VM fd: {e}"))
}

/// KVM's default routing after KVM_CREATE_IRQCHIP: GSI n to IOAPIC pin n (0..24) and, for
/// 0..16, also to the PIC. KVM_SET_GSI_ROUTING replaces the whole table, so these stay in it.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            e.u.irqchip.pin = gsi % 8;
            v.push(e);
        }
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
        e.u.irqchip.pin = gsi;
        v.push(e);
    }
    v
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// [`InterruptRouter`] over KVM, shared by every passed-through device of a VM.
pub struct KvmInterruptRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

struct RouterState {
    next_gsi: u32,
    free: Vec<u32>,
    msi: BTreeMap<u32, MsiMessage>,
}

impl KvmInterruptRouter {
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(KvmInterruptRouter {
            vm,
            state: Mutex::new(RouterState {
                next_gsi: IOAPIC_PINS,
                free: Vec::new(),
                msi: BTreeMap::new(),
            }),
        })
    }

    fn commit(&self, state: &RouterState) -> Result<(), IrqError> {
        let mut entries = default_routes();
        entries.extend(state.msi.iter().map(|(&g, &m)| msi_route(g, m)));
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::NoFreeGsi)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(kvm_err("set the GSI routing table (KVM_SET_GSI_ROUTING)"))
    }
}

impl InterruptRouter for KvmInterruptRouter {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut s = crate::devices::bus::lock(&self.state);
        if let Some(g) = s.free.pop() {
            return Ok(g);
        }
        if s.next_gsi >= MAX_ROUTES {
            return Err(IrqError::NoFreeGsi);
        }
        s.next_gsi += 1;
        Ok(s.next_gsi - 1)
    }

    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
        let mut s = crate::devices::bus::lock(&self.state);
        s.msi.insert(gsi, msg);
        self.commit(&s)
    }

    fn remove_route(&self, gsi: u32) -> Result<(), IrqError> {
        let mut s = crate::devices::bus::lock(&self.state);
        if s.msi.remove(&gsi).is_some() {
            self.commit(&s)?;
        }
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(kvm_err("register an irqfd (KVM_IRQFD)"))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(kvm_err("unregister an irqfd (KVM_IRQFD)"))
    }

    fn register_irqfd_with_resample(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> Result<(), IrqError> {
        self.vm
            .register_irqfd_with_resample(fd, resample, gsi)
            .map_err(kvm_err("register a level-triggered irqfd (KVM_IRQFD)"))
    }
}

/// [`GuestMapper`] over KVM memory slots.
pub struct KvmGuestMapper {
    vm: Arc<VmFd>,
    next_slot: Mutex<u32>,
}

impl KvmGuestMapper {
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(KvmGuestMapper {
            vm,
            next_slot: Mutex::new(FIRST_BAR_SLOT),
        })
    }
}

impl GuestMapper for KvmGuestMapper {
    fn allocate_slot(&self) -> u32 {
        let mut s = crate::devices::bus::lock(&self.next_slot);
        *s += 1;
        *s - 1
    }

    fn map(&self, slot: u32, gpa: u64, len: u64, host_addr: u64) -> Result<(), String> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host_addr,
        };
        // SAFETY: `host_addr..+len` is a mapping of a device region owned by the passthrough
        // device, which unmaps the slot (below) before it drops the mapping.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM could not map a BAR at {gpa:#x}: {e}"))
    }

    fn unmap(&self, slot: u32) -> Result<(), String> {
        let region = kvm_userspace_memory_region {
            slot,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; no memory is referenced.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM could not unmap a BAR slot: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvms() {
        let r = default_routes();
        assert_eq!(r.len(), 16 + 24);
        // SAFETY: reading the irqchip variant of entries built as irqchip routes.
        let pins: Vec<(u32, u32, u32)> = r
            .iter()
            .map(|e| {
                (e.gsi, unsafe { e.u.irqchip.irqchip }, unsafe {
                    e.u.irqchip.pin
                })
            })
            .collect();
        assert!(pins.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        let m = msi_route(
            30,
            MsiMessage {
                address: 0x1_fee0_0000,
                data: 0x41,
            },
        );
        // SAFETY: reading the msi variant of an entry built as an MSI route.
        let (lo, hi, data) = unsafe { (m.u.msi.address_lo, m.u.msi.address_hi, m.u.msi.data) };
        assert_eq!(
            (m.type_, lo, hi, data),
            (KVM_IRQ_ROUTING_MSI, 0xfee0_0000, 1, 0x41)
        );
    }
}
