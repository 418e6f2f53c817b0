//! Boots the real `airlock-vmm` on /dev/kvm with the test guest: every scenario with 1, 2 and 4
//! vCPUs, through `--config-file` and through the API socket, plus both kernel formats.

use std::path::Path;
use std::time::Duration;

use airlock_tests::{api_request, guest_config, scratch_dir, test_guest, VmmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn boot_args(scenario: &str, vcpus: u32, mem_mib: u64) -> String {
    format!("console=ttyS0 probe={scenario} expect_cpus={vcpus} expect_mem_mib={mem_mib}")
}

/// Asserts the guest's verdict line and a clean exit, showing everything on failure.
fn assert_probe_ok(vmm: &mut VmmProcess, scenario: &str) {
    let (status, console, stderr) = vmm.finish(BOOT_TIMEOUT);
    let ok = format!("PROBE OK {scenario}");
    assert!(
        console.iter().any(|l| l == &ok) && status.success(),
        "expected `{ok}` and exit 0, got {status}\nconsole:\n{}\nstderr:\n{stderr}",
        console.join("\n")
    );
    assert!(!console.iter().any(|l| l.starts_with("PROBE FAIL")));
}

fn boot_with_config_file(kernel: &Path, scenario: &str, vcpus: u32, mem_mib: u64) {
    let dir = scratch_dir("cfg");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        guest_config(kernel, &boot_args(scenario, vcpus, mem_mib), vcpus, mem_mib),
    )
    .unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", config.to_str().unwrap()]);
    assert_probe_ok(&mut vmm, scenario);
    let _ = std::fs::remove_dir_all(dir);
}

