//! Airlock test guest: a tiny polling kernel booted through the Linux x86_64 64-bit
//! boot protocol. It runs one scenario chosen on the command line and reports
//! `PROBE OK <scenario>` or `PROBE FAIL <scenario>: <reason>` on COM1.
//!
//! Built for the host, only the pure logic is compiled, so `cargo test` can run its
//! unit tests; the kernel itself needs `--target x86_64-unknown-none`.

#![cfg_attr(target_os = "none", no_std, no_main)]
// On the host only the unit tests use the pure modules.
#![cfg_attr(not(target_os = "none"), allow(dead_code))]
// Failures carry their report line (`fmt::LineBuf`) by value: there is no allocator,
// and the stacks are far larger than the few hundred bytes this costs.
#![allow(clippy::result_large_err)]

mod bootparams;
mod cmdline;
mod e820;
mod fmt;
mod kbd;
mod memtest;
mod mptable;
mod paging;
mod pci;
mod virtio;
mod virtio_blk;
mod virtio_net;
mod virtio_vsock;

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod kernel;
#[cfg(target_os = "none")]
mod pci_scenario;
#[cfg(target_os = "none")]
mod scenario;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod virtio_mmio;
#[cfg(target_os = "none")]
mod virtio_scenarios;

#[cfg(not(target_os = "none"))]
fn main() {
    println!(
        "airlock-test-guest is a guest kernel; build it with \
         `cargo build --release -p airlock-test-guest --target x86_64-unknown-none`"
    );
}
