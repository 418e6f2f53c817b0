//! cgroups v1 and v2: where the VM's cgroup goes, the files written to create it and apply its
//! limits (a plan, so it is testable against a temporary directory), and its removal.
//!
//! Layout, as Firecracker's: v1 `<controller mount>/<parent cgroup>/<id>` in each controller a
//! `--cgroup` names; v2 `<unified mount>/<parent cgroup>/<id>`, with the controllers enabled in
//! `cgroup.subtree_control` from the root down to the parent.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cli::CgroupSetting;
use crate::error::JailerError;

/// Where the hierarchies are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// v1: one mount per controller (or per group of controllers), found by controller name.
    V1 { mounts: Vec<(String, PathBuf)> },
    /// v2: the unified mount.
    V2 { root: PathBuf },
}

/// One step of creating the VM's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupOp {
    /// mkdir, fine if it exists.
    MakeDir(PathBuf),
    /// v1 cpuset: a new cgroup starts with no CPUs or memory nodes; copy the parent's when empty.
    InheritIfEmpty { file: PathBuf, from: PathBuf },
    /// v2: enable a controller for a cgroup's children (`+memory` into `cgroup.subtree_control`).
    EnableController { file: PathBuf, controller: String },
    /// Write a limit. The file must already exist: a missing one is an unknown key.
    WriteLimit {
        file: PathBuf,
        key: String,
        value: String,
    },
}

/// Everything about one VM's cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    pub version: u8,
    pub ops: Vec<CgroupOp>,
    /// The VM's own cgroup directories (one per v1 hierarchy, one for v2): the pid goes into
    /// each one's `cgroup.procs`, and cleanup removes them.
    pub vm_dirs: Vec<PathBuf>,
}

/// Finds the hierarchies from /proc/self/mounts, or under `root` when given (tests, odd hosts).
pub fn discover(version: u8, root: Option<&Path>) -> Result<Hierarchy, JailerError> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    discover_in(version, root, &mounts)
}

fn discover_in(version: u8, root: Option<&Path>, mounts: &str) -> Result<Hierarchy, JailerError> {
    if version == 2 {
        if let Some(root) = root {
            return Ok(Hierarchy::V2 {
                root: root.to_path_buf(),
            });
        }
        return mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3 && f[2] == "cgroup2").then(|| PathBuf::from(unescape(f[1])))
            })
            .next()
            .map(|root| Hierarchy::V2 { root })
            .ok_or(JailerError::NoCgroupV2);
    }
    if let Some(root) = root {
        let mounts = fs::read_dir(root)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok().map(|n| (n, e.path())))
                    .collect()
            })
            .unwrap_or_default();
        return Ok(Hierarchy::V1 { mounts });
    }
    let mut found = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[2] != "cgroup" {
            continue;
        }
        for option in f[3].split(',') {
            found.push((option.to_string(), PathBuf::from(unescape(f[1]))));
        }
    }
    Ok(Hierarchy::V1 { mounts: found })
}

/// /proc/mounts escapes spaces and such as `\040`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let octal = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(v) = octal {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Hierarchy {
    fn v1_mount(&self, controller: &str) -> Result<&Path, JailerError> {
        match self {
            Hierarchy::V1 { mounts } => mounts
                .iter()
                .find(|(name, _)| name == controller)
                .map(|(_, p)| p.as_path())
                .ok_or_else(|| JailerError::NoCgroupController(controller.to_string())),
            Hierarchy::V2 { .. } => unreachable!("v1 lookup on a v2 hierarchy"),
        }
    }
}

