//! The namespace backend's launcher: `airlockd __launch SPEC` runs as a fresh, single-threaded
//! process (so forking is safe), builds the sandbox and execs the agent as its PID 1:
//!
//! 1. joins the sandbox's cgroups, leaves the daemon's session (`setsid`);
//! 2. makes the sandbox's user namespace (its ids 0..65535 are its own host range), then
//!    `unshare`: mount, PID, UTS, IPC, cgroup and (network off) network namespaces, all owned
//!    by the host's user namespace, so sandbox root holds no capability over them;
//! 3. forks: the child is PID 1 of the new PID namespace; the parent prints its host PID once
//!    the child has exec'd the agent (or the child's error), and exits;
//! 4. the child makes every mount private, mounts an overlay (the template's tree below,
//!    idmapped to the sandbox's range; the sandbox's own upper directory above) and inside it:
//!    a fresh /proc (its /proc/sys and
//!    other kernel knobs read-only, a few host-wide files hidden), a /dev tmpfs with a
//!    few device nodes bound in and its own devpts, a read-only /sys tmpfs holding only the
//!    sandbox's own cgroup directories, a /tmp tmpfs, and /run/airlock (the agent's socket
//!    directory, shared with the host);
//! 5. `pivot_root` into it and detaches the old root;
//! 6. sets the hostname, brings up `lo` (the last steps that need host root; the OOM shield
//!    was set in step 2, before the fork), enters the sandbox's user namespace (made in step 2 by
//!    `userns.rs`, owned by the sandbox's own host uid) as its root, drops every capability
//!    outside a short list from the bounding set, sets `no_new_privs`, installs the seccomp
//!    filter (`seccomp.rs`);
//! 7. execs the daemon's agent (opened on the host before step 4, never a file of the
//!    sandbox's tree) with an empty environment.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{fork, ForkResult};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub id: String,
    pub hostname: String,
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    /// Host directory mounted at /run/airlock (the agent's socket).
    pub run_dir: PathBuf,
    /// The agent's stdout/stderr.
    pub log: PathBuf,
    pub cgroup_procs: Vec<PathBuf>,
    /// (name under /sys/fs/cgroup, host directory); an empty name is /sys/fs/cgroup itself.
    pub cgroup_mounts: Vec<(String, PathBuf)>,
    /// true: share the host's network namespace; false: a new one with only `lo`.
    pub host_network: bool,
    /// The daemon's own agent binary (a host path). The launcher opens it before it enters the
    /// sandbox's root and execs it through that descriptor, so no file of the sandbox's tree
    /// (which a tenant, a snapshot or a fork's template may have changed) is ever run as PID 1.
    pub agent_bin: PathBuf,
    /// The agent's arguments (argv[1..]).
    pub agent_args: Vec<String>,
    pub tmp_size_mib: u64,
    /// Host device nodes bound into the sandbox's /dev under their own names (GPUs).
    #[serde(default)]
    pub device_nodes: Vec<PathBuf>,
    /// (host file, absolute path inside the sandbox), bound read-only (a GPU driver's files).
    #[serde(default)]
    pub ro_files: Vec<(PathBuf, String)>,
    /// The sandbox's user namespace (`userns.rs`); none only for specs of older daemons.
    #[serde(default)]
    pub user_ns: Option<UserNsSpec>,
}

/// A sandbox's own host id range and where its template is mounted with those ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserNsSpec {
    /// Host uid and gid of sandbox root; the sandbox's ids 0..65535 are `base..base+65535`.
    pub base: u32,
    /// A host directory to mount the idmapped template tree on, in the launcher's private
    /// mount namespace (the overlay's lower layer).
    pub lower_mount: PathBuf,
}

/// Capabilities the agent keeps (everything else leaves the bounding set). CAP_SYS_ADMIN,
/// CAP_SYS_TIME, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_MKNOD, CAP_SYS_PTRACE, CAP_BPF, ... are gone.
const KEPT_CAPS: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    2,  // DAC_READ_SEARCH
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    18, // SYS_CHROOT
    22, // SYS_BOOT (reboot(2) in a PID namespace only ends that namespace)
    29, // AUDIT_WRITE
    31, // SETFCAP
];
/// Kept only with a network namespace of the sandbox's own.
const OWN_NETNS_CAPS: &[u32] = &[12 /* NET_ADMIN */, 13 /* NET_RAW */];

fn err<E: std::fmt::Display>(step: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{step}: {e}")
}

/// The launcher's main: prints the sandbox's host PID on stdout and returns 0, or prints the
/// error on stderr and returns 1.
pub fn main(spec_json: &str) -> i32 {
    let spec: LaunchSpec = match serde_json::from_str(spec_json) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("airlockd launcher: bad spec: {e}");
            return 1;
        }
    };
    match launch(&spec) {
        Ok(pid) => {
            println!("{pid}");
            0
        }
        Err(e) => {
            eprintln!("airlockd launcher: {e}");
            1
        }
    }
}

