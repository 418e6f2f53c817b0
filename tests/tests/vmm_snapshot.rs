//! Snapshot, restore and fork with the real `airlock-vmm` and the test guest's `spin` scenario:
//! the guest's counter and memory survive a restore in a new process, with both memory backends
//! and 1, 2 and 4 vCPUs; a Diff merged onto its base equals a Full snapshot; 20 forks of one
//! snapshot run independently and share memory; broken files are refused by name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_tests::{api_request, guest_config, scratch_dir, test_guest, VmmProcess};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn spin_number(line: &str) -> Option<u64> {
    line.strip_prefix("SPIN ")?.trim().parse().ok()
}

/// A spinning guest with an API socket, paused and snapshotted into `dir`; returns the last
/// counter value the guest printed before the pause.
struct Template {
    state: PathBuf,
    mem: PathBuf,
    last_spin: u64,
}

fn make_template(
    dir: &Path,
    vcpus: u32,
    boot_args: &str,
    track_dirty: bool,
) -> (VmmProcess, PathBuf, Template) {
    let sock = dir.join("template.sock");
    let config = dir.join("template.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&guest_config(&test_guest("elf"), boot_args, vcpus, 64)).unwrap();
    cfg["machine-config"]["track_dirty_pages"] = json!(track_dirty);
    std::fs::write(&config, cfg.to_string()).unwrap();
    let vmm = VmmProcess::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        config.to_str().unwrap(),
    ]);
    vmm.wait_for_line(TIMEOUT, |l| spin_number(l).is_some_and(|n| n >= 2))
        .expect("template guest spins");
    let (status, body) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{body}");
    // Written out by the time the pause returns; the window covers the reader thread on a busy host.
    let last_spin = vmm
        .drain_lines(Duration::from_millis(300))
        .iter()
        .chain(vmm.console.lock().unwrap().iter())
        .filter_map(|l| spin_number(l))
        .max()
        .unwrap();
    let t = Template {
        state: dir.join("snap.state"),
        mem: dir.join("snap.mem"),
        last_spin,
    };
    snapshot(&sock, "Full", &t.state, &t.mem);
    (vmm, sock, t)
}

fn snapshot(sock: &Path, kind: &str, state: &Path, mem: &Path) {
    let body = json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem});
    let (status, reply) = api_request(sock, "PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(status, 204, "snapshot: {reply}");
}

fn load_body(state: &Path, mem: &Path, backend: &str, prefetch: bool) -> String {
    json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": backend, "backend_path": mem, "prefetch": prefetch},
        "resume_vm": true,
    })
    .to_string()
}

/// The first counter a restored guest prints, and the one it should print. The pause can land in
/// the middle of a line: the template's console then ends with the start of `SPIN last+1` and the
/// restored console opens with the rest of it, so the first whole line is `SPIN last+2`.
fn first_counter_after_restore(vmm: &VmmProcess, t: &Template) -> (u64, u64) {
    let generation = vmm
        .wait_for_line(TIMEOUT, |l| l.starts_with("GENERATION "))
        .expect("the guest sees a new VM generation");
    assert_ne!(generation, format!("GENERATION {:032x}", 0));
    let before: Vec<String> = {
        let console = vmm.console.lock().unwrap();
        let at = console.iter().position(|l| *l == generation).unwrap();
        console[..at].to_vec()
    };
    let interrupted = format!("SPIN {}", t.last_spin + 1);
    let expected = match before.as_slice() {
        [] => t.last_spin + 1,
        [rest] if interrupted.ends_with(rest.as_str()) => t.last_spin + 2,
        other => panic!("restored console opens with {other:?}, not the rest of {interrupted:?}"),
    };
    let next = vmm
        .wait_for_line(TIMEOUT, |l| spin_number(l).is_some())
        .and_then(|l| spin_number(&l))
        .expect("the counter runs after the restore");
    (next, expected)
}

/// A new VMM process that loads the snapshot and resumes it.
fn restore(
    dir: &Path,
    name: &str,
    state: &Path,
    mem: &Path,
    backend: &str,
    prefetch: bool,
) -> (VmmProcess, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let (status, reply) = api_request(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&load_body(state, mem, backend, prefetch)),
    );
    assert_eq!(status, 204, "load: {reply}");
    (vmm, sock)
}

