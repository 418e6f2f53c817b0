//! Emulated devices and the buses that route guest port and MMIO accesses to them.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod virtio;
pub mod vm_generation;

pub use bus::{Bus, BusDevice, BusError, VmExitRequest};