fn launch(spec: &LaunchSpec) -> Result<i32, String> {
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .map_err(|e| format!("joining cgroup {}: {e}", procs.display()))?;
    }
    nix::unistd::setsid().map_err(err("setsid"))?;
    // Before the PID namespace: its helper process must not become the sandbox's PID 1.
    let userns = spec
        .user_ns
        .as_ref()
        .map(|u| crate::userns::owned_by(u.base))
        .transpose()?;
    if userns.is_some() {
        // The agent, root only of its user namespace, could not lower its own OOM score: it
        // inherits this one (and the floor that lets it write the same value again). Best
        // effort: a daemon without CAP_SYS_RESOURCE (these development hosts) cannot either.
        let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP;
    if !spec.host_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(err("unshare"))?;
    // The child reports a failure before exec through this pipe; a successful exec closes it.
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(err("pipe"))?;
    // SAFETY: this process is single-threaded (the launcher runs nothing else), so the child
    // may do anything until it execs.
    match unsafe { fork() }.map_err(err("fork"))? {
        ForkResult::Child => {
            drop(read_end);
            let e = child(spec, userns.as_ref());
            let mut f = std::fs::File::from(write_end);
            let _ = f.write_all(e.as_bytes());
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut message = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut message);
            if !message.is_empty() {
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(message);
            }
            Ok(child.as_raw())
        }
    }
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} holds a NUL"))
}

fn mnt(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(source, target, fstype, flags, data).map_err(|e| {
        format!(
            "mounting {} on {}: {e}",
            source.or(fstype).unwrap_or("?"),
            target.display()
        )
    })
}

fn bind(from: &Path, to: &Path) -> Result<(), String> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| format!("binding {} on {}: {e}", from.display(), to.display()))
}

/// Opens (creating, never truncating) the regular file `inside` (absolute, plain components)
/// below `root`, making its directories, without following a symbolic link anywhere: a link a
/// tenant planted in the path is refused by name instead of leading to a host file.
pub fn create_beneath(root: &Path, inside: &str) -> Result<std::os::fd::OwnedFd, String> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let rel = inside.trim_start_matches('/');
    let parts: Vec<&str> = rel.split('/').collect();
    if rel.is_empty()
        || parts
            .iter()
            .any(|c| *c == ".." || *c == "." || c.is_empty())
    {
        return Err(format!("{inside:?}: not a plain absolute path"));
    }
    let refuse = |e: nix::Error| {
        if e == nix::Error::ELOOP || e == nix::Error::ENOTDIR {
            format!(
                "{inside:?} below {}: a component is a symbolic link or not a directory",
                root.display()
            )
        } else {
            format!("{inside:?} below {}: {e}", root.display())
        }
    };
    let dir_flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let mut dir = open(root, dir_flags, Mode::empty()).map_err(refuse)?;
    let Some((file, dirs)) = parts.split_last() else {
        return Err(format!("{inside:?}: not a plain absolute path"));
    };
    for name in dirs {
        match mkdirat(&dir, *name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(refuse(e)),
        }
        dir = openat(&dir, *name, dir_flags, Mode::empty()).map_err(refuse)?;
    }
    openat(
        &dir,
        *file,
        OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(refuse)
}

/// The host kernel's knobs in the sandbox's /proc: read-only, and a few host-wide files hidden,
/// as container runtimes do. A writable /proc/sys let a sandbox set `kernel.core_pattern` to its
/// own script, which the host kernel then ran as host root (issue 13, row 1).
const PROC_READ_ONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];
const PROC_HIDDEN_FILES: &[&str] = &[
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
];
const PROC_HIDDEN_DIRS: &[&str] = &["acpi", "scsi"];

fn harden_proc(proc: &Path) -> Result<(), String> {
    let none = None::<&str>;
    let ro = MsFlags::MS_REMOUNT
        | MsFlags::MS_BIND
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    // Paths inside a fresh procfs are the kernel's: no tenant link can be among them.
    for name in PROC_READ_ONLY {
        let target = proc.join(name);
        if target.symlink_metadata().is_err() {
            continue; // not in this kernel
        }
        bind(&target, &target)?;
        mnt(none, &target, none, ro, none)?;
    }
    for name in PROC_HIDDEN_FILES {
        let target = proc.join(name);
        if target.symlink_metadata().is_ok() {
            bind(Path::new("/dev/null"), &target)?;
        }
    }
    for name in PROC_HIDDEN_DIRS {
        let target = proc.join(name);
        if target.is_dir() {
            mnt(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=4k"),
            )?;
        }
    }
    Ok(())
}

fn mkdirs(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
}

