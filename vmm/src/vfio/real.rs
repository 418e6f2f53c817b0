//! [`VfioBackend`] over vfio-ioctls: the type-1 IOMMU container (`/dev/vfio/vfio`), the group
//! (`/dev/vfio/<group>`) and the device fd. Compiled everywhere; it runs only on a host with an
//! IOMMU and a device bound to vfio-pci (none of the development hosts has one).

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{HostMapping, RegionInfo, VfioBackend, VFIO_PCI_INTX_IRQ_INDEX};

fn to_io(e: vfio_ioctls::VfioError) -> io::Error {
    io::Error::other(e.to_string())
}

/// The container all passed-through devices of a VM share, registered with KVM's kvm-vfio
/// device (so KVM knows DMA can be non-coherent).
pub fn open_container(vm: &VmFd) -> Result<Arc<VfioContainer>, String> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let kvm_vfio = vm
        .create_device(&mut dev)
        .map_err(|e| format!("KVM could not create its VFIO device (KVM_CREATE_DEVICE): {e}"))?;
    let handle = Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio));
    VfioContainer::new(Some(handle)).map(Arc::new).map_err(|e| {
        format!("cannot open the VFIO container /dev/vfio/vfio: {e} (is the vfio-pci module loaded, and inside a jail, did the jailer get --vfio-group?)")
    })
}

pub struct VfioIoctlsBackend {
    container: Arc<VfioContainer>,
    device: VfioDevice,
}

impl VfioIoctlsBackend {
    /// Opens the device at `sysfs_path` (`/sys/bus/pci/devices/<addr>`: only its `iommu_group`
    /// link is read, so a jail needs just that link) in `container`.
    pub fn open(container: Arc<VfioContainer>, sysfs_path: &Path) -> Result<Self, String> {
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(sysfs_path, ops, false)
            .map_err(|e| format!("cannot open the VFIO device: {e}"))?;
        Ok(VfioIoctlsBackend { container, device })
    }
}

impl VfioBackend for VfioIoctlsBackend {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        let size = self.device.get_region_size(index);
        if size == 0 {
            return None;
        }
        let flags = self.device.get_region_flags(index);
        let sparse = self
            .device
            .get_region_caps(index)
            .into_iter()
            .find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => {
                    Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
                }
                _ => None,
            });
        Some(RegionInfo {
            size,
            mmap: flags & vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP != 0,
            sparse,
        })
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.device.region_read(index, data, offset);
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) {
        self.device.region_write(index, data, offset);
    }

    fn mmap_region(&self, index: u32, offset: u64, len: u64) -> io::Result<HostMapping> {
        let file_offset = self.device.get_region_offset(index) + offset;
        // SAFETY: a fresh shared mapping of the device fd at a page-aligned offset VFIO reported;
        // the result is checked, and the mapping is owned by the returned HostMapping.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                file_offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let unmap = Box::new(|addr: u64, len: u64| {
            // SAFETY: unmaps exactly the mapping made above, once, when its owner drops.
            unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
        });
        Ok(HostMapping::new(addr as u64, len, Some(unmap)))
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.device.get_irq_info(index).map_or(0, |i| i.count)
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        self.device.enable_irq(index, fds.to_vec()).map_err(to_io)
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        self.device.disable_irq(index).map_err(to_io)
    }

    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()> {
        self.device
            .set_irq_resample_fd(VFIO_PCI_INTX_IRQ_INDEX, vec![fd])
            .map_err(to_io)
    }

    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        // SAFETY: the caller keeps the range mapped until dma_unmap (the trait's contract).
        unsafe {
            self.container
                .vfio_dma_map(iova, size as usize, host_addr as *mut u8)
                .map_err(to_io)
        }
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        self.container
            .vfio_dma_unmap(iova, size as usize)
            .map_err(to_io)
    }

    fn reset(&self) {
        self.device.reset();
    }
}
