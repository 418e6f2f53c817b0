//! `airlock-jailer`: starts `airlock-vmm` confined, after Firecracker's jailer, and removes the
//! jail when the VM ends. See README.md for the steps and THREAT-MODEL.md for why.
//!
//! Process structure: the jailer (the supervisor) does the steps that need host paths (chroot,
//! copy, rlimits, cgroups), then forks the jail process, which enters the jail and execs the VMM.
//! The supervisor waits for the VMM and cleans up when it ends.

mod cgroup;
mod cli;
mod error;
mod inspect;
mod jail;
mod vfio;

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, setsid, ForkResult, Gid, Pid, Uid};

use cgroup::CgroupPlan;
use cli::{Cli, Command, JailConfig};
use error::JailerError;

/// How long cleanup waits for the VMM's last processes (its deferred KVM teardown) to leave the
/// cgroup.
const CGROUP_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Cleanup {
            id,
            exec_file,
            place,
            kill,
        }) => cleanup_command(&id, &exec_file, &place, kill).map(|()| ExitCode::SUCCESS),
        Some(Command::Inspect { tap }) => return inspect::run(tap.as_deref()),
        None => cli.jail.into_config().and_then(run_jail),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("airlock-jailer: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Closes every descriptor above stderr: the VMM inherits nothing it was not meant to.
fn close_inherited_fds() -> Result<(), JailerError> {
    // SAFETY: close_range only closes descriptors; nothing in this single-threaded process holds
    // one above 2 at this point (clap opened none).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.9: walk /proc/self/fd.
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map_err(JailerError::CloseFds)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor number; the read_dir's own descriptor is already closed,
        // and a failure (EBADF) is harmless.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn clear_environment() {
    let keys: Vec<OsString> = std::env::vars_os().map(|(k, _)| k).collect();
    for key in keys {
        // The jailer is single-threaded here.
        std::env::remove_var(key);
    }
}

/// What the supervisor must undo when the VM ends or the start fails.
struct Jail {
    cfg: JailConfig,
    root: PathBuf,
    cgroups: Option<CgroupPlan>,
}

impl Jail {
    fn cleanup(&self) -> Result<(), JailerError> {
        let mut first_error = None;
        if let Some(plan) = &self.cgroups {
            if let Err(e) = plan.remove(CGROUP_GRACE) {
                first_error.get_or_insert(e);
            }
        }
        let dir = jail::jail_dir(&self.cfg.chroot_base, &self.cfg.exec_name, &self.cfg.id);
        if let Err(e) = remove_jail_dir(&dir) {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn remove_jail_dir(dir: &Path) -> Result<(), JailerError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(JailerError::Cleanup {
            what: "chroot",
            path: dir.to_path_buf(),
            reason: e.to_string(),
        }),
        _ => Ok(()),
    }
}

fn run_jail(cfg: JailConfig) -> Result<ExitCode, JailerError> {
    // 1. The id is valid (checked in into_config). 2-3. Descriptors and environment.
    close_inherited_fds()?;
    clear_environment();
    // The exec file is checked before anything is created.
    if !cfg.exec_file.is_file() {
        return Err(JailerError::ExecFile {
            path: cfg.exec_file.clone(),
            reason: match fs::metadata(&cfg.exec_file) {
                Err(e) => e.to_string(),
                Ok(_) => "it is not a regular file".into(),
            },
        });
    }
    // Everything the jail process needs from the host is read now.
    let sysfs_view = vfio::plan_view(&cfg.sysfs_root, &cfg.vfio_devices)?;
    let mut vfio_groups = cfg.vfio_groups.clone();
    vfio_groups.extend(&sysfs_view.groups);
    vfio_groups.sort_unstable();
    vfio_groups.dedup();
    let devices = jail::device_plan(&vfio_groups)?;
    let netns = cfg.netns.as_deref().map(jail::open_netns).transpose()?;
    let hierarchy = cgroup::discover(cfg.cgroup_version, cfg.cgroup_root.as_deref())?;
    let plan = cgroup::plan(&hierarchy, &cfg.parent_cgroup, &cfg.id, &cfg.cgroups)?;
    let plan = (!plan.vm_dirs.is_empty()).then_some(plan);

    // 4. The chroot and the VMM's copy.
    let root = jail::prepare_chroot(&cfg)?;
    let mut jail = Jail {
        cfg,
        root,
        cgroups: None,
    };
    let prepared = (|| {
        check_memory_limit(&jail.cfg, &jail.root)?;
        vfio::write_view(&jail.root, &sysfs_view)?;
        // 5. rlimits (inherited by the jail process and the VMM).
        jail::set_rlimits(&cli::effective_rlimits(&jail.cfg.rlimits))?;
        let memlock_given =
            (jail.cfg.rlimits.iter()).any(|l| matches!(l, cli::ResourceLimit::Memlock(_)));
        if !vfio_groups.is_empty() && !memlock_given {
            let cgroup_limit = cgroup::memory_limit(&jail.cfg.cgroups).is_some();
            let guest_mib = guest_memory(&jail.cfg, &jail.root).map(|(_, mib)| mib);
            jail::set_dma_memlock(jail::dma_memlock(cgroup_limit, guest_mib))?;
        }
        // 6. cgroups and limits.
        if let Some(plan) = &plan {
            plan.apply(&jail.cfg.id)?;
        }
        Ok(())
    })();
    jail.cgroups = plan;
    if let Err(e) = prepared {
        let _ = jail.cleanup();
        return Err(e);
    }

    if jail.cfg.daemonize {
        return daemonize(jail, devices, netns);
    }
    supervise(&jail, &devices, netns.as_ref(), None)
}

/// With `--daemonize`, the foreground jailer returns once the VMM runs (or with the error that
/// stopped it); a detached supervisor keeps waiting to clean up.
fn daemonize(
    jail: Jail,
    devices: Vec<jail::DevNode>,
    netns: Option<OwnedFd>,
) -> Result<ExitCode, JailerError> {
    let (report_r, report_w) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|source| JailerError::Sys {
            step: "create a pipe",
            source,
        })?;
    // SAFETY: the jailer is single-threaded, so the child may do anything the parent could.
    match unsafe { fork() } {
        Err(source) => {
            let _ = jail.cleanup();
            Err(JailerError::Sys {
                step: "fork the supervisor",
                source,
            })
        }
        Ok(ForkResult::Child) => {
            drop(report_r);
            let _ = setsid();
            if let Ok(null) = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    // SAFETY: dup2 onto the standard descriptors of this process.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            let code = match supervise(&jail, &devices, netns.as_ref(), Some(report_w)) {
                Ok(_) => 0,
                Err(_) => 1,
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(report_w);
            let mut message = String::new();
            let _ = fs::File::from(report_r).read_to_string(&mut message);
            if message.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(JailerError::Child(message))
            }
        }
    }
}

