//! A user namespace per namespace-backend sandbox: its uids and gids 0..65535 are host ids
//! `base..base+65535`, a range of its own, so sandbox root is not host root and no two tenants
//! share a host user (issue 13, rows 1 and 7). Per-user kernel limits (inotify instances, say)
//! are charged to the namespace's owner, which is the range's base, not a shared user.
//!
//! - [`claim`] and [`release`]: the ranges, one file per range under the state dir, so a range
//!   stays taken across daemon restarts for as long as its sandbox lives.
//! - [`owned_by`]: makes the namespace (owner `base`, both maps written by host root).
//! - [`idmapped_tree`]: a detached, idmapped copy of a template's tree (its on-disk owner 0
//!   shows as `base`), the overlay's lower layer.
//! - [`IdShift`]: a sandbox's files back to template ids when it is snapshotted.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Ids per sandbox: the 16-bit range a Linux distribution expects (`nobody` is 65534).
pub const RANGE: u32 = 65536;
/// The first range starts here, far above any host account or `/etc/subuid` range.
pub const FIRST_BASE: u32 = 1 << 30;
/// Ranges available: `FIRST_BASE..2^31`.
pub const SLOTS: u32 = (1 << 30) / RANGE;

/// The directory of claimed ranges, `<state>/uid-ranges/<slot>` holding the sandbox's id.
fn ranges_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("uid-ranges")
}

/// Claims the lowest free range for `sandbox`; returns its base.
pub fn claim(state_dir: &Path, sandbox: &str) -> Result<u32, String> {
    let dir = ranges_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    for slot in 0..SLOTS {
        let path = dir.join(slot.to_string());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(sandbox.as_bytes())
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                return Ok(FIRST_BASE + slot * RANGE);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("claiming {}: {e}", path.display())),
        }
    }
    Err(format!(
        "every one of the {SLOTS} host uid ranges is taken ({})",
        dir.display()
    ))
}

/// Frees the range at `base` (once nothing of its sandbox runs).
pub fn release(state_dir: &Path, base: u32) {
    if let Some(slot) = base
        .checked_sub(FIRST_BASE)
        .filter(|o| o % RANGE == 0)
        .map(|o| o / RANGE)
    {
        let _ = std::fs::remove_file(ranges_dir(state_dir).join(slot.to_string()));
    }
}

/// Host ids of a sandbox's range taken back to the ids the sandbox sees (a template's), for
/// copying its files into a template; ids outside the range are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdShift {
    pub base: u32,
}

impl IdShift {
    pub fn apply(self, id: u32) -> u32 {
        match id.checked_sub(self.base) {
            Some(inside) if self.base > 0 && inside < RANGE => inside,
            _ => id,
        }
    }
}

/// `/proc/PID/uid_map` (and `gid_map`) text for a range.
pub fn map_line(base: u32) -> String {
    format!("0 {base} {RANGE}\n")
}

