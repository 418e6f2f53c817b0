//! The chroot and what happens inside the jail process: the chroot layout and copy, the mount
//! namespace and pivot_root, device nodes, the network namespace, the user, exec.

use std::ffi::{CString, OsString};
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, chown, execve, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

use crate::cli::{JailConfig, ResourceLimit};
use crate::error::JailerError;

/// `<chroot_base>/<exec_name>/<id>`: removed as a whole when the VM ends.
pub fn jail_dir(chroot_base: &Path, exec_name: &str, id: &str) -> PathBuf {
    chroot_base.join(exec_name).join(id)
}

/// `<chroot_base>/<exec_name>/<id>/root`: the VMM's `/`.
pub fn chroot_dir(chroot_base: &Path, exec_name: &str, id: &str) -> PathBuf {
    jail_dir(chroot_base, exec_name, id).join("root")
}

/// Makes the chroot (files an orchestrator put there beforehand stay) and copies the exec file
/// to `/<exec_name>` in it. A copy, not a hard link: the jailed copy's owner and mode are ours
/// to set, and changing them cannot touch the installed binary.
pub fn prepare_chroot(cfg: &JailConfig) -> Result<PathBuf, JailerError> {
    let meta = fs::metadata(&cfg.exec_file).map_err(|e| JailerError::ExecFile {
        path: cfg.exec_file.clone(),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(JailerError::ExecFile {
            path: cfg.exec_file.clone(),
            reason: "it is not a regular file".into(),
        });
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(JailerError::ExecFile {
            path: cfg.exec_file.clone(),
            reason: "it is not executable".into(),
        });
    }
    let root = chroot_dir(&cfg.chroot_base, &cfg.exec_name, &cfg.id);
    fs::create_dir_all(&root).map_err(|source| JailerError::CreateChroot {
        path: root.clone(),
        source,
    })?;
    let target = root.join(&cfg.exec_name);
    // A leftover copy may be busy or read-only; replace it.
    let _ = fs::remove_file(&target);
    fs::copy(&cfg.exec_file, &target).map_err(|source| JailerError::CopyExec {
        from: cfg.exec_file.clone(),
        to: target.clone(),
        source,
    })?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).map_err(|source| {
        JailerError::CopyExec {
            from: cfg.exec_file.clone(),
            to: target.clone(),
            source,
        }
    })?;
    Ok(root)
}

/// Sets the rlimits on the jailer; the VMM inherits them.
pub fn set_rlimits(limits: &[ResourceLimit]) -> Result<(), JailerError> {
    use nix::sys::resource::{setrlimit, Resource};
    for limit in limits {
        let (resource, name, value) = match *limit {
            ResourceLimit::Fsize(v) => (Resource::RLIMIT_FSIZE, "fsize", v),
            ResourceLimit::NoFile(v) => (Resource::RLIMIT_NOFILE, "no-file", v),
            ResourceLimit::Memlock(v) => (Resource::RLIMIT_MEMLOCK, "memlock", v),
        };
        setrlimit(resource, value, value).map_err(|source| JailerError::Rlimit {
            resource: name,
            value,
            source,
        })?;
    }
    Ok(())
}

/// Room above the guest's memory for the other pages VFIO pins (the VMM pins nothing else).
pub const DMA_MEMLOCK_MARGIN: u64 = 64 << 20;

/// The memlock a VFIO jail gets when `--resource-limit memlock=` is not given. VFIO pins all
/// guest memory for DMA, which counts against RLIMIT_MEMLOCK (a few MiB by default), and that
/// limit is then all that bounds what the VMM can pin, unless a cgroup memory limit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaMemlock {
    /// A cgroup memory limit bounds the VM: no second limit.
    Unlimited,
    /// The guest's memory from `--config-file`, plus [`DMA_MEMLOCK_MARGIN`].
    Bytes(u64),
    /// Neither is known (a VM configured over the API): the inherited limit stays.
    Inherited,
}

