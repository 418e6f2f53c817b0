//! seccomp filters for the VMM's threads, compiled from the readable allowlist in
//! `vmm/seccomp/x86_64-unknown-linux-musl.json` (Firecracker's format, compiled by seccompiler).
//!
//! Filters, and which thread installs which:
//!
//! | filter | installed by | covers |
//! | --- | --- | --- |
//! | `main` | the main thread, in [`init`], before it opens the API socket | main, and every thread it starts inherits it: tiny_http's accept and connection threads, `fc_api`, vCPUs |
//! | `api` | `fc_api`, first thing | the API thread; builds VMs, so it is a superset of `vcpu` and `uffd` (threads it starts inherit it) |
//! | `vcpu` | each `fc_vcpu N`, first thing | KVM_RUN and the guest's device exits |
//! | `uffd` | `fc_uffd` and `fc_uffd_prefetch`, first thing | serving page faults of a snapshot restore |
//!
//! A thread's filters stack: a vCPU started by `fc_api` runs under `main`, `api` and `vcpu`, and a
//! syscall must pass all three. So each filter is a subset of the one installed before it (the
//! unit tests check `vcpu` ⊆ `api` ⊆ `main`, `uffd` ⊆ `api`): adding a syscall a vCPU needs means
//! adding its line to `vcpu`, `api` and `main`.
//!
//! A forbidden syscall traps (SECCOMP_RET_TRAP): the SIGSYS handler writes
//! `airlock-vmm: seccomp: thread <name> (<filter> filter) made forbidden syscall <nr> (<name>)`
//! with write(2), then makes a syscall no filter can allow while SIGSYS is blocked, so the kernel
//! kills the whole process with SIGSYS (no core dump: [`init`] sets RLIMIT_CORE to 0, as a VMM's
//! core holds guest memory).

use std::cell::Cell;
use std::path::Path;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch};

/// The allowlists, one rule per line, each with a comment saying why.
pub const FILTERS_JSON: &str = include_str!("../seccomp/x86_64-unknown-linux-musl.json");

/// [`FILTERS_JSON`] compiled (compiling at start would cost ~0.6 ms, a third of a boot). The
/// unit test `compiled_filters_match_the_json` fails when this is stale, and regenerates it with
/// `AIRLOCK_REGENERATE_SECCOMP=1`.
mod compiled {
    use seccompiler::sock_filter;
    include!("../seccomp/x86_64-unknown-linux-musl.bpf.rs");
}

/// A syscall number no kernel has: no filter can allow it, so it always traps.
const TRIPWIRE_SYSCALL: libc::c_long = 0x3fff;
/// `SYS_SECCOMP`, the si_code of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

/// Which filter a thread installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    Main,
    Api,
    Vcpu,
    Uffd,
    /// The virtio device event loop (`fc_devices`).
    Devices,
    /// vCPU threads of a VM with a passed-through PCI device: `vcpu` plus what trapped BAR and
    /// config accesses and guest MSI changes need. Other VMs never get it.
    VcpuPassthrough,
}

impl ThreadRole {
    pub const ALL: [ThreadRole; 6] = [
        ThreadRole::Main,
        ThreadRole::Api,
        ThreadRole::Vcpu,
        ThreadRole::Uffd,
        ThreadRole::Devices,
        ThreadRole::VcpuPassthrough,
    ];

