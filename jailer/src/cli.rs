//! The command line, Firecracker's jailer flags where they overlap, and the checks on each value.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::JailerError;

/// Firecracker's default chroot base.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
/// Longest VM id, as in Firecracker.
pub const MAX_ID_LEN: usize = 64;
/// Firecracker's default for `no-file`.
pub const DEFAULT_NO_FILE: u64 = 2048;

#[derive(Parser, Debug)]
#[command(
    name = "airlock-jailer",
    version,
    about = "Start airlock-vmm confined: chroot, namespaces, cgroups, rlimits, an unprivileged user",
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(flatten)]
    pub jail: JailArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Args, Debug, Clone)]
pub struct JailArgs {
    /// The VM's id: letters, digits and `-`, at most 64 characters. Names the chroot and the
    /// cgroup, and is passed to the VMM as `--id`.
    #[arg(long, required = true)]
    pub id: Option<String>,
    /// The VMM binary; it is copied to `<chroot-base-dir>/<file name>/<id>/root/<file name>`.
    #[arg(long, value_name = "PATH", required = true)]
    pub exec_file: Option<PathBuf>,
    /// The user the VMM runs as.
    #[arg(long, required = true)]
    pub uid: Option<u32>,
    /// The group the VMM runs as.
    #[arg(long, required = true)]
    pub gid: Option<u32>,
    #[command(flatten)]
    pub place: PlaceArgs,
    /// A network namespace to join, such as /var/run/netns/NAME (`ip netns add NAME`).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// A cgroup file to write, as `<controller>.<file>=<value>` (e.g. `memory.limit_in_bytes=512M`
    /// with v1, `memory.max=536870912` with v2). Repeatable.
    #[arg(long = "cgroup", value_name = "KEY=VALUE")]
    pub cgroups: Vec<String>,
    /// `fsize=<bytes>`, `no-file=<count>` or `memlock=<bytes>`. Repeatable. no-file defaults to
    /// 2048; with a VFIO device or group, memlock is raised for DMA pinning (see the README).
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE")]
    pub resource_limits: Vec<String>,
    /// Run the VMM as PID 1 of a new PID namespace: it sees no host process.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Detach: new session, standard I/O to /dev/null; the jailer returns once the VMM runs and
    /// keeps supervising it in the background (to clean up when it ends).
    #[arg(long)]
    pub daemonize: bool,
    /// A VFIO group to pass through (creates /dev/vfio/vfio and /dev/vfio/<group>). Repeatable.
    #[arg(long = "vfio-group", value_name = "GROUP")]
    pub vfio_groups: Vec<u32>,
    /// A PCI device to pass through, as `lspci -D` names it (0000:41:00.0): its IOMMU group's
    /// nodes go in /dev/vfio and its sysfs links in /sys of the chroot. Repeatable.
    #[arg(long = "vfio-device", value_name = "ADDRESS")]
    pub vfio_devices: Vec<String>,
    /// Where sysfs is, instead of /sys. For tests.
    #[arg(long, value_name = "DIR", hide = true, default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// The VMM's own arguments, after `--`.
    #[arg(last = true, value_name = "VMM ARGS")]
    pub exec_args: Vec<OsString>,
}

/// Where a jail lives: shared by the jail and by `cleanup`.
#[derive(Args, Debug, Clone)]
pub struct PlaceArgs {
    /// Base of the chroot directories.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CHROOT_BASE)]
    pub chroot_base_dir: PathBuf,
    /// cgroup version: 1 (one hierarchy per controller) or 2 (the unified hierarchy).
    #[arg(long, default_value = "1", value_parser = clap::value_parser!(u8).range(1..=2))]
    pub cgroup_version: u8,
    /// The cgroup (relative to each hierarchy's root) under which the VM's `<id>` cgroup is
    /// created. Defaults to the exec file's name, as Firecracker does.
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// Where the cgroup hierarchies are mounted, instead of what /proc/self/mounts says: with v1,
    /// `<DIR>/<controller>`; with v2, `<DIR>` itself. For tests and unusual hosts.
    #[arg(long, value_name = "DIR", hide = true)]
    pub cgroup_root: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Remove what a jail left behind after a crash: its chroot and its cgroups.
    Cleanup {
        #[arg(long)]
        id: String,
        /// The exec file's name (or path) the jail was started with.
        #[arg(long, value_name = "NAME", default_value = "airlock-vmm")]
        exec_file: PathBuf,
        #[command(flatten)]
        place: PlaceArgs,
        /// Kill processes still in the VM's cgroups instead of refusing.
        #[arg(long)]
        kill: bool,
    },
    /// Print, as one JSON line, what a process in a jail sees (user, PID, root, environment,
    /// descriptors, devices). Run the jailer binary itself as the `--exec-file`, with `-- inspect`,
    /// to check a jail configuration.
    Inspect {
        /// Also attach to this TAP interface through /dev/net/tun.
        #[arg(long)]
        tap: Option<String>,
    },
}