static FORWARD_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_signal(signal: libc::c_int) {
    FORWARD_SIGNAL.store(signal, Ordering::SeqCst);
}

/// Forks the jail process, puts it in the cgroups, lets it enter the jail and exec the VMM, then
/// waits for the VMM and cleans up. `report` (daemon mode) receives the start's outcome: closed
/// empty once the VMM runs, or the error.
fn supervise(
    jail: &Jail,
    devices: &[jail::DevNode],
    netns: Option<&OwnedFd>,
    report: Option<OwnedFd>,
) -> Result<ExitCode, JailerError> {
    let result = start_and_wait(jail, devices, netns, report);
    let cleaned = jail.cleanup();
    match (result, cleaned) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
        (Ok(code), Ok(())) => Ok(code),
    }
}

fn start_and_wait(
    jail: &Jail,
    devices: &[jail::DevNode],
    netns: Option<&OwnedFd>,
    mut report: Option<OwnedFd>,
) -> Result<ExitCode, JailerError> {
    let sys = |step| move |source| JailerError::Sys { step, source };
    let cfg = &jail.cfg;
    // 10. A new PID namespace applies to the children forked from here: the jail process is its
    // PID 1, and so is the VMM it becomes.
    if cfg.new_pid_ns {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
            .map_err(sys("create a PID namespace (unshare)"))?;
    }
    let (status_r, status_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("create a pipe"))?;
    let (go_r, go_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("create a pipe"))?;
    // SAFETY: the jailer is single-threaded, so the child may do anything the parent could.
    let child = match unsafe { fork() }.map_err(sys("fork the jail process"))? {
        ForkResult::Child => {
            drop(status_r);
            drop(go_w);
            drop(report.take());
            let err = jail_process(jail, devices, netns, go_r);
            let _ = fs::File::from(status_w).write_all(err.to_string().as_bytes());
            // SAFETY: leave at once, without running the parent's exit-time code.
            unsafe { libc::_exit(1) };
        }
        ForkResult::Parent { child } => child,
    };
    drop(go_r);
    drop(status_w);
    // 6 (cont.). The jail process joins the cgroups before it runs anything of the VMM.
    if let Some(plan) = &jail.cgroups {
        if let Err(e) = plan.attach(child.as_raw() as u32) {
            let _ = kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            return Err(e);
        }
    }
    let pid_file = jail.root.join(format!("{}.pid", cfg.exec_name));
    let _ = fs::write(&pid_file, format!("{child}\n"));
    let _ = fs::File::from(go_w).write_all(b"g");
    let mut message = String::new();
    let _ = fs::File::from(status_r).read_to_string(&mut message);
    if !message.is_empty() {
        let _ = waitpid(child, None);
        if let Some(report) = report {
            let _ = fs::File::from(report).write_all(message.as_bytes());
        }
        return Err(JailerError::Child(message));
    }
    drop(report);

    // Signals to the jailer stop the VMM (it has no handler of its own; as PID 1 of a namespace
    // it would ignore them), and the jailer then cleans up.
    let handler = SigAction::new(
        SigHandler::Handler(record_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &handler) }.map_err(sys("install a signal handler"))?;
    }
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitCode::from(code as u8)),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                report_killed(jail, signal);
                return Ok(ExitCode::from(128 + signal as u8));
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => {
                if FORWARD_SIGNAL.swap(0, Ordering::SeqCst) != 0 {
                    let _ = kill(child, Signal::SIGKILL);
                }
            }
            Err(source) => {
                return Err(JailerError::Sys {
                    step: "wait for the VMM",
                    source,
                })
            }
        }
    }
}

