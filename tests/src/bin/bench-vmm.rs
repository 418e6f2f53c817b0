//! Boot benchmark: runs the whole `airlock-vmm` process with the test guest's `boot` scenario
//! many times and prints, side by side with the baselines, the time from process start to the
//! guest's ready signal and to exit, and the VMM's own memory (resident beyond guest memory).
//!
//! `cargo run --release -p airlock-tests --bin bench-vmm -- [RUNS]`

use std::time::{Duration, Instant};

use airlock_tests::{guest_config, percentile, scratch_dir, test_guest, vmm_bin};

/// Firecracker built from source on one of these hosts: start, run a trivial guest that asks for
/// a reboot, exit (../shared/host-kvm/README.md).
const FIRECRACKER_RUN_TO_EXIT_MS: f64 = 24.0;
const TARGET_READY_MS: f64 = 5.0;
const TARGET_OVERHEAD_MIB: f64 = 3.0;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

struct Sample {
    ready_ms: f64,
    exit_ms: f64,
    teardown_ms: f64,
    overhead_kib: u64,
}

/// A pipe whose write end the VMM inherits (no CLOEXEC). airlock-vmm hands its last KVM
/// references to a child that outlives it until the kernel has torn the VM down; that child holds
/// the write end too, so EOF on the read end marks "VM fully gone".
fn inherited_pipe() -> (i32, i32) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array we pass.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    (fds[0], fds[1])
}

fn wait_eof(fd: i32) {
    let mut buf = [0u8; 16];
    // SAFETY: reading into our own buffer from our own descriptor, then closing it.
    unsafe {
        while libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
        libc::close(fd);
    }
}

fn run_once(config: &str) -> Result<Sample, String> {
    let (teardown_read, teardown_write) = inherited_pipe();
    let t0 = monotonic_ns();
    let start = Instant::now();
    let out = std::process::Command::new(vmm_bin())
        .args(["--no-api", "--boot-timer", "--config-file", config])
        .stdin(std::process::Stdio::null())
        .output();
    let exit_ms = start.elapsed().as_secs_f64() * 1e3;
    // SAFETY: closing our copy of the write end, so only the VMM's side keeps the pipe open.
    unsafe { libc::close(teardown_write) };
    wait_eof(teardown_read);
    let teardown_ms = start.elapsed().as_secs_f64() * 1e3;
    let out = out.map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("PROBE OK reboot") {
        return Err(format!("run failed: {}\n{stdout}\n{stderr}", out.status));
    }
    let line = stderr
        .lines()
        .find(|l| l.contains("guest ready"))
        .ok_or("no guest-ready line")?;
    let ready_ns = field(line, "monotonic_ns=").ok_or("no monotonic_ns")?;
    let anon = field(line, "rss_anon_kib=").ok_or("no rss_anon_kib")?;
    let file = field(line, "rss_file_kib=").ok_or("no rss_file_kib")?;
    Ok(Sample {
        ready_ms: ready_ns.saturating_sub(t0) as f64 / 1e6,
        exit_ms,
        teardown_ms,
        overhead_kib: anon + file,
    })
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let dir = scratch_dir("bench");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        guest_config(&test_guest("elf"), "probe=reboot", 1, 128),
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8 path").to_string();
    // One warm-up run loads the binary and guest image into the page cache.
    if let Err(e) = run_once(&config) {
        eprintln!("bench-vmm: {e}");
        std::process::exit(1);
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        match run_once(&config) {
            Ok(s) => samples.push(s),
            Err(e) => {
                eprintln!("bench-vmm: {e}");
                std::process::exit(1);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sorted = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v
    };
    let ready = sorted(&|s| s.ready_ms);
    let exit = sorted(&|s| s.exit_ms);
    let teardown = sorted(&|s| s.teardown_ms);
    let overhead = sorted(&|s| s.overhead_kib as f64 / 1024.0);
    println!("airlock-vmm boot benchmark: {runs} runs, test guest `reboot` (asks for a reboot as soon as it runs), 1 vCPU, 128 MiB");
    println!(
        "{:<34} {:>8} {:>8} {:>8}   {:<32}",
        "measure", "p50", "p90", "max", "baseline / target"
    );
    let row = |name: &str, v: &[f64], unit: &str, baseline: String| {
        println!(
            "{:<34} {:>6.2}{unit} {:>6.2}{unit} {:>6.2}{unit}   {baseline}",
            name,
            percentile(v, 50.0),
            percentile(v, 90.0),
            percentile(v, 100.0),
        )
    };
    row(
        "process start -> guest ready",
        &ready,
        "ms",
        format!("target < {TARGET_READY_MS} ms"),
    );
    row(
        "process start -> exit (whole run)",
        &exit,
        "ms",
        format!(
            "Firecracker {FIRECRACKER_RUN_TO_EXIT_MS} ms p50; target <= {:.1} ms",
            FIRECRACKER_RUN_TO_EXIT_MS / 4.0
        ),
    );
    row(
        "process start -> KVM teardown done",
        &teardown,
        "ms",
        "in a child, after exit (irqchip SRCU wait)".to_string(),
    );
    row(
        "VMM memory beyond guest (RSS)",
        &overhead,
        "Mi",
        format!("target < {TARGET_OVERHEAD_MIB} MiB"),
    );
    let ratio = FIRECRACKER_RUN_TO_EXIT_MS / percentile(&exit, 50.0);
    println!("whole run vs Firecracker: {ratio:.1}x faster at p50");
    let _ = std::fs::remove_dir_all(dir);
}
