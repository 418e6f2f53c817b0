//! File operations. Reads and writes stream in 64 KiB chunks so large files never sit in memory;
//! a write goes to a temporary file beside the target and is renamed over it at the end, so a
//! reader never sees half a file. Paths arrive normalized (see `protocol::normalize_path`).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

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
pub async fn stat(path: String) -> AgentResult<FileStat> {
    blocking(move || {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| AgentError::io(format!("stat {path}"), e))?;
        Ok(stat_of(Path::new(&path), &meta))
    })
    .await
}

/// The entries under `path`, `depth` levels down (1: the directory's own entries), sorted by
/// path, without following symlinks.
pub async fn list(path: String, depth: u32) -> AgentResult<Listing> {
    blocking(move || {
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
    })
    .await
}

/// Opens a file for a streamed read: its size and a stream of its bytes from `offset`, at most
/// `length` of them.
pub async fn read_stream(
    path: String,
    offset: u64,
    length: Option<u64>,
) -> AgentResult<(u64, impl Stream<Item = io::Result<Bytes>> + Send + 'static)> {
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| AgentError::io(format!("open {path}"), e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| AgentError::io(format!("stat {path}"), e))?;
    if meta.is_dir() {
        return Err(AgentError::io(
            format!("read {path}"),
            io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
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

fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// Creates the missing directories up to `dir`, owned by uid/gid.
fn create_dirs_owned(dir: &Path, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(d) = cursor {
        if d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        cursor = d.parent();
    }
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?;
                chown(d, uid, gid)?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An open streamed write: chunks go in with [`FileWriter::write`], and [`FileWriter::finish`]
/// puts the file in place (a replacing write is renamed over the target only then).
pub struct FileWriter {
    target: PathBuf,
    temp: Option<PathBuf>,
    file: tokio::fs::File,
    written: u64,
}

pub struct WriteOptions {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
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
        if opts.create_parents {
            let (p, uid, gid) = (parent.clone(), opts.uid, opts.gid);
            blocking(move || {
                create_dirs_owned(&p, 0o755, uid, gid)
                    .map_err(|e| AgentError::io(format!("create directories {}", p.display()), e))
            })
            .await?;
        }
        let (file, temp) = if opts.append {
            let file = tokio::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(opts.mode)
                .open(&target)
                .await
                .map_err(|e| AgentError::io(format!("open {path}"), e))?;
            (file, None)
        } else {
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let temp = parent.join(format!(
                ".{name}.airlock-{}-{}",
                std::process::id(),
                TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(opts.mode)
                .open(&temp)
                .await
                .map_err(|e| AgentError::io(format!("create {}", temp.display()), e))?;
            (file, Some(temp))
        };
        let written_path = temp.clone().unwrap_or_else(|| target.clone());
        // The mode is set explicitly as well: the umask must not narrow it.
        let (mode, uid, gid) = (opts.mode, opts.uid, opts.gid);
        let fixup = blocking(move || {
            std::fs::set_permissions(&written_path, std::fs::Permissions::from_mode(mode))
                .and_then(|_| chown(&written_path, uid, gid))
                .map_err(|e| AgentError::io(format!("chmod/chown {}", written_path.display()), e))
        })
        .await;
        let writer = FileWriter {
            target,
            temp,
            file,
            written: 0,
        };
        fixup?;
        Ok(writer)
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
            tokio::fs::rename(&temp, &self.target).await.map_err(|e| {
                let _ = std::fs::remove_file(&temp);
                AgentError::io(format!("rename into place {}", self.target.display()), e)
            })?;
        }
        Ok(self.written)
    }
}

impl Drop for FileWriter {
    /// An unfinished replacing write (client gone, write error) leaves no temporary behind.
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

static TEMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub async fn mkdir(spec: MkdirSpec, uid: u32, gid: u32) -> AgentResult<()> {
    blocking(move || {
        let mode = spec.mode.map_or(0o755, |m| m.0);
        let path = Path::new(&spec.path);
        let result = if spec.parents {
            if path.is_dir() {
                return Ok(());
            }
            create_dirs_owned(path, mode, uid, gid)
        } else {
            std::fs::create_dir(path).and_then(|_| {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                chown(path, uid, gid)
            })
        };
        result.map_err(|e| AgentError::io(format!("mkdir {}", spec.path), e))
    })
    .await
}

pub async fn remove(spec: RemoveSpec) -> AgentResult<()> {
    blocking(move || {
        let path = &spec.path;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound && spec.missing_ok => return Ok(()),
            Err(e) => return Err(AgentError::io(format!("remove {path}"), e)),
        };
        let result = if meta.is_dir() {
            if spec.recursive {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_dir(path)
            }
        } else {
            std::fs::remove_file(path)
        };
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

pub async fn rename(spec: RenameSpec) -> AgentResult<()> {
    tokio::fs::rename(&spec.from, &spec.to)
        .await
        .map_err(|e| AgentError::io(format!("rename {} to {}", spec.from, spec.to), e))
}

pub async fn chmod(spec: ChmodSpec) -> AgentResult<()> {
    tokio::fs::set_permissions(&spec.path, std::fs::Permissions::from_mode(spec.mode.0))
        .await
        .map_err(|e| AgentError::io(format!("chmod {}", spec.path), e))
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

    fn me() -> (u32, u32) {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }

    #[tokio::test]
    async fn write_read_list_remove() {
        let dir = temp_dir("files");
        let (uid, gid) = me();
        let path = dir.join("a/b/c.txt").display().to_string();
        let mut w = FileWriter::create(
            &path,
            WriteOptions {
                mode: 0o640,
                uid,
                gid,
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
        let s = stat(path.clone()).await.unwrap();
        assert_eq!(
            (s.kind, s.mode, s.size),
            ("file", 0o640, FILE_CHUNK as u64 + 14)
        );

        let (size, stream) = read_stream(path.clone(), 5, Some(FILE_CHUNK as u64))
            .await
            .unwrap();
        assert_eq!(size, FILE_CHUNK as u64 + 9);
        let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), FILE_CHUNK);

        let listing = list(dir.display().to_string(), 3).await.unwrap();
        let names: Vec<&str> = listing.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        let shallow = list(dir.display().to_string(), 1).await.unwrap();
        assert_eq!(shallow.entries.len(), 1);

        let err = remove(RemoveSpec {
            path: dir.join("a").display().to_string(),
            recursive: false,
            missing_ok: false,
        })
        .await
        .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::CONFLICT);
        remove(RemoveSpec {
            path: dir.display().to_string(),
            recursive: true,
            missing_ok: false,
        })
        .await
        .unwrap();
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn abandoned_write_leaves_no_temp_file() {
        let dir = temp_dir("abandon");
        let (uid, gid) = me();
        let path = dir.join("x").display().to_string();
        let mut w = FileWriter::create(
            &path,
            WriteOptions {
                mode: 0o644,
                uid,
                gid,
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
