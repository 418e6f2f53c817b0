//! Host checks before a device is passed through, over a sysfs root (`/sys`, or a fake tree in
//! tests). Each refusal names its cause and the command that fixes it.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::{bind_commands, DevicePassthroughConfig, PassthroughError, PciAddress};

/// Drivers a device may keep and still leave its IOMMU group usable by this VM: none
/// (unbound), pci-stub, and pcieport on bridges (the kernel's own allow-list, less vfio-pci:
/// a sibling bound to vfio-pci but not given to this VM is one another VM cannot have either).
const HARMLESS_DRIVERS: &[&str] = &["pci-stub", "pcieport"];

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The directory of `addr` under `sys`.
pub fn device_dir(sys: &Path, addr: &PciAddress) -> PathBuf {
    sys.join("bus/pci/devices").join(addr.to_string())
}

/// The driver `addr` is bound to, if any.
pub fn driver_of(sys: &Path, addr: &PciAddress) -> Option<String> {
    link_name(&device_dir(sys, addr).join("driver"))
}

/// The IOMMU group of `addr`, if the IOMMU covers it.
pub fn iommu_group_of(sys: &Path, addr: &PciAddress) -> Option<u32> {
    link_name(&device_dir(sys, addr).join("iommu_group"))?
        .parse()
        .ok()
}

/// The devices in IOMMU group `group`.
pub fn group_members(sys: &Path, group: u32) -> Vec<PciAddress> {
    let dir = sys
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let mut members: Vec<PciAddress> = fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    members.sort();
    members
}

/// Whether any IOMMU group exists (an IOMMU is on).
pub fn iommu_enabled(sys: &Path) -> bool {
    fs::read_dir(sys.join("kernel/iommu_groups"))
        .map(|mut it| it.next().is_some())
        .unwrap_or(false)
}

/// A device ready for passthrough: its address and IOMMU group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedDevice {
    pub address: PciAddress,
    pub group: u32,
}

/// Checks one device: it exists, an IOMMU is on, it is bound to vfio-pci, and every other
/// device of its IOMMU group is in `passed` or unbound.
pub fn check_device(
    sys: &Path,
    addr: &PciAddress,
    passed: &[PciAddress],
) -> Result<CheckedDevice, PassthroughError> {
    let dir = device_dir(sys, addr);
    if !dir.exists() {
        return Err(PassthroughError::DeviceNotFound(
            *addr,
            dir.display().to_string(),
        ));
    }
    if !iommu_enabled(sys) {
        return Err(PassthroughError::NoIommu(
            sys.join("kernel/iommu_groups").display().to_string(),
        ));
    }
    match driver_of(sys, addr) {
        Some(d) if d == "vfio-pci" => {}
        other => {
            return Err(PassthroughError::NotBoundToVfio {
                addr: *addr,
                driver: other.unwrap_or_else(|| "no driver".into()),
                commands: bind_commands(addr),
            })
        }
    }
    let group = iommu_group_of(sys, addr).ok_or_else(|| PassthroughError::NoIommuGroup {
        addr: *addr,
        path: dir.join("iommu_group").display().to_string(),
    })?;
    let blockers: Vec<(PciAddress, String)> = group_members(sys, group)
        .into_iter()
        .filter(|m| m != addr && !passed.contains(m))
        .filter_map(|m| {
            let driver = driver_of(sys, &m)?;
            (!HARMLESS_DRIVERS.contains(&driver.as_str())).then_some((m, driver))
        })
        .collect();
    if !blockers.is_empty() {
        let others: Vec<String> = blockers
            .iter()
            .map(|(m, d)| format!("{m} (driver {d})"))
            .collect();
        let unbind: Vec<String> = blockers
            .iter()
            .map(|(m, _)| format!("echo {m} > /sys/bus/pci/devices/{m}/driver/unbind"))
            .collect();
        return Err(PassthroughError::GroupNotViable {
            addr: *addr,
            group,
            others: others.join(", "),
            unbind: unbind.join("; "),
        });
    }
    Ok(CheckedDevice {
        address: *addr,
        group,
    })
}

