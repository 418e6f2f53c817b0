//! The PCI root complex (issue 9): present only when a device is passed through or the PCI test
//! device is asked for, so the boot path without PCI is unchanged.
//!
//! - [`root`]: bus 0 with a host bridge; configuration through ports 0xcf8/0xcfc and ECAM;
//!   windows that route BAR accesses by the BARs' current addresses.
//! - [`config`]: an emulated configuration space (BAR sizing, capability lists).
//! - [`msi`]: MSI/MSI-X tables and vectors, over an [`msi::InterruptRouter`] (KVM or a fake).
//! - [`layout`]: where the ECAM and the windows are.
//! - [`acpi`]: the ACPI tables (MCFG, DSDT host bridge, MADT) that describe it to Linux.
//! - [`test_device`]: an emulated device for the test guest's `pci` scenario.

pub mod acpi;
pub mod config;
pub mod layout;
pub mod msi;
pub mod root;
pub mod test_device;

pub use root::{
    BarRange, PciConfigIo, PciDevice, PciEcam, PciRoot, PciWindow, SharedPciDevice, SharedPciRoot,
};
