//! `airlock-jailer inspect`: what a process in a jail sees, as one JSON line on stdout. Run the
//! jailer binary as a jail's `--exec-file` with `-- inspect` to check a jail configuration; the
//! integration tests use it to look at the jail from inside.

use std::fs;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use serde_json::{json, Value};

/// TUNSETIFF (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

fn open_result(path: &str) -> Value {
    match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => json!("ok"),
        Err(e) => json!(e.to_string()),
    }
}

/// Attaches to an existing TAP interface as the current user.
fn attach_tap(name: &str) -> Value {
    let file = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(f) => f,
        Err(e) => return json!(format!("open /dev/net/tun: {e}")),
    };
    // struct ifreq: 16 bytes of name, then a short of flags (and padding to 40 bytes).
    let mut ifreq = [0u8; 40];
    let bytes = name.as_bytes();
    if bytes.len() >= 16 {
        return json!("interface name too long");
    }
    ifreq[..bytes.len()].copy_from_slice(bytes);
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which the 40-byte buffer holds.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) };
    if rc == 0 {
        json!("ok")
    } else {
        json!(format!("TUNSETIFF: {}", std::io::Error::last_os_error()))
    }
}

fn open_fds() -> Vec<i32> {
    (0..1024)
        // SAFETY: F_GETFD only queries a descriptor number.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
        .collect()
}

fn rlimit(resource: libc::c_int) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    unsafe { libc::getrlimit(resource as _, &mut lim) };
    lim.rlim_cur
}

pub fn run(tap: Option<&str>) -> ExitCode {
    // Listed before anything here opens a descriptor.
    let fds = open_fds();
    let mut root: Vec<String> = fs::read_dir("/")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    root.sort();
    let mut groups = vec![0 as libc::gid_t; 64];
    // SAFETY: getgroups writes at most 64 entries into the buffer.
    let n = unsafe { libc::getgroups(64, groups.as_mut_ptr()) };
    groups.truncate(n.max(0) as usize);
    let env: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    // SAFETY: these calls only return the caller's ids.
    let ids = unsafe {
        json!({
            "uid": libc::getuid(), "euid": libc::geteuid(),
            "gid": libc::getgid(), "egid": libc::getegid(),
            "pid": libc::getpid(), "ppid": libc::getppid(),
        })
    };
    let report = json!({
        "ids": ids,
        "groups": groups,
        "root": root,
        "cwd": std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
        "env": env,
        "fds": fds,
        "nofile": rlimit(libc::RLIMIT_NOFILE as _),
        "fsize": rlimit(libc::RLIMIT_FSIZE as _),
        "memlock": rlimit(libc::RLIMIT_MEMLOCK as _),
        "proc_visible": fs::metadata("/proc/self").is_ok(),
        "kvm": open_result("/dev/kvm"),
        "tun": open_result("/dev/net/tun"),
        "tap": tap.map(attach_tap),
    });
    println!("JAIL-INSPECT {report}");
    ExitCode::SUCCESS
}