fn boot_with_api(kernel: &Path, scenario: &str, vcpus: u32, mem_mib: u64) {
    let dir = scratch_dir("api");
    let sock = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap()]);
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "boot_args": boot_args(scenario, vcpus, mem_mib),
    });
    let machine = serde_json::json!({"vcpu_count": vcpus, "mem_size_mib": mem_mib});
    for (path, body) in [
        ("/boot-source", boot.to_string()),
        ("/machine-config", machine.to_string()),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ] {
        let (status, reply) = api_request(&sock, "PUT", path, Some(&body));
        assert_eq!(status, 204, "PUT {path}: {reply}");
    }
    assert_probe_ok(&mut vmm, scenario);
    assert!(
        !sock.exists(),
        "the API socket is removed when the VMM exits"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn every_scenario_boots_through_the_config_file() {
    let kernel = test_guest("elf");
    for vcpus in [1, 2, 4] {
        for scenario in ["boot", "smp", "mem:1"] {
            boot_with_config_file(&kernel, scenario, vcpus, 128);
        }
    }
}

#[test]
fn every_scenario_boots_through_the_api() {
    let kernel = test_guest("elf");
    for vcpus in [1, 2, 4] {
        for scenario in ["boot", "smp", "mem:1"] {
            boot_with_api(&kernel, scenario, vcpus, 128);
        }
    }
}

#[test]
fn bzimage_boots_like_the_elf() {
    let kernel = test_guest("bzImage");
    boot_with_config_file(&kernel, "boot", 2, 64);
    boot_with_config_file(&kernel, "smp", 4, 64);
}

#[test]
fn memory_above_the_mmio_hole_is_given_and_mapped() {
    // 4 GiB puts 768 MiB above 4 GiB; pages are only touched where the guest writes.
    let kernel = test_guest("elf");
    boot_with_config_file(&kernel, "boot", 1, 4096);
    boot_with_config_file(&kernel, "mem:1", 2, 4096);
}

#[test]
fn most_vcpus_all_check_in() {
    boot_with_config_file(&test_guest("elf"), "smp", 32, 128);
}

fn spin_number(line: &str) -> Option<u64> {
    line.strip_prefix("SPIN ")?.trim().parse().ok()
}

#[test]
fn pause_stops_the_counter_and_resume_continues_it() {
    for vcpus in [1, 2, 4] {
        let dir = scratch_dir("pause");
        let sock = dir.join("api.sock");
        let config = dir.join("vm.json");
        std::fs::write(
            &config,
            guest_config(&test_guest("elf"), "console=ttyS0 probe=spin", vcpus, 64),
        )
        .unwrap();
        let mut vmm = VmmProcess::spawn(&[
            "--api-sock",
            sock.to_str().unwrap(),
            "--config-file",
            config.to_str().unwrap(),
        ]);
        let running = vmm
            .wait_for_line(BOOT_TIMEOUT, |l| spin_number(l).is_some_and(|n| n >= 3))
            .and_then(|l| spin_number(&l))
            .expect("the spin counter runs");
        let (status, body) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!(status, 204, "pause: {body}");
        let (_, info) = api_request(&sock, "GET", "/", None);
        assert!(info.contains("\"Paused\""), "{info}");
        // The VMM has written everything by the time the pause returns; the first window only
        // covers the reader thread on a busy host. Then nothing may come while paused.
        let before: Vec<u64> = vmm
            .drain_lines(Duration::from_millis(300))
            .iter()
            .filter_map(|l| spin_number(l))
            .collect();
        let during = vmm.drain_lines(Duration::from_millis(400));
        assert!(during.is_empty(), "the guest ran while paused: {during:?}");
        let last = before.last().copied().unwrap_or(running);
        let (status, body) = api_request(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
        assert_eq!(status, 204, "resume: {body}");
        let next = vmm
            .wait_for_line(Duration::from_secs(10), |l| spin_number(l).is_some())
            .and_then(|l| spin_number(&l))
            .expect("the counter goes on after resume");
        assert!(
            next > last && next <= last + 3,
            "counter went from {last} to {next}"
        );
        // Ctrl-Alt-Del ends the scenario cleanly.
        let (status, body) = api_request(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        );
        assert_eq!(status, 204, "ctrl-alt-del: {body}");
        assert_probe_ok(&mut vmm, "spin");
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn guest_faults_stop_the_vmm_with_a_reason() {
    let dir = scratch_dir("faults");
    let kernel = test_guest("elf");
    let config = dir.join("triple.json");
    std::fs::write(&config, guest_config(&kernel, "probe=triple-fault", 1, 32)).unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", config.to_str().unwrap()]);
    let (status, _, stderr) = vmm.finish(BOOT_TIMEOUT);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("shut down (triple fault"), "{stderr}");

    let config = dir.join("exception.json");
    std::fs::write(&config, guest_config(&kernel, "probe=exception", 1, 32)).unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", config.to_str().unwrap()]);
    let (status, console, _) = vmm.finish(BOOT_TIMEOUT);
    assert!(status.success());
    assert!(
        console
            .iter()
            .any(|l| l.starts_with("PROBE FAIL exception: exception 6")),
        "{console:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = scratch_dir("serial");
    let out = dir.join("console.log");
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest("elf"), "boot_args": "probe=boot"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        "serial": {"serial_out_path": out},
    });
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", path.to_str().unwrap()]);
    let (status, console, _) = vmm.finish(BOOT_TIMEOUT);
    assert!(status.success());
    assert!(console.is_empty(), "console went to stdout: {console:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("PROBE OK boot"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn boot_timer_reports_ready_time_and_memory() {
    let dir = scratch_dir("timer");
    let path = dir.join("vm.json");
    std::fs::write(
        &path,
        guest_config(&test_guest("elf"), "probe=boot", 1, 128),
    )
    .unwrap();
    let mut vmm = VmmProcess::spawn(&[
        "--no-api",
        "--boot-timer",
        "--config-file",
        path.to_str().unwrap(),
    ]);
    let (status, _, stderr) = vmm.finish(BOOT_TIMEOUT);
    assert!(status.success());
    let line = stderr
        .lines()
        .find(|l| l.contains("guest ready"))
        .unwrap_or_else(|| panic!("no ready line in {stderr}"));
    for key in [
        "boot_time_us=",
        "monotonic_ns=",
        "rss_anon_kib=",
        "rss_file_kib=",
    ] {
        assert!(line.contains(key), "{line}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn initrd_is_loaded_beside_the_kernel() {
    let dir = scratch_dir("initrd");
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, vec![0x5a; 1 << 20]).unwrap();
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": test_guest("elf"),
            "initrd_path": initrd,
            "boot_args": "probe=boot expect_mem_mib=64",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", path.to_str().unwrap()]);
    assert_probe_ok(&mut vmm, "boot");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn pci_bus_with_test_device_is_enumerated_through_cf8_and_ecam() {
    let kernel = test_guest("elf");
    for vcpus in [1, 2] {
        let dir = scratch_dir("pci");
        let config = dir.join("vm.json");
        std::fs::write(
            &config,
            guest_config(&kernel, "console=ttyS0 probe=pci", vcpus, 64),
        )
        .unwrap();
        let mut vmm = VmmProcess::spawn(&[
            "--no-api",
            "--pci-test-device",
            "--config-file",
            config.to_str().unwrap(),
        ]);
        assert_probe_ok(&mut vmm, "pci");
        // With a PCI bus (and its ACPI tables and reserved ECAM) the boot checks still hold.
        std::fs::write(
            &config,
            guest_config(&kernel, &boot_args("boot", vcpus, 64), vcpus, 64),
        )
        .unwrap();
        let mut vmm = VmmProcess::spawn(&[
            "--no-api",
            "--pci-test-device",
            "--config-file",
            config.to_str().unwrap(),
        ]);
        assert_probe_ok(&mut vmm, "boot");
        let _ = std::fs::remove_dir_all(dir);
    }
    // Through the API: the VM is built on the API thread, under its seccomp filter.
    let dir = scratch_dir("pci-api");
    let sock = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&["--api-sock", sock.to_str().unwrap(), "--pci-test-device"]);
    let boot = serde_json::json!({"kernel_image_path": kernel, "boot_args": "probe=pci"});
    for (path, body) in [
        ("/boot-source", boot.to_string()),
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#.to_string(),
        ),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ] {
        let (status, reply) = api_request(&sock, "PUT", path, Some(&body));
        assert_eq!(status, 204, "PUT {path}: {reply}");
    }
    assert_probe_ok(&mut vmm, "pci");
    // Without the bus the scenario says what is missing.
    let config = dir.join("vm.json");
    std::fs::write(&config, guest_config(&kernel, "probe=pci", 1, 64)).unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", config.to_str().unwrap()]);
    let (_, console, _) = vmm.finish(BOOT_TIMEOUT);
    assert!(
        console
            .iter()
            .any(|l| l == "PROBE FAIL pci: no ACPI RSDP in boot_params"),
        "{console:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