/// Checks every configured device (addresses well formed, none twice, each passing
/// [`check_device`] with the others counted as given). Returns them in configuration order.
pub fn check_devices(
    sys: &Path,
    configs: &[DevicePassthroughConfig],
) -> Result<Vec<CheckedDevice>, PassthroughError> {
    let mut addrs: Vec<(PciAddress, &str)> = Vec::new();
    for c in configs {
        let a = c.validate()?;
        if let Some((_, first)) = addrs.iter().find(|(b, _)| *b == a) {
            return Err(PassthroughError::Duplicate(
                a,
                first.to_string(),
                c.id.clone(),
            ));
        }
        addrs.push((a, &c.id));
    }
    let passed: Vec<PciAddress> = addrs.iter().map(|(a, _)| *a).collect();
    passed
        .iter()
        .map(|a| check_device(sys, a, &passed))
        .collect()
}

/// The IOMMU groups of `devices`, once each (for the jailer's `--vfio-group`).
pub fn groups(devices: &[CheckedDevice]) -> Vec<u32> {
    devices
        .iter()
        .map(|d| d.group)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
pub mod fake {
    //! A fake sysfs tree in a temporary directory.

    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};

    pub struct FakeSys {
        pub root: PathBuf,
    }

    impl FakeSys {
        pub fn new(tag: &str) -> Self {
            let root = std::env::temp_dir().join(format!(
                "airlock-vfio-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
            std::fs::create_dir_all(root.join("bus/pci/drivers")).unwrap();
            std::fs::create_dir_all(root.join("kernel/iommu_groups")).unwrap();
            FakeSys { root }
        }

        /// A device at `addr`, with `driver` (if any) and in `group` (if any).
        pub fn device(&self, addr: &str, driver: Option<&str>, group: Option<u32>) {
            let dir = self.root.join("bus/pci/devices").join(addr);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(d) = driver {
                let ddir = self.root.join("bus/pci/drivers").join(d);
                std::fs::create_dir_all(&ddir).unwrap();
                symlink(&ddir, dir.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = self.root.join("kernel/iommu_groups").join(g.to_string());
                std::fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&gdir, dir.join("iommu_group")).unwrap();
                symlink(&dir, gdir.join("devices").join(addr)).unwrap();
            }
        }

        pub fn path(&self) -> &Path {
            &self.root
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeSys;
    use super::*;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn cfg(id: &str, addr: &str) -> DevicePassthroughConfig {
        DevicePassthroughConfig {
            id: id.into(),
            host_address: addr.into(),
        }
    }

    #[test]
    fn a_missing_device_is_named() {
        let sys = FakeSys::new("missing");
        let e = check_device(sys.path(), &a("0000:41:00.0"), &[]).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("0000:41:00.0 does not exist") && m.contains("lspci"),
            "{m}"
        );
    }

    #[test]
    fn no_iommu_says_how_to_turn_it_on() {
        let sys = FakeSys::new("noiommu");
        sys.device("0000:41:00.0", Some("nvidia"), None);
        let m = check_device(sys.path(), &a("0000:41:00.0"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("no IOMMU") && m.contains("intel_iommu=on") && m.contains("amd_iommu"),
            "{m}"
        );
    }

    #[test]
    fn a_device_on_another_driver_gets_the_bind_commands() {
        let sys = FakeSys::new("driver");
        sys.device("0000:41:00.0", Some("nvidia"), Some(12));
        let m = check_device(sys.path(), &a("0000:41:00.0"), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("bound to nvidia, not vfio-pci"), "{m}");
        assert!(
            m.contains("echo 0000:41:00.0 > /sys/bus/pci/devices/0000:41:00.0/driver/unbind"),
            "{m}"
        );
        assert!(
            m.contains("echo vfio-pci > /sys/bus/pci/devices/0000:41:00.0/driver_override"),
            "{m}"
        );
        assert!(
            m.contains("echo 0000:41:00.0 > /sys/bus/pci/drivers_probe"),
            "{m}"
        );
        let sys2 = FakeSys::new("nodriver");
        sys2.device("0000:41:00.0", None, Some(12));
        let m = check_device(sys2.path(), &a("0000:41:00.0"), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("bound to no driver"), "{m}");
    }

    #[test]
    fn a_device_outside_any_group_is_refused() {
        let sys = FakeSys::new("nogroup");
        sys.device("0000:00:02.0", None, Some(1));
        sys.device("0000:41:00.0", Some("vfio-pci"), None);
        let m = check_device(sys.path(), &a("0000:41:00.0"), &[])
            .unwrap_err()
            .to_string();
        assert!(m.contains("not in an IOMMU group"), "{m}");
    }

    #[test]
    fn a_shared_group_needs_every_member_given_or_unbound() {
        let sys = FakeSys::new("group");
        sys.device("0000:41:00.0", Some("vfio-pci"), Some(12));
        sys.device("0000:41:00.1", Some("snd_hda_intel"), Some(12));
        sys.device("0000:40:01.1", Some("pcieport"), Some(12));
        let m = gpu_with_its_audio_function(sys.path());
        assert!(
            !m.contains("0000:40:01.1"),
            "bridges on pcieport are allowed: {m}"
        );
        assert!(
            m.contains("echo 0000:41:00.1 > /sys/bus/pci/devices/0000:41:00.1/driver/unbind"),
            "{m}"
        );
    }

    /// 41:00.0 (vfio-pci) and 41:00.1 (snd_hda_intel) share group 12: the GPU alone is refused
    /// naming its sibling; both given are accepted. Returns the refusal.
    fn gpu_with_its_audio_function(sys: &Path) -> String {
        let gpu = a("0000:41:00.0");
        let m = check_device(sys, &gpu, &[gpu]).unwrap_err().to_string();
        assert!(
            m.contains("IOMMU group 12 with 0000:41:00.1 (driver snd_hda_intel)"),
            "{m}"
        );
        let both = [gpu, a("0000:41:00.1")];
        assert_eq!(check_device(sys, &gpu, &both).unwrap().group, 12);
        m
    }

    /// Inside a jail, `/sys` is the view airlock-jailer writes for `--vfio-device`: plain
    /// directories and relative links that dangle (only their last component is read).
    #[test]
    fn the_jailers_sysfs_view_gives_the_same_verdicts() {
        use std::os::unix::fs::symlink;
        let sys = FakeSys::new("jailview");
        for (addr, driver) in [
            ("0000:41:00.0", Some("vfio-pci")),
            ("0000:41:00.1", Some("snd_hda_intel")),
        ] {
            let dir = sys.path().join("bus/pci/devices").join(addr);
            std::fs::create_dir_all(&dir).unwrap();
            symlink(
                "../../../../kernel/iommu_groups/12",
                dir.join("iommu_group"),
            )
            .unwrap();
            if let Some(d) = driver {
                symlink(
                    format!("../../../../bus/pci/drivers/{d}"),
                    dir.join("driver"),
                )
                .unwrap();
            }
            let members = sys.path().join("kernel/iommu_groups/12/devices");
            std::fs::create_dir_all(&members).unwrap();
            symlink(
                format!("../../../../bus/pci/devices/{addr}"),
                members.join(addr),
            )
            .unwrap();
        }
        gpu_with_its_audio_function(sys.path());
    }

    #[test]
    fn unbound_siblings_are_fine_and_lists_are_checked_together() {
        let sys = FakeSys::new("list");
        sys.device("0000:41:00.0", Some("vfio-pci"), Some(12));
        sys.device("0000:41:00.1", None, Some(12));
        sys.device("0000:42:00.0", Some("vfio-pci"), Some(13));
        let devs = check_devices(
            sys.path(),
            &[cfg("gpu0", "0000:41:00.0"), cfg("gpu1", "0000:42:00.0")],
        )
        .unwrap();
        assert_eq!(groups(&devs), vec![12, 13]);
        let e = check_devices(sys.path(), &[cfg("a", "0000:41:00.0"), cfg("b", "41:00.0")])
            .unwrap_err();
        assert!(e.to_string().contains("passed through twice"), "{e}");
    }
}
