//! File operations act as a user, not as the agent. The agent runs as root (it is the sandbox's
//! init); a file request names a uid and gid (or takes the sandbox user's), and the thread doing
//! it switches its filesystem uid, gid and supplementary groups to them for the call. The kernel
//! then checks every path component and every permission as it would for that user, and drops
//! the file capabilities (CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER, ...) while the filesystem uid
//! is not 0. A symbolic link the tenant planted therefore leads only where the tenant could go
//! itself: `ln -s /usr/bin ubin` then an upload to `ubin/x` fails with "permission denied", as it
//! would for the tenant's own shell.
//!
//! The switch is per thread (`setfsuid`, `setfsgid` and the raw `setgroups` system call change
//! the calling thread only) and is undone when the call returns or unwinds, so the blocking pool's
//! threads go back to root between requests.

use std::io;

/// Who a file operation acts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActingUser {
    pub uid: u32,
    pub gid: u32,
}

fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the raw system call changes only this thread's groups (libc's setgroups would
    // change every thread's); it reads `groups.len()` gids from a live slice.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn current_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a size query: getgroups(0, NULL) writes nothing.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0; n as usize];
    // SAFETY: the buffer holds `n` gids, the count passed.
    let n = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

/// Puts the thread's filesystem identity back when dropped (also on unwinding).
struct Restore {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: setfsuid/setfsgid take plain integers and change only this thread.
        unsafe {
            libc::setfsuid(self.uid);
            libc::setfsgid(self.gid);
        }
        let _ = set_groups(&self.groups);
    }
}

/// Runs `f` on this thread with the filesystem identity of `user`. Where the agent is not root
/// (a host test), acting as anyone but the agent's own user is refused.
pub fn as_user<T>(user: ActingUser, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    // SAFETY: geteuid/getegid take no arguments.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if user.uid == euid && user.gid == egid {
        return f();
    }
    if euid != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the agent runs as uid {euid}, so it cannot act as uid {} gid {}",
                user.uid, user.gid
            ),
        ));
    }
    let restore = Restore {
        uid: euid,
        gid: egid,
        groups: current_groups()?,
    };
    set_groups(&[user.gid])?;
    // SAFETY: setfsuid/setfsgid take plain integers and change only this thread; an invalid id
    // (u32::MAX) changes nothing and returns the current one, which checks the switch.
    let switched = unsafe {
        libc::setfsgid(user.gid);
        libc::setfsuid(user.uid);
        libc::setfsgid(u32::MAX) as u32 == user.gid && libc::setfsuid(u32::MAX) as u32 == user.uid
    };
    if !switched {
        return Err(io::Error::other(format!(
            "cannot act as uid {} gid {}",
            user.uid, user.gid
        )));
    }
    let result = f();
    drop(restore);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As an unprivileged user a root-only file cannot be read and a root-owned directory cannot
    /// be written; afterwards the thread is root again.
    #[test]
    fn acts_as_the_user_and_comes_back() {
        // SAFETY: geteuid takes no arguments.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("NOT RUN acts_as_the_user_and_comes_back: needs root to switch users");
            return;
        }
        let dir = std::env::temp_dir().join(format!("airlock-acting-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let nobody = ActingUser {
            uid: 65534,
            gid: 65534,
        };
        let read = as_user(nobody, || std::fs::read(&secret)).unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::PermissionDenied);
        let made = as_user(nobody, || std::fs::write(dir.join("new"), b"x")).unwrap_err();
        assert_eq!(made.kind(), io::ErrorKind::PermissionDenied);
        // Back to root on this thread.
        assert_eq!(std::fs::read(&secret).unwrap(), b"root only");
        // SAFETY: setfsuid(-1) changes nothing and returns the current filesystem uid.
        assert_eq!(unsafe { libc::setfsuid(u32::MAX) }, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