/// Builds the plan for `<parent>/<id>`. `settings` may be empty: then v1 creates nothing and v2
/// still creates the VM's cgroup (it costs nothing and keeps the VM accountable).
pub fn plan(
    hierarchy: &Hierarchy,
    parent: &str,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<CgroupPlan, JailerError> {
    let controllers: BTreeSet<&str> = settings.iter().map(|s| s.controller.as_str()).collect();
    let mut ops = Vec::new();
    let mut vm_dirs = Vec::new();
    let version;
    match hierarchy {
        Hierarchy::V1 { .. } => {
            version = 1;
            // One directory chain per distinct mount (cpu and cpuacct often share one).
            let mut done: Vec<PathBuf> = Vec::new();
            for controller in &controllers {
                let mount = hierarchy.v1_mount(controller)?.to_path_buf();
                let vm_dir = mount.join(parent).join(id);
                if !done.contains(&vm_dir) {
                    let mut dir = mount.clone();
                    for component in Path::new(parent).join(id).components() {
                        let up = dir.clone();
                        dir = dir.join(component);
                        ops.push(CgroupOp::MakeDir(dir.clone()));
                        if mount_has_cpuset(hierarchy, &mount) {
                            for file in ["cpuset.cpus", "cpuset.mems"] {
                                ops.push(CgroupOp::InheritIfEmpty {
                                    file: dir.join(file),
                                    from: up.join(file),
                                });
                            }
                        }
                    }
                    done.push(vm_dir.clone());
                    vm_dirs.push(vm_dir.clone());
                }
                for s in settings.iter().filter(|s| s.controller == **controller) {
                    ops.push(CgroupOp::WriteLimit {
                        file: vm_dir.join(&s.file),
                        key: s.file.clone(),
                        value: s.value.clone(),
                    });
                }
            }
        }
        Hierarchy::V2 { root } => {
            version = 2;
            let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            for controller in &controllers {
                if !available.split_whitespace().any(|c| c == *controller) {
                    return Err(JailerError::CgroupV2ControllerMissing {
                        root: root.clone(),
                        controller: controller.to_string(),
                        available: if available.trim().is_empty() {
                            "none".into()
                        } else {
                            available.trim().to_string()
                        },
                    });
                }
            }
            // Enable the controllers in the root and every ancestor of the VM's cgroup.
            let mut dir = root.clone();
            let enable = |dir: &Path, ops: &mut Vec<CgroupOp>| {
                for c in &controllers {
                    ops.push(CgroupOp::EnableController {
                        file: dir.join("cgroup.subtree_control"),
                        controller: c.to_string(),
                    });
                }
            };
            enable(&dir, &mut ops);
            for component in Path::new(parent).components() {
                dir = dir.join(component);
                ops.push(CgroupOp::MakeDir(dir.clone()));
                enable(&dir, &mut ops);
            }
            let vm_dir = dir.join(id);
            ops.push(CgroupOp::MakeDir(vm_dir.clone()));
            for s in settings {
                ops.push(CgroupOp::WriteLimit {
                    file: vm_dir.join(&s.file),
                    key: s.file.clone(),
                    value: s.value.clone(),
                });
            }
            vm_dirs.push(vm_dir);
        }
    }
    Ok(CgroupPlan {
        version,
        ops,
        vm_dirs,
    })
}

fn mount_has_cpuset(hierarchy: &Hierarchy, mount: &Path) -> bool {
    matches!(hierarchy, Hierarchy::V1 { mounts } if mounts.iter().any(|(n, p)| n == "cpuset" && p == mount))
}

fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> JailerError + 'a {
    move |source| JailerError::Cgroup {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// The pids in a cgroup directory (empty if it does not exist).
pub fn pids_in(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn pid_list(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl CgroupPlan {
    /// Creates the cgroups and writes the limits. On failure, removes the VM's directories it
    /// created, so a refused start leaves nothing behind.
    pub fn apply(&self, id: &str) -> Result<(), JailerError> {
        for dir in &self.vm_dirs {
            let pids = pids_in(dir);
            if !pids.is_empty() {
                return Err(JailerError::CgroupBusy {
                    id: id.to_string(),
                    path: dir.clone(),
                    pids: pid_list(&pids),
                });
            }
        }
        let result = self.run_ops();
        if result.is_err() {
            let _ = self.remove(Duration::from_millis(200));
        }
        result
    }

    fn run_ops(&self) -> Result<(), JailerError> {
        for op in &self.ops {
            match op {
                CgroupOp::MakeDir(dir) => match fs::create_dir(dir) {
                    Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                        return Err(io_err(dir, "create the directory")(e))
                    }
                    _ => {}
                },
                CgroupOp::InheritIfEmpty { file, from } => {
                    let current = fs::read_to_string(file).map_err(io_err(file, "read"))?;
                    if current.trim().is_empty() {
                        let value = fs::read_to_string(from).map_err(io_err(from, "read"))?;
                        fs::write(file, value.trim()).map_err(io_err(file, "write"))?;
                    }
                }
                CgroupOp::EnableController { file, controller } => {
                    let enabled = fs::read_to_string(file).unwrap_or_default();
                    if !enabled.split_whitespace().any(|c| c == controller) {
                        fs::write(file, format!("+{controller}"))
                            .map_err(io_err(file, "enable the controller"))?;
                    }
                }
                CgroupOp::WriteLimit { file, key, value } => {
                    if !file.exists() {
                        return Err(JailerError::UnknownCgroupKey {
                            key: key.clone(),
                            path: file.clone(),
                            version: self.version,
                        });
                    }
                    fs::write(file, value).map_err(|source| JailerError::Cgroup {
                        path: file.clone(),
                        action: "write the limit",
                        source,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Moves `pid` into the VM's cgroups.
    pub fn attach(&self, pid: u32) -> Result<(), JailerError> {
        for dir in &self.vm_dirs {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(io_err(&procs, "add the VMM process"))?;
        }
        Ok(())
    }

    /// OOM kills the memory controller recorded, if it was in use.
    pub fn oom_kills(&self) -> Option<u64> {
        self.vm_dirs.iter().find_map(|dir| {
            let text = fs::read_to_string(dir.join("memory.events"))
                .or_else(|_| fs::read_to_string(dir.join("memory.oom_control")))
                .ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse().ok())
        })
    }

    /// Removes the VM's cgroups. A cgroup with processes cannot be removed; processes that are
    /// exiting (the VMM's teardown child) leave within the grace period.
    pub fn remove(&self, grace: Duration) -> Result<(), JailerError> {
        remove_cgroup_dirs(&self.vm_dirs, grace)
    }
}

/// Removes cgroup directories (each a VM's leaf cgroup), waiting up to `grace` for exiting
/// processes to leave.
pub fn remove_cgroup_dirs(dirs: &[PathBuf], grace: Duration) -> Result<(), JailerError> {
    let deadline = Instant::now() + grace;
    for dir in dirs {
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    let pids = pids_in(dir);
                    return Err(JailerError::Cleanup {
                        what: "cgroup",
                        path: dir.clone(),
                        reason: if pids.is_empty() {
                            e.to_string()
                        } else {
                            format!("{e}; processes still in it: {}", pid_list(&pids))
                        },
                    });
                }
            }
        }
    }
    Ok(())
}

/// The VM's cgroup directories for `cleanup`: every v1 hierarchy (or the v2 one) that has
/// `<parent>/<id>`.
pub fn existing_vm_dirs(hierarchy: &Hierarchy, parent: &str, id: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = match hierarchy {
        Hierarchy::V1 { mounts } => mounts
            .iter()
            .map(|(_, p)| p.join(parent).join(id))
            .collect(),
        Hierarchy::V2 { root } => vec![root.join(parent).join(id)],
    };
    dirs.sort();
    dirs.dedup();
    dirs.retain(|d| d.is_dir());
    dirs
}

/// Parses a memory limit as cgroups accept it: bytes, or with a K/M/G/T suffix (v1);
/// `max` or `-1` mean none.
pub fn parse_memory_limit(value: &str) -> Option<u64> {
    let v = value.trim();
    if v == "max" || v == "-1" {
        return None;
    }
    let (digits, shift) = match v.chars().last()? {
        'k' | 'K' => (&v[..v.len() - 1], 10),
        'm' | 'M' => (&v[..v.len() - 1], 20),
        'g' | 'G' => (&v[..v.len() - 1], 30),
        't' | 'T' => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// The memory limit among the settings (`memory.limit_in_bytes` for v1, `memory.max` for v2).
pub fn memory_limit(settings: &[CgroupSetting]) -> Option<(String, u64)> {
    settings
        .iter()
        .filter(|s| s.file == "memory.limit_in_bytes" || s.file == "memory.max")
        .find_map(|s| parse_memory_limit(&s.value).map(|l| (s.file.clone(), l)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_cgroup;

    fn temp_root(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("airlock-jailer-cg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn finds_mounts() {
        let mounts = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
                      cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(
            discover_in(2, None, mounts).unwrap(),
            Hierarchy::V2 {
                root: "/sys/fs/cgroup/unified".into()
            }
        );
        let v1 = discover_in(1, None, mounts).unwrap();
        assert_eq!(
            v1.v1_mount("cpuacct").unwrap(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(
            v1.v1_mount("memory").unwrap(),
            Path::new("/sys/fs/cgroup/memory")
        );
        assert!(matches!(
            v1.v1_mount("pids"),
            Err(JailerError::NoCgroupController(_))
        ));
        assert!(matches!(
            discover_in(2, None, "proc /proc proc rw 0 0\n"),
            Err(JailerError::NoCgroupV2)
        ));
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }

    #[test]
    fn v1_plan_and_apply() {
        let root = temp_root("v1");
        for c in ["memory", "cpuset", "pids"] {
            fs::create_dir_all(root.join(c)).unwrap();
        }
        fs::write(root.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        let h = discover_in(1, Some(&root), "").unwrap();
        let settings = vec![
            parse_cgroup("memory.limit_in_bytes=64M").unwrap(),
            parse_cgroup("cpuset.cpus=1").unwrap(),
        ];
        let plan = plan(&h, "airlock-vmm", "vm1", &settings).unwrap();
        assert_eq!(
            plan.vm_dirs,
            vec![
                root.join("cpuset/airlock-vmm/vm1"),
                root.join("memory/airlock-vmm/vm1")
            ]
        );
        assert!(plan.ops.contains(&CgroupOp::InheritIfEmpty {
            file: root.join("cpuset/airlock-vmm/cpuset.mems"),
            from: root.join("cpuset/cpuset.mems"),
        }));
        // A fake tree has no kernel to create the files a real cgroup directory has.
        let fake_kernel = |plan: &CgroupPlan| {
            for op in &plan.ops {
                if let CgroupOp::MakeDir(d) = op {
                    fs::create_dir_all(d).unwrap();
                    if d.starts_with(root.join("cpuset")) {
                        for f in ["cpuset.cpus", "cpuset.mems"] {
                            if !d.join(f).exists() {
                                fs::write(d.join(f), "").unwrap();
                            }
                        }
                    } else {
                        fs::write(d.join("memory.limit_in_bytes"), "").unwrap();
                    }
                    fs::write(d.join("cgroup.procs"), "").unwrap();
                }
            }
        };
        fake_kernel(&plan);
        plan.apply("vm1").unwrap();
        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("memory/airlock-vmm/vm1/memory.limit_in_bytes"), "64M");
        assert_eq!(read("cpuset/airlock-vmm/cpuset.cpus"), "0-1");
        assert_eq!(read("cpuset/airlock-vmm/vm1/cpuset.mems"), "0");
        assert_eq!(read("cpuset/airlock-vmm/vm1/cpuset.cpus"), "1");
        plan.attach(4242).unwrap();
        assert_eq!(read("memory/airlock-vmm/vm1/cgroup.procs"), "4242");
        // A busy cgroup refuses a second VM with the same id.
        assert!(matches!(
            plan.apply("vm1"),
            Err(JailerError::CgroupBusy { .. })
        ));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v1_unknown_key_and_controller() {
        let root = temp_root("v1bad");
        fs::create_dir_all(root.join("memory")).unwrap();
        let h = discover_in(1, Some(&root), "").unwrap();
        let err = plan(&h, "p", "vm", &[parse_cgroup("nosuch.x=1").unwrap()]).unwrap_err();
        assert!(matches!(err, JailerError::NoCgroupController(_)), "{err}");
        let p = plan(&h, "p", "vm", &[parse_cgroup("memory.bogus=1").unwrap()]).unwrap();
        let err = p.apply("vm").unwrap_err().to_string();
        assert!(err.contains("unknown cgroup key \"memory.bogus\""), "{err}");
        // The refused start removed the VM's directory.
        assert!(!root.join("memory/p/vm").exists());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v2_plan_and_apply() {
        let root = temp_root("v2");
        fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(root.join("cgroup.subtree_control"), "cpu\n").unwrap();
        let h = discover_in(2, Some(&root), "").unwrap();
        let settings = vec![
            parse_cgroup("memory.max=67108864").unwrap(),
            parse_cgroup("pids.max=16").unwrap(),
            parse_cgroup("cpu.max=50000 100000").unwrap(),
        ];
        let plan = plan(&h, "airlock/vms", "vm2", &settings).unwrap();
        assert_eq!(plan.vm_dirs, vec![root.join("airlock/vms/vm2")]);
        let enables: Vec<_> = plan
            .ops
            .iter()
            .filter_map(|op| match op {
                CgroupOp::EnableController { file, controller } => Some((
                    file.strip_prefix(&root).unwrap().to_owned(),
                    controller.clone(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            enables.len(),
            9,
            "3 controllers at the root and 2 ancestors"
        );
        assert_eq!(
            enables[0],
            (PathBuf::from("cgroup.subtree_control"), "cpu".into())
        );
        assert_eq!(
            enables[8],
            (
                PathBuf::from("airlock/vms/cgroup.subtree_control"),
                "pids".into()
            )
        );
        // Fake the kernel's files, then apply.
        for d in ["airlock", "airlock/vms", "airlock/vms/vm2"] {
            fs::create_dir_all(root.join(d)).unwrap();
            for f in [
                "cgroup.subtree_control",
                "cgroup.procs",
                "memory.max",
                "pids.max",
                "cpu.max",
            ] {
                fs::write(root.join(d).join(f), "").unwrap();
            }
        }
        plan.apply("vm2").unwrap();
        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
        // "cpu" was already enabled at the root: only the missing ones are written.
        assert_eq!(read("cgroup.subtree_control"), "+pids");
        assert_eq!(read("airlock/cgroup.subtree_control"), "+pids");
        assert_eq!(read("airlock/vms/vm2/memory.max"), "67108864");
        assert_eq!(read("airlock/vms/vm2/pids.max"), "16");
        assert_eq!(read("airlock/vms/vm2/cpu.max"), "50000 100000");
        plan.attach(99).unwrap();
        assert_eq!(read("airlock/vms/vm2/cgroup.procs"), "99");
        assert_eq!(
            existing_vm_dirs(&h, "airlock/vms", "vm2"),
            vec![root.join("airlock/vms/vm2")]
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v2_missing_controller_is_refused() {
        let root = temp_root("v2missing");
        fs::write(root.join("cgroup.controllers"), "hugetlb\n").unwrap();
        let h = discover_in(2, Some(&root), "").unwrap();
        let err = plan(&h, "p", "vm", &[parse_cgroup("memory.max=1").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not offer the \"memory\" controller"),
            "{err}"
        );
        assert!(err.contains("hugetlb"), "{err}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn memory_limits() {
        assert_eq!(parse_memory_limit("64M"), Some(64 << 20));
        assert_eq!(parse_memory_limit("1g"), Some(1 << 30));
        assert_eq!(parse_memory_limit("4096"), Some(4096));
        assert_eq!(parse_memory_limit("max"), None);
        assert_eq!(parse_memory_limit("-1"), None);
        assert_eq!(parse_memory_limit("x"), None);
        let s = vec![
            parse_cgroup("pids.max=5").unwrap(),
            parse_cgroup("memory.max=1048576").unwrap(),
        ];
        assert_eq!(memory_limit(&s), Some(("memory.max".into(), 1 << 20)));
    }
}
