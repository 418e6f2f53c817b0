//! Host helpers: atomic files, tree copies, process liveness, time.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub use crate::userns::IdShift;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `data` to `path` atomically: a temporary file beside it, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The start time of a process (/proc/PID/stat field 22, clock ticks since boot), None when
/// there is no such process or it is a zombie.
pub fn pid_start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and ')': fields follow the last ')'.
    let after = stat.rsplit_once(") ")?.1;
    let mut fields = after.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Field 3 is the state; field 22 the start time: 19 more on.
    fields.nth(18)?.parse().ok()
}

/// Whether the process `pid` that started at `start_time` still runs.
pub fn process_alive(pid: i32, start_time: u64) -> bool {
    pid_start_time(pid) == Some(start_time)
}

/// Reaps `pid` if it is our child and has exited (no effect otherwise).
pub fn reap(pid: i32) {
    if pid > 0 {
        // SAFETY: waitpid with WNOHANG on a specific pid and a null status pointer only reaps
        // that child, if it is ours and has exited.
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        }
    }
}

/// Progress of a tree copy: bytes and files done so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyProgress {
    pub bytes: u64,
    pub files: u64,
}

/// Total size of regular files under `dir` (symlinks not followed, other filesystems skipped).
pub fn tree_size(dir: &Path) -> u64 {
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let dev = root.dev();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

/// Copies the tree `from` to `to` (which must not exist): directories, regular files,
/// symlinks (as links), owners, modes and times. Stays on `from`'s filesystem (mount points
/// below it become empty directories), and skips sockets, FIFOs and devices. Owners pass
/// through `ids` (a sandbox's host range back to a template's ids). `progress` is called after
/// each file.
pub fn copy_tree(
    from: &Path,
    to: &Path,
    ids: IdShift,
    progress: &mut dyn FnMut(CopyProgress),
) -> std::io::Result<CopyProgress> {
    let root = std::fs::symlink_metadata(from)?;
    if !root.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a directory", from.display()),
        ));
    }
    let mut walk = Walk {
        dev: root.dev(),
        ids,
        done: CopyProgress::default(),
    };
    copy_dir(from, to, &mut walk, progress)?;
    Ok(walk.done)
}

struct Walk {
    dev: u64,
    ids: IdShift,
    done: CopyProgress,
}

fn copy_meta(to: &Path, m: &std::fs::Metadata, ids: IdShift) -> std::io::Result<()> {
    std::os::unix::fs::lchown(to, Some(ids.apply(m.uid())), Some(ids.apply(m.gid())))?;
    if !m.file_type().is_symlink() {
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    Ok(())
}

fn copy_dir(
    from: &Path,
    to: &Path,
    walk: &mut Walk,
    progress: &mut dyn FnMut(CopyProgress),
) -> std::io::Result<()> {
    let ids = walk.ids;
    let meta = std::fs::symlink_metadata(from)?;
    std::fs::create_dir(to)?;
    let mut entries: Vec<_> = std::fs::read_dir(from)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let src = e.path();
        let dst = to.join(e.file_name());
        let m = std::fs::symlink_metadata(&src)?;
        let ft = m.file_type();
        if ft.is_dir() {
            if m.dev() != walk.dev {
                std::fs::create_dir(&dst)?;
                copy_meta(&dst, &m, ids)?;
            } else {
                copy_dir(&src, &dst, walk, progress)?;
            }
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&src)?;
            std::os::unix::fs::symlink(target, &dst)?;
            copy_meta(&dst, &m, ids)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst)?;
            copy_meta(&dst, &m, ids)?;
            walk.done.bytes += m.len();
        } else {
            continue;
        }
        walk.done.files += 1;
        progress(walk.done);
    }
    copy_meta(to, &meta, ids)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("airlockd-sys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_replaces() {
        let d = scratch("atomic");
        let p = d.join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn copies_a_tree() {
        let d = scratch("copy");
        let src = d.join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/f"), b"hello").unwrap();
        std::fs::set_permissions(src.join("a/b/f"), std::fs::Permissions::from_mode(0o741))
            .unwrap();
        std::os::unix::fs::symlink("b/f", src.join("a/link")).unwrap();
        let mut calls = 0;
        let done = copy_tree(&src, &d.join("dst"), IdShift::default(), &mut |_| {
            calls += 1
        })
        .unwrap();
        assert_eq!(done.bytes, 5);
        assert_eq!(calls, 4);
        assert_eq!(std::fs::read(d.join("dst/a/b/f")).unwrap(), b"hello");
        assert_eq!(
            std::fs::metadata(d.join("dst/a/b/f")).unwrap().mode() & 0o777,
            0o741
        );
        assert_eq!(
            std::fs::read_link(d.join("dst/a/link")).unwrap(),
            Path::new("b/f")
        );
        assert_eq!(tree_size(&d.join("dst")), 5);
        assert!(copy_tree(&src, &d.join("dst"), IdShift::default(), &mut |_| {}).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }

    /// A snapshot of a sandbox with its own id range: the range's ids become the template's.
    #[test]
    fn a_copy_shifts_a_sandbox_range_back() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("NOT RUN a_copy_shifts_a_sandbox_range_back: chown needs root");
            return;
        }
        let d = scratch("shift");
        let src = d.join("src");
        std::fs::create_dir_all(src.join("home")).unwrap();
        std::fs::write(src.join("home/f"), b"x").unwrap();
        let base = crate::userns::FIRST_BASE;
        std::os::unix::fs::lchown(&src, Some(base), Some(base)).unwrap();
        std::os::unix::fs::lchown(src.join("home/f"), Some(base + 1000), Some(base + 1000))
            .unwrap();
        std::os::unix::fs::lchown(src.join("home"), Some(77), Some(78)).unwrap();
        copy_tree(&src, &d.join("dst"), IdShift { base }, &mut |_| {}).unwrap();
        let owner = |p: &str| {
            let m = std::fs::symlink_metadata(d.join(p)).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(owner("dst"), (0, 0));
        assert_eq!(owner("dst/home/f"), (1000, 1000));
        assert_eq!(
            owner("dst/home"),
            (77, 78),
            "ids outside the range are kept"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        let t = pid_start_time(me).unwrap();
        assert!(process_alive(me, t));
        assert!(!process_alive(me, t + 1));
        assert!(pid_start_time(-1).is_none());
    }
}