/// The checked jail request.
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub id: String,
    pub exec_file: PathBuf,
    pub exec_name: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub netns: Option<PathBuf>,
    pub cgroup_version: u8,
    pub parent_cgroup: String,
    pub cgroup_root: Option<PathBuf>,
    pub cgroups: Vec<CgroupSetting>,
    pub rlimits: Vec<ResourceLimit>,
    pub new_pid_ns: bool,
    pub daemonize: bool,
    pub vfio_groups: Vec<u32>,
    pub vfio_devices: Vec<String>,
    pub sysfs_root: PathBuf,
    pub exec_args: Vec<OsString>,
}

/// One `--cgroup KEY=VALUE`: the controller is the key up to its first `.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    pub controller: String,
    pub file: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceLimit {
    Fsize(u64),
    NoFile(u64),
    Memlock(u64),
}

/// Letters, digits and `-`, 1 to 64 characters (Firecracker's rule).
pub fn validate_id(id: &str) -> Result<(), JailerError> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.len() > MAX_ID_LEN {
        "it is longer than 64 characters"
    } else if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        "only ASCII letters, digits and `-` are allowed"
    } else {
        return Ok(());
    };
    Err(JailerError::InvalidId {
        id: id.to_string(),
        reason,
    })
}

/// `<controller>.<file>=<value>`; the names are plain file names, the value a single line.
pub fn parse_cgroup(arg: &str) -> Result<CgroupSetting, JailerError> {
    let bad = |reason: &'static str| JailerError::InvalidCgroup {
        arg: arg.to_string(),
        reason,
    };
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE, such as memory.limit_in_bytes=512M"))?;
    let (controller, _) = key
        .split_once('.')
        .ok_or_else(|| bad("the key must be <controller>.<file>, such as memory.max"))?;
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
    };
    if !name_ok(controller) || !name_ok(key) || key.ends_with('.') || key.contains("..") {
        return Err(bad(
            "the key must be a cgroup file name: letters, digits, `.`, `_`, `-`",
        ));
    }
    if value.is_empty() || value.contains('\n') {
        return Err(bad("the value must be one non-empty line"));
    }
    Ok(CgroupSetting {
        controller: controller.to_string(),
        file: key.to_string(),
        value: value.to_string(),
    })
}

/// `fsize=<bytes>`, `no-file=<count>` or `memlock=<bytes>`.
pub fn parse_rlimit(arg: &str) -> Result<ResourceLimit, JailerError> {
    let bad = |reason: String| JailerError::InvalidResourceLimit {
        arg: arg.to_string(),
        reason,
    };
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected fsize=N, no-file=N or memlock=N".into()))?;
    let value: u64 = value
        .parse()
        .map_err(|_| bad(format!("{value:?} is not a non-negative integer")))?;
    match name {
        "fsize" => Ok(ResourceLimit::Fsize(value)),
        "no-file" => Ok(ResourceLimit::NoFile(value)),
        "memlock" => Ok(ResourceLimit::Memlock(value)),
        other => Err(bad(format!(
            "unknown resource {other:?}; known: fsize, no-file, memlock"
        ))),
    }
}

/// The exec file's name, used for the chroot layout and the default parent cgroup.
pub fn exec_name(path: &std::path::Path) -> Result<String, JailerError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_string)
        .ok_or_else(|| JailerError::ExecFile {
            path: path.to_path_buf(),
            reason: "it has no usable file name".into(),
        })
}