    /// The filter's name in the JSON file.
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Main => "main",
            ThreadRole::Api => "api",
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::Uffd => "uffd",
            ThreadRole::Devices => "devices",
            ThreadRole::VcpuPassthrough => "vcpu_passthrough",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot read the seccomp filter file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot compile the seccomp filters: {0}")]
    Compile(String),
    #[error("the seccomp filters have no {0:?} filter")]
    MissingFilter(&'static str),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the {role} seccomp filter: {reason}")]
    Install { role: &'static str, reason: String },
}

/// The compiled programs, one per role, in [`ThreadRole::ALL`] order.
pub struct Filters {
    programs: Vec<BpfProgram>,
}

impl Filters {
    /// The built-in filters, compiled ahead of time from [`FILTERS_JSON`].
    pub fn builtin() -> Filters {
        Filters {
            programs: vec![
                compiled::MAIN.to_vec(),
                compiled::API.to_vec(),
                compiled::VCPU.to_vec(),
                compiled::UFFD.to_vec(),
                compiled::DEVICES.to_vec(),
                compiled::VCPU_PASSTHROUGH.to_vec(),
            ],
        }
    }

    /// Compiles a filter document (the built-in one, or a `--seccomp-filter` file).
    pub fn compile(json: &str) -> Result<Filters, SeccompError> {
        let mut map = seccompiler::compile_from_json(json.as_bytes(), TargetArch::x86_64)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let programs = ThreadRole::ALL
            .iter()
            .map(|role| {
                map.remove(role.name())
                    .ok_or(SeccompError::MissingFilter(role.name()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filters { programs })
    }

    pub fn program(&self, role: ThreadRole) -> &BpfProgram {
        &self.programs[role as usize]
    }
}

/// `None` inside: seccomp disabled (`--no-seccomp`). Unset: [`init`] was not called, and
/// [`apply`] installs nothing (unit tests, `check-host`).
static FILTERS: OnceLock<Option<Filters>> = OnceLock::new();

thread_local! {
    /// The filter this thread installed itself, for the SIGSYS report. Threads that installed none
    /// run under the filter of the thread that started them.
    static ROLE: Cell<&'static str> = const { Cell::new("inherited") };
}

/// Once, on the main thread, before any other thread starts: compiles the filters (the built-in
/// ones, or `custom`), installs the SIGSYS reporter, and confines the main thread with `main`.
/// With `disabled` (`--no-seccomp`), every later [`apply`] does nothing.
pub fn init(disabled: bool, custom: Option<&Path>) -> Result<(), SeccompError> {
    if disabled {
        let _ = FILTERS.set(None);
        return Ok(());
    }
    let filters = match custom {
        None => Filters::builtin(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| SeccompError::ReadFile {
                path: path.display().to_string(),
                source,
            })?;
            Filters::compile(&text)?
        }
    };
    install_sigsys_handler()?;
    let _ = FILTERS.set(Some(filters));
    apply(ThreadRole::Main)
}

/// Confines the calling thread with `role`'s filter. Call it first thing on each thread the VMM
/// starts for itself (`fc_api`, vCPUs, userfaultfd handlers).
pub fn apply(role: ThreadRole) -> Result<(), SeccompError> {
    let Some(Some(filters)) = FILTERS.get() else {
        return Ok(());
    };
    if role != ThreadRole::Main {
        block_termination_signals();
    }
    ROLE.with(|r| r.set(role.name()));
    seccompiler::apply_filter(filters.program(role)).map_err(|e| SeccompError::Install {
        role: role.name(),
        reason: e.to_string(),
    })
}

/// Termination signals are handled on the main thread, whose filter allows what the handler does
/// (remove the API socket); a vCPU must not be the thread that takes them.
fn block_termination_signals() {
    // SAFETY: sigset operations on a local set, then pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; a failure only leaves core dumps possible.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    // SAFETY: a zeroed sigaction is valid; the handler only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = sigsys_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A fixed buffer for building the report without allocating (signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report line for a forbidden syscall.
fn report(line: &mut Line, thread: &[u8], role: &str, nr: i32) {
    line.push(b"airlock-vmm: seccomp: thread ");
    line.push(thread);
    line.push(b" (");
    line.push(role.as_bytes());
    line.push(b" filter) made forbidden syscall ");
    line.push_number(nr.max(0) as u64);
    line.push(b" (");
    line.push(syscall_name(nr).as_bytes());
    line.push(b")\n");
}

/// x86_64 syscall name, or "unknown".
pub fn syscall_name(nr: i32) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|n| SYSCALL_NAMES.get(n))
        .filter(|name| !name.is_empty())
        .copied()
        .unwrap_or("unknown")
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo. For SIGSYS it holds `struct { void *call_addr;
    // int syscall; unsigned arch; }` at offset 16 (after si_signo, si_errno, si_code, padding).
    let (code, nr) = unsafe {
        let base = info.cast::<u8>();
        (*base.add(8).cast::<i32>(), *base.add(24).cast::<i32>())
    };
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let name_len = thread.iter().position(|b| *b == 0).unwrap_or(thread.len());
    let role = ROLE.with(|r| r.get());
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    if code == SYS_SECCOMP {
        report(&mut line, &thread[..name_len], role, nr);
    } else {
        line.push(b"airlock-vmm: SIGSYS not raised by seccomp\n");
    }
    // SAFETY: write(2) and syscall(2) are async-signal-safe; the buffer outlives the calls.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        // SIGSYS is blocked while this handler runs, so this trap makes the kernel reset SIGSYS
        // to its default action and kill the whole process with it.
        libc::syscall(TRIPWIRE_SYSCALL);
        // Not reached while a filter is installed; the shell's convention for "killed by SIGSYS".
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// x86_64 syscall names by number (from seccompiler's table, Linux 6.12).
#[rustfmt::skip]
const SYSCALL_NAMES: [&str; 463] = [
    "read", "write", "open", "close", "stat", "fstat", "lstat", "poll", "lseek", "mmap",
    "mprotect", "munmap", "brk", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "ioctl",
    "pread64", "pwrite64", "readv", "writev", "access", "pipe", "select", "sched_yield", "mremap",
    "msync", "mincore", "madvise", "shmget", "shmat", "shmctl", "dup", "dup2", "pause",
    "nanosleep", "getitimer", "alarm", "setitimer", "getpid", "sendfile", "socket", "connect",
    "accept", "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "bind", "listen",
    "getsockname", "getpeername", "socketpair", "setsockopt", "getsockopt", "clone", "fork",
    "vfork", "execve", "exit", "wait4", "kill", "uname", "semget", "semop", "semctl", "shmdt",
    "msgget", "msgsnd", "msgrcv", "msgctl", "fcntl", "flock", "fsync", "fdatasync", "truncate",
    "ftruncate", "getdents", "getcwd", "chdir", "fchdir", "rename", "mkdir", "rmdir", "creat",
    "link", "unlink", "symlink", "readlink", "chmod", "fchmod", "chown", "fchown", "lchown",
    "umask", "gettimeofday", "getrlimit", "getrusage", "sysinfo", "times", "ptrace", "getuid",
    "syslog", "getgid", "setuid", "setgid", "geteuid", "getegid", "setpgid", "getppid", "getpgrp",
    "setsid", "setreuid", "setregid", "getgroups", "setgroups", "setresuid", "getresuid",
    "setresgid", "getresgid", "getpgid", "setfsuid", "setfsgid", "getsid", "capget", "capset",
    "rt_sigpending", "rt_sigtimedwait", "rt_sigqueueinfo", "rt_sigsuspend", "sigaltstack", "utime",
    "mknod", "uselib", "personality", "ustat", "statfs", "fstatfs", "sysfs", "getpriority",
    "setpriority", "sched_setparam", "sched_getparam", "sched_setscheduler", "sched_getscheduler",
    "sched_get_priority_max", "sched_get_priority_min", "sched_rr_get_interval", "mlock",
    "munlock", "mlockall", "munlockall", "vhangup", "modify_ldt", "pivot_root", "_sysctl", "prctl",
    "arch_prctl", "adjtimex", "setrlimit", "chroot", "sync", "acct", "settimeofday", "mount",
    "umount2", "swapon", "swapoff", "reboot", "sethostname", "setdomainname", "iopl", "ioperm",
    "create_module", "init_module", "delete_module", "get_kernel_syms", "query_module", "quotactl",
    "nfsservctl", "getpmsg", "putpmsg", "afs_syscall", "tuxcall", "security", "gettid",
    "readahead", "setxattr", "lsetxattr", "fsetxattr", "getxattr", "lgetxattr", "fgetxattr",
    "listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr",
    "tkill", "time", "futex", "sched_setaffinity", "sched_getaffinity", "set_thread_area",
    "io_setup", "io_destroy", "io_getevents", "io_submit", "io_cancel", "get_thread_area",
    "lookup_dcookie", "epoll_create", "epoll_ctl_old", "epoll_wait_old", "remap_file_pages",
    "getdents64", "set_tid_address", "restart_syscall", "semtimedop", "fadvise64", "timer_create",
    "timer_settime", "timer_gettime", "timer_getoverrun", "timer_delete", "clock_settime",
    "clock_gettime", "clock_getres", "clock_nanosleep", "exit_group", "epoll_wait", "epoll_ctl",
    "tgkill", "utimes", "vserver", "mbind", "set_mempolicy", "get_mempolicy", "mq_open",
    "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr", "kexec_load",
    "waitid", "add_key", "request_key", "keyctl", "ioprio_set", "ioprio_get", "inotify_init",
    "inotify_add_watch", "inotify_rm_watch", "migrate_pages", "openat", "mkdirat", "mknodat",
    "fchownat", "futimesat", "newfstatat", "unlinkat", "renameat", "linkat", "symlinkat",
    "readlinkat", "fchmodat", "faccessat", "pselect6", "ppoll", "unshare", "set_robust_list",
    "get_robust_list", "splice", "tee", "sync_file_range", "vmsplice", "move_pages", "utimensat",
    "epoll_pwait", "signalfd", "timerfd_create", "eventfd", "fallocate", "timerfd_settime",
    "timerfd_gettime", "accept4", "signalfd4", "eventfd2", "epoll_create1", "dup3", "pipe2",
    "inotify_init1", "preadv", "pwritev", "rt_tgsigqueueinfo", "perf_event_open", "recvmmsg",
    "fanotify_init", "fanotify_mark", "prlimit64", "name_to_handle_at", "open_by_handle_at",
    "clock_adjtime", "syncfs", "sendmmsg", "setns", "getcpu", "process_vm_readv",
    "process_vm_writev", "kcmp", "finit_module", "sched_setattr", "sched_getattr", "renameat2",
    "seccomp", "getrandom", "memfd_create", "kexec_file_load", "bpf", "execveat", "userfaultfd",
    "membarrier", "mlock2", "copy_file_range", "preadv2", "pwritev2", "pkey_mprotect",
    "pkey_alloc", "pkey_free", "statx", "io_pgetevents", "rseq", "uretprobe", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
    "", "", "", "", "", "", "", "", "", "", "", "pidfd_send_signal", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "pidfd_open", "clone3", "close_range", "openat2", "pidfd_getfd",
    "faccessat2", "process_madvise", "epoll_pwait2", "mount_setattr", "quotactl_fd",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "memfd_secret",
    "process_mrelease", "futex_waitv", "set_mempolicy_home_node", "cachestat", "fchmodat2",
    "map_shadow_stack", "futex_wake", "futex_wait", "futex_requeue", "statmount", "listmount",
    "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules", "mseal",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::BTreeMap;

    fn document() -> Value {
        serde_json::from_str(FILTERS_JSON).expect("the filter file is JSON")
    }

    /// syscall -> None (allowed whatever the arguments) or the list of argument conditions.
    fn rules(doc: &Value, filter: &str) -> BTreeMap<String, Option<Vec<Value>>> {
        let mut out: BTreeMap<String, Option<Vec<Value>>> = BTreeMap::new();
        for rule in doc[filter]["filter"].as_array().expect("filter list") {
            let name = rule["syscall"].as_str().unwrap().to_string();
            let mut args = rule["args"].as_array().cloned();
            // Comments are for readers, not part of the rule.
            for cond in args.iter_mut().flatten() {
                cond.as_object_mut().unwrap().remove("comment");
            }
            match (out.get_mut(&name), args) {
                (None, a) => {
                    out.insert(name, a.map(|a| vec![Value::Array(a)]));
                }
                (Some(Some(list)), Some(a)) => list.push(Value::Array(a)),
                (Some(_), _) => panic!(
                    "{filter}: {name} has both an unconditional and a conditional rule; seccompiler would keep only the conditional ones"
                ),
            }
        }
        out
    }

    /// Where [`FILTERS_JSON`] compiled to BPF is kept.
    const COMPILED_PATH: &str = "seccomp/x86_64-unknown-linux-musl.bpf.rs";

    fn render_compiled(filters: &Filters) -> String {
        let mut out = String::from(
            "// @generated from x86_64-unknown-linux-musl.json by the unit test\n\
             // seccomp::tests::compiled_filters_match_the_json (AIRLOCK_REGENERATE_SECCOMP=1).\n\
             // Do not edit: edit the JSON, then regenerate.\n\n\
             const fn i(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {\n    \
             sock_filter { code, jt, jf, k }\n}\n",
        );
        for role in ThreadRole::ALL {
            let program = filters.program(role);
            out.push_str(&format!(
                "\n/// `{}`: {} instructions.\npub const {}: &[sock_filter] = &[\n",
                role.name(),
                program.len(),
                role.name().to_uppercase()
            ));
            for chunk in program.chunks(4) {
                let row: Vec<String> = chunk
                    .iter()
                    .map(|f| format!("i({:#06x}, {}, {}, {:#x})", f.code, f.jt, f.jf, f.k))
                    .collect();
                out.push_str(&format!("    {},\n", row.join(", ")));
            }
            out.push_str("];\n");
        }
        out
    }

    /// The BPF the VMM installs is exactly what the readable JSON compiles to.
    #[test]
    fn compiled_filters_match_the_json() {
        let start = std::time::Instant::now();
        let fresh = Filters::compile(FILTERS_JSON).unwrap();
        eprintln!(
            "compiling every filter at run time would take {:?}",
            start.elapsed()
        );
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(COMPILED_PATH);
        if std::env::var_os("AIRLOCK_REGENERATE_SECCOMP").is_some() {
            std::fs::write(&path, render_compiled(&fresh)).unwrap();
            return;
        }
        let builtin = Filters::builtin();
        for role in ThreadRole::ALL {
            assert!(
                fresh.program(role) == builtin.program(role),
                "{} is stale for the {:?} filter: run AIRLOCK_REGENERATE_SECCOMP=1 cargo test --release -p airlock-vmm seccomp::tests::compiled_filters_match_the_json",
                path.display(),
                role.name()
            );
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            render_compiled(&fresh)
        );
    }

    #[test]
    fn every_rule_says_why() {
        let doc = document();
        for role in ThreadRole::ALL {
            let filter = &doc[role.name()];
            assert_eq!(filter["default_action"], "trap", "{}", role.name());
            for rule in filter["filter"].as_array().unwrap() {
                assert!(rule["comment"].is_string(), "{}: {rule}", role.name());
            }
        }
    }

    /// Filters stack: a thread's syscalls must pass the filters of the threads that started it.
    #[test]
    fn filters_nest_as_threads_inherit_them() {
        let doc = document();
        for (inner, outer) in [
            ("vcpu", "api"),
            ("uffd", "api"),
            ("devices", "api"),
            ("vcpu", "vcpu_passthrough"),
            ("vcpu_passthrough", "api"),
            ("api", "main"),
        ] {
            let (inner_rules, outer_rules) = (rules(&doc, inner), rules(&doc, outer));
            let mut missing = Vec::new();
            for (name, conds) in &inner_rules {
                match (outer_rules.get(name), conds) {
                    (Some(None), _) => {}
                    (Some(Some(outer_conds)), Some(conds)) => {
                        for c in conds {
                            if !outer_conds.contains(c) {
                                missing.push(format!("{name} {c}"));
                            }
                        }
                    }
                    _ => missing.push(name.clone()),
                }
            }
            assert!(
                missing.is_empty(),
                "the {outer:?} filter must allow everything {inner:?} allows (threads started under {outer:?} inherit it); add to {outer:?}: {missing:#?}"
            );
        }
    }

    /// The ioctl numbers in the file are the ones their comments name.
    #[test]
    fn ioctl_numbers_match_their_names() {
        use kvm_bindings::*;
        use std::mem::size_of;
        let ioc = |dir: u32, ty: u32, nr: u32, size: usize| -> u64 {
            u64::from((dir << 30) | ((size as u32) << 16) | (ty << 8) | nr)
        };
        let (io, iow, ior, iowr) = (0, 1, 2, 3);
        let k = 0xae;
        let expected: BTreeMap<&str, u64> = [
            ("KVM_GET_API_VERSION", ioc(io, k, 0x00, 0)),
            ("KVM_CREATE_VM", ioc(io, k, 0x01, 0)),
            (
                "KVM_GET_MSR_INDEX_LIST",
                ioc(iowr, k, 0x02, size_of::<kvm_msr_list>()),
            ),
            ("KVM_CHECK_EXTENSION", ioc(io, k, 0x03, 0)),
            ("KVM_GET_VCPU_MMAP_SIZE", ioc(io, k, 0x04, 0)),
            (
                "KVM_GET_SUPPORTED_CPUID",
                ioc(iowr, k, 0x05, size_of::<kvm_cpuid2>()),
            ),
            ("KVM_CREATE_VCPU", ioc(io, k, 0x41, 0)),
            (
                "KVM_GET_DIRTY_LOG",
                ioc(iow, k, 0x42, size_of::<kvm_dirty_log>()),
            ),
            (
                "KVM_SET_USER_MEMORY_REGION",
                ioc(iow, k, 0x46, size_of::<kvm_userspace_memory_region>()),
            ),
            ("KVM_SET_TSS_ADDR", ioc(io, k, 0x47, 0)),
            ("KVM_CREATE_IRQCHIP", ioc(io, k, 0x60, 0)),
            (
                "KVM_GET_IRQCHIP",
                ioc(iowr, k, 0x62, size_of::<kvm_irqchip>()),
            ),
            (
                "KVM_SET_IRQCHIP",
                ioc(ior, k, 0x63, size_of::<kvm_irqchip>()),
            ),
            ("KVM_IRQFD", ioc(iow, k, 0x76, size_of::<kvm_irqfd>())),
            (
                "KVM_IOEVENTFD",
                ioc(iow, k, 0x79, size_of::<kvm_ioeventfd>()),
            ),
            (
                "TUNSETIFF",
                ioc(iow, u32::from(b'T'), 202, size_of::<libc::c_int>()),
            ),
            (
                "TUNSETVNETHDRSZ",
                ioc(iow, u32::from(b'T'), 216, size_of::<libc::c_int>()),
            ),
            ("FIONBIO", 0x5421),
            (
                "KVM_SET_GSI_ROUTING",
                ioc(iow, k, 0x6a, size_of::<kvm_irq_routing>()),
            ),
            (
                "KVM_CREATE_DEVICE",
                ioc(iowr, k, 0xe0, size_of::<kvm_create_device>()),
            ),
            (
                "KVM_SET_DEVICE_ATTR",
                ioc(iow, k, 0xe1, size_of::<kvm_device_attr>()),
            ),
            (
                "KVM_CREATE_PIT2",
                ioc(iow, k, 0x77, size_of::<kvm_pit_config>()),
            ),
            (
                "KVM_SET_CLOCK",
                ioc(iow, k, 0x7b, size_of::<kvm_clock_data>()),
            ),
            (
                "KVM_GET_CLOCK",
                ioc(ior, k, 0x7c, size_of::<kvm_clock_data>()),
            ),
            ("KVM_RUN", ioc(io, k, 0x80, 0)),
            ("KVM_GET_REGS", ioc(ior, k, 0x81, size_of::<kvm_regs>())),
            ("KVM_SET_REGS", ioc(iow, k, 0x82, size_of::<kvm_regs>())),
            ("KVM_GET_SREGS", ioc(ior, k, 0x83, size_of::<kvm_sregs>())),
            ("KVM_SET_SREGS", ioc(iow, k, 0x84, size_of::<kvm_sregs>())),
            ("KVM_GET_MSRS", ioc(iowr, k, 0x88, size_of::<kvm_msrs>())),
            ("KVM_SET_MSRS", ioc(iow, k, 0x89, size_of::<kvm_msrs>())),
            ("KVM_SET_FPU", ioc(iow, k, 0x8d, size_of::<kvm_fpu>())),
            (
                "KVM_GET_LAPIC",
                ioc(ior, k, 0x8e, size_of::<kvm_lapic_state>()),
            ),
            (
                "KVM_SET_LAPIC",
                ioc(iow, k, 0x8f, size_of::<kvm_lapic_state>()),
            ),
            ("KVM_SET_CPUID2", ioc(iow, k, 0x90, size_of::<kvm_cpuid2>())),
            (
                "KVM_GET_CPUID2",
                ioc(iowr, k, 0x91, size_of::<kvm_cpuid2>()),
            ),
            (
                "KVM_GET_MP_STATE",
                ioc(ior, k, 0x98, size_of::<kvm_mp_state>()),
            ),
            (
                "KVM_SET_MP_STATE",
                ioc(iow, k, 0x99, size_of::<kvm_mp_state>()),
            ),
            (
                "KVM_GET_VCPU_EVENTS",
                ioc(ior, k, 0x9f, size_of::<kvm_vcpu_events>()),
            ),
            (
                "KVM_GET_PIT2",
                ioc(ior, k, 0x9f, size_of::<kvm_pit_state2>()),
            ),
            (
                "KVM_SET_VCPU_EVENTS",
                ioc(iow, k, 0xa0, size_of::<kvm_vcpu_events>()),
            ),
            (
                "KVM_SET_PIT2",
                ioc(iow, k, 0xa0, size_of::<kvm_pit_state2>()),
            ),
            (
                "KVM_GET_DEBUGREGS",
                ioc(ior, k, 0xa1, size_of::<kvm_debugregs>()),
            ),
            (
                "KVM_SET_DEBUGREGS",
                ioc(iow, k, 0xa2, size_of::<kvm_debugregs>()),
            ),
            ("KVM_SET_TSC_KHZ", ioc(io, k, 0xa2, 0)),
            ("KVM_GET_TSC_KHZ", ioc(io, k, 0xa3, 0)),
            ("KVM_GET_XSAVE", ioc(ior, k, 0xa4, 4096)),
            ("KVM_SET_XSAVE", ioc(iow, k, 0xa5, 4096)),
            ("KVM_GET_XCRS", ioc(ior, k, 0xa6, size_of::<kvm_xcrs>())),
            ("KVM_SET_XCRS", ioc(iow, k, 0xa7, size_of::<kvm_xcrs>())),
            ("USERFAULTFD_IOC_NEW", ioc(io, 0xaa, 0x00, 0)),
            ("UFFDIO_REGISTER", ioc(iowr, 0xaa, 0x00, 32)),
            ("UFFDIO_WAKE", ioc(ior, 0xaa, 0x02, 16)),
            ("UFFDIO_COPY", ioc(iowr, 0xaa, 0x03, 40)),
            ("UFFDIO_ZEROPAGE", ioc(iowr, 0xaa, 0x04, 32)),
            ("UFFDIO_API", ioc(iowr, 0xaa, 0x3f, 24)),
        ]
        .into_iter()
        // VFIO's numbers come from the table the vfio module checks against its bindings.
        .chain(
            crate::vfio::PASSTHROUGH_IOCTLS
                .iter()
                .copied()
                .filter(|(name, _)| name.starts_with("VFIO_")),
        )
        .collect();
        let doc = document();
        let mut seen = 0;
        for role in ThreadRole::ALL {
            for rule in doc[role.name()]["filter"].as_array().unwrap() {
                if rule["syscall"] != "ioctl" {
                    continue;
                }
                let cond = &rule["args"][0];
                let name = cond["comment"].as_str().unwrap();
                let want = expected
                    .get(name)
                    .unwrap_or_else(|| panic!("no expected number for {name}"));
                assert_eq!(cond["val"].as_u64(), Some(*want), "{name}");
                assert_eq!(
                    cond["type"], "dword",
                    "{name}: musl sign-extends the request"
                );
                seen += 1;
            }
        }
        assert!(seen > 50);
    }

    #[test]
    fn report_names_the_thread_filter_and_syscall() {
        let mut line = Line {
            buf: [0; 256],
            len: 0,
        };
        report(&mut line, b"fc_vcpu 0", "vcpu", 41);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "airlock-vmm: seccomp: thread fc_vcpu 0 (vcpu filter) made forbidden syscall 41 (socket)\n"
        );
        assert_eq!(syscall_name(16), "ioctl");
        assert_eq!(syscall_name(TRIPWIRE_SYSCALL as i32), "unknown");
        assert_eq!(syscall_name(-1), "unknown");
        assert_eq!(syscall_name(435), "clone3");
    }

    /// Runs one `child_*` test below in a fresh process (filters cannot be removed once
    /// installed), returning its exit status and stderr.
    fn run_child(test: &str, role: &str) -> (std::process::ExitStatus, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                test,
                "--exact",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("AIRLOCK_SECCOMP_CHILD_ROLE", role)
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn child_role() -> ThreadRole {
        let role = std::env::var("AIRLOCK_SECCOMP_CHILD_ROLE").expect("run by run_child");
        ThreadRole::ALL
            .into_iter()
            .find(|r| r.name() == role)
            .unwrap()
    }

    /// Child: the main filter, then a named thread under `role` that calls socket(AF_INET), which
    /// no filter allows.
    #[test]
    #[ignore = "run in a child process by forbidden_syscalls_kill_the_process"]
    fn child_forbidden_syscall() {
        let role = child_role();
        init(false, None).unwrap();
        let t = std::thread::Builder::new()
            .name("seccomp-probe".into())
            .spawn(move || {
                if role != ThreadRole::Main {
                    apply(role).unwrap();
                }
                // SAFETY: socket takes integer arguments.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            })
            .unwrap();
        let _ = t.join();
        std::process::exit(0);
    }

    #[test]
    fn forbidden_syscalls_kill_the_process() {
        use std::os::unix::process::ExitStatusExt;
        for role in ThreadRole::ALL {
            let (status, stderr) =
                run_child("seccomp::tests::child_forbidden_syscall", role.name());
            assert_eq!(
                status.signal(),
                Some(libc::SIGSYS),
                "{role:?}: {status}\n{stderr}"
            );
            let shown = if role == ThreadRole::Main {
                "inherited"
            } else {
                role.name()
            };
            let want = format!(
                "airlock-vmm: seccomp: thread seccomp-probe ({shown} filter) made forbidden syscall 41 (socket)"
            );
            assert!(
                stderr.contains(&want),
                "{role:?}: want {want:?} in\n{stderr}"
            );
        }
    }

    /// Child: ordinary thread work under every filter: allocate, write, sleep, lock, exit.
    #[test]
    #[ignore = "run in a child process by ordinary_work_passes_every_filter"]
    fn child_ordinary_work() {
        let role = child_role();
        init(false, None).unwrap();
        let t = std::thread::Builder::new()
            .name("seccomp-probe".into())
            .spawn(move || {
                if role != ThreadRole::Main {
                    apply(role).unwrap();
                }
                let v: Vec<u8> = vec![7; 8 << 20];
                let m = std::sync::Mutex::new(v.len());
                std::thread::sleep(std::time::Duration::from_millis(1));
                eprintln!("worked: {}", *m.lock().unwrap());
            })
            .unwrap();
        t.join().unwrap();
        std::process::exit(0);
    }

    #[test]
    fn ordinary_work_passes_every_filter() {
        for role in ThreadRole::ALL {
            let (status, stderr) = run_child("seccomp::tests::child_ordinary_work", role.name());
            assert!(status.success(), "{role:?}: {status}\n{stderr}");
            assert!(stderr.contains("worked: 8388608"), "{stderr}");
        }
    }
}
