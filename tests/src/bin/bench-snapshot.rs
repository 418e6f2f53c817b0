//! Snapshot benchmark: time from the load request to the guest running (128 MiB and 1 GiB
//! guests, `File` and `Uffd` backends), snapshot creation time, forks per second and memory per
//! fork, printed beside the targets and Firecracker's figure on the same kind of host.
//!
//! `cargo run --release -p airlock-tests --bin bench-snapshot -- [RUNS]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_tests::{
    api_request, connect_with_retry, guest_config, percentile, scratch_dir, test_guest, VmmProcess,
};
use serde_json::json;

/// Firecracker's snapshot-load call for a 128 MiB guest on these hosts (../shared/host-kvm).
const FIRECRACKER_LOAD_MS: f64 = 19.0;
const TARGET_RESTORE_MS: f64 = 5.0;

struct Template {
    state: PathBuf,
    mem: PathBuf,
    create_ms: f64,
    touched_kib: u64,
}

fn make_template(dir: &Path, name: &str, mem_mib: u64) -> Template {
    let sock = dir.join(format!("{name}.sock"));
    let config = dir.join(format!("{name}.json"));
    std::fs::write(
        &config,
        guest_config(&test_guest("elf"), "probe=spin", 1, mem_mib),
    )
    .unwrap();
    let vmm = VmmProcess::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        config.to_str().unwrap(),
    ]);
    vmm.wait_for_line(Duration::from_secs(60), |l| l == "SPIN 2")
        .expect("template runs");
    let (status, body) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{body}");
    let t = Template {
        state: dir.join(format!("{name}.state")),
        mem: dir.join(format!("{name}.mem")),
        create_ms: 0.0,
        touched_kib: 0,
    };
    let body = json!({"snapshot_type": "Full", "snapshot_path": t.state, "mem_file_path": t.mem})
        .to_string();
    let start = Instant::now();
    let (status, reply) = api_request(&sock, "PUT", "/snapshot/create", Some(&body));
    let create_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status, 204, "{reply}");
    let out = std::process::Command::new("du")
        .args(["-k", t.mem.to_str().unwrap()])
        .output()
        .unwrap();
    let touched_kib = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Template {
        create_ms,
        touched_kib,
        ..t
    }
}

fn load_body(t: &Template, backend: &str) -> String {
    json!({
        "snapshot_path": t.state,
        "mem_backend": {"backend_type": backend, "backend_path": t.mem},
        "resume_vm": true,
    })
    .to_string()
}

/// Spawns a VMM, waits for its socket, then times the load request alone.
fn timed_restore(dir: &Path, t: &Template, backend: &str, n: usize) -> (f64, VmmProcess) {
    let sock = dir.join(format!("r{n}.sock"));
    let vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap()]);
    drop(connect_with_retry(&sock, Duration::from_secs(10)));
    let start = Instant::now();
    let (status, reply) = api_request(&sock, "PUT", "/snapshot/load", Some(&load_body(t, backend)));
    let ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(status, 204, "{reply}");
    (ms, vmm)
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = scratch_dir("bench-snapshot");
    println!("airlock-vmm snapshot benchmark: test guest `spin`, 1 vCPU, {runs} restores per row");
    println!(
        "{:<44} {:>9} {:>9}   baseline / target",
        "measure", "p50", "p90"
    );
    let mut counter = 0;
    for mem_mib in [128u64, 1024] {
        let t = make_template(&dir, &format!("t{mem_mib}"), mem_mib);
        println!(
            "{:<44} {:>7.2}ms {:>9}   ({} KiB of guest memory touched)",
            format!("snapshot create, {mem_mib} MiB guest"),
            t.create_ms,
            "",
            t.touched_kib
        );
        for backend in ["File", "Uffd"] {
            let mut times = Vec::new();
            for _ in 0..runs {
                counter += 1;
                let (ms, vmm) = timed_restore(&dir, &t, backend, counter);
                times.push(ms);
                drop(vmm);
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "{:<44} {:>7.2}ms {:>7.2}ms   Firecracker {FIRECRACKER_LOAD_MS} ms (128 MiB); target < {TARGET_RESTORE_MS} ms",
                format!("load request -> running, {mem_mib} MiB, {backend}"),
                percentile(&times, 50.0),
                percentile(&times, 90.0),
            );
        }
    }
    // Forks: 20 VMMs restore one 128 MiB snapshot at once.
    let t = make_template(&dir, "forks", 128);
    let socks: Vec<PathBuf> = (0..20).map(|i| dir.join(format!("f{i}.sock"))).collect();
    let vmms: Vec<VmmProcess> = socks
        .iter()
        .map(|s| VmmProcess::spawn(&["--api-sock", s.to_str().unwrap()]))
        .collect();
    for s in &socks {
        drop(connect_with_retry(s, Duration::from_secs(10)));
    }
    let start = Instant::now();
    let threads: Vec<_> = socks
        .iter()
        .map(|s| {
            let (s, body) = (s.clone(), load_body(&t, "File"));
            std::thread::spawn(move || api_request(&s, "PUT", "/snapshot/load", Some(&body)).0)
        })
        .collect();
    for th in threads {
        assert_eq!(th.join().unwrap(), 204);
    }
    let wall = start.elapsed().as_secs_f64();
    for v in &vmms {
        v.wait_for_line(Duration::from_secs(60), |l| l.starts_with("SPIN "))
            .expect("fork runs");
    }
    let pss: Vec<f64> = vmms
        .iter()
        .map(|v| pss_kib(v.pid()) as f64 / 1024.0)
        .collect();
    let total: f64 = pss.iter().sum();
    println!(
        "{:<44} {:>8.0}/s {:>9}   20 loads in {:.1} ms",
        "forks (20 concurrent File restores)",
        20.0 / wall,
        "",
        wall * 1e3
    );
    println!(
        "{:<44} {:>7.2}Mi {:>9}   20 forks {:.1} MiB in all; one full copy of the touched memory is {:.1} MiB",
        "memory per fork (PSS, whole VMM process)",
        total / 20.0,
        "",
        total,
        t.touched_kib as f64 / 1024.0
    );
    drop(vmms);
    let _ = std::fs::remove_dir_all(dir);
}
