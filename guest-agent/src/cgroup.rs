//! The cgroup that user code runs in, so that a fork bomb or a memory hog inside the sandbox hits
//! its limits and not the agent. Works on cgroup v2 (one directory with `pids.max`,
//! `memory.max`, `cpu.weight`) and v1 (a directory in each of the pids, memory and cpu
//! hierarchies); which one is found by looking at /sys/fs/cgroup.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// What the user cgroup should look like.
#[derive(Debug, Clone)]
pub struct UserCgroupConfig {
    /// Directory name, created beside or under the agent's own cgroup.
    pub name: String,
    pub pids_max: Option<u64>,
    pub memory_max: Option<u64>,
    /// Relative CPU weight of user code against the agent (v2 `cpu.weight`, 1..=10000, where
    /// 100 is the default; v1 `cpu.shares` gets weight * 1024 / 100).
    pub cpu_weight: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy with the pids controller under {CGROUP_ROOT}")]
    NotFound,
    #[error("cannot read the agent's own cgroup from /proc/self/cgroup: {0}")]
    OwnCgroup(String),
    #[error("cgroup setup step {step} failed on {path}: {source}")]
    Step {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CgroupVersion {
    #[serde(rename = "v1")]
    V1,
    #[serde(rename = "v2")]
    V2,
}

/// The user cgroup, created and limited.
#[derive(Debug)]
pub struct UserCgroup {
    pub version: CgroupVersion,
    /// The directories a user process joins (one on v2, one a hierarchy on v1); the first holds
    /// the pids controller.
    pub dirs: Vec<PathBuf>,
    /// `<dir>/cgroup.procs` of each directory, ready for a `pre_exec` hook.
    procs_files: Vec<CString>,
    pub pids_max: Option<u64>,
    pub memory_max: Option<u64>,
}

/// What `GET /v1/health` reports about the user cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct CgroupInfo {
    pub version: CgroupVersion,
    pub path: String,
    pub pids_max: Option<u64>,
    pub memory_max: Option<u64>,
    pub pids_current: Option<u64>,
}

fn step<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Step {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, value: &str, what: &'static str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(step(what, path))
}

/// The agent's own cgroup path in the hierarchy named `controller` (v1) or the unified one
/// (`controller` = None), from the text of /proc/self/cgroup.
pub fn own_cgroup_path(proc_self_cgroup: &str, controller: Option<&str>) -> Option<String> {
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        match controller {
            None if id == "0" && controllers.is_empty() => return Some(path.to_string()),
            Some(want) if controllers.split(',').any(|c| c == want) => {
                return Some(path.to_string())
            }
            _ => {}
        }
    }
    None
}

/// Parses a size such as `512M`, `2G`, `1048576` or `max` (None).
pub fn parse_size(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("max") {
        return Ok(None);
    }
    let (digits, multiplier) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .map(Some)
        .ok_or_else(|| {
            format!("size {text:?} is not a number with an optional K/M/G suffix, or \"max\"")
        })
}

/// 90% of the guest's memory: the default memory limit of user code.
pub fn default_memory_max() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024 / 10 * 9)
}

