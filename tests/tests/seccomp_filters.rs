//! airlock-vmm's seccomp filters on the real binary: every thread is filtered, the filters let the
//! test guest boot, pause, resume, snapshot, restore and stop, and a thread making a syscall its
//! filter lacks kills the VMM with SIGSYS and a line naming the syscall.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_tests::{api_request, guest_config, repo_root, scratch_dir, test_guest, VmmProcess};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Per thread: (name, seccomp mode, number of stacked filters).
fn thread_filters(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out.sort();
    out
}

fn put(sock: &Path, path: &str, body: &str) {
    let (status, reply) = api_request(sock, "PUT", path, Some(body));
    assert_eq!(status, 204, "PUT {path}: {reply}");
}

fn patch_vm(sock: &Path, state: &str) {
    let (status, reply) = api_request(
        sock,
        "PATCH",
        "/vm",
        Some(&format!(r#"{{"state": "{state}"}}"#)),
    );
    assert_eq!(status, 204, "{state}: {reply}");
}

fn start_spin_over_api(dir: &Path, extra: &[&str]) -> (VmmProcess, PathBuf) {
    let sock = dir.join("api.sock");
    let mut args = vec!["--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let vmm = VmmProcess::spawn(&args);
    let boot = serde_json::json!({
        "kernel_image_path": test_guest("elf"),
        "boot_args": "probe=spin",
    });
    put(&sock, "/boot-source", &boot.to_string());
    put(
        &sock,
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64, "track_dirty_pages": true}"#,
    );
    put(&sock, "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(
        vmm.wait_for_line(TIMEOUT, |l| l.starts_with("SPIN 1"))
            .is_some(),
        "the guest did not start spinning: {}",
        vmm.stderr.lock().unwrap()
    );
    (vmm, sock)
}

fn stop_and_expect_spin_ok(mut vmm: VmmProcess, sock: &Path) {
    put(sock, "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let (status, console, stderr) = vmm.finish(TIMEOUT);
    assert!(
        status.success() && console.iter().any(|l| l == "PROBE OK spin"),
        "{status}\n{}\n{stderr}",
        console.join("\n")
    );
    assert!(!stderr.contains("airlock-vmm: seccomp:"), "{stderr}");
}

#[test]
fn every_filter_lets_the_guest_boot_pause_resume_and_stop() {
    let dir = scratch_dir("seccomp-api");
    let (vmm, sock) = start_spin_over_api(&dir, &[]);
    // Main thread: `main`; fc_api: `main` + `api`; vCPUs started by fc_api: + `vcpu`; tiny_http's
    // threads inherit `main`. Every thread is in filter mode (2).
    let threads = thread_filters(vmm.pid());
    // Kernel workers KVM attaches to the process (kvm-nx-lpage-recovery) inherit too.
    for (name, mode, filters) in threads.iter().filter(|t| !t.0.starts_with("kvm-")) {
        assert_eq!(*mode, 2, "{name} is not filtered: {threads:?}");
        let want = match name.as_str() {
            "fc_api" => 2,
            n if n.starts_with("fc_vcpu") => 3,
            _ => 1,
        };
        assert_eq!(*filters, want, "{name}: {threads:?}");
    }
    assert_eq!(
        threads
            .iter()
            .filter(|t| t.0.starts_with("fc_vcpu"))
            .count(),
        2
    );
    for _ in 0..3 {
        patch_vm(&sock, "Paused");
        let (_, info) = api_request(&sock, "GET", "/", None);
        assert!(info.contains("Paused"), "{info}");
        patch_vm(&sock, "Resumed");
    }
    let (status, _) = api_request(&sock, "GET", "/vm/config", None);
    assert_eq!(status, 200);
    stop_and_expect_spin_ok(vmm, &sock);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn config_file_boots_and_reboots_pass_the_filters() {
    let dir = scratch_dir("seccomp-cfg");
    for scenario in ["smp", "reboot", "triple-fault"] {
        let config = dir.join(format!("{scenario}.json"));
        let args = format!("probe={scenario} expect_cpus=2");
        std::fs::write(&config, guest_config(&test_guest("elf"), &args, 2, 64)).unwrap();
        let mut vmm = VmmProcess::spawn(&[
            "--no-api",
            "--boot-timer",
            "--config-file",
            config.to_str().unwrap(),
        ]);
        let (status, console, stderr) = vmm.finish(TIMEOUT);
        assert!(
            status.success(),
            "{scenario}: {status}\n{}\n{stderr}",
            console.join("\n")
        );
        assert!(
            !stderr.contains("airlock-vmm: seccomp:"),
            "{scenario}: {stderr}"
        );
        if scenario != "triple-fault" {
            assert!(console.iter().any(|l| l == &format!("PROBE OK {scenario}")));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn snapshot_and_userfaultfd_restore_pass_the_filters() {
    let dir = scratch_dir("seccomp-snap");
    let (vmm, sock) = start_spin_over_api(&dir, &[]);
    patch_vm(&sock, "Paused");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let body =
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem});
    put(&sock, "/snapshot/create", &body.to_string());
    patch_vm(&sock, "Resumed");
    stop_and_expect_spin_ok(vmm, &sock);

    let restore_dir = dir.join("restore");
    std::fs::create_dir_all(&restore_dir).unwrap();
    let sock = restore_dir.join("api.sock");
    let vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let body = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "Uffd", "backend_path": mem, "prefetch": true},
        "resume_vm": true,
    });
    put(&sock, "/snapshot/load", &body.to_string());
    assert!(vmm
        .wait_for_line(TIMEOUT, |l| l.starts_with("SPIN "))
        .is_some());
    let threads = thread_filters(vmm.pid());
    assert!(
        threads
            .iter()
            .any(|(n, mode, f)| n == "fc_uffd" && *mode == 2 && *f == 3),
        "{threads:?}"
    );
    stop_and_expect_spin_ok(vmm, &sock);
    let _ = std::fs::remove_dir_all(dir);
}

/// The built-in filters with one rule taken out of one filter.
fn filters_without(filter: &str, syscall: &str, ioctl: Option<&str>) -> String {
    let path = repo_root().join("vmm/seccomp/x86_64-unknown-linux-musl.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rules = doc[filter]["filter"].as_array_mut().unwrap();
    let before = rules.len();
    rules.retain(|r| {
        let same = r["syscall"] == syscall;
        match ioctl {
            None => !same,
            Some(name) => !(same && r["args"][0]["comment"] == name),
        }
    });
    assert_eq!(rules.len(), before - 1, "{filter} {syscall} {ioctl:?}");
    doc.to_string()
}

fn assert_killed_naming(vmm: &mut VmmProcess, want: &str) {
    let (status, console, stderr) = vmm.finish(TIMEOUT);
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{status}\n{}\n{stderr}",
        console.join("\n")
    );
    assert!(stderr.contains(want), "want {want:?} in stderr:\n{stderr}");
}

#[test]
fn a_forbidden_syscall_kills_the_vmm_and_names_it() {
    let dir = scratch_dir("seccomp-kill");
    // A vCPU thread whose filter lacks KVM_RUN.
    let filters = dir.join("no-kvm-run.json");
    std::fs::write(&filters, filters_without("vcpu", "ioctl", Some("KVM_RUN"))).unwrap();
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        guest_config(&test_guest("elf"), "probe=boot", 1, 64),
    )
    .unwrap();
    let mut vmm = VmmProcess::spawn(&[
        "--no-api",
        "--seccomp-filter",
        filters.to_str().unwrap(),
        "--config-file",
        config.to_str().unwrap(),
    ]);
    assert_killed_naming(
        &mut vmm,
        "airlock-vmm: seccomp: thread fc_vcpu 0 (vcpu filter) made forbidden syscall 16 (ioctl)",
    );

    // The API thread, whose filter lacks sendto: its first answer kills the VMM.
    let filters = dir.join("no-sendto.json");
    std::fs::write(&filters, filters_without("api", "sendto", None)).unwrap();
    let sock = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--seccomp-filter",
        filters.to_str().unwrap(),
    ]);
    let stream = airlock_tests::connect_with_retry(&sock, TIMEOUT);
    {
        use std::io::Write;
        let mut s = &stream;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    }
    assert_killed_naming(
        &mut vmm,
        "airlock-vmm: seccomp: thread fc_api (api filter) made forbidden syscall 44 (sendto)",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_seccomp_runs_unfiltered() {
    let dir = scratch_dir("seccomp-off");
    let (vmm, sock) = start_spin_over_api(&dir, &["--no-seccomp"]);
    let threads = thread_filters(vmm.pid());
    assert!(threads.iter().all(|t| t.1 == 0), "{threads:?}");
    stop_and_expect_spin_ok(vmm, &sock);
    let _ = std::fs::remove_dir_all(dir);
}