pub fn dma_memlock(cgroup_memory_limit: bool, guest_mib: Option<u64>) -> DmaMemlock {
    match (cgroup_memory_limit, guest_mib) {
        (true, _) => DmaMemlock::Unlimited,
        (false, Some(mib)) => DmaMemlock::Bytes((mib << 20).saturating_add(DMA_MEMLOCK_MARGIN)),
        (false, None) => DmaMemlock::Inherited,
    }
}

/// Applies [`dma_memlock`]'s answer. Without CAP_SYS_RESOURCE the limit cannot rise above the
/// hard limit: it is set to that, with a warning, and the VMM names RLIMIT_MEMLOCK if DMA
/// mapping then fails.
pub fn set_dma_memlock(plan: DmaMemlock) -> Result<(), JailerError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let hint = "pass --resource-limit memlock=<guest memory + 64 MiB>, or a cgroup memory limit";
    let target = match plan {
        DmaMemlock::Unlimited => RLIM_INFINITY,
        DmaMemlock::Bytes(n) => n,
        DmaMemlock::Inherited => {
            eprintln!(
                "airlock-jailer: warning: VFIO pins the guest's memory, but with no --config-file and no cgroup memory limit the memlock limit stays as inherited; {hint}"
            );
            return Ok(());
        }
    };
    if setrlimit(Resource::RLIMIT_MEMLOCK, target, target).is_ok() {
        return Ok(());
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|source| JailerError::Sys {
        step: "read the memlock resource limit",
        source,
    })?;
    eprintln!(
        "airlock-jailer: warning: cannot raise the memlock limit to {target} bytes for VFIO DMA (above the hard limit, and no CAP_SYS_RESOURCE); keeping {hard} bytes, so the guest's memory must fit in it"
    );
    setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard).map_err(|source| JailerError::Rlimit {
        resource: "memlock",
        value: hard,
        source,
    })
}

/// A device node to create in the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevNode {
    pub path: PathBuf,
    pub major: u64,
    pub minor: u64,
}

/// A device's numbers on this host: its /dev node, or else its /proc/misc entry (major 10).
fn host_device(
    what: &'static str,
    host_path: &Path,
    misc_name: Option<&str>,
    misc: &str,
) -> Result<(u64, u64), JailerError> {
    if let Ok(meta) = fs::metadata(host_path) {
        if meta.file_type().is_char_device() {
            let rdev = meta.rdev();
            return Ok((nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)));
        }
    }
    if let Some(name) = misc_name {
        if let Some(minor) = misc_minor(misc, name) {
            return Ok((10, minor));
        }
    }
    Err(JailerError::HostDevice {
        what,
        path: host_path.to_path_buf(),
        reason: "no character device there, and none in /proc/misc".into(),
    })
}

/// `/proc/misc` lines are `<minor> <name>`.
fn misc_minor(misc: &str, name: &str) -> Option<u64> {
    misc.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let minor = f.next()?.parse().ok()?;
        (f.next()? == name).then_some(minor)
    })
}

/// The nodes the VMM needs: /dev/kvm and /dev/net/tun (required), /dev/userfaultfd (when the host
/// has it), and the VFIO container and groups when devices are passed through. Numbers come from
/// the host, read before the pivot.
pub fn device_plan(vfio_groups: &[u32]) -> Result<Vec<DevNode>, JailerError> {
    let misc = fs::read_to_string("/proc/misc").unwrap_or_default();
    device_plan_from(vfio_groups, &misc, Path::new("/dev"))
}

