//! Boots a real Linux kernel (Debian's cloud kernel, as a bzImage) wherever
//! `airlock-vmm check-host` says this host can run Linux guests, and the default image
//! (`images/out/default`: vmlinux, initrd, rootfs.ext4 with the agent as init) when it has been
//! built, then talks to the agent over vsock. Elsewhere each test prints one line saying why it
//! did not run; that verdict comes from the host check, never from a guess.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// True when this host can run Linux guests; otherwise prints one line saying why `test` did not
/// run.
fn host_runs_linux_guests(test: &str) -> bool {
    let report = host_report();
    if report["linux_guests"] != serde_json::Value::Bool(true) {
        // Straight to stderr: libtest captures print!/eprint! of passing tests, and this line
        // must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "{test} not run: this host cannot run Linux guests: {}",
            report["reason"].as_str().unwrap_or("no reason given")
        );
        return false;
    }
    true
}

#[test]
fn linux_guest_boots_to_userspace_handoff() {
    if !host_runs_linux_guests("linux guest boot test") {
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

/// One HTTP/1.1 request to the agent through the VMM's vsock Unix socket (Firecracker's host
/// side: `CONNECT <port>\n`, then `OK <port>\n`). None until the agent is listening.
fn agent_request(uds: &std::path::Path, path: &str) -> Option<(u16, String)> {
    let stream = UnixStream::connect(uds).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut writer = stream.try_clone().ok()?;
    writer.write_all(b"CONNECT 52\n").ok()?;
    let mut reader = BufReader::new(stream);
    let mut ack = String::new();
    reader.read_line(&mut ack).ok()?;
    if !ack.starts_with("OK ") {
        return None;
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    writer.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    reader.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The default image: Debian's cloud kernel as vmlinux, the initrd that loads virtio-mmio,
/// virtio-blk and vsock, and rootfs.ext4 as the root drive, with airlock-agent as init. The test
/// waits for the agent's health answer over vsock.
#[test]
fn default_image_boots_to_the_agent() {
    let image = repo_root().join("images/out/default");
    if !image.join("manifest.json").exists() {
        let _ = writeln!(
            std::io::stderr(),
            "default image boot test not run: {} does not exist (run `bash images/build.sh`)",
            image.join("manifest.json").display()
        );
        return;
    }
    if !host_runs_linux_guests("default image boot test") {
        return;
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    let dir = scratch_dir("linux-image");
    // The guest writes to its root drive: boot a copy.
    let rootfs = dir.join("rootfs.ext4");
    std::fs::copy(image.join("rootfs.ext4"), &rootfs).unwrap();
    let uds = dir.join("vsock.sock");
    let mut config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": image.join("vmlinux"),
            "boot_args": manifest["boot_args"].as_str().unwrap(),
        },
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 512},
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": rootfs,
            "is_root_device": true,
            "is_read_only": false,
        }],
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    if image.join("initrd").exists() {
        config["boot-source"]["initrd_path"] = serde_json::json!(image.join("initrd"));
    }
    let config_path = dir.join("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", config_path.to_str().unwrap()]);

    let deadline = Instant::now() + Duration::from_secs(60);
    let health = loop {
        if let Some(answer) = agent_request(&uds, "/v1/health") {
            break answer;
        }
        if Instant::now() > deadline || vmm.wait_exit(Duration::from_millis(1)).is_some() {
            std::thread::sleep(Duration::from_millis(50));
            let console = vmm.console.lock().unwrap().join("\n");
            let stderr = vmm.stderr.lock().unwrap().clone();
            panic!("the agent did not answer over vsock within 60 s\nconsole:\n{console}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = vmm.console.lock().unwrap().join("\n");
    assert_eq!(health.0, 200, "{health:?}\n{console}");
    let body: serde_json::Value = serde_json::from_str(&health.1).expect("health is JSON");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(
        body["pid1"], true,
        "the agent runs as the guest's init: {body}"
    );
    assert_eq!(body["version"], manifest["agent"]["version"], "{body}");
    assert!(console.contains("Linux version"), "{console}");

    // The VMM is killed on drop. (No POST /v1/shutdown here: without ACPI the kernel turns
    // a power-off into a halt, which leaves the VMM running; a reboot is what stops it.)
    drop(vmm);
    let _ = std::fs::remove_dir_all(dir);
}
