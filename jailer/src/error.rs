//! Every way the jailer can fail, each with a message that names the step, the path and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    #[error("invalid VM id {id:?}: {reason} (use letters, digits and `-`, 1 to 64 characters)")]
    InvalidId { id: String, reason: &'static str },
    #[error("invalid --cgroup {arg:?}: {reason}")]
    InvalidCgroup { arg: String, reason: &'static str },
    #[error("invalid --resource-limit {arg:?}: {reason}")]
    InvalidResourceLimit { arg: String, reason: String },
    #[error(
        "invalid --parent-cgroup {0:?}: give a relative cgroup path without `.` or `..` components"
    )]
    InvalidParentCgroup(String),
    #[error("invalid --vfio-device {0:?}: give the PCI address as sysfs names it, dddd:bb:dd.f (e.g. 0000:41:00.0, from `lspci -D`)")]
    InvalidVfioDevice(String),
    #[error("--vfio-device {addr}: {reason}")]
    VfioDevice { addr: String, reason: String },
    #[error("exec file {path}: {reason}")]
    ExecFile { path: PathBuf, reason: String },
    #[error("cannot close inherited file descriptors: {0}")]
    CloseFds(std::io::Error),
    #[error("cannot create the chroot directory {path}: {source} (is the --chroot-base-dir writable by root, on a filesystem that allows device nodes?)")]
    CreateChroot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy the exec file {from} into the chroot as {to}: {source}")]
    CopyExec {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set the {resource} resource limit to {value}: {source} (raising a limit above its hard limit needs CAP_SYS_RESOURCE)")]
    Rlimit {
        resource: &'static str,
        value: u64,
        source: nix::Error,
    },
    #[error("no cgroup v1 hierarchy with the {0:?} controller is mounted (see /proc/self/mounts); is the controller name right?")]
    NoCgroupController(String),
    #[error("no cgroup v2 (unified) hierarchy is mounted; use --cgroup-version 1 on this host")]
    NoCgroupV2,
    #[error("the cgroup v2 hierarchy at {root} does not offer the {controller:?} controller (it offers: {available})")]
    CgroupV2ControllerMissing {
        root: PathBuf,
        controller: String,
        available: String,
    },
    #[error("unknown cgroup key {key:?}: {path} does not exist (check the file name for cgroup v{version})")]
    UnknownCgroupKey {
        key: String,
        path: PathBuf,
        version: u8,
    },
    #[error("cgroup {path}: cannot {action}: {source}")]
    Cgroup {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("a VM with id {id:?} is already running in {path} (processes {pids}); pick another id, or stop it and run `airlock-jailer cleanup`")]
    CgroupBusy {
        id: String,
        path: PathBuf,
        pids: String,
    },
    #[error("the cgroup memory limit {limit} bytes ({key}) is below the guest's memory, {guest_mib} MiB from {config}: the guest would be killed when it touches its memory; raise the limit above the guest memory plus the VMM's overhead")]
    MemoryLimitTooLow {
        key: String,
        limit: u64,
        guest_mib: u64,
        config: String,
    },
    #[error("cannot open the network namespace {path}: {source} (create one with `ip netns add NAME`; the path is then /var/run/netns/NAME)")]
    OpenNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot join the network namespace {path}: {source}")]
    JoinNetns { path: PathBuf, source: nix::Error },
    #[error("cannot {step}: {source}")]
    Sys {
        step: &'static str,
        source: nix::Error,
    },
    #[error("cannot {step} {path}: {source}")]
    SysPath {
        step: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("the host has no {what} ({path}): {reason}")]
    HostDevice {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot execute {path} in the jail: {source}")]
    Exec { path: PathBuf, source: nix::Error },
    #[error("the jail process failed before exec: {0}")]
    Child(String),
    #[error("cleanup of {what} {path} failed: {reason}")]
    Cleanup {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("processes {pids} still run in {path}; stop them first, or run cleanup with --kill")]
    StillRunning { path: PathBuf, pids: String },
}
