//! VFIO passthrough (issue 9): host PCI devices handed to the guest on the VMM's PCI bus.
//!
//! - [`sysfs`]: the host checks, as pure functions over a sysfs root (device present, bound to
//!   vfio-pci, IOMMU on, IOMMU group complete), each refusal naming its cause and the fix.
//! - [`backend`]: the VFIO calls behind [`backend::VfioBackend`]; [`real`] implements it over
//!   vfio-ioctls, and tests use a fake.
//! - [`device`]: the passed-through function on the PCI bus: configuration space with BARs,
//!   MSI, MSI-X and the ROM virtualized and the rest passed through; BARs mapped into the guest
//!   (mmap'able parts directly, the MSI-X table and the rest trapped); MSI/MSI-X through KVM
//!   irqfds; INTx with a resample eventfd.
//! - [`kvm`]: the KVM side (GSI routing, irqfds, memory slots for BARs, the kvm-vfio device).
//! - [`attach`]: the whole sequence for the builder.

pub mod attach;
pub mod backend;
pub mod device;
pub mod kvm;
pub mod real;
pub mod sysfs;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `PUT /device-passthrough/{id}` and the config file's `device-passthrough` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePassthroughConfig {
    pub id: String,
    /// The host PCI address, `DDDD:BB:DD.F` (e.g. `0000:41:00.0`).
    pub host_address: String,
}

impl DevicePassthroughConfig {
    /// Checks the id and the address's form (not the host: [`sysfs::check_devices`] does).
    pub fn validate(&self) -> Result<PciAddress, PassthroughError> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(PassthroughError::BadId(self.id.clone()));
        }
        self.host_address.parse()
    }
}

/// A PCI address: domain, bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = PassthroughError;

    /// `DDDD:BB:DD.F`, or `BB:DD.F` with domain 0 (as lspci prints it).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PassthroughError::BadAddress(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] if d.len() == 4 => (*d, *b, *df),
            [b, df] => ("0000", *b, *df),
            _ => return Err(bad()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let hex = |t: &str, len: usize| {
            (t.len() == len && t.chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| u16::from_str_radix(t, 16).ok())
                .flatten()
        };
        let domain = hex(domain, 4).ok_or_else(bad)?;
        let bus = hex(bus, 2).ok_or_else(bad)? as u8;
        let device = hex(dev, 2).filter(|d| *d < 32).ok_or_else(bad)? as u8;
        let function = hex(func, 1).filter(|f| *f < 8).ok_or_else(bad)? as u8;
        Ok(PciAddress {
            domain,
            bus,
            device,
            function,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PassthroughError {
    #[error("device-passthrough id {0:?} must be 1 to 64 letters, digits, '-' or '_'")]
    BadId(String),
    #[error("{0:?} is not a PCI address: write it as DDDD:BB:DD.F, e.g. 0000:41:00.0 (lspci -D lists them)")]
    BadAddress(String),
    #[error("PCI device {0} does not exist on this host (no {1}); `lspci -D` lists the devices there are")]
    DeviceNotFound(PciAddress, String),
    #[error("this host has no IOMMU ({0} is empty), so no device can be passed through: turn it on with the kernel parameter intel_iommu=on (Intel) or amd_iommu=on (AMD; usually on by default) plus iommu=pt, enable VT-d/AMD-Vi in the firmware, and reboot")]
    NoIommu(String),
    #[error("PCI device {addr} is not in an IOMMU group (no {path}): the IOMMU does not cover it; check `dmesg | grep -i -e DMAR -e IOMMU`")]
    NoIommuGroup { addr: PciAddress, path: String },
    #[error("PCI device {addr} is bound to {driver}, not vfio-pci; bind it with: {commands}")]
    NotBoundToVfio {
        addr: PciAddress,
        driver: String,
        commands: String,
    },
    #[error("PCI device {addr} is in IOMMU group {group} with {others}, which this VM is not given and which are still bound to a driver: pass them through too, or unbind each ({unbind})")]
    GroupNotViable {
        addr: PciAddress,
        group: u32,
        others: String,
        unbind: String,
    },
    #[error("PCI device {0} is passed through twice (device-passthrough ids {1:?} and {2:?})")]
    Duplicate(PciAddress, String, String),
    #[error("PCI device {addr}: {what}: {reason}")]
    Vfio {
        addr: PciAddress,
        what: &'static str,
        reason: String,
    },
    #[error("PCI device {addr}: {reason}")]
    Layout { addr: PciAddress, reason: String },
}

/// The commands that bind `addr` to vfio-pci (the driver's `driver_override` route, which needs
/// no vendor/device id).
pub fn bind_commands(addr: &PciAddress) -> String {
    format!(
        "modprobe vfio-pci; echo {addr} > /sys/bus/pci/devices/{addr}/driver/unbind; echo vfio-pci > /sys/bus/pci/devices/{addr}/driver_override; echo {addr} > /sys/bus/pci/drivers_probe"
    )
}

/// Operations a VM with a passed-through device cannot do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedOp {
    Snapshot,
    PauseForSnapshot,
    Fork,
    LoadSnapshotWithPassthrough,
}

impl fmt::Display for RefusedOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefusedOp::Snapshot => "creating a snapshot",
            RefusedOp::PauseForSnapshot => "pausing for a snapshot",
            RefusedOp::Fork => "forking",
            RefusedOp::LoadSnapshotWithPassthrough => {
                "loading a snapshot into a VMM configured with device-passthrough"
            }
        })
    }
}