/// The parent cgroup: relative, no `..`, no empty components.
pub fn validate_parent_cgroup(parent: &str) -> Result<String, JailerError> {
    let trimmed = parent.trim_matches('/');
    let ok = !trimmed.is_empty()
        && trimmed
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\n'));
    if ok {
        Ok(trimmed.to_string())
    } else {
        Err(JailerError::InvalidParentCgroup(parent.to_string()))
    }
}

impl PlaceArgs {
    pub fn parent_cgroup_for(&self, exec_name: &str) -> Result<String, JailerError> {
        validate_parent_cgroup(self.parent_cgroup.as_deref().unwrap_or(exec_name))
    }
}

impl JailArgs {
    /// Checks every value; the first problem is the error.
    pub fn into_config(self) -> Result<JailConfig, JailerError> {
        // clap enforces these as required without a subcommand.
        let id = self.id.unwrap_or_default();
        validate_id(&id)?;
        let exec_file = self.exec_file.unwrap_or_default();
        let exec_name = exec_name(&exec_file)?;
        let parent_cgroup = self.place.parent_cgroup_for(&exec_name)?;
        let cgroups = self
            .cgroups
            .iter()
            .map(|c| parse_cgroup(c))
            .collect::<Result<Vec<_>, _>>()?;
        for addr in &self.vfio_devices {
            crate::vfio::validate_address(addr)?;
        }
        let rlimits = self
            .resource_limits
            .iter()
            .map(|r| parse_rlimit(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JailConfig {
            id,
            exec_file,
            exec_name,
            uid: self.uid.unwrap_or_default(),
            gid: self.gid.unwrap_or_default(),
            chroot_base: self.place.chroot_base_dir,
            netns: self.netns,
            cgroup_version: self.place.cgroup_version,
            parent_cgroup,
            cgroup_root: self.place.cgroup_root,
            cgroups,
            rlimits,
            new_pid_ns: self.new_pid_ns,
            daemonize: self.daemonize,
            vfio_groups: self.vfio_groups,
            vfio_devices: self.vfio_devices,
            sysfs_root: self.sysfs_root,
            exec_args: self.exec_args,
        })
    }
}

/// The rlimits to set: the defaults, overridden by the user's.
pub fn effective_rlimits(user: &[ResourceLimit]) -> Vec<ResourceLimit> {
    let mut out = vec![ResourceLimit::NoFile(DEFAULT_NO_FILE)];
    for limit in user {
        out.retain(|l| std::mem::discriminant(l) != std::mem::discriminant(limit));
        out.push(*limit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("airlock-jailer").chain(args.iter().copied()))
    }

    #[test]
    fn ids() {
        assert!(validate_id("vm-1").is_ok());
        assert!(validate_id("551e7604-e35c-42b3-b825-416853441234").is_ok());
        assert!(validate_id(&"a".repeat(64)).is_ok());
        for bad in [
            "",
            "a/b",
            "a.b",
            "..",
            "a b",
            "vm_1",
            "ünï",
            &"a".repeat(65),
        ] {
            let err = validate_id(bad).unwrap_err().to_string();
            assert!(err.contains("invalid VM id"), "{bad}: {err}");
        }
        assert!(validate_id(&"a".repeat(65))
            .unwrap_err()
            .to_string()
            .contains("longer than 64"));
    }

    #[test]
    fn cgroup_settings() {
        assert_eq!(
            parse_cgroup("memory.limit_in_bytes=512M").unwrap(),
            CgroupSetting {
                controller: "memory".into(),
                file: "memory.limit_in_bytes".into(),
                value: "512M".into()
            }
        );
        assert_eq!(
            parse_cgroup("cpuset.cpus=0-1").unwrap().controller,
            "cpuset"
        );
        assert_eq!(
            parse_cgroup("cpu.max=10000 100000").unwrap().value,
            "10000 100000"
        );
        for bad in [
            "memory",
            "memory=1",
            "=1",
            "memory.max=",
            "../../etc/passwd.x=1",
            "memory./x=1",
            "memory..x=1",
            "memory.=1",
            "memory.max=1\n2",
        ] {
            assert!(parse_cgroup(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resource_limits() {
        assert_eq!(
            parse_rlimit("fsize=1024").unwrap(),
            ResourceLimit::Fsize(1024)
        );
        assert_eq!(
            parse_rlimit("no-file=64").unwrap(),
            ResourceLimit::NoFile(64)
        );
        assert!(parse_rlimit("nofile=64")
            .unwrap_err()
            .to_string()
            .contains("unknown resource"));
        assert_eq!(
            parse_rlimit("memlock=4294967296").unwrap(),
            ResourceLimit::Memlock(4 << 30)
        );
        assert!(parse_rlimit("fsize=-1").is_err());
        assert!(parse_rlimit("fsize").is_err());
        assert_eq!(
            effective_rlimits(&[]),
            vec![ResourceLimit::NoFile(DEFAULT_NO_FILE)]
        );
        assert_eq!(
            effective_rlimits(&[ResourceLimit::NoFile(10), ResourceLimit::Fsize(5)]),
            vec![ResourceLimit::NoFile(10), ResourceLimit::Fsize(5)]
        );
        for bad in ["--vfio-device=41:00.0", "--vfio-device=0000:41:00.0/../x"] {
            let args = [
                "--id",
                "vm1",
                "--exec-file",
                "/bin/true",
                "--uid",
                "1",
                "--gid",
                "1",
                bad,
            ];
            let err = parse(&args)
                .unwrap()
                .jail
                .into_config()
                .unwrap_err()
                .to_string();
            assert!(err.contains("dddd:bb:dd.f"), "{err}");
        }
    }

    #[test]
    fn firecracker_flags_parse() {
        let cli = parse(&[
            "--id",
            "vm1",
            "--exec-file",
            "/usr/bin/airlock-vmm",
            "--uid",
            "123",
            "--gid",
            "100",
            "--chroot-base-dir",
            "/tmp/j",
            "--netns",
            "/var/run/netns/x",
            "--cgroup-version",
            "2",
            "--cgroup",
            "memory.max=1000000",
            "--cgroup",
            "pids.max=10",
            "--parent-cgroup",
            "airlock/vms",
            "--resource-limit",
            "fsize=10",
            "--new-pid-ns",
            "--daemonize",
            "--",
            "--api-sock",
            "/run/api.sock",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let cfg = cli.jail.into_config().unwrap();
        assert_eq!(cfg.exec_name, "airlock-vmm");
        assert_eq!(cfg.parent_cgroup, "airlock/vms");
        assert_eq!(cfg.cgroup_version, 2);
        assert_eq!(cfg.cgroups.len(), 2);
        assert!(cfg.new_pid_ns && cfg.daemonize);
        assert_eq!(cfg.exec_args, ["--api-sock", "/run/api.sock"]);
    }

    #[test]
    fn defaults_and_required_flags() {
        let cli = parse(&[
            "--id",
            "a",
            "--exec-file",
            "/x/vmm",
            "--uid",
            "1",
            "--gid",
            "1",
        ])
        .unwrap();
        let cfg = cli.jail.into_config().unwrap();
        assert_eq!(cfg.chroot_base, PathBuf::from(DEFAULT_CHROOT_BASE));
        assert_eq!(cfg.cgroup_version, 1);
        assert_eq!(cfg.parent_cgroup, "vmm");
        assert!(parse(&["--id", "a", "--exec-file", "/x", "--uid", "1"]).is_err());
        assert!(parse(&[
            "--id",
            "a",
            "--exec-file",
            "/x",
            "--uid",
            "1",
            "--gid",
            "1",
            "--cgroup-version",
            "3"
        ])
        .is_err());
        let bad_parent = parse(&[
            "--id",
            "a",
            "--exec-file",
            "/x",
            "--uid",
            "1",
            "--gid",
            "1",
            "--parent-cgroup",
            "../x",
        ])
        .unwrap();
        assert!(bad_parent.jail.into_config().is_err());
    }

    #[test]
    fn subcommands_need_no_jail_flags() {
        let cli = parse(&["cleanup", "--id", "vm1", "--chroot-base-dir", "/tmp/j"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Cleanup { .. })));
        // How the jailer runs itself inside a jail: `--id` comes first.
        let cli = parse(&["--id", "vm1", "inspect", "--tap", "tap0"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Inspect { tap: Some(_) })
        ));
    }
}
