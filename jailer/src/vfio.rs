//! `--vfio-device`: the part of sysfs a passed-through device needs, rebuilt inside the chroot.
//!
//! The jail has no `/sys`, yet the VMM finds a device's IOMMU group through
//! `/sys/bus/pci/devices/<addr>/iommu_group` (vfio-ioctls reads that link) and checks the group
//! through `/sys/kernel/iommu_groups/<n>/devices` and each member's `driver` link. The jailer reads
//! those links on the host before the pivot and recreates them, as relative symlinks whose last
//! component is all that is read, in root-owned directories the VMM cannot change. The VMM then
//! runs its own checks against this view and refuses exactly what it would refuse outside a jail.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::JailerError;

/// `dddd:bb:dd.f`, lowercase hex, as sysfs names PCI functions.
pub fn validate_address(addr: &str) -> Result<(), JailerError> {
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let ok = match addr.split(':').collect::<Vec<_>>().as_slice() {
        [domain, bus, slot_fn] => match slot_fn.split_once('.') {
            Some((slot, func)) => {
                hex(domain, 4)
                    && hex(bus, 2)
                    && hex(slot, 2)
                    && u8::from_str_radix(slot, 16).is_ok_and(|s| s < 32)
                    && matches!(func, "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7")
            }
            None => false,
        },
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(JailerError::InvalidVfioDevice(addr.to_string()))
    }
}

/// One symlink of the view: `path` relative to the chroot, `target` as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewLink {
    pub path: PathBuf,
    pub target: PathBuf,
}

/// What `--vfio-device` adds to a jail: the IOMMU groups whose nodes go in `/dev/vfio`, and the
/// sysfs links.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SysfsView {
    pub groups: Vec<u32>,
    pub links: Vec<ViewLink>,
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// Reads the devices' groups, every member of those groups and the members' drivers from `sys`
/// (the host's `/sys`, or a fake tree in tests).
pub fn plan_view(sys: &Path, devices: &[String]) -> Result<SysfsView, JailerError> {
    let mut view = SysfsView::default();
    for addr in devices {
        let dir = sys.join("bus/pci/devices").join(addr);
        if !dir.exists() {
            return Err(JailerError::VfioDevice {
                addr: addr.clone(),
                reason: format!(
                    "no such PCI device: {} does not exist (see `lspci -D`)",
                    dir.display()
                ),
            });
        }
        let group = link_name(&dir.join("iommu_group"))
            .and_then(|g| g.parse::<u32>().ok())
            .ok_or_else(|| JailerError::VfioDevice {
                addr: addr.clone(),
                reason: format!(
                    "it has no IOMMU group ({} is missing): turn the IOMMU on (intel_iommu=on or amd_iommu=on on the kernel command line)",
                    dir.join("iommu_group").display()
                ),
            })?;
        if !view.groups.contains(&group) {
            view.groups.push(group);
        }
    }
    view.groups.sort_unstable();
    for &group in &view.groups {
        let members_dir = sys.join(format!("kernel/iommu_groups/{group}/devices"));
        let mut members: Vec<String> = fs::read_dir(&members_dir)
            .map_err(|e| JailerError::VfioDevice {
                addr: devices.join(","),
                reason: format!(
                    "cannot list IOMMU group {group} ({}): {e}",
                    members_dir.display()
                ),
            })?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|m| validate_address(m).is_ok())
            .collect();
        members.sort();
        for member in members {
            let member_dir = PathBuf::from("sys/bus/pci/devices").join(&member);
            view.links.push(ViewLink {
                path: PathBuf::from(format!("sys/kernel/iommu_groups/{group}/devices/{member}")),
                target: PathBuf::from(format!("../../../../bus/pci/devices/{member}")),
            });
            view.links.push(ViewLink {
                path: member_dir.join("iommu_group"),
                target: PathBuf::from(format!("../../../../kernel/iommu_groups/{group}")),
            });
            if let Some(driver) =
                link_name(&sys.join("bus/pci/devices").join(&member).join("driver"))
            {
                view.links.push(ViewLink {
                    path: member_dir.join("driver"),
                    target: PathBuf::from(format!("../../../../bus/pci/drivers/{driver}")),
                });
            }
        }
    }
    Ok(view)
}

/// Creates the view under `root` (the chroot, from the host side): directories 0755 and links
/// owned by root, so the unprivileged VMM reads them but cannot change them.
/// A view left by an earlier jail with this id (a crash skips cleanup) is removed first, whole:
/// a stale `driver` link or group member would make the VMM's verdict differ from the host's.
/// The jailer owns `/sys` in the chroot when a device is given.
pub fn write_view(root: &Path, view: &SysfsView) -> Result<(), JailerError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JailerError::CreateChroot { path, source }
    };
    if view.links.is_empty() {
        return Ok(());
    }
    let sys = root.join("sys");
    // remove_dir_all does not follow a symlink planted at `sys`; it removes the link.
    match fs::remove_dir_all(&sys) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(&sys)(e)),
        _ => {}
    }
    for link in &view.links {
        let path = root.join(&link.path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(fail(parent))?;
        }
        symlink(&link.target, &path).map_err(fail(&path))?;
    }
    set_tree_mode(&sys).map_err(fail(&sys))
}

