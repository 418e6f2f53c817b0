//! The builder's entry points: [`attach_pci`] puts the PCI root complex on the buses with the
//! test device and the passed-through devices, and [`write_pci_boot_tables`] writes the ACPI
//! tables and finishes the zero page. Nothing runs unless a device is configured.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::backend::VfioBackend;
use super::device::{BarWindows, GuestMapper, VfioPciDevice};
use super::kvm::{shared_vm_fd, KvmGuestMapper, KvmInterruptRouter};
use super::{sysfs, DevicePassthroughConfig, PassthroughError, PciAddress};
use crate::arch::mptable::ioapic_id;
use crate::devices::pci::acpi::{patch_zero_page, write_tables, AcpiLayout};
use crate::devices::pci::layout::{
    host_phys_bits, mmio64_window, WindowAllocator, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN,
    PCI_ECAM_BASE, PCI_ECAM_SIZE, PCI_IO_END, PCI_IO_START, PCI_MMIO32_END, PCI_MMIO32_START,
};
use crate::devices::pci::msi::{InterruptRouter, InterruptVectors};
use crate::devices::pci::test_device::{PciTestDevice, TEST_DEVICE_MSIX_VECTORS};
use crate::devices::pci::{PciConfigIo, PciEcam, PciRoot, PciWindow, SharedPciRoot};
use crate::devices::virtio::attach::{FIRST_VIRTIO_IRQ, LAST_VIRTIO_IRQ};
use crate::devices::Bus;
use crate::vstate::vm::Vm;

/// What the builder asks for.
pub struct PciOptions<'a> {
    pub passthrough: &'a [DevicePassthroughConfig],
    /// Put the emulated PCI test device on the bus (test guest `pci` scenario).
    pub test_device: bool,
    /// How many virtio-mmio devices took GSIs from [`FIRST_VIRTIO_IRQ`] up.
    pub virtio_count: usize,
}

/// The PCI root complex of a running VM.
pub struct PciSetup {
    pub root: SharedPciRoot,
    pub mmio64: (u64, u64),
    /// (slot, GSI) for INTx routing in the DSDT.
    pub intx: Vec<(u8, u32)>,
    /// The passed-through devices' host addresses (for refusals).
    pub passthrough: Vec<PciAddress>,
    /// Kept alive: DMA maps and the container live as long as the devices.
    _backends: Vec<Arc<dyn VfioBackend>>,
}

impl PciSetup {
    /// Whether snapshot, pause-for-snapshot and fork must be refused.
    pub fn has_passthrough(&self) -> bool {
        !self.passthrough.is_empty()
    }
}

/// GSIs for INTx of `count` PCI devices: from the IOAPIC's last pin down, above the virtio
/// devices' lines.
pub fn intx_gsi_plan(virtio_count: usize, count: usize) -> Result<Vec<u32>, String> {
    let first_free = FIRST_VIRTIO_IRQ as usize + virtio_count;
    let available = (LAST_VIRTIO_IRQ as usize + 1).saturating_sub(first_free);
    if count > available {
        return Err(format!(
            "{count} PCI devices need INTx lines but only {available} are left after {virtio_count} virtio devices; configure fewer devices"
        ));
    }
    Ok((0..count as u32).map(|i| LAST_VIRTIO_IRQ - i).collect())
}

/// Maps every guest memory region for device DMA at IOVA = guest physical address.
pub fn map_guest_memory(backend: &dyn VfioBackend, mem: &GuestMemoryMmap) -> Result<(), String> {
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| format!("guest memory: {e}"))?;
        // SAFETY: guest memory stays mapped for the life of the VM, which outlives the devices
        // (the VMM exits rather than unmapping it), and it is only ever shared with the guest.
        unsafe { backend.dma_map(region.start_addr().0, region.len(), host as u64) }.map_err(
            |e| {
                format!(
                    "cannot map guest memory for DMA ({:#x}+{:#x}): {e} (is RLIMIT_MEMLOCK at least the guest's memory size?)",
                    region.start_addr().0,
                    region.len()
                )
            },
        )?;
    }
    Ok(())
}

/// (slot, GSI) INTx routes, and the backends to keep alive.
pub type AddedDevices = (Vec<(u8, u32)>, Vec<Arc<dyn VfioBackend>>);