/// The message for `op` on a VM with `devices` passed through.
pub fn passthrough_refusal(op: RefusedOp, devices: &[PciAddress]) -> String {
    let list: Vec<String> = devices.iter().map(ToString::to_string).collect();
    format!(
        "{op} is not supported for a VM with passed-through PCI devices ({}): guest memory is pinned for the devices' DMA and a device's internal state cannot be saved or restored; boot a VM without device-passthrough for snapshots and forks",
        list.join(", ")
    )
}

/// The ioctls the VMM issues for passthrough, with their numbers, for the seccomp filter of the
/// thread that attaches devices (`main`) and of the vCPU threads (BAR and config accesses: VFIO
/// region reads and writes are pread64/pwrite64 on the device fd, not ioctls; MSI/MSI-X changes
/// from the guest issue VFIO_DEVICE_SET_IRQS, KVM_SET_GSI_ROUTING, KVM_IRQFD and, for BAR moves,
/// KVM_SET_USER_MEMORY_REGION on the vCPU thread that wrote the config space).
pub const PASSTHROUGH_IOCTLS: &[(&str, u64)] = &[
    ("VFIO_GET_API_VERSION", 0x3b64),
    ("VFIO_CHECK_EXTENSION", 0x3b65),
    ("VFIO_SET_IOMMU", 0x3b66),
    ("VFIO_GROUP_GET_STATUS", 0x3b67),
    ("VFIO_GROUP_SET_CONTAINER", 0x3b68),
    ("VFIO_GROUP_UNSET_CONTAINER", 0x3b69),
    ("VFIO_GROUP_GET_DEVICE_FD", 0x3b6a),
    ("VFIO_DEVICE_GET_INFO", 0x3b6b),
    ("VFIO_DEVICE_GET_REGION_INFO", 0x3b6c),
    ("VFIO_DEVICE_GET_IRQ_INFO", 0x3b6d),
    ("VFIO_DEVICE_SET_IRQS", 0x3b6e),
    ("VFIO_DEVICE_RESET", 0x3b6f),
    ("VFIO_IOMMU_MAP_DMA", 0x3b71),
    ("VFIO_IOMMU_UNMAP_DMA", 0x3b72),
    ("KVM_CREATE_DEVICE", 0xc00c_aee0),
    ("KVM_SET_DEVICE_ATTR", 0x4018_aee1),
    ("KVM_SET_GSI_ROUTING", 0x4008_ae6a),
    ("KVM_IRQFD", 0x4020_ae76),
    ("KVM_SET_USER_MEMORY_REGION", 0x4020_ae46),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_parse_and_print() {
        let a: PciAddress = "0000:41:00.0".parse().unwrap();
        assert_eq!(
            a,
            PciAddress {
                domain: 0,
                bus: 0x41,
                device: 0,
                function: 0
            }
        );
        assert_eq!(a.to_string(), "0000:41:00.0");
        assert_eq!(
            "41:00.1".parse::<PciAddress>().unwrap().to_string(),
            "0000:41:00.1"
        );
        assert_eq!(
            "000a:ff:1f.7".parse::<PciAddress>().unwrap().to_string(),
            "000a:ff:1f.7"
        );
        for bad in [
            "",
            "0000:41:00",
            "0000:41:20.0",
            "0000:41:00.8",
            "41.00.0",
            "0:41:00.0",
            "zz:00.0",
        ] {
            let e = bad.parse::<PciAddress>().unwrap_err();
            assert!(e.to_string().contains("0000:41:00.0"), "{bad}: {e}");
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        let ok = DevicePassthroughConfig {
            id: "gpu0".into(),
            host_address: "0000:41:00.0".into(),
        };
        assert!(ok.validate().is_ok());
        let bad_id = DevicePassthroughConfig {
            id: "gpu 0".into(),
            ..ok.clone()
        };
        assert!(bad_id
            .validate()
            .unwrap_err()
            .to_string()
            .contains("id \"gpu 0\""));
        let json = r#"{"id": "gpu0", "host_address": "0000:41:00.0", "extra": 1}"#;
        assert!(serde_json::from_str::<DevicePassthroughConfig>(json).is_err());
    }

    #[test]
    fn refusals_name_the_operation_the_devices_and_the_cause() {
        let devs = [
            "0000:41:00.0".parse().unwrap(),
            "0000:41:00.1".parse().unwrap(),
        ];
        for op in [
            RefusedOp::Snapshot,
            RefusedOp::PauseForSnapshot,
            RefusedOp::Fork,
            RefusedOp::LoadSnapshotWithPassthrough,
        ] {
            let m = passthrough_refusal(op, &devs);
            assert!(m.starts_with(&op.to_string()), "{m}");
            assert!(m.contains("0000:41:00.0, 0000:41:00.1"), "{m}");
            assert!(m.contains("pinned") && m.contains("cannot be saved"), "{m}");
        }
    }

    #[test]
    fn ioctl_numbers_match_the_bindings() {
        use vfio_bindings::bindings::vfio::VFIO_TYPE;
        let io = |nr: u64| (u64::from(VFIO_TYPE) << 8) | (100 + nr);
        let by_name = |n: &str| PASSTHROUGH_IOCTLS.iter().find(|(k, _)| *k == n).unwrap().1;
        assert_eq!(by_name("VFIO_GET_API_VERSION"), io(0));
        assert_eq!(by_name("VFIO_DEVICE_RESET"), io(11));
        assert_eq!(by_name("VFIO_IOMMU_MAP_DMA"), io(13));
        assert_eq!(by_name("VFIO_IOMMU_UNMAP_DMA"), io(14));
        // _IOW(KVMIO, 0x6a, struct kvm_irq_routing) (8-byte header) etc.
        let iow = |nr: u64, size: u64| (1 << 30) | (size << 16) | (0xae << 8) | nr;
        let iowr = |nr: u64, size: u64| (3 << 30) | (size << 16) | (0xae << 8) | nr;
        assert_eq!(by_name("KVM_SET_GSI_ROUTING"), iow(0x6a, 8));
        assert_eq!(
            by_name("KVM_IRQFD"),
            iow(0x76, std::mem::size_of::<kvm_bindings::kvm_irqfd>() as u64)
        );
        assert_eq!(
            by_name("KVM_CREATE_DEVICE"),
            iowr(
                0xe0,
                std::mem::size_of::<kvm_bindings::kvm_create_device>() as u64
            )
        );
        assert_eq!(
            by_name("KVM_SET_DEVICE_ATTR"),
            iow(
                0xe1,
                std::mem::size_of::<kvm_bindings::kvm_device_attr>() as u64
            )
        );
        assert_eq!(
            by_name("KVM_SET_USER_MEMORY_REGION"),
            iow(
                0x46,
                std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>() as u64
            )
        );
    }
}