#[test]
fn restore_continues_the_counter_and_keeps_memory() {
    for (backend, prefetch) in [("File", false), ("Uffd", false), ("Uffd", true)] {
        for vcpus in [1, 2, 4] {
            let dir = scratch_dir("restore");
            // 1 MiB filled before the snapshot is verified after the restore, byte for byte.
            let (template, _, t) = make_template(&dir, vcpus, "probe=spin fill_mib=1", false);
            drop(template);
            let (mut vmm, sock) = restore(&dir, "restored", &t.state, &t.mem, backend, prefetch);
            let (next, expected) = first_counter_after_restore(&vmm, &t);
            assert_eq!(
                next,
                expected,
                "{backend} (prefetch {prefetch}), {vcpus} vCPUs: counter resumed at {next}, paused at {}",
                t.last_spin
            );
            let (status, _) = api_request(
                &sock,
                "PUT",
                "/actions",
                Some(r#"{"action_type": "SendCtrlAltDel"}"#),
            );
            assert_eq!(status, 204);
            let (status, console, stderr) = vmm.finish(TIMEOUT);
            assert!(
                status.success() && console.iter().any(|l| l == "PROBE OK spin"),
                "{backend}/{vcpus}: {console:?} {stderr}"
            );
            assert!(
                console.iter().any(|l| l.starts_with("mem: verified 1 MiB")),
                "{console:?}"
            );
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn restored_vm_can_start_paused_and_report_its_config() {
    let dir = scratch_dir("paused-restore");
    let (template, _, t) = make_template(&dir, 2, "probe=spin", false);
    drop(template);
    let sock = dir.join("r.sock");
    let vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let body = json!({"snapshot_path": t.state, "mem_file_path": t.mem}).to_string();
    let (status, reply) = api_request(&sock, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(status, 204, "{reply}");
    let (_, info) = api_request(&sock, "GET", "/", None);
    assert!(info.contains("\"Paused\""), "{info}");
    assert!(
        vmm.drain_lines(Duration::from_millis(300)).is_empty(),
        "guest ran while paused"
    );
    let (_, config) = api_request(&sock, "GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["boot-source"]["boot_args"], "probe=spin");
    let (status, _) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(status, 204);
    let (next, expected) = first_counter_after_restore(&vmm, &t);
    assert_eq!(
        next, expected,
        "counter resumed at {next}, paused at {}",
        t.last_spin
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn diff_merged_onto_its_base_equals_a_full_snapshot() {
    let dir = scratch_dir("diff");
    let (template, sock, base) = make_template(&dir, 1, "probe=spin", true);
    let (status, _) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(status, 204);
    template
        .wait_for_line(TIMEOUT, |l| {
            spin_number(l).is_some_and(|n| n >= base.last_spin + 2)
        })
        .expect("guest runs on after the base snapshot");
    let (status, _) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204);
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));
    let (full_state, full_mem) = (dir.join("full.state"), dir.join("full.mem"));
    snapshot(&sock, "Diff", &diff_state, &diff_mem);
    snapshot(&sock, "Full", &full_state, &full_mem);
    let diff_size = std::fs::metadata(&diff_mem).unwrap();
    assert_eq!(diff_size.len(), 64 << 20);
    let out = std::process::Command::new(airlock_tests::vmm_bin())
        .args([
            "snapshot-merge",
            "--base",
            base.mem.to_str().unwrap(),
            "--diff",
            diff_mem.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read(&base.mem).unwrap() == std::fs::read(&full_mem).unwrap(),
        "merged memory differs from the full snapshot's"
    );
    // The Diff's state with the merged memory is a working snapshot.
    drop(template);
    let (vmm, _) = restore(&dir, "merged", &diff_state, &base.mem, "File", false);
    vmm.wait_for_line(TIMEOUT, |l| spin_number(l).is_some())
        .expect("the merged snapshot runs");
    let _ = std::fs::remove_dir_all(dir);
}

/// Proportional set size of the snapshot memory file's mappings, and of the whole process, in KiB.
fn pss_kib(pid: u32, mem_file: &Path) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let name = mem_file.to_str().unwrap();
    let (mut guest, mut total, mut in_guest) = (0, 0, false);
    for line in smaps.lines() {
        if line.contains('-')
            && line.split_whitespace().count() >= 5
            && !line.starts_with(|c: char| c.is_ascii_uppercase())
        {
            in_guest = line.ends_with(name);
        } else if let Some(v) = line.strip_prefix("Pss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    (guest, total)
}

#[test]
fn twenty_forks_run_independently_and_share_memory() {
    let dir = scratch_dir("forks");
    let (template, _, t) = make_template(&dir, 1, "probe=spin fill_mib=2", false);
    drop(template);
    let forks: Vec<(VmmProcess, PathBuf)> = (0..20)
        .map(|i| restore(&dir, &format!("fork{i}"), &t.state, &t.mem, "File", false))
        .collect();
    let mut generations = Vec::new();
    for (vmm, _) in &forks {
        generations.push(
            vmm.wait_for_line(TIMEOUT, |l| l.starts_with("GENERATION "))
                .expect("each fork learns it is a clone"),
        );
        vmm.wait_for_line(TIMEOUT, |l| spin_number(l).is_some_and(|n| n > t.last_spin))
            .expect("each fork counts on");
    }
    generations.sort();
    generations.dedup();
    assert_eq!(
        generations.len(),
        20,
        "every fork has its own generation id"
    );
    let data_kib = {
        let out = std::process::Command::new("du")
            .args(["-k", t.mem.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let (guest, total): (u64, u64) = forks
        .iter()
        .map(|(v, _)| pss_kib(v.pid(), &t.mem))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    eprintln!(
        "20 forks: guest memory PSS {guest} KiB in all (snapshot memory {data_kib} KiB; 20 copies would be {} KiB); whole processes {total} KiB",
        20 * data_kib
    );
    assert!(
        data_kib >= 2048,
        "the snapshot holds the 2 MiB the guest filled"
    );
    assert!(
        guest * 4 < 20 * data_kib,
        "forks do not share memory: {guest} KiB"
    );
    // Each still runs on its own: stop one, the others keep counting.
    let (first, first_sock) = &forks[0];
    let (status, _) = api_request(
        first_sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(status, 204);
    first
        .wait_for_line(TIMEOUT, |l| l == "PROBE OK spin")
        .expect("fork 0 stops");
    forks[1]
        .0
        .wait_for_line(TIMEOUT, |l| spin_number(l).is_some())
        .expect("fork 1 runs on");
    drop(forks);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn snapshot_requests_and_broken_files_are_refused_by_name() {
    let dir = scratch_dir("snapbad");
    let (template, sock, t) = make_template(&dir, 1, "probe=spin", false);
    let (status, _) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(status, 204);
    let body = json!({"snapshot_path": dir.join("x.state"), "mem_file_path": dir.join("x.mem")});
    let (status, reply) = api_request(&sock, "PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(status, 400);
    assert!(reply.contains("paused VM"), "{reply}");
    let (status, _) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204);
    let body = json!({"snapshot_type": "Diff", "snapshot_path": dir.join("x.state"), "mem_file_path": dir.join("x.mem")});
    let (status, reply) = api_request(&sock, "PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(status, 400);
    assert!(reply.contains("needs dirty page tracking"), "{reply}");
    drop(template);

    let good = std::fs::read(&t.state).unwrap();
    let mut corrupted = good.clone();
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0x55;
    let mut old_version = good.clone();
    old_version[8] = 0;
    let short_mem = dir.join("short.mem");
    std::fs::write(&short_mem, vec![0u8; 4096]).unwrap();
    let cases: Vec<(Vec<u8>, &Path, &str)> = vec![
        (good[..good.len() / 2].to_vec(), &t.mem, "is truncated"),
        (corrupted, &t.mem, "corrupted (checksum mismatch)"),
        (old_version, &t.mem, "format version 0"),
        (
            b"not a snapshot at all, just text....".to_vec(),
            &t.mem,
            "not an Airlock snapshot file",
        ),
        (
            good.clone(),
            &short_mem,
            "is 4096 bytes, but the snapshot's guest has",
        ),
        (
            good.clone(),
            Path::new("/nonexistent/snap.mem"),
            "cannot open memory file /nonexistent/snap.mem",
        ),
    ];
    for (i, (state, mem, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.state"));
        std::fs::write(&path, state).unwrap();
        let sock = dir.join(format!("bad{i}.sock"));
        let vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap()]);
        for backend in ["File", "Uffd"] {
            let (status, reply) = api_request(
                &sock,
                "PUT",
                "/snapshot/load",
                Some(&load_body(&path, mem, backend, false)),
            );
            assert_eq!(status, 400, "case {i}: {reply}");
            assert!(
                reply.contains(expected),
                "case {i} ({backend}): expected {expected:?} in {reply}"
            );
        }
        // The VMM is still there and unconfigured.
        let (_, info) = api_request(&sock, "GET", "/", None);
        assert!(info.contains("Not started"), "{info}");
        drop(vmm);
    }
    let _ = std::fs::remove_dir_all(dir);
}