/// Opens each device (with `open`), maps guest memory for DMA once, and puts the devices on
/// `root`. Separate from [`attach_pci`] so tests can pass fake backends.
#[allow(clippy::too_many_arguments)]
pub fn add_passthrough_devices(
    root: &SharedPciRoot,
    windows: &mut BarWindows,
    router: Arc<dyn InterruptRouter>,
    mapper: Arc<dyn GuestMapper>,
    mem: &GuestMemoryMmap,
    devices: &[PciAddress],
    gsis: &[u32],
    mut open: impl FnMut(&PciAddress) -> Result<Arc<dyn VfioBackend>, String>,
) -> Result<AddedDevices, PassthroughError> {
    let mut intx = Vec::new();
    let mut backends = Vec::new();
    for (i, addr) in devices.iter().enumerate() {
        let vfio = |what, reason| PassthroughError::Vfio {
            addr: *addr,
            what,
            reason,
        };
        let backend = open(addr).map_err(|r| vfio("open", r))?;
        if i == 0 {
            // The container's IOMMU is set once the first group is in it: map memory now.
            map_guest_memory(backend.as_ref(), mem).map_err(|r| vfio("DMA map", r))?;
        }
        let gsi = gsis.get(i).copied();
        let dev = VfioPciDevice::new(
            *addr,
            backend.clone(),
            mapper.clone(),
            router.clone(),
            windows,
            gsi,
        )?;
        let slot = crate::devices::bus::lock(root)
            .add_device(Arc::new(Mutex::new(dev)))
            .map_err(|e| vfio("PCI bus", e.to_string()))?;
        if let Some(g) = gsi {
            intx.push((slot, g));
        }
        backends.push(backend);
    }
    Ok((intx, backends))
}

/// Puts the root complex on the buses (ports 0xcf8..0xd00 and the I/O window on `pio`; the
/// ECAM and both MMIO windows on `mmio`), then the test device and the passed-through devices.
/// Call after the irqchip and the virtio devices exist and before any vCPU runs. Returns None
/// (and touches nothing) when no PCI device is configured.
pub fn attach_pci(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    pio: &mut Bus,
    mmio: &mut Bus,
    opts: &PciOptions,
) -> Result<Option<PciSetup>, String> {
    if opts.passthrough.is_empty() && !opts.test_device {
        return Ok(None);
    }
    let sys = Path::new("/sys");
    let passthrough: Vec<PciAddress> = if sys.join("bus/pci/devices").exists() {
        sysfs::check_devices(sys, opts.passthrough)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|d| d.address)
            .collect()
    } else {
        // In a jail without /sys the jailer ran the same checks (docs/gpu-passthrough.md).
        opts.passthrough
            .iter()
            .map(DevicePassthroughConfig::validate)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?
    };
    let ram_end = mem
        .iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0);
    let mmio64 = mmio64_window(ram_end, host_phys_bits()).map_err(|e| e.to_string())?;
    let root: SharedPciRoot = Arc::new(Mutex::new(PciRoot::new()));
    let bus_err = |e: crate::devices::BusError| format!("PCI: {e}");
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        PCI_CONFIG_IO_BASE,
        PCI_CONFIG_IO_LEN,
    )
    .map_err(bus_err)?;
    pio.insert(
        Arc::new(Mutex::new(PciWindow::io(root.clone(), PCI_IO_START))),
        PCI_IO_START,
        PCI_IO_END - PCI_IO_START,
    )
    .map_err(bus_err)?;
    mmio.insert(
        Arc::new(Mutex::new(PciEcam::new(root.clone()))),
        PCI_ECAM_BASE,
        PCI_ECAM_SIZE,
    )
    .map_err(bus_err)?;
    mmio.insert(
        Arc::new(Mutex::new(PciWindow::mmio(root.clone(), PCI_MMIO32_START))),
        PCI_MMIO32_START,
        PCI_MMIO32_END - PCI_MMIO32_START,
    )
    .map_err(bus_err)?;
    mmio.insert(
        Arc::new(Mutex::new(PciWindow::mmio(root.clone(), mmio64.0))),
        mmio64.0,
        mmio64.1,
    )
    .map_err(bus_err)?;

    let vm_fd = shared_vm_fd(&vm.kvm, &vm.fd)?;
    let router: Arc<dyn InterruptRouter> = KvmInterruptRouter::new(vm_fd.clone());
    let mapper: Arc<dyn GuestMapper> = KvmGuestMapper::new(vm_fd);
    let mut windows = BarWindows {
        mmio32: WindowAllocator::mmio32(),
        mmio64: WindowAllocator::mmio64(mmio64.0, mmio64.1),
        io: WindowAllocator::io(),
    };
    if opts.test_device {
        let vectors = InterruptVectors::new(router.clone(), usize::from(TEST_DEVICE_MSIX_VECTORS))
            .map_err(|e| e.to_string())?;
        let dev = PciTestDevice::new(&mut windows.mmio32, &mut windows.mmio64, Some(vectors))?;
        crate::devices::bus::lock(&root)
            .add_device(Arc::new(Mutex::new(dev)))
            .map_err(|e| e.to_string())?;
    }
    let gsis = intx_gsi_plan(opts.virtio_count, passthrough.len())?;
    let mut container = None;
    let (intx, backends) = add_passthrough_devices(
        &root,
        &mut windows,
        router,
        mapper,
        mem,
        &passthrough,
        &gsis,
        |addr| {
            if container.is_none() {
                container = Some(super::real::open_container(&vm.fd)?);
            }
            let c = container.clone().expect("just set");
            let path = sysfs::device_dir(sys, addr);
            let b = super::real::VfioIoctlsBackend::open(c, &path)?;
            Ok(Arc::new(b) as Arc<dyn VfioBackend>)
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Some(PciSetup {
        root,
        mmio64,
        intx,
        passthrough,
        _backends: backends,
    }))
}

