//! File operations. Reads and writes stream in 64 KiB chunks so large files never sit in memory;
//! a write goes to a temporary file beside the target and is renamed over it at the end, so a
//! reader never sees half a file. Paths arrive normalized (see `protocol::normalize_path`).
//!
//! Every operation acts as a user (`acting_user`): the kernel checks each path and permission as
//! it would for that user, so a symbolic link the tenant planted cannot lead the agent's root
//! privileges anywhere. Files are opened without blocking and only regular files are read or
//! written (a FIFO or a device is refused by name, not waited on). A replacing write's temporary
//! name is unpredictable and created exclusively; its mode is set through its descriptor.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::acting_user::{as_user, ActingUser};
use crate::error::{AgentError, AgentResult};
use crate::protocol::{ChmodSpec, MkdirSpec, RemoveSpec, RenameSpec};

pub const FILE_CHUNK: usize = 64 * 1024;
/// The most entries one `list` returns; past it the answer says `"truncated": true`.
pub const MAX_LIST_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileStat {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<FileStat>,
    pub truncated: bool,
}

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device"
    } else {
        "other"
    }
}

fn stat_of(path: &Path, meta: &std::fs::Metadata) -> FileStat {
    let link_target = if meta.file_type().is_symlink() {
        std::fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    FileStat {
        path: path.to_string_lossy().into_owned(),
        kind: kind_of(&meta.file_type()),
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        link_target,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> AgentResult<T> + Send + 'static,
) -> AgentResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("file task failed: {e}")))?
}

/// lstat: a symlink is reported as one, with its target.
pub async fn stat(path: String, user: ActingUser) -> AgentResult<FileStat> {
    blocking(move || {
        let meta = as_user(user, || std::fs::symlink_metadata(&path))
            .map_err(|e| AgentError::io(format!("stat {path}"), e))?;
        Ok(stat_of(Path::new(&path), &meta))
    })
    .await
}

/// The entries under `path`, `depth` levels down (1: the directory's own entries), sorted by
/// path, without following symlinks.
pub async fn list(path: String, depth: u32, user: ActingUser) -> AgentResult<Listing> {
    blocking(move || {
        as_user(user, || Ok(list_as_user(path, depth))).map_err(|e| AgentError::io("list", e))?
    })
    .await
}