fn device_plan_from(
    vfio_groups: &[u32],
    misc: &str,
    host_dev: &Path,
) -> Result<Vec<DevNode>, JailerError> {
    let mut nodes = Vec::new();
    let mut add = |path: &str, (major, minor): (u64, u64)| {
        nodes.push(DevNode {
            path: PathBuf::from(path),
            major,
            minor,
        })
    };
    add(
        "/dev/kvm",
        host_device("KVM device", &host_dev.join("kvm"), Some("kvm"), misc)?,
    );
    add(
        "/dev/net/tun",
        host_device("TUN device", &host_dev.join("net/tun"), Some("tun"), misc)?,
    );
    if let Ok(n) = host_device(
        "userfaultfd device",
        &host_dev.join("userfaultfd"),
        Some("userfaultfd"),
        misc,
    ) {
        add("/dev/userfaultfd", n);
    }
    if !vfio_groups.is_empty() {
        add(
            "/dev/vfio/vfio",
            host_device(
                "VFIO container device",
                &host_dev.join("vfio/vfio"),
                Some("vfio"),
                misc,
            )?,
        );
        for group in vfio_groups {
            let path = format!("/dev/vfio/{group}");
            let numbers = host_device(
                "VFIO group device",
                &host_dev.join(format!("vfio/{group}")),
                None,
                misc,
            )?;
            add(&path, numbers);
        }
    }
    Ok(nodes)
}