fn set_tree_mode(dir: &Path) -> std::io::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_tree_mode(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake host sysfs: devices with their group and driver links, as the kernel lays them out.
    struct FakeSys(PathBuf);

    impl FakeSys {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("airlock-jailer-vfio-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("kernel/iommu_groups")).unwrap();
            FakeSys(dir)
        }

        fn device(&self, addr: &str, group: Option<u32>, driver: Option<&str>) {
            let real = self.0.join("devices/pci0000:00").join(addr);
            fs::create_dir_all(&real).unwrap();
            fs::create_dir_all(self.0.join("bus/pci/devices")).unwrap();
            symlink(&real, self.0.join("bus/pci/devices").join(addr)).unwrap();
            if let Some(g) = group {
                let gdir = self.0.join(format!("kernel/iommu_groups/{g}/devices"));
                fs::create_dir_all(&gdir).unwrap();
                symlink(&real, gdir.join(addr)).unwrap();
                symlink(
                    self.0.join(format!("kernel/iommu_groups/{g}")),
                    real.join("iommu_group"),
                )
                .unwrap();
            }
            if let Some(d) = driver {
                symlink(self.0.join("bus/pci/drivers").join(d), real.join("driver")).unwrap();
            }
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn addresses_are_checked() {
        for good in ["0000:41:00.0", "0001:ff:1f.7"] {
            validate_address(good).unwrap();
        }
        for bad in [
            "41:00.0",
            "0000:41:00",
            "0000:41:20.0",
            "0000:41:00.8",
            "0000:4G:00.0",
            "0000:41:00.0/..",
            "../../etc",
        ] {
            let err = validate_address(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("dddd:bb:dd.f"), "{err}");
        }
    }

    #[test]
    fn the_view_mirrors_the_group_its_members_and_their_drivers() {
        let sys = FakeSys::new("view");
        sys.device("0000:41:00.0", Some(12), Some("vfio-pci"));
        sys.device("0000:41:00.1", Some(12), None);
        sys.device("0000:40:01.0", Some(12), Some("pcieport"));
        sys.device("0000:00:02.0", Some(3), Some("i915"));
        let view = plan_view(&sys.0, &["0000:41:00.0".into()]).unwrap();
        assert_eq!(view.groups, vec![12]);
        // Only group 12's members, each with its group link; a driver link where one is bound.
        let paths: Vec<String> = view
            .links
            .iter()
            .map(|l| l.path.display().to_string())
            .collect();
        assert!(paths.iter().all(|p| !p.contains("00:02.0")), "{paths:?}");
        assert_eq!(paths.len(), 3 + 3 + 2, "{paths:?}");

        let root = sys.0.join("chroot");
        fs::create_dir_all(&root).unwrap();
        write_view(&root, &view).unwrap();
        // The jailed VMM reads only last components: the same answers as the host's sysfs.
        let jailed = root.join("sys");
        for (addr, group, driver) in [
            ("0000:41:00.0", "12", Some("vfio-pci")),
            ("0000:41:00.1", "12", None),
            ("0000:40:01.0", "12", Some("pcieport")),
        ] {
            let dev = jailed.join("bus/pci/devices").join(addr);
            assert!(dev.exists(), "{addr}");
            assert_eq!(link_name(&dev.join("iommu_group")).as_deref(), Some(group));
            assert_eq!(link_name(&dev.join("driver")).as_deref(), driver);
        }
        let mut members: Vec<String> = fs::read_dir(jailed.join("kernel/iommu_groups/12/devices"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        members.sort();
        assert_eq!(members, ["0000:40:01.0", "0000:41:00.0", "0000:41:00.1"]);
        let mode = fs::metadata(jailed.join("bus/pci/devices/0000:41:00.0"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        // A second jail start over a leftover view replaces it whole: a member that went away
        // and a planted symlink do not survive.
        let stale = jailed.join("bus/pci/devices/0000:99:00.0");
        fs::create_dir_all(&stale).unwrap();
        symlink("../../../../bus/pci/drivers/nvidia", stale.join("driver")).unwrap();
        write_view(&root, &view).unwrap();
        assert!(!stale.exists());
        fs::remove_dir_all(&jailed).unwrap();
        symlink(&sys.0, &jailed).unwrap();
        write_view(&root, &view).unwrap();
        assert!(
            fs::symlink_metadata(&jailed).unwrap().is_dir(),
            "sys is a directory again"
        );
        assert!(
            sys.0.join("bus/pci/devices/0000:41:00.0").exists(),
            "the host tree is intact"
        );
    }

    #[test]
    fn two_devices_of_one_group_need_the_group_once() {
        let sys = FakeSys::new("twice");
        sys.device("0000:41:00.0", Some(12), Some("vfio-pci"));
        sys.device("0000:41:00.1", Some(12), Some("vfio-pci"));
        sys.device("0000:81:00.0", Some(40), Some("vfio-pci"));
        let view = plan_view(
            &sys.0,
            &[
                "0000:81:00.0".into(),
                "0000:41:00.1".into(),
                "0000:41:00.0".into(),
            ],
        )
        .unwrap();
        assert_eq!(view.groups, vec![12, 40]);
    }

    #[test]
    fn a_missing_device_or_group_is_named() {
        let sys = FakeSys::new("missing");
        sys.device("0000:41:00.0", None, Some("vfio-pci"));
        let err = plan_view(&sys.0, &["0000:42:00.0".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0000:42:00.0") && err.contains("no such PCI device"),
            "{err}"
        );
        let err = plan_view(&sys.0, &["0000:41:00.0".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0000:41:00.0")
                && err.contains("no IOMMU group")
                && err.contains("intel_iommu=on"),
            "{err}"
        );
    }
}