/// Runs in the child (PID 1 of the sandbox); returns only on failure.
fn child(spec: &LaunchSpec, userns: Option<&OwnedFd>) -> String {
    match build_and_exec(spec, userns) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn build_and_exec(
    spec: &LaunchSpec,
    userns: Option<&OwnedFd>,
) -> Result<std::convert::Infallible, String> {
    let none = None::<&str>;
    mnt(
        none,
        Path::new("/"),
        none,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        none,
    )?;
    let lower_mount = spec.user_ns.as_ref().map(|u| &u.lower_mount);
    for p in [&spec.lower, &spec.upper, &spec.work]
        .into_iter()
        .chain(lower_mount)
    {
        let s = p.to_string_lossy();
        if s.contains(',') || s.contains(':') {
            return Err(format!("{s:?}: overlay paths may not hold ',' or ':'"));
        }
    }
    let mut lower = spec.lower.clone();
    // Owner options for the tmpfs mounts below: root of the sandbox, not host root.
    let mut owner = String::new();
    if let (Some(u), Some(ns)) = (&spec.user_ns, userns) {
        give_root_dirs(spec, u.base)?;
        mkdirs(&u.lower_mount)?;
        crate::userns::idmapped_tree(&spec.lower, &u.lower_mount, ns)?;
        lower = u.lower_mount.clone();
        owner = format!(",uid={0},gid={0}", u.base);
    }
    let overlay = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        spec.upper.display(),
        spec.work.display()
    );
    // Opened now, on the host, and exec'd by descriptor at the end: the sandbox's tree is the
    // tenant's, and so may be any agent a template or fork carries in it.
    let agent = std::fs::File::open(&spec.agent_bin)
        .map_err(|e| format!("opening the agent {}: {e}", spec.agent_bin.display()))?;
    let root = &spec.merged;
    mnt(
        Some("overlay"),
        root,
        Some("overlay"),
        MsFlags::empty(),
        Some(&overlay),
    )?;
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for d in ["proc", "dev", "sys", "tmp", "run/airlock"] {
        mkdirs(&root.join(d))?;
    }
    mnt(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        nosuid_nodev_noexec,
        none,
    )?;
    harden_proc(&root.join("proc"))?;

    // /dev: a small tmpfs with the host's harmless nodes bound in, and a devpts of its own.
    let dev = root.join("dev");
    mnt(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&format!("mode=755,size=64k{owner}")),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        std::fs::File::create(&target)
            .map_err(|e| format!("creating {}: {e}", target.display()))?;
        bind(&Path::new("/dev").join(node), &target)?;
    }
    mkdirs(&dev.join("pts"))?;
    mnt(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mkdirs(&dev.join("shm"))?;
    mnt(
        Some("tmpfs"),
        &dev.join("shm"),
        Some("tmpfs"),
        nosuid_nodev_noexec,
        Some(&format!("mode=1777,size=64m{owner}")),
    )?;
    for node in &spec.device_nodes {
        let name = node
            .file_name()
            .ok_or_else(|| format!("{}: not a device node path", node.display()))?;
        let target = dev.join(name);
        std::fs::File::create(&target)
            .map_err(|e| format!("creating {}: {e}", target.display()))?;
        bind(node, &target)?;
    }
    for (host, inside) in &spec.ro_files {
        // The root may be a tenant's tree (a fork's template is a sandbox's files): the mount
        // point is made without following any symbolic link, so the path below has none (and
        // nothing runs in the sandbox yet that could plant one).
        drop(create_beneath(root, inside)?);
        let target = root.join(inside.trim_start_matches('/'));
        bind(host, &target)?;
        mnt(
            none,
            &target,
            none,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            none,
        )?;
    }
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).map_err(err("symlink in /dev"))?;
    }

    // /sys: only the sandbox's own cgroups, read-only apart from them.
    let sys = root.join("sys");
    mnt(
        Some("tmpfs"),
        &sys,
        Some("tmpfs"),
        nosuid_nodev_noexec,
        Some("mode=755,size=16k"),
    )?;
    let cgroot = sys.join("fs/cgroup");
    mkdirs(&cgroot)?;
    mnt(
        Some("tmpfs"),
        &cgroot,
        Some("tmpfs"),
        nosuid_nodev_noexec,
        Some("mode=755,size=16k"),
    )?;
    for (name, host) in &spec.cgroup_mounts {
        let target = if name.is_empty() {
            cgroot.clone()
        } else {
            cgroot.join(name)
        };
        mkdirs(&target)?;
        bind(host, &target)?;
    }
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid_nodev_noexec;
    if spec.cgroup_mounts.iter().all(|(n, _)| !n.is_empty()) {
        mnt(none, &cgroot, none, ro, none)?;
    }
    mnt(none, &sys, none, ro, none)?;

    let tmp_opts = format!("mode=1777,size={}m{owner}", spec.tmp_size_mib.max(1));
    mnt(
        Some("tmpfs"),
        &root.join("tmp"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&tmp_opts),
    )?;
    bind(&spec.run_dir, &root.join("run/airlock"))?;

    // Standard I/O: the log for output, /dev/null for input.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(|e| format!("opening {}: {e}", spec.log.display()))?;
    let null = std::fs::File::open("/dev/null").map_err(err("opening /dev/null"))?;
    // SAFETY: dup2 onto the standard descriptors from descriptors this function owns.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    drop((log, null));

    std::env::set_current_dir(root).map_err(err("chdir to the new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detaching the old root"))?;
    std::env::set_current_dir("/").map_err(err("chdir /"))?;
    nix::unistd::sethostname(&spec.hostname).map_err(err("sethostname"))?;
    if let Some(ns) = userns {
        // What the agent did as host root and cannot do as the sandbox's: the network namespace
        // belongs to the host's user namespace.
        if !spec.host_network {
            airlock_agent::init::bring_up("lo").map_err(err("bringing up lo"))?;
        }
        enter_as_root(ns)?;
    }

    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only marks descriptors close-on-exec.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            4u32, /* CLOSE_RANGE_CLOEXEC */
        );
    }
    drop_capabilities(!spec.host_network)?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    crate::seccomp::install().map_err(err("installing the seccomp filter"))?;

    let mut argv = vec![cstr("airlock-agent")?];
    for a in &spec.agent_args {
        argv.push(cstr(a)?);
    }
    let env = [cstr(
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    )?];
    let e = nix::unistd::fexecve(&agent, &argv, &env).unwrap_err();
    Err(format!("exec the agent {}: {e}", spec.agent_bin.display()))
}

