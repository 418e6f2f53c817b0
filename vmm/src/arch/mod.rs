//! x86_64 specifics: the guest physical memory map, boot-time CPU state, CPUID, the MP table and
//! the Linux zero page.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