/// New mount namespace, nothing propagating back to the host, then `pivot_root` into the chroot
/// and detach the old root, so no host path stays reachable.
pub fn enter_chroot(root: &Path) -> Result<(), JailerError> {
    let sys = |step| move |source| JailerError::Sys { step, source };
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("create a mount namespace (unshare)"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("make the mounts private to the jail (MS_SLAVE)"))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| JailerError::SysPath {
        step: "bind-mount the chroot",
        path: root.to_path_buf(),
        source,
    })?;
    chdir(root).map_err(|source| JailerError::SysPath {
        step: "enter the chroot",
        path: root.to_path_buf(),
        source,
    })?;
    let old_root = "old_root";
    match fs::create_dir(old_root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(JailerError::CreateChroot {
                path: root.join(old_root),
                source: e,
            })
        }
        _ => {}
    }
    pivot_root(".", old_root).map_err(sys("pivot_root into the chroot"))?;
    chdir("/").map_err(sys("change to the new root"))?;
    umount2(old_root, MntFlags::MNT_DETACH).map_err(sys("detach the host's root"))?;
    fs::remove_dir(old_root).map_err(|e| JailerError::SysPath {
        step: "remove",
        path: PathBuf::from("/old_root"),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    Ok(())
}

/// A directory in the jail, owned as given.
fn jail_dir_owned(path: &Path, mode: u32, owner: Option<(Uid, Gid)>) -> Result<(), JailerError> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(JailerError::CreateChroot {
                path: path.to_path_buf(),
                source: e,
            })
        }
        _ => {}
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        JailerError::CreateChroot {
            path: path.to_path_buf(),
            source,
        }
    })?;
    if let Some((uid, gid)) = owner {
        chown(path, Some(uid), Some(gid)).map_err(|source| JailerError::SysPath {
            step: "chown",
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// Creates the device nodes (mode 0600, owned by the VMM's user) and `/run` for the API socket.
/// Runs inside the jail, after the pivot.
pub fn make_devices(nodes: &[DevNode], uid: Uid, gid: Gid) -> Result<(), JailerError> {
    jail_dir_owned(Path::new("/dev"), 0o755, None)?;
    jail_dir_owned(Path::new("/run"), 0o755, Some((uid, gid)))?;
    for node in nodes {
        if let Some(parent) = node.path.parent() {
            jail_dir_owned(parent, 0o755, None)?;
        }
        // A node left by a crashed jail with this id is replaced.
        let _ = fs::remove_file(&node.path);
        let dev = makedev(node.major, node.minor);
        let fail = |step| {
            let path = node.path.clone();
            move |source| JailerError::SysPath { step, path, source }
        };
        mknod(
            &node.path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            dev,
        )
        .map_err(fail("create the device node"))?;
        chown(&node.path, Some(uid), Some(gid)).map_err(fail("chown the device node"))?;
    }
    Ok(())
}

/// Opens the network namespace while host paths are still reachable.
pub fn open_netns(path: &Path) -> Result<OwnedFd, JailerError> {
    let file = fs::File::open(path).map_err(|source| JailerError::OpenNetns {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(file.into())
}

pub fn join_netns(fd: &OwnedFd, path: &Path) -> Result<(), JailerError> {
    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|source| JailerError::JoinNetns {
        path: path.to_path_buf(),
        source,
    })
}

/// No supplementary groups, then the group, then the user (all of real, effective, saved).
pub fn drop_privileges(uid: Uid, gid: Gid) -> Result<(), JailerError> {
    let sys = |step| move |source| JailerError::Sys { step, source };
    setgroups(&[]).map_err(sys("clear the supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(sys("switch to the VMM's group"))?;
    setresuid(uid, uid, uid).map_err(sys("switch to the VMM's user"))?;
    Ok(())
}

/// argv for the VMM: `/<exec_name> --id <id> <args...>`, as Firecracker's jailer passes `--id`.
pub fn exec_argv(exec_name: &str, id: &str, args: &[OsString]) -> Vec<CString> {
    let mut argv = vec![
        CString::new(format!("/{exec_name}")).expect("validated name has no NUL"),
        CString::new("--id").expect("static"),
        CString::new(id).expect("validated id has no NUL"),
    ];
    for a in args {
        // A NUL cannot reach us in argv; an OsString from clap has none.
        argv.push(CString::new(a.as_bytes()).unwrap_or_default());
    }
    argv
}

/// Replaces the jail process with the VMM, with an empty environment.
pub fn exec(exec_name: &str, argv: &[CString]) -> JailerError {
    let path = CString::new(format!("/{exec_name}")).expect("validated name has no NUL");
    let env: [CString; 0] = [];
    match execve(&path, argv, &env) {
        Err(source) => JailerError::Exec {
            path: PathBuf::from(format!("/{exec_name}")),
            source,
        },
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_memlock_is_bounded_by_something() {
        assert_eq!(dma_memlock(true, Some(512)), DmaMemlock::Unlimited);
        assert_eq!(
            dma_memlock(false, Some(512)),
            DmaMemlock::Bytes((512 << 20) + DMA_MEMLOCK_MARGIN)
        );
        assert_eq!(dma_memlock(false, None), DmaMemlock::Inherited);
    }

    #[test]
    fn layout_matches_firecracker() {
        assert_eq!(
            chroot_dir(Path::new("/srv/jailer"), "airlock-vmm", "vm1"),
            Path::new("/srv/jailer/airlock-vmm/vm1/root")
        );
        let argv = exec_argv("airlock-vmm", "vm1", &["--no-api".into()]);
        let argv: Vec<_> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(argv, ["/airlock-vmm", "--id", "vm1", "--no-api"]);
    }

    #[test]
    fn device_numbers_come_from_the_host() {
        let misc = " 232 kvm\n200 tun\n257 userfaultfd\n196 vfio\n";
        let empty = std::env::temp_dir().join("airlock-jailer-no-dev");
        let nodes = device_plan_from(&[], misc, &empty).unwrap();
        assert_eq!(
            nodes,
            vec![
                DevNode {
                    path: "/dev/kvm".into(),
                    major: 10,
                    minor: 232
                },
                DevNode {
                    path: "/dev/net/tun".into(),
                    major: 10,
                    minor: 200
                },
                DevNode {
                    path: "/dev/userfaultfd".into(),
                    major: 10,
                    minor: 257
                },
            ]
        );
        // No userfaultfd on an older host: skipped. No KVM: refused.
        let nodes = device_plan_from(&[], "232 kvm\n200 tun\n", &empty).unwrap();
        assert_eq!(nodes.len(), 2);
        let err = device_plan_from(&[], "200 tun\n", &empty).unwrap_err();
        assert!(
            err.to_string().contains("the host has no KVM device"),
            "{err}"
        );
        // VFIO groups need their host nodes (dynamic major): none here.
        let err = device_plan_from(&[12], misc, &empty).unwrap_err();
        assert!(err.to_string().contains("VFIO group device"), "{err}");
        // The real host: numbers from the real nodes.
        if Path::new("/dev/kvm").exists() {
            let real = device_plan(&[]).unwrap();
            let kvm = fs::metadata("/dev/kvm").unwrap().rdev();
            assert_eq!(real[0].minor, nix::sys::stat::minor(kvm));
        }
    }
}
