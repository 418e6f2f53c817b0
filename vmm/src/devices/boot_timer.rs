//! The "guest ready" signal: the guest writes [`BOOT_TIMER_MAGIC`] to this MMIO page when it has
//! booted, and the VMM records how long that took, so boot time is measured from outside.

use std::time::Instant;

use super::bus::{BusDevice, VmExitRequest};
use crate::arch::layout::BOOT_TIMER_MAGIC;

pub struct BootTimer {
    start: Instant,
    /// Print the ready line on stderr (`--boot-timer`); the time is recorded either way.
    report: bool,
    ready_after_us: Option<u64>,
}

impl BootTimer {
    pub fn new(start: Instant, report: bool) -> Self {
        BootTimer {
            start,
            report,
            ready_after_us: None,
        }
    }

    pub fn ready_after_us(&self) -> Option<u64> {
        self.ready_after_us
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock another process can compare against.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The VMM's memory beyond guest memory, from /proc/self/status: anonymous plus file-backed
/// resident pages (guest memory is a memfd and shows up as RssShmem instead).
pub fn vmm_overhead_kib() -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("RssAnon:")?, field("RssFile:")?, field("RssShmem:")?))
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest> {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) || self.ready_after_us.is_some() {
            return None;
        }
        let now_ns = monotonic_ns();
        let us = self.start.elapsed().as_micros() as u64;
        self.ready_after_us = Some(us);
        if self.report {
            let mem = vmm_overhead_kib()
                .map(|(anon, file, shmem)| {
                    format!(" rss_anon_kib={anon} rss_file_kib={file} rss_shmem_kib={shmem}")
                })
                .unwrap_or_default();
            eprintln!("airlock-vmm: guest ready: boot_time_us={us} monotonic_ns={now_ns}{mem}");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_magic_value_once() {
        let mut t = BootTimer::new(Instant::now(), false);
        t.write(0, &[1]);
        assert_eq!(t.ready_after_us(), None);
        t.write(1, &[BOOT_TIMER_MAGIC]);
        assert_eq!(t.ready_after_us(), None);
        t.write(0, &[BOOT_TIMER_MAGIC]);
        let first = t.ready_after_us().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(t.ready_after_us(), Some(first));
    }

    #[test]
    fn reads_own_memory_figures() {
        let (anon, file, _) = vmm_overhead_kib().unwrap();
        assert!(anon > 0 && file > 0);
        assert!(monotonic_ns() > 0);
    }
}
