//! The seccomp filter of namespace-backend sandboxes: installed by the launcher just before it
//! execs the agent, so the agent and all user code run under it. A deny-list in the spirit of
//! Docker's default profile: everything that reaches the host kernel's global state
//! (modules, clocks, mounts, keyrings, BPF, perf, new namespaces, io_uring, personality,
//! vsock sockets) fails with EPERM; 32-bit and
//! x32 system calls are refused; `clone3` answers ENOSYS so libc falls back to `clone`, whose
//! namespace flags are checked.

/// `AUDIT_ARCH_X86_64`.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
/// `offsetof(struct seccomp_data, nr / arch / args[0])`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0: u32 = 16;
/// CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME.
const CLONE_NAMESPACE_FLAGS: u32 = 0x0002_0000
    | 0x0200_0000
    | 0x0400_0000
    | 0x0800_0000
    | 0x1000_0000
    | 0x2000_0000
    | 0x4000_0000
    | 0x80;

/// System calls refused with EPERM.
pub const DENIED: &[(i64, &str)] = &[
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_lookup_dcookie, "lookup_dcookie"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_uselib, "uselib"),
    // A large attack surface of its own, which sandboxed code does not need (issue 13, row 11).
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    // Execution domains (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, ...) weaken the sandbox's own
    // defenses and reach old kernel paths.
    (libc::SYS_personality, "personality"),
];

/// `AF_VSOCK`: a namespace sandbox has no vsock device of its own; the host's is refused.
const AF_VSOCK: u32 = 40;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// The BPF program.
pub fn program() -> Vec<libc::sock_filter> {
    let eperm = SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let enosys = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
        jump(JSET_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, eperm),
    ];
    for (nr, _) in DENIED {
        p.push(jump(JEQ_K, *nr as u32, 0, 1));
        p.push(stmt(RET_K, eperm));
    }
    // socket: refuse the vsock family (its first argument).
    p.push(jump(JEQ_K, libc::SYS_socket as u32, 0, 4));
    p.push(stmt(LD_W_ABS, OFF_ARG0));
    p.push(jump(JEQ_K, AF_VSOCK, 0, 1));
    p.push(stmt(RET_K, eperm));
    p.push(stmt(RET_K, SECCOMP_RET_ALLOW));
    p.push(jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1));
    p.push(stmt(RET_K, enosys));
    // clone: refuse namespace flags in its first argument (the low 32 bits hold them).
    p.push(jump(JEQ_K, libc::SYS_clone as u32, 0, 3));
    p.push(stmt(LD_W_ABS, OFF_ARG0));
    p.push(jump(JSET_K, CLONE_NAMESPACE_FLAGS, 0, 1));
    p.push(stmt(RET_K, eperm));
    p.push(stmt(RET_K, SECCOMP_RET_ALLOW));
    p
}

/// Installs the filter on the calling thread (inherited across fork and exec). Needs
/// `PR_SET_NO_NEW_PRIVS` or CAP_SYS_ADMIN.
pub fn install() -> std::io::Result<()> {
    let prog = program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, a valid array of `len` BPF instructions that outlives
    // the call; the kernel copies the program.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog as libc::c_ulong,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions the program uses.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            match i.code {
                LD_W_ABS => {
                    acc = match i.k {
                        OFF_ARCH => arch,
                        OFF_NR => nr,
                        OFF_ARG0 => arg0,
                        other => panic!("load of offset {other}"),
                    };
                    pc += 1;
                }
                JEQ_K => pc += 1 + if acc == i.k { i.jt } else { i.jf } as usize,
                JSET_K => pc += 1 + if acc & i.k != 0 { i.jt } else { i.jf } as usize,
                RET_K => return i.k,
                other => panic!("unexpected opcode {other}"),
            }
        }
    }

    #[test]
    fn filter_decisions() {
        let p = program();
        assert!(p.len() < 4096);
        let eperm = SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let allow = SECCOMP_RET_ALLOW;
        let x86 = AUDIT_ARCH_X86_64;
        assert_eq!(run(&p, x86, libc::SYS_read as u32, 0), allow);
        assert_eq!(run(&p, x86, libc::SYS_execve as u32, 0), allow);
        assert_eq!(run(&p, x86, libc::SYS_mount as u32, 0), eperm);
        assert_eq!(run(&p, x86, libc::SYS_init_module as u32, 0), eperm);
        assert_eq!(run(&p, x86, libc::SYS_unshare as u32, 0), eperm);
        assert_eq!(
            run(&p, x86, libc::SYS_clone3 as u32, 0),
            SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        // fork-like clone is fine; a clone into a new user namespace is not.
        assert_eq!(
            run(&p, x86, libc::SYS_clone as u32, libc::SIGCHLD as u32),
            allow
        );
        assert_eq!(
            run(
                &p,
                x86,
                libc::SYS_clone as u32,
                0x1000_0000 | libc::SIGCHLD as u32
            ),
            eperm
        );
        assert_eq!(
            run(&p, x86, libc::SYS_read as u32 | X32_SYSCALL_BIT, 0),
            eperm
        );
        assert_eq!(run(&p, 0x4000_0003, 3, 0), SECCOMP_RET_KILL_PROCESS);
        // Issue 13, row 11: io_uring, personality and vsock sockets are refused; other
        // sockets are not.
        assert_eq!(run(&p, x86, libc::SYS_io_uring_setup as u32, 8), eperm);
        assert_eq!(run(&p, x86, libc::SYS_personality as u32, 0), eperm);
        assert_eq!(run(&p, x86, libc::SYS_socket as u32, AF_VSOCK), eperm);
        assert_eq!(
            run(&p, x86, libc::SYS_socket as u32, libc::AF_UNIX as u32),
            allow
        );
        assert_eq!(
            run(&p, x86, libc::SYS_socket as u32, libc::AF_INET as u32),
            allow
        );
    }
}