fn report_killed(jail: &Jail, signal: Signal) {
    let oom = jail.cgroups.as_ref().and_then(CgroupPlan::oom_kills);
    match oom {
        Some(n) if n > 0 => eprintln!(
            "airlock-jailer: the VMM was killed by {signal}: its cgroup's memory limit was hit ({n} OOM kill(s)); raise the memory limit"
        ),
        _ => eprintln!("airlock-jailer: the VMM was killed by {signal}"),
    }
}

/// The jail process: steps 7 to 12. Returns only on failure.
fn jail_process(
    jail: &Jail,
    devices: &[jail::DevNode],
    netns: Option<&OwnedFd>,
    go: OwnedFd,
) -> JailerError {
    let mut byte = [0u8; 1];
    if !matches!(fs::File::from(go).read(&mut byte), Ok(1)) {
        return JailerError::Child("the supervisor went away".into());
    }
    let cfg = &jail.cfg;
    let (uid, gid) = (Uid::from_raw(cfg.uid), Gid::from_raw(cfg.gid));
    let steps = || -> Result<(), JailerError> {
        // 7. Mount namespace and pivot_root.
        jail::enter_chroot(&jail.root)?;
        // 8. Device nodes.
        jail::make_devices(devices, uid, gid)?;
        // 9. Network namespace.
        if let (Some(fd), Some(path)) = (netns, &cfg.netns) {
            jail::join_netns(fd, path)?;
        }
        // 11. The VMM's user and group.
        jail::drop_privileges(uid, gid)?;
        // Die with the supervisor, so a killed jailer leaves no unsupervised VMM (set after the
        // user change, which clears it).
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        Ok(())
    };
    if let Err(e) = steps() {
        return e;
    }
    // 12. exec.
    let argv = jail::exec_argv(&cfg.exec_name, &cfg.id, &cfg.exec_args);
    jail::exec(&cfg.exec_name, &argv)
}

/// Refuses a memory limit below the guest's memory when the VMM boots from a config file in the
/// chroot: the guest would be OOM-killed when it touches its memory, possibly long after start.
fn check_memory_limit(cfg: &JailConfig, root: &Path) -> Result<(), JailerError> {
    let Some((key, limit)) = cgroup::memory_limit(&cfg.cgroups) else {
        return Ok(());
    };
    let Some((config, mib)) = guest_memory(cfg, root) else {
        return Ok(());
    };
    if limit < mib << 20 {
        return Err(JailerError::MemoryLimitTooLow {
            key,
            limit,
            guest_mib: mib,
            config: config.display().to_string(),
        });
    }
    Ok(())
}

/// The guest's memory from the VMM's `--config-file` in the chroot, with the file's path; None
/// without one (the VMM reports a missing or malformed config itself).
fn guest_memory(cfg: &JailConfig, root: &Path) -> Option<(PathBuf, u64)> {
    let config = config_file_arg(&cfg.exec_args)?;
    let host_path = root.join(config.strip_prefix("/").unwrap_or(&config));
    let mib = fs::read_to_string(&host_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["machine-config"]["mem_size_mib"].as_u64())?;
    Some((config, mib))
}

/// The VMM's `--config-file` argument, in either `--config-file X` or `--config-file=X` form.
fn config_file_arg(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_str()?;
        if a == "--config-file" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config-file=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// `airlock-jailer cleanup`: after a crash, removes the VM's chroot and cgroups.
fn cleanup_command(
    id: &str,
    exec_file: &Path,
    place: &cli::PlaceArgs,
    kill_leftovers: bool,
) -> Result<(), JailerError> {
    cli::validate_id(id)?;
    let exec_name = cli::exec_name(exec_file)?;
    let parent = place.parent_cgroup_for(&exec_name)?;
    let hierarchy = cgroup::discover(place.cgroup_version, place.cgroup_root.as_deref())?;
    let dirs = cgroup::existing_vm_dirs(&hierarchy, &parent, id);
    for dir in &dirs {
        let pids = cgroup::pids_in(dir);
        if pids.is_empty() {
            continue;
        }
        if !kill_leftovers {
            return Err(JailerError::StillRunning {
                path: dir.clone(),
                pids: pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
    cgroup::remove_cgroup_dirs(&dirs, CGROUP_GRACE)?;
    remove_jail_dir(&jail::jail_dir(&place.chroot_base_dir, &exec_name, id))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_config_file_argument() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_file_arg(&args(&["--no-api", "--config-file", "/vm.json"])),
            Some(PathBuf::from("/vm.json"))
        );
        assert_eq!(
            config_file_arg(&args(&["--config-file=vm.json"])),
            Some(PathBuf::from("vm.json"))
        );
        assert_eq!(config_file_arg(&args(&["--api-sock", "/run/a"])), None);
    }
}
