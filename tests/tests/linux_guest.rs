//! Real Linux guests: Debian's cloud kernel and the default image (`images/out/default`: vmlinux,
//! initrd, rootfs.ext4 with the agent as init), booted by `airlock-vmm`. They run wherever
//! `airlock-vmm check-host` says this host runs Linux guests: on hardware KVM, and in the nested
//! lab (`bash tests/lab/run.sh linux`) on the development and CI machines. Elsewhere each test
//! prints its one NOT RUN line with check-host's reason.
//!
//! Times are generous: in the lab a boot takes tens of seconds. No test fails on a timing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_tests::{
    api_request, can_run_linux_guests, guest_config, host_report, not_run, repo_root, scratch_dir,
    VmmProcess,
};
use serde_json::json;

/// Longest a boot to the agent (or to the kernel's last word) may take.
const BOOT_LIMIT: Duration = Duration::from_secs(420);

/// Debian's cloud kernel as a bzImage: the lab places it here; elsewhere
/// images/build-linux-kernel.sh fetches it.
fn linux_bzimage() -> PathBuf {
    let kernel = repo_root().join("images/out/linux/bzImage");
    if !kernel.exists() {
        let status = std::process::Command::new("bash")
            .arg(repo_root().join("images/build-linux-kernel.sh"))
            .status()
            .expect("run images/build-linux-kernel.sh");
        assert!(status.success(), "images/build-linux-kernel.sh failed");
    }
    kernel
}

/// Boots the bzImage with no root filesystem on `vcpus` vCPUs: the kernel brings up every vCPU,
/// then panics looking for root, and panic=-1 reboot=k make it reboot through the i8042, which
/// stops the VMM with exit 0. Returns (exit success, console, stderr); a VMM still running after
/// `limit` is killed and counts as a failed boot (on a paravirtual KVM the guest can spin with
/// no console output at all).
fn boot_to_root_panic(vcpus: u32, limit: Duration) -> (bool, String, String) {
    let dir = scratch_dir("linux");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        guest_config(
            &linux_bzimage(),
            "console=ttyS0 reboot=k panic=-1 pci=off nomodule",
            vcpus,
            256,
        ),
    )
    .unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", config.to_str().unwrap()]);
    let (status, console, mut stderr) = vmm.finish_or_kill(limit);
    let _ = std::fs::remove_dir_all(dir);
    if status.is_none() {
        stderr.push_str(&format!(
            "(airlock-vmm did not exit within {limit:?}; killed)\n"
        ));
    }
    (
        status.is_some_and(|s| s.success()),
        console.join("\n"),
        stderr,
    )
}

/// The probe and a real boot must agree: check-host's "yes" is only right if Debian's kernel
/// boots here, and its "no" only if it does not. Runs on every host (on one whose KVM cannot run
/// Linux, the boot fails or runs out of its time, which is the point).
#[test]
fn check_host_agrees_with_a_real_boot() {
    let report = host_report();
    let says_yes = report["linux_guests"] == true;
    // Where check-host says no, a boot that has not reached userspace handoff in this long has
    // failed: hardware boots take well under a second, the lab's under a minute.
    let limit = if says_yes {
        BOOT_LIMIT
    } else {
        Duration::from_secs(90)
    };
    let t = Instant::now();
    let (exited_cleanly, console, stderr) = boot_to_root_panic(2, limit);
    let booted = exited_cleanly && console.contains("Unable to mount root fs");
    let _ = writeln!(
        std::io::stderr(),
        "check-host says linux_guests={says_yes} ({}); the real boot {} after {:.1} s",
        report["reason"].as_str().unwrap_or(""),
        if booted {
            "reached the root-fs panic"
        } else {
            "did not boot"
        },
        t.elapsed().as_secs_f64()
    );
    let tail: Vec<&str> = console.lines().rev().take(15).collect();
    assert_eq!(
        says_yes,
        booted,
        "check-host and a real boot disagree\ncheck-host: {}\nconsole tail (newest first): {tail:#?}\nstderr: {stderr}",
        report["reason"]
    );
}