/// After `arch::boot::write_boot_params`: writes the ACPI tables (Linux then takes CPUs, the
/// IOAPIC and PCI from them) and sets `acpi_rsdp_addr` and the ECAM's e820 reservation.
pub fn write_pci_boot_tables(
    mem: &GuestMemoryMmap,
    setup: &PciSetup,
    vcpu_count: u8,
) -> Result<(), String> {
    let layout = AcpiLayout {
        vcpu_count,
        ioapic_id: ioapic_id(vcpu_count),
        mmio64: setup.mmio64,
        intx: setup.intx.clone(),
        pci: true,
    };
    let rsdp = write_tables(mem, &layout).map_err(|e| e.to_string())?;
    patch_zero_page(mem, rsdp, &[(PCI_ECAM_BASE, PCI_ECAM_SIZE)]).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::backend::fake::FakeVfio;
    use super::*;
    use crate::devices::pci::layout::PCI_MMIO64_MIN_START;
    use crate::devices::pci::msi::fake::RecordingRouter;
    use vm_memory::GuestAddress;

    struct NoSlots;
    impl GuestMapper for NoSlots {
        fn allocate_slot(&self) -> u32 {
            16
        }
        fn map(&self, _: u32, _: u64, _: u64, _: u64) -> Result<(), String> {
            Ok(())
        }
        fn unmap(&self, _: u32) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn intx_lines_come_from_the_top_and_stop_at_virtio() {
        assert_eq!(intx_gsi_plan(3, 2).unwrap(), vec![23, 22]);
        assert_eq!(intx_gsi_plan(18, 1).unwrap(), vec![23]);
        let e = intx_gsi_plan(19, 1).unwrap_err();
        assert!(e.contains("only 0 are left after 19 virtio devices"), "{e}");
    }

    #[test]
    fn devices_go_on_the_bus_with_all_guest_memory_mapped_for_dma() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        let root: SharedPciRoot = Arc::new(Mutex::new(PciRoot::new()));
        let mut windows = BarWindows {
            mmio32: WindowAllocator::mmio32(),
            mmio64: WindowAllocator::mmio64(PCI_MMIO64_MIN_START, 512 << 30),
            io: WindowAllocator::io(),
        };
        let mut config = include_bytes!("../../../tests/data/pci/1af4_1041_020000.bin").to_vec();
        config[0x3d] = 1; // INTA
        let fakes: Vec<Arc<FakeVfio>> = (0..2)
            .map(|_| Arc::new(FakeVfio::new(&config, &[(0, 0x80000, true)], [1, 0, 3])))
            .collect();
        let addrs: Vec<PciAddress> = vec![
            "0000:41:00.0".parse().unwrap(),
            "0000:42:00.0".parse().unwrap(),
        ];
        let mut n = 0;
        let (intx, backends) = add_passthrough_devices(
            &root,
            &mut windows,
            RecordingRouter::new(),
            Arc::new(NoSlots),
            &mem,
            &addrs,
            &[23, 22],
            |_| {
                n += 1;
                Ok(fakes[n - 1].clone() as Arc<dyn VfioBackend>)
            },
        )
        .unwrap();
        assert_eq!(backends.len(), 2);
        // Both have an INTx pin: both slots routed.
        assert_eq!(intx, vec![(1, 23), (2, 22)]);
        assert_eq!(
            fakes[0].state.lock().unwrap().dma,
            vec![(0, 1 << 20), (1 << 32, 1 << 20)]
        );
        assert!(
            fakes[1].state.lock().unwrap().dma.is_empty(),
            "one container, one map"
        );
        // The two BAR0s do not overlap.
        let devs = root.lock().unwrap().devices();
        let b0 = devs[1].1.lock().unwrap().read_config(4);
        let b1 = devs[2].1.lock().unwrap().read_config(4);
        assert_ne!(b0, b1);
        // An open failure names the device.
        let Err(e) = add_passthrough_devices(
            &root,
            &mut windows,
            RecordingRouter::new(),
            Arc::new(NoSlots),
            &mem,
            &addrs[..1],
            &[],
            |_| Err("VFIO_GROUP_GET_DEVICE_FD: Device or resource busy".into()),
        ) else {
            panic!("an open failure must fail the attach")
        };
        assert!(
            e.to_string()
                .contains("0000:41:00.0: open: VFIO_GROUP_GET_DEVICE_FD"),
            "{e}"
        );
    }
}