/// The upper directory's root (the sandbox's `/`) owned as the template's root is, in the
/// sandbox's range, and the agent's socket directory owned by sandbox root.
fn give_root_dirs(spec: &LaunchSpec, base: u32) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = std::fs::symlink_metadata(&spec.lower)
        .map_err(|e| format!("reading {}: {e}", spec.lower.display()))?;
    let shifted = |id: u32| base.saturating_add(id);
    for (dir, uid, gid, mode) in [
        (
            &spec.upper,
            shifted(root.uid()),
            shifted(root.gid()),
            root.mode() & 0o7777,
        ),
        (&spec.run_dir, base, base, 0o755),
    ] {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Joins the sandbox's user namespace and becomes its root (host uid `base`). Joining gives a
/// full capability set inside it, and a full bounding set, which `drop_capabilities` then cuts.
fn enter_as_root(ns: &OwnedFd) -> Result<(), String> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWUSER).map_err(err("entering the user namespace"))?;
    // SAFETY: plain system calls on integers; ids 0 are the namespace's root, mapped.
    let rc = unsafe {
        if libc::setresgid(0, 0, 0) != 0 || libc::setgroups(0, std::ptr::null()) != 0 {
            -1
        } else {
            libc::setresuid(0, 0, 0)
        }
    };
    if rc != 0 {
        return Err(format!(
            "becoming root of the user namespace: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn drop_capabilities(own_netns: bool) -> Result<(), String> {
    for cap in 0..64u32 {
        if KEPT_CAPS.contains(&cap) || (own_netns && OWN_NETNS_CAPS.contains(&cap)) {
            continue;
        }
        // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes no pointers.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // past the last capability this kernel knows
            }
            return Err(format!("dropping capability {cap}: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The GPU driver's mount points are made in a tree a tenant may have shaped: a symbolic
    /// link anywhere on the path is refused, and nothing outside is created or truncated.
    #[test]
    fn create_beneath_refuses_planted_links_and_never_truncates() {
        let root = std::env::temp_dir().join(format!("airlock-beneath-{}", std::process::id()));
        let outside = root.with_extension("outside");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
        std::fs::create_dir_all(root.join("usr")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"keep").unwrap();
        // A link as a directory on the path, and as the file itself.
        std::os::unix::fs::symlink(&outside, root.join("usr/local")).unwrap();
        let e = super::create_beneath(&root, "/usr/local/secret").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::create_dir_all(root.join("opt")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("opt/lib.so")).unwrap();
        assert!(super::create_beneath(&root, "/opt/lib.so").is_err());
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"keep");
        assert!(!outside.join("lib.so").exists());
        // A plain path is made, directories included; an existing file is kept whole.
        super::create_beneath(&root, "/a/b/c.so").unwrap();
        std::fs::write(root.join("a/b/c.so"), b"data").unwrap();
        super::create_beneath(&root, "/a/b/c.so").unwrap();
        assert_eq!(std::fs::read(root.join("a/b/c.so")).unwrap(), b"data");
        assert!(super::create_beneath(&root, "/a/../x").is_err());
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
