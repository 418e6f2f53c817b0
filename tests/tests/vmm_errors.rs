//! Bad input to the real `airlock-vmm`: each case exits non-zero (or answers HTTP 400) with a
//! message naming the problem, and never panics.

use std::time::Duration;

use airlock_tests::{api_request, guest_config, scratch_dir, test_guest, VmmProcess};

const TIMEOUT: Duration = Duration::from_secs(30);

fn run_expecting_error(args: &[&str], expected: &str) {
    let mut vmm = VmmProcess::spawn(args);
    let (status, _, stderr) = vmm.finish(TIMEOUT);
    assert!(!status.success(), "{args:?} should fail");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

#[test]
fn bad_config_files_are_refused_by_name() {
    let dir = scratch_dir("badcfg");
    let kernel = test_guest("elf");
    let not_kernel = dir.join("notes.txt");
    std::fs::write(&not_kernel, "just text, no kernel here").unwrap();
    let mut cases: Vec<(String, &str)> = vec![
        (guest_config(&kernel, "probe=boot", 0, 64), "vcpu_count must be from 1 to 32, got 0"),
        (guest_config(&kernel, "probe=boot", 33, 64), "vcpu_count must be from 1 to 32, got 33"),
        (guest_config(&kernel, "probe=boot", 1, 0), "mem_size_mib must be at least 1"),
        (guest_config(&kernel, "probe=boot", 1, 100_000_000), "mem_size_mib 100000000"),
        (guest_config(&dir.join("missing"), "", 1, 64), "cannot open kernel image"),
        (guest_config(&not_kernel, "", 1, 64), "neither an ELF vmlinux nor a bzImage"),
        ("{\"boot-source\": ".into(), "malformed JSON in config file"),
        (
            format!("{{\"boot-source\": {{\"kernel_image_path\": {:?}}}, \"turbo\": true}}", kernel),
            "unknown field `turbo`",
        ),
        (
            format!("{{\"boot-source\": {{\"kernel_image_path\": {:?}, \"initrd_path\": \"/nonexistent/initrd\"}}}}", kernel),
            "cannot open initrd /nonexistent/initrd",
        ),
    ];
    let big_initrd = dir.join("big-initrd");
    std::fs::write(&big_initrd, vec![0u8; 40 << 20]).unwrap();
    cases.push((
        serde_json::json!({
            "boot-source": {"kernel_image_path": kernel, "initrd_path": big_initrd},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        })
        .to_string(),
        "does not fit in guest memory above the kernel",
    ));
    for (i, (config, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.json"));
        std::fs::write(&path, config).unwrap();
        run_expecting_error(
            &["--no-api", "--config-file", path.to_str().unwrap()],
            expected,
        );
    }
    run_expecting_error(
        &["--no-api", "--config-file", "/nonexistent/vm.json"],
        "cannot read config file /nonexistent/vm.json",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_command_lines_are_refused() {
    run_expecting_error(&[], "give --api-sock PATH");
    run_expecting_error(&["--no-api"], "--no-api needs --config-file");
    let dir = scratch_dir("sock");
    let existing = dir.join("taken.sock");
    std::fs::write(&existing, "").unwrap();
    run_expecting_error(
        &["--api-sock", existing.to_str().unwrap()],
        "already exists",
    );
    let long = format!("/tmp/{}", "s".repeat(150));
    run_expecting_error(
        &["--api-sock", &long],
        "Unix socket paths are limited to 107",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn api_errors_are_400_with_fault_message() {
    let dir = scratch_dir("apierr");
    let sock = dir.join("api.sock");
    let _vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let cases = [
        (
            "PUT",
            "/machine-config",
            "{not json",
            "malformed JSON in PUT /machine-config",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 64, "mem_size_mib": 128}"#,
            "got 64",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/nonexistent"}"#,
            "cannot open kernel image",
        ),
        (
            "PATCH",
            "/vm",
            r#"{"state": "Paused"}"#,
            "not supported before starting",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            "no boot source",
        ),
        (
            "GET",
            "/no/such/thing",
            "",
            "Invalid request method and/or path",
        ),
    ];
    for (method, path, body, expected) in cases {
        let (status, reply) = api_request(&sock, method, path, Some(body));
        assert_eq!(status, 400, "{method} {path}: {reply}");
        let v: serde_json::Value = serde_json::from_str(&reply).expect("JSON error body");
        let msg = v["fault_message"].as_str().unwrap_or_default();
        assert!(msg.contains(expected), "{method} {path}: {msg}");
    }
    let huge = "x".repeat(100 << 10);
    let (status, reply) = api_request(&sock, "PUT", "/boot-source", Some(&huge));
    assert_eq!(status, 400);
    assert!(reply.contains("larger than the 64 KiB limit"), "{reply}");
    // The VMM is still serving after all of that.
    let (status, info) = api_request(&sock, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(info.contains("Not started"), "{info}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn configuration_after_start_is_refused() {
    let dir = scratch_dir("afterstart");
    let sock = dir.join("api.sock");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        guest_config(&test_guest("elf"), "probe=spin", 1, 32),
    )
    .unwrap();
    let vmm = VmmProcess::spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        config.to_str().unwrap(),
    ]);
    vmm.wait_for_line(TIMEOUT, |l| l.starts_with("SPIN "))
        .expect("guest runs");
    for (method, path, body) in [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
        ),
        ("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#),
        ("PUT", "/boot-source", r#"{"kernel_image_path": "/x"}"#),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        let (status, reply) = api_request(&sock, method, path, Some(body));
        assert_eq!(status, 400, "{method} {path}");
        assert!(
            reply.contains("not supported after starting the microVM"),
            "{method} {path}: {reply}"
        );
    }
    let (status, reply) = api_request(&sock, "GET", "/vm/config", None);
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["machine-config"]["vcpu_count"], 1);
    assert!(v["boot-source"]["boot_args"]
        .as_str()
        .unwrap()
        .contains("probe=spin"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn termination_signals_remove_the_api_socket() {
    let dir = scratch_dir("sigterm");
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let sock = dir.join(format!("api-{signal}.sock"));
        let mut vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap()]);
        let (status, _) = api_request(&sock, "GET", "/", None);
        assert_eq!(status, 200);
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(vmm.pid() as i32, signal) };
        let (status, _, _) = vmm.finish(TIMEOUT);
        assert_eq!(status.code(), Some(128 + signal));
        assert!(!sock.exists(), "socket left behind after signal {signal}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