fn list_as_user(path: String, depth: u32) -> AgentResult<Listing> {
    {
        let mut entries = Vec::new();
        let mut truncated = false;
        let meta =
            std::fs::metadata(&path).map_err(|e| AgentError::io(format!("list {path}"), e))?;
        if !meta.is_dir() {
            return Err(AgentError::io(
                format!("list {path}"),
                io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
        let mut pending: Vec<(PathBuf, u32)> = vec![(PathBuf::from(&path), 1)];
        while let Some((dir, level)) = pending.pop() {
            let read = match std::fs::read_dir(&dir) {
                Ok(r) => r,
                // The top directory's error is the caller's; deeper ones are skipped.
                Err(e) if dir == Path::new(&path) => {
                    return Err(AgentError::io(format!("list {path}"), e))
                }
                Err(_) => continue,
            };
            for entry in read.flatten() {
                if entries.len() >= MAX_LIST_ENTRIES {
                    truncated = true;
                    break;
                }
                let Ok(meta) = entry.metadata() else { continue };
                let entry_path = entry.path();
                if meta.is_dir() && level < depth {
                    pending.push((entry_path.clone(), level + 1));
                }
                entries.push(stat_of(&entry_path, &meta));
            }
            if truncated {
                break;
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Listing {
            path,
            entries,
            truncated,
        })
    }
}

/// Opens a file for a streamed read: its size and a stream of its bytes from `offset`, at most
/// `length` of them.
pub async fn read_stream(
    path: String,
    offset: u64,
    length: Option<u64>,
    user: ActingUser,
) -> AgentResult<(u64, impl Stream<Item = io::Result<Bytes>> + Send + 'static)> {
    let (file, meta) = {
        let path = path.clone();
        blocking(move || {
            let file = as_user(user, || open_regular(Path::new(&path), OpenFor::Read))
                .map_err(|e| AgentError::io(format!("read {path}"), e))?;
            let meta = file
                .metadata()
                .map_err(|e| AgentError::io(format!("stat {path}"), e))?;
            Ok((file, meta))
        })
        .await?
    };
    let mut file = tokio::fs::File::from_std(file);
    if offset > 0 {
        file.seek(io::SeekFrom::Start(offset))
            .await
            .map_err(|e| AgentError::io(format!("seek {path}"), e))?;
    }
    let remaining = length.unwrap_or(u64::MAX);
    let stream =
        futures_util::stream::unfold((file, remaining), |(mut file, remaining)| async move {
            if remaining == 0 {
                return None;
            }
            let want = remaining.min(FILE_CHUNK as u64) as usize;
            let mut buf = BytesMut::with_capacity(want);
            match (&mut file).take(want as u64).read_buf(&mut buf).await {
                Ok(0) => None,
                Ok(n) => Some((Ok(buf.freeze()), (file, remaining - n as u64))),
                Err(e) => Some((Err(e), (file, 0))),
            }
        });
    Ok((meta.len().saturating_sub(offset), stream))
}

enum OpenFor {
    Read,
    Append { mode: u32 },
}

/// Opens a regular file without blocking on it: a FIFO, socket or device is refused with a
/// clear error (opening a FIFO for reading would wait for a writer forever), a directory too.
fn open_regular(path: &Path, purpose: OpenFor) -> io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    match purpose {
        OpenFor::Read => options.read(true),
        OpenFor::Append { mode } => options.append(true).create(true).mode(mode),
    };
    let file = match options.open(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(not_regular("FIFO without a reader, or a socket"))
        }
        other => other?,
    };
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(not_regular(kind_of(&kind)));
    }
    // Regular files ignore O_NONBLOCK; clear it anyway so later reads are plain ones.
    // SAFETY: fcntl on a descriptor this function owns, with integer arguments.
    unsafe {
        use std::os::fd::AsRawFd;
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

fn not_regular(kind: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file (it is a {kind}); only regular files are read and written"),
    )
}

/// Creates the missing directories up to `dir` (as the acting user, so they are its own).
fn create_dirs(dir: &Path, mode: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(d) = cursor {
        if d.symlink_metadata().is_ok() {
            break;
        }
        missing.push(d.to_path_buf());
        cursor = d.parent();
    }
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An unpredictable suffix for a temporary file's name (a tenant cannot plant a link there in
/// advance; the name is created exclusively anyway).
fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never in practice (8 bytes from an initialized pool); the time still varies.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = t.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An open streamed write: chunks go in with [`FileWriter::write`], and [`FileWriter::finish`]
/// puts the file in place (a replacing write is renamed over the target only then).
pub struct FileWriter {
    target: PathBuf,
    temp: Option<PathBuf>,
    file: tokio::fs::File,
    written: u64,
    user: ActingUser,
}

pub struct WriteOptions {
    pub mode: u32,
    /// Who writes: the file ends up theirs, and the kernel checks the path as for them.
    pub user: ActingUser,
    pub create_parents: bool,
    pub append: bool,
}

impl FileWriter {
    pub async fn create(path: &str, opts: WriteOptions) -> AgentResult<FileWriter> {
        let target = PathBuf::from(path);
        let parent = target
            .parent()
            .ok_or_else(|| AgentError::bad_request("cannot write to \"/\""))?
            .to_path_buf();
        let user = opts.user;
        let (file, temp) = {
            let (target, path) = (target.clone(), path.to_string());
            blocking(move || {
                as_user(user, || {
                    if opts.create_parents {
                        create_dirs(&parent, 0o755)?;
                    }
                    if opts.append {
                        let file = open_regular(&target, OpenFor::Append { mode: opts.mode })?;
                        return Ok((file, None));
                    }
                    let name = target
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    // Keep the name within NAME_MAX whatever the target's length.
                    let short: String = name.chars().take(200).collect();
                    let temp = parent.join(format!(".{short}.airlock-{}", random_suffix()));
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .mode(opts.mode)
                        .open(&temp)?;
                    // The umask must not narrow the mode; through the descriptor, not the name.
                    file.set_permissions(std::fs::Permissions::from_mode(opts.mode))?;
                    Ok((file, Some(temp)))
                })
                .map_err(|e| AgentError::io(format!("write {path}"), e))
            })
            .await?
        };
        Ok(FileWriter {
            target,
            temp,
            file: tokio::fs::File::from_std(file),
            written: 0,
            user,
        })
    }

    pub async fn write(&mut self, data: &[u8]) -> AgentResult<()> {
        self.file
            .write_all(data)
            .await
            .map_err(|e| AgentError::io(format!("write {}", self.target.display()), e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    pub async fn finish(mut self) -> AgentResult<u64> {
        self.file
            .flush()
            .await
            .map_err(|e| AgentError::io(format!("write {}", self.target.display()), e))?;
        if let Some(temp) = self.temp.take() {
            let (target, user) = (self.target.clone(), self.user);
            blocking(move || {
                as_user(user, || {
                    std::fs::rename(&temp, &target).inspect_err(|_| {
                        let _ = std::fs::remove_file(&temp);
                    })
                })
                .map_err(|e| AgentError::io(format!("rename into place {}", target.display()), e))
            })
            .await?;
        }
        Ok(self.written)
    }
}

impl Drop for FileWriter {
    /// An unfinished replacing write (client gone, write error) leaves no temporary behind.
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = as_user(self.user, || std::fs::remove_file(temp));
        }
    }
}

pub async fn mkdir(spec: MkdirSpec, user: ActingUser) -> AgentResult<()> {
    blocking(move || {
        let mode = spec.mode.map_or(0o755, |m| m.0);
        let path = Path::new(&spec.path);
        as_user(user, || {
            if spec.parents {
                if path.is_dir() {
                    return Ok(());
                }
                create_dirs(path, mode)
            } else {
                std::fs::create_dir(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            }
        })
        .map_err(|e| AgentError::io(format!("mkdir {}", spec.path), e))
    })
    .await
}

pub async fn remove(spec: RemoveSpec, user: ActingUser) -> AgentResult<()> {
    blocking(move || {
        let path = &spec.path;
        let meta = match as_user(user, || std::fs::symlink_metadata(path)) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound && spec.missing_ok => return Ok(()),
            Err(e) => return Err(AgentError::io(format!("remove {path}"), e)),
        };
        let result = as_user(user, || {
            if meta.is_dir() {
                if spec.recursive {
                    std::fs::remove_dir_all(path)
                } else {
                    std::fs::remove_dir(path)
                }
            } else {
                std::fs::remove_file(path)
            }
        });
        result.map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::ENOTEMPTY) {
                " (set \"recursive\": true to remove a directory with its contents)"
            } else {
                ""
            };
            AgentError::io(format!("remove {path}{hint}"), e)
        })
    })
    .await
}

pub async fn rename(spec: RenameSpec, user: ActingUser) -> AgentResult<()> {
    blocking(move || {
        as_user(user, || std::fs::rename(&spec.from, &spec.to))
            .map_err(|e| AgentError::io(format!("rename {} to {}", spec.from, spec.to), e))
    })
    .await
}

pub async fn chmod(spec: ChmodSpec, user: ActingUser) -> AgentResult<()> {
    blocking(move || {
        as_user(user, || {
            std::fs::set_permissions(&spec.path, std::fs::Permissions::from_mode(spec.mode.0))
        })
        .map_err(|e| AgentError::io(format!("chmod {}", spec.path), e))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("airlock-agent-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn me() -> ActingUser {
        ActingUser {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    #[tokio::test]
    async fn write_read_list_remove() {
        let dir = temp_dir("files");
        let user = me();
        let path = dir.join("a/b/c.txt").display().to_string();
        let mut w = FileWriter::create(
            &path,
            WriteOptions {
                mode: 0o640,
                user,
                create_parents: true,
                append: false,
            },
        )
        .await
        .unwrap();
        let chunk = vec![7u8; FILE_CHUNK + 10];
        w.write(&chunk).await.unwrap();
        w.write(b"tail").await.unwrap();
        assert_eq!(w.finish().await.unwrap(), FILE_CHUNK as u64 + 14);
        let s = stat(path.clone(), user).await.unwrap();
        assert_eq!(
            (s.kind, s.mode, s.size),
            ("file", 0o640, FILE_CHUNK as u64 + 14)
        );

        let (size, stream) = read_stream(path.clone(), 5, Some(FILE_CHUNK as u64), user)
            .await
            .unwrap();
        assert_eq!(size, FILE_CHUNK as u64 + 9);
        let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), FILE_CHUNK);

        let listing = list(dir.display().to_string(), 3, user).await.unwrap();
        let names: Vec<&str> = listing.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        let shallow = list(dir.display().to_string(), 1, user).await.unwrap();
        assert_eq!(shallow.entries.len(), 1);

        let err = remove(
            RemoveSpec {
                path: dir.join("a").display().to_string(),
                recursive: false,
                missing_ok: false,
                uid: None,
                gid: None,
            },
            user,
        )
        .await
        .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::CONFLICT);
        remove(
            RemoveSpec {
                path: dir.display().to_string(),
                recursive: true,
                missing_ok: false,
                uid: None,
                gid: None,
            },
            user,
        )
        .await
        .unwrap();
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn abandoned_write_leaves_no_temp_file() {
        let dir = temp_dir("abandon");
        let user = me();
        let path = dir.join("x").display().to_string();
        let mut w = FileWriter::create(
            &path,
            WriteOptions {
                mode: 0o644,
                user,
                create_parents: false,
                append: false,
            },
        )
        .await
        .unwrap();
        w.write(b"partial").await.unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
