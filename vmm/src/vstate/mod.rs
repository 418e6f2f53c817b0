//! KVM objects: guest memory, the VM and its vCPUs.

pub mod memory;
pub mod uffd;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