impl UserCgroup {
    /// Finds the cgroup version in use, creates the user cgroup and sets its limits.
    pub fn setup(config: &UserCgroupConfig) -> Result<UserCgroup, CgroupError> {
        let root = Path::new(CGROUP_ROOT);
        let self_cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| CgroupError::OwnCgroup(e.to_string()))?;
        let unified_controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if unified_controllers.split_whitespace().any(|c| c == "pids") {
            Self::setup_v2(config, root, &self_cgroup, &unified_controllers)
        } else if root.join("pids/cgroup.procs").exists() {
            Self::setup_v1(config, root, &self_cgroup)
        } else {
            Err(CgroupError::NotFound)
        }
    }

    fn setup_v2(
        config: &UserCgroupConfig,
        root: &Path,
        self_cgroup: &str,
        controllers: &str,
    ) -> Result<UserCgroup, CgroupError> {
        let own = own_cgroup_path(self_cgroup, None)
            .ok_or_else(|| CgroupError::OwnCgroup("no \"0::\" line".into()))?;
        let parent = root.join(own.trim_start_matches('/'));
        if own != "/" {
            // No internal processes: a cgroup that hands controllers to its children may hold
            // no process itself, so the agent moves into a leaf of its own first.
            let agent_leaf = parent.join(format!("{}-agent", config.name));
            std::fs::create_dir_all(&agent_leaf).map_err(step("mkdir", &agent_leaf))?;
            write_file(
                &agent_leaf.join("cgroup.procs"),
                &std::process::id().to_string(),
                "move the agent into its leaf",
            )?;
        }
        let wanted: Vec<String> = ["pids", "memory", "cpu"]
            .iter()
            .filter(|c| controllers.split_whitespace().any(|have| have == **c))
            .map(|c| format!("+{c}"))
            .collect();
        write_file(
            &parent.join("cgroup.subtree_control"),
            &wanted.join(" "),
            "enable controllers",
        )?;
        let dir = parent.join(&config.name);
        std::fs::create_dir_all(&dir).map_err(step("mkdir", &dir))?;
        let limit = |v: Option<u64>| v.map_or("max".to_string(), |n| n.to_string());
        write_file(
            &dir.join("pids.max"),
            &limit(config.pids_max),
            "set pids.max",
        )?;
        if wanted.iter().any(|c| c == "+memory") {
            write_file(
                &dir.join("memory.max"),
                &limit(config.memory_max),
                "set memory.max",
            )?;
        }
        if let (Some(weight), true) = (config.cpu_weight, wanted.iter().any(|c| c == "+cpu")) {
            write_file(
                &dir.join("cpu.weight"),
                &weight.to_string(),
                "set cpu.weight",
            )?;
        }
        Ok(UserCgroup::new(CgroupVersion::V2, vec![dir], config))
    }

    fn setup_v1(
        config: &UserCgroupConfig,
        root: &Path,
        self_cgroup: &str,
    ) -> Result<UserCgroup, CgroupError> {
        let mut dirs = Vec::new();
        for controller in ["pids", "memory", "cpu"] {
            let hierarchy = root.join(controller);
            if !hierarchy.join("cgroup.procs").exists() {
                continue;
            }
            let own = own_cgroup_path(self_cgroup, Some(controller)).unwrap_or("/".into());
            let dir = hierarchy
                .join(own.trim_start_matches('/'))
                .join(&config.name);
            std::fs::create_dir_all(&dir).map_err(step("mkdir", &dir))?;
            match controller {
                "pids" => write_file(
                    &dir.join("pids.max"),
                    &config.pids_max.map_or("max".into(), |n| n.to_string()),
                    "set pids.max",
                )?,
                "memory" => write_file(
                    &dir.join("memory.limit_in_bytes"),
                    &config.memory_max.map_or("-1".into(), |n| n.to_string()),
                    "set memory.limit_in_bytes",
                )?,
                _ => {
                    if let Some(weight) = config.cpu_weight {
                        write_file(
                            &dir.join("cpu.shares"),
                            &(weight * 1024 / 100).max(2).to_string(),
                            "set cpu.shares",
                        )?
                    }
                }
            }
            dirs.push(dir);
        }
        Ok(UserCgroup::new(CgroupVersion::V1, dirs, config))
    }

    fn new(version: CgroupVersion, dirs: Vec<PathBuf>, config: &UserCgroupConfig) -> UserCgroup {
        let procs_files = dirs
            .iter()
            .map(|d| {
                CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes())
                    .expect("cgroup paths hold no NUL")
            })
            .collect();
        UserCgroup {
            version,
            dirs,
            procs_files,
            pids_max: config.pids_max,
            memory_max: config.memory_max,
        }
    }

    /// The `cgroup.procs` files a new user process writes `0` to (in its `pre_exec` hook).
    pub fn procs_files(&self) -> &[CString] {
        &self.procs_files
    }

    /// Pids now in the user cgroup, its per-process children included.
    pub fn pids(&self) -> Vec<i32> {
        tree_pids(&self.dirs[0])
    }

    /// Makes the cgroup of one started process: a child of the user cgroup (in the pids
    /// hierarchy on v1, which is where membership is tracked), so that everything the process
    /// starts, in its own session or not, is found and killed with it (issue 13, rows 4 and 10).
    /// The user cgroup's limits still bound it. Returns the directory and the `cgroup.procs`
    /// files the new process joins (the per-process one instead of the user cgroup's pids one).
    pub fn process_cgroup(&self, name: &str) -> std::io::Result<ProcessCgroup> {
        let dir = self.dirs[0].join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mut procs = self.procs_files.clone();
        procs[0] = CString::new(
            dir.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(ProcessCgroup {
            dir,
            version: self.version,
            procs_files: procs,
        })
    }

    /// Kills every process in the user cgroup and waits (up to `timeout`) until it is empty.
    /// Returns how many kill(2) calls were made (v2 with `cgroup.kill` counts the pids seen).
    pub fn kill_all(&self, timeout: Duration) -> std::io::Result<usize> {
        kill_tree(&self.dirs[0], self.version, timeout)
    }
    /// Removes the (emptied) cgroup directories; best effort, at shutdown.
    pub fn remove(&self) {
        self.remove_process_cgroups();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Removes the per-process cgroups that are empty (those of processes that ended).
    pub fn remove_process_cgroups(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.dirs[0]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }

    pub fn info(&self) -> CgroupInfo {
        let pids_current = std::fs::read_to_string(self.dirs[0].join("pids.current"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        CgroupInfo {
            version: self.version,
            path: self.dirs[0].display().to_string(),
            pids_max: self.pids_max,
            memory_max: self.memory_max,
            pids_current,
        }
    }
}

/// Every pid in `dir` and the cgroups below it (`cgroup.procs` lists only a cgroup's own).
fn tree_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

/// SIGKILLs everything in `dir` and below until it is empty, at most `timeout`. A fork bomb
/// cannot outrun it: every pass kills what is there, and the cgroup's pids limit bounds how
/// many new ones can appear between passes; `cgroup.kill` (v2) is atomic anyway.
fn kill_tree(dir: &Path, version: CgroupVersion, timeout: Duration) -> std::io::Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut killed = 0;
    let cgroup_kill = dir.join("cgroup.kill");
    let use_cgroup_kill = version == CgroupVersion::V2 && cgroup_kill.exists();
    loop {
        let pids = tree_pids(dir);
        if pids.is_empty() {
            return Ok(killed);
        }
        if use_cgroup_kill {
            std::fs::write(&cgroup_kill, "1")?;
            killed += pids.len();
        } else {
            for pid in pids {
                // Sending to a pid that just exited is harmless (ESRCH).
                if nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok()
                {
                    killed += 1;
                }
            }
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("cgroup {} still not empty after {timeout:?}", dir.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The cgroup of one process started through the API and everything it starts.
#[derive(Debug)]
pub struct ProcessCgroup {
    pub dir: PathBuf,
    version: CgroupVersion,
    procs_files: Vec<CString>,
}

impl ProcessCgroup {
    /// The `cgroup.procs` files the process writes `0` to before it execs.
    pub fn procs_files(&self) -> &[CString] {
        &self.procs_files
    }

    /// Kills the process and all it started (its own sessions and orphans included).
    pub fn kill(&self, timeout: Duration) -> std::io::Result<usize> {
        kill_tree(&self.dir, self.version, timeout)
    }

    /// Whether a process of it is still alive.
    pub fn is_empty(&self) -> bool {
        tree_pids(&self.dir).is_empty()
    }

    /// Removes the directory once empty (best effort; a leftover is removed with the user
    /// cgroup's next kill-all or at shutdown).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "12:pids:/user.slice/session-1.scope\n11:memory:/user.slice\n4:cpu,cpuacct:/\n0::/user.slice/session-1.scope\n";

    #[test]
    fn own_cgroup_per_controller() {
        assert_eq!(
            own_cgroup_path(HYBRID, Some("pids")).unwrap(),
            "/user.slice/session-1.scope"
        );
        assert_eq!(own_cgroup_path(HYBRID, Some("cpu")).unwrap(), "/");
        assert_eq!(own_cgroup_path(HYBRID, Some("cpuacct")).unwrap(), "/");
        assert_eq!(
            own_cgroup_path(HYBRID, None).unwrap(),
            "/user.slice/session-1.scope"
        );
        assert_eq!(own_cgroup_path("0::/\n", None).unwrap(), "/");
        assert!(own_cgroup_path("garbage", None).is_none());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("max").unwrap(), None);
        assert_eq!(parse_size("1024").unwrap(), Some(1024));
        assert_eq!(parse_size("64M").unwrap(), Some(64 << 20));
        assert_eq!(parse_size("2g").unwrap(), Some(2 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
