//! airlock-vmm: a minimal KVM virtual machine monitor for Airlock sandboxes.
//!
//! One module per concern, after Firecracker's layout: `arch` (x86_64 boot state), `vstate` (KVM
//! memory, VM and vCPUs), `devices`, `builder` (config to running VM), `rpc` (the
//! Firecracker-compatible API) and `check_host`.

pub mod arch;
pub mod builder;
pub mod check_host;
pub mod config;
pub mod devices;
pub mod persist;
pub mod rpc;
pub mod seccomp;
pub mod vfio;
pub mod vstate;
