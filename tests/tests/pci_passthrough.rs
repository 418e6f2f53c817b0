//! End to end GPU (or any PCI device) passthrough: on a host with an IOMMU and a device bound to
//! vfio-pci, boots Debian's cloud kernel with that device in `device-passthrough` and checks
//! that the guest kernel enumerated it through ECAM with the host's vendor:device id. Elsewhere
//! it prints one line saying why it did not run; the verdict comes from `airlock-vmm check-host`.
//!
//! `AIRLOCK_PASSTHROUGH_DEVICE=0000:41:00.0` picks the device; otherwise the first vfio-pci
//! device check-host lists is used. The test never changes a device's driver binding.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use airlock_tests::{guest_config, host_report, repo_root, scratch_dir, VmmProcess};

fn skip(why: &str) {
    // Straight to stderr: libtest captures print! of passing tests, and this line must be seen.
    airlock_tests::not_run("passed_through_device_is_enumerated_by_a_linux_guest", why);
}

/// The device to pass, as (address, "vendor:device"), or why there is none.
fn passthrough_candidate(report: &serde_json::Value) -> Result<(String, String), String> {
    if report["linux_guests"] != serde_json::Value::Bool(true) {
        return Err(format!(
            "this host cannot run Linux guests: {}",
            report["reason"].as_str().unwrap_or("no reason given")
        ));
    }
    let vfio = &report["vfio"];
    if vfio["iommu_enabled"] != serde_json::Value::Bool(true) {
        return Err("this host has no IOMMU enabled (check-host: vfio.iommu_enabled is false; see docs/gpu-passthrough.md)".into());
    }
    let devices = vfio["vfio_pci_devices"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let wanted = std::env::var("AIRLOCK_PASSTHROUGH_DEVICE").ok();
    let device = devices.iter().find(|d| match &wanted {
        Some(w) => d["address"].as_str() == Some(w.as_str()),
        None => true,
    });
    match device {
        Some(d) => Ok((
            d["address"].as_str().unwrap_or_default().to_string(),
            d["id"].as_str().unwrap_or_default().to_string(),
        )),
        None => Err(match wanted {
            Some(w) => format!("AIRLOCK_PASSTHROUGH_DEVICE={w} is not bound to vfio-pci"),
            None => "no PCI device on this host is bound to vfio-pci (docs/gpu-passthrough.md says how to bind one)".into(),
        }),
    }
}

/// The guest kernel: `images/out/linux/bzImage` where it was built, else Debian's cloud kernel
/// from the default image (PCI, ACPI and MMCONFIG built in), else build the former.
fn linux_kernel() -> PathBuf {
    let kernel = repo_root().join("images/out/linux/bzImage");
    let debian = repo_root().join("images/out/default/vmlinux");
    if !kernel.exists() && debian.exists() {
        return debian;
    }
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
fn passed_through_device_is_enumerated_by_a_linux_guest() {
    let (address, id) = match passthrough_candidate(&host_report()) {
        Ok(c) => c,
        Err(why) => return skip(&why),
    };
    let kernel = linux_kernel();
    let dir = scratch_dir("pci-passthrough");
    let mut config: serde_json::Value = serde_json::from_str(&guest_config(
        &kernel,
        "console=ttyS0 reboot=k panic=-1 nomodule loglevel=7",
        2,
        1024,
    ))
    .unwrap();
    config["device-passthrough"] = serde_json::json!([{"id": "dev0", "host_address": address}]);
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut vmm = VmmProcess::spawn(&["--no-api", "--config-file", path.to_str().unwrap()]);
    let (status, console, stderr) = vmm.finish(Duration::from_secs(180));
    let text = console.join("\n");
    // Linux prints "pci 0000:00:01.0: [10de:2330] type 00 class 0x030200 ..." per function.
    let needle = format!("[{id}] type 00");
    assert!(
        text.contains("PCI: Using configuration type 1") || text.contains("MMCONFIG"),
        "the guest found no PCI configuration access\n{text}\n{stderr}"
    );
    assert!(
        text.contains(&needle),
        "the guest did not enumerate {address} ({id})\n{text}\n{stderr}"
    );
    assert!(
        text.contains("ECAM") || text.contains("MMCONFIG for domain 0000"),
        "ECAM was not described to the guest\n{text}"
    );
    assert!(status.success(), "{status}: {stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn candidate_selection_explains_every_skip() {
    let no_linux = serde_json::json!({"linux_guests": false, "reason": "no /dev/kvm"});
    assert!(passthrough_candidate(&no_linux)
        .unwrap_err()
        .contains("no /dev/kvm"));
    let no_iommu = serde_json::json!({"linux_guests": true, "vfio": {"iommu_enabled": false}});
    assert!(passthrough_candidate(&no_iommu)
        .unwrap_err()
        .contains("no IOMMU"));
    let none = serde_json::json!({"linux_guests": true, "vfio": {"iommu_enabled": true, "vfio_pci_devices": []}});
    if std::env::var("AIRLOCK_PASSTHROUGH_DEVICE").is_err() {
        assert!(passthrough_candidate(&none)
            .unwrap_err()
            .contains("bound to vfio-pci"));
        let one = serde_json::json!({"linux_guests": true, "vfio": {"iommu_enabled": true,
            "vfio_pci_devices": [{"address": "0000:41:00.0", "id": "10de:2330", "iommu_group": "12"}]}});
        assert_eq!(
            passthrough_candidate(&one).unwrap(),
            ("0000:41:00.0".into(), "10de:2330".into())
        );
    }
}
