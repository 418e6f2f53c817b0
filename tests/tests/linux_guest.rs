//! Boots a real Linux kernel (Debian's cloud kernel, as a bzImage) wherever
//! `airlock-vmm check-host` says this host can run Linux guests. Elsewhere it prints one line
//! saying why it did not run; that verdict comes from the host check, never from a guess.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use airlock_tests::{guest_config, host_report, repo_root, scratch_dir, VmmProcess};

fn linux_kernel() -> PathBuf {
    let kernel = repo_root().join("images/out/linux/bzImage");
    if !kernel.exists() {
        let status = Command::new("bash")
            .arg(repo_root().join("images/build-linux-kernel.sh"))
            .status()
            .expect("run images/build-linux-kernel.sh");
        assert!(status.success(), "images/build-linux-kernel.sh failed");
    }
    kernel
}

#[test]
fn linux_guest_boots_to_userspace_handoff() {
    let report = host_report();
    if report["linux_guests"] != serde_json::Value::Bool(true) {
        // Straight to stderr: libtest captures print!/eprint! of passing tests, and this line
        // must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "linux guest boot test not run: this host cannot run Linux guests: {}",
            report["reason"].as_str().unwrap_or("no reason given")
        );
        return;
    }
    let kernel = linux_kernel();
    let dir = scratch_dir("linux");
    let config = dir.join("vm.json");
    // No root filesystem: the kernel boots every vCPU, then panics looking for root, and
    // panic=-1 reboot=k make it reboot through the i8042, which stops the VMM with exit 0.
    std::fs::write(
        &config,
        guest_config(
            &kernel,
            "console=ttyS0 reboot=k panic=-1 pci=off nomodule",
            2,
            256,
        ),
    )
    .unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", config.to_str().unwrap()]);
    let (status, console, stderr) = vmm.finish(Duration::from_secs(120));
    let text = console.join("\n");
    assert!(text.contains("Linux version"), "{text}\n{stderr}");
    assert!(text.contains("smp: Brought up 1 node, 2 CPUs"), "{text}");
    assert!(text.contains("Unable to mount root fs"), "{text}");
    assert!(status.success(), "{status}: {stderr}");
    let _ = std::fs::remove_dir_all(dir);
}