/// A new user namespace owned by host uid `base`, with both maps `0 base 65536`. Forks a helper
/// that takes uid `base` and unshares; this process (host root) writes the maps and keeps the
/// namespace's descriptor. Call only from a single-threaded process (the launcher).
pub fn owned_by(base: u32) -> Result<OwnedFd, String> {
    let (ready_r, ready_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    // SAFETY: the caller is single-threaded, so the child may run anything until it exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!(
            "fork for the user namespace: {}",
            std::io::Error::last_os_error()
        ));
    }
    if pid == 0 {
        drop((ready_r, done_w));
        // The owner is the creator's euid: gid first, while still allowed.
        // SAFETY: plain system calls on integers, in the child, which only exits afterwards.
        let status = unsafe {
            if libc::setresgid(base, base, base) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresuid(base, base, base) != 0
                || libc::unshare(libc::CLONE_NEWUSER) != 0
            {
                1
            } else {
                0
            }
        };
        let mut ready = std::fs::File::from(ready_w);
        let _ = ready.write_all(&[status]);
        drop(ready);
        // Wait until the parent has written the maps and opened the namespace.
        let mut byte = [0u8; 1];
        let _ = std::fs::File::from(done_r).read(&mut byte);
        // SAFETY: _exit ends the helper without running the parent's atexit handlers.
        unsafe { libc::_exit(0) }
    }
    drop((ready_w, done_r));
    let result = (|| {
        let mut status = [1u8; 1];
        std::fs::File::from(ready_r)
            .read_exact(&mut status)
            .map_err(|e| format!("the user namespace helper: {e}"))?;
        if status[0] != 0 {
            return Err(format!(
                "the user namespace helper could not take uid {base} and unshare (are user namespaces enabled: /proc/sys/user/max_user_namespaces?)"
            ));
        }
        for (file, text) in [("uid_map", map_line(base)), ("gid_map", map_line(base))] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(&path, &text).map_err(|e| format!("writing {path}: {e}"))?;
        }
        let path = format!("/proc/{pid}/ns/user");
        let ns = std::fs::File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
        Ok(OwnedFd::from(ns))
    })();
    drop(done_w);
    let mut wstatus = 0;
    // SAFETY: waitpid on the helper this function forked.
    unsafe { libc::waitpid(pid, &mut wstatus, 0) };
    result
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Mounts a copy of `tree` on `target` with the ids of `userns` (a file owned by 0 on disk is
/// `base`'s there). In a private mount namespace, so the host never sees it.
pub fn idmapped_tree(tree: &Path, target: &Path, userns: &OwnedFd) -> Result<(), String> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{}: holds a NUL", p.display()))
    };
    let (tree_c, target_c) = (c(tree)?, c(target)?);
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EINVAL) {
            " (the filesystem holding the templates may not support idmapped mounts; it needs Linux 5.12+ and e.g. ext4, xfs, btrfs or tmpfs)"
        } else {
            ""
        };
        format!("{what} {}: {e}{hint}", tree.display())
    };
    // SAFETY: open_tree with a NUL-terminated path; the result is a new descriptor we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            tree_c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(fail("open_tree"));
    }
    // SAFETY: fd was just returned by open_tree and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr on our detached tree with an empty path and a mount_attr of the
    // size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(fail("idmapping"));
    }
    // SAFETY: move_mount of our detached tree onto a NUL-terminated target path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(fail("mounting the idmapped copy of"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_claimed_once_and_freed() {
        let dir = std::env::temp_dir().join(format!("airlock-userns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = claim(&dir, "a").unwrap();
        let b = claim(&dir, "b").unwrap();
        assert_eq!(a, FIRST_BASE);
        assert_eq!(b, FIRST_BASE + RANGE);
        release(&dir, a);
        assert_eq!(
            claim(&dir, "c").unwrap(),
            FIRST_BASE,
            "a freed range is reused"
        );
        assert_eq!(claim(&dir, "d").unwrap(), FIRST_BASE + 2 * RANGE);
        // A base that is no range's is ignored.
        release(&dir, FIRST_BASE + 1);
        release(&dir, 7);
        assert_eq!(
            std::fs::read_to_string(dir.join("uid-ranges/1")).unwrap(),
            "b"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ids_shift_back_only_inside_the_range() {
        let s = IdShift { base: FIRST_BASE };
        assert_eq!(s.apply(FIRST_BASE), 0);
        assert_eq!(s.apply(FIRST_BASE + 1000), 1000);
        assert_eq!(s.apply(FIRST_BASE + RANGE), FIRST_BASE + RANGE);
        assert_eq!(s.apply(5), 5);
        assert_eq!(IdShift::default().apply(1000), 1000);
        assert_eq!(map_line(FIRST_BASE), format!("0 {FIRST_BASE} 65536\n"));
        assert!(FIRST_BASE as u64 + SLOTS as u64 * RANGE as u64 <= 1 << 31);
    }
}