#[test]
#[ignore = "open bug: Debian's cloud kernel has no MP-table parser (CONFIG_X86_MPPARSE off) and sees 1 CPU; \
            ACPI tables for every VM (AcpiLayout::without_pci) made the L2 guest soft-lock the lab's L1"]
fn debian_kernel_boots_on_1_2_and_4_vcpus() {
    if !can_run_linux_guests("debian_kernel_boots_on_1_2_and_4_vcpus") {
        return;
    }
    for vcpus in [1u32, 2, 4] {
        let t = Instant::now();
        let (ok, console, stderr) = boot_to_root_panic(vcpus, BOOT_LIMIT);
        assert!(
            console.contains("Linux version"),
            "{vcpus} vCPUs:\n{console}\n{stderr}"
        );
        let brought_up = if vcpus == 1 {
            "smp: Brought up 1 node, 1 CPU".to_string()
        } else {
            format!("smp: Brought up 1 node, {vcpus} CPUs")
        };
        assert!(console.contains(&brought_up), "{vcpus} vCPUs:\n{console}");
        assert!(
            console.contains("Unable to mount root fs"),
            "{vcpus} vCPUs:\n{console}"
        );
        assert!(ok, "{vcpus} vCPUs: the VMM did not exit cleanly: {stderr}");
        let _ = writeln!(
            std::io::stderr(),
            "{vcpus} vCPUs: Debian's kernel to its root-fs panic in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
}

/// One HTTP/1.1 request to the agent through the VMM's vsock Unix socket (Firecracker's host
/// side: `CONNECT <port>\n`, then `OK <port>\n`). None until the agent is listening.
fn agent_request(uds: &Path, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let stream = UnixStream::connect(uds).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut writer = stream.try_clone().ok()?;
    writer.write_all(b"CONNECT 52\n").ok()?;
    let mut reader = BufReader::new(stream);
    let mut ack = String::new();
    reader.read_line(&mut ack).ok()?;
    if !ack.starts_with("OK ") {
        return None;
    }
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes()).ok()?;
    writer.write_all(body).ok()?;
    let mut response = Vec::new();
    reader.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = String::from_utf8_lossy(&response[..split])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let mut body = response[split + 4..].to_vec();
    if String::from_utf8_lossy(&response[..split])
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Some((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
}

/// Waits for the agent's health answer over vsock; panics with the console on failure.
fn wait_for_agent(vmm: &mut VmmProcess, uds: &Path, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((200, body)) = agent_request(uds, "GET", "/v1/health", b"") {
            return serde_json::from_slice(&body).expect("health is JSON");
        }
        if Instant::now() > deadline || vmm.wait_exit(Duration::from_millis(1)).is_some() {
            std::thread::sleep(Duration::from_millis(50));
            let console = vmm.console.lock().unwrap().join("\n");
            let stderr = vmm.stderr.lock().unwrap().clone();
            panic!("the agent did not answer over vsock within {limit:?}\nconsole:\n{console}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The default image, booted from a config file with an API socket (for pause and snapshots).
struct DefaultImageVm {
    vmm: VmmProcess,
    dir: PathBuf,
    api: PathBuf,
    uds: PathBuf,
    manifest: serde_json::Value,
}

fn default_image() -> Option<PathBuf> {
    let image = repo_root().join("images/out/default");
    image.join("manifest.json").exists().then_some(image)
}

fn boot_default_image(test: &str, vcpus: u32, track_dirty_pages: bool) -> DefaultImageVm {
    let image = default_image().expect("checked by the caller");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    let dir = scratch_dir(test);
    // The guest writes to its root drive: boot a copy.
    let rootfs = dir.join("rootfs.ext4");
    std::fs::copy(image.join("rootfs.ext4"), &rootfs).unwrap();
    let uds = dir.join("vsock.sock");
    let api = dir.join("api.sock");
    let mut config = json!({
        "boot-source": {
            "kernel_image_path": image.join("vmlinux"),
            "boot_args": manifest["boot_args"].as_str().unwrap(),
        },
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": 256, "track_dirty_pages": track_dirty_pages},
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": rootfs,
            "is_root_device": true,
            "is_read_only": false,
        }],
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    if image.join("initrd").exists() {
        config["boot-source"]["initrd_path"] = json!(image.join("initrd"));
    }
    let config_path = dir.join("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let vmm = VmmProcess::spawn(&[
        "--api-sock",
        api.to_str().unwrap(),
        "--config-file",
        config_path.to_str().unwrap(),
    ]);
    DefaultImageVm {
        vmm,
        dir,
        api,
        uds,
        manifest,
    }
}

/// Lines of the guest's boot log that point at the VMM's CPU set-up, printed for the record.
fn report_cpu_warnings(console: &str) {
    for line in console.lines().filter(|l| {
        l.contains("XSAVE consistency problem")
            || l.contains("Unhandled WRMSR")
            || l.contains("unchecked MSR access")
            || l.contains("x86/fpu")
    }) {
        let _ = writeln!(std::io::stderr(), "guest boot log: {line}");
    }
}

/// The default image: Debian's cloud kernel, the initrd that loads virtio-mmio, virtio-blk and
/// vsock, and rootfs.ext4 as the root drive, with airlock-agent as init; the test waits for the
/// agent's health answer over vsock.
#[test]
fn default_image_boots_to_the_agent() {
    if default_image().is_none() {
        not_run(
            "default_image_boots_to_the_agent",
            "images/out/default is not built (bash images/build.sh)",
        );
        return;
    }
    if !can_run_linux_guests("default_image_boots_to_the_agent") {
        return;
    }
    let t = Instant::now();
    let mut vm = boot_default_image("linux-image", 2, false);
    let health = wait_for_agent(&mut vm.vmm, &vm.uds, BOOT_LIMIT);
    let _ = writeln!(
        std::io::stderr(),
        "default image: VMM start to agent health in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let console = vm.vmm.console.lock().unwrap().join("\n");
    report_cpu_warnings(&console);
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(
        health["pid1"], true,
        "the agent runs as the guest's init: {health}"
    );
    assert_eq!(
        health["version"], vm.manifest["agent"]["version"],
        "{health}"
    );
    assert!(console.contains("Linux version"), "{console}");
    // Not asserted: it sees 1 CPU of its 2 (see debian_kernel_boots_on_1_2_and_4_vcpus).
    // The VMM is killed on drop. (No POST /v1/shutdown here: without ACPI the kernel turns
    // a power-off into a halt, which leaves the VMM running; a reboot is what stops it.)
    let dir = vm.dir.clone();
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}

fn put_file(uds: &Path, path: &str, data: &[u8]) {
    let (status, body) = agent_request(uds, "PUT", &format!("/v1/files/content?path={path}"), data)
        .expect("the agent answers");
    assert!(
        (200..300).contains(&status),
        "PUT {path}: {status} {}",
        String::from_utf8_lossy(&body)
    );
}

fn get_file(uds: &Path, path: &str) -> Vec<u8> {
    let (status, body) = agent_request(uds, "GET", &format!("/v1/files/content?path={path}"), b"")
        .expect("the agent answers");
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    body
}

fn vm_api(api: &Path, method: &str, path: &str, body: serde_json::Value) {
    let (status, reply) = api_request(api, method, path, Some(&body.to_string()));
    assert_eq!(status, 204, "{method} {path}: {reply}");
}

/// A new VMM that loads a snapshot of the default image (resumed) and answers over a new vsock
/// socket.
fn restore(
    dir: &Path,
    name: &str,
    state: &Path,
    mem: &Path,
    backend: &str,
) -> (VmmProcess, PathBuf) {
    let api = dir.join(format!("{name}.api"));
    let uds = dir.join(format!("{name}.vsock"));
    let mut vmm = VmmProcess::spawn(&["--api-sock", api.to_str().unwrap()]);
    let body = json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": backend, "backend_path": mem},
        "resume_vm": true,
        "vsock_override": {"uds_path": uds},
    });
    let (status, reply) = api_request(&api, "PUT", "/snapshot/load", Some(&body.to_string()));
    assert_eq!(status, 204, "load ({backend}): {reply}");
    wait_for_agent(&mut vmm, &uds, Duration::from_secs(120));
    (vmm, uds)
}

/// A running Linux guest with a file written, paused and snapshotted, then restored in new VMMs
/// with the File and with the Uffd memory backend: the agent answers and the file is there.
#[test]
fn linux_guest_snapshot_restores_with_file_and_uffd_backends() {
    if default_image().is_none() {
        not_run(
            "linux_guest_snapshot_restores_with_file_and_uffd_backends",
            "images/out/default is not built (bash images/build.sh)",
        );
        return;
    }
    if !can_run_linux_guests("linux_guest_snapshot_restores_with_file_and_uffd_backends") {
        return;
    }
    let mut vm = boot_default_image("linux-snap", 2, false);
    wait_for_agent(&mut vm.vmm, &vm.uds, BOOT_LIMIT);
    put_file(&vm.uds, "/tmp/marker", b"written before the snapshot\n");
    vm_api(&vm.api, "PATCH", "/vm", json!({"state": "Paused"}));
    let (state, mem) = (vm.dir.join("full.state"), vm.dir.join("full.mem"));
    vm_api(
        &vm.api,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem}),
    );
    drop(vm.vmm);
    for backend in ["File", "Uffd"] {
        let t = Instant::now();
        let (vmm, uds) = restore(&vm.dir, backend, &state, &mem, backend);
        let _ = writeln!(
            std::io::stderr(),
            "{backend} backend: restore to agent health in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        assert_eq!(
            get_file(&uds, "/tmp/marker"),
            b"written before the snapshot\n"
        );
        put_file(&uds, "/tmp/after", backend.as_bytes());
        assert_eq!(get_file(&uds, "/tmp/after"), backend.as_bytes());
        drop(vmm);
    }
    let _ = std::fs::remove_dir_all(&vm.dir);
}

/// A Diff snapshot of a Linux guest merged onto its Full base (`airlock-vmm snapshot-merge`)
/// restores to the Diff's moment: what was written between the two is there.
#[test]
fn linux_guest_diff_snapshot_merges_and_restores() {
    if default_image().is_none() {
        not_run(
            "linux_guest_diff_snapshot_merges_and_restores",
            "images/out/default is not built (bash images/build.sh)",
        );
        return;
    }
    if !can_run_linux_guests("linux_guest_diff_snapshot_merges_and_restores") {
        return;
    }
    let mut vm = boot_default_image("linux-diff", 1, true);
    wait_for_agent(&mut vm.vmm, &vm.uds, BOOT_LIMIT);
    vm_api(&vm.api, "PATCH", "/vm", json!({"state": "Paused"}));
    let (base_state, base_mem) = (vm.dir.join("base.state"), vm.dir.join("base.mem"));
    vm_api(
        &vm.api,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": base_state, "mem_file_path": base_mem}),
    );
    vm_api(&vm.api, "PATCH", "/vm", json!({"state": "Resumed"}));
    put_file(
        &vm.uds,
        "/tmp/between",
        b"after the base, before the diff\n",
    );
    vm_api(&vm.api, "PATCH", "/vm", json!({"state": "Paused"}));
    let (diff_state, diff_mem) = (vm.dir.join("diff.state"), vm.dir.join("diff.mem"));
    vm_api(
        &vm.api,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Diff", "snapshot_path": diff_state, "mem_file_path": diff_mem}),
    );
    drop(vm.vmm);
    let out = std::process::Command::new(airlock_tests::vmm_bin())
        .args(["snapshot-merge", "--base"])
        .arg(&base_mem)
        .arg("--diff")
        .arg(&diff_mem)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (vmm, uds) = restore(&vm.dir, "merged", &diff_state, &base_mem, "File");
    assert_eq!(
        get_file(&uds, "/tmp/between"),
        b"after the base, before the diff\n"
    );
    drop(vmm);
    let _ = std::fs::remove_dir_all(&vm.dir);
}
