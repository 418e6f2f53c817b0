//! Running user code: spawning (own session and process group, user cgroup, unprivileged user,
//! optional PTY), reaping (one reaper for our children and, as PID 1, for orphans), output
//! pumping with backpressure, stdin, signals, and the table of live processes.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, OwnedMutexGuard};

use crate::cgroup::{ProcessCgroup, UserCgroup};
use crate::error::{AgentError, AgentResult};
use crate::protocol::{output_line, Event, EventKind, ExecSpec, PtySize};

/// Bytes read from a pipe or PTY at a time: one `stdout`/`stderr` event at most.
pub const OUTPUT_CHUNK: usize = 64 * 1024;
/// Chunks buffered between a process and its client; past this the process blocks on write.
pub const OUTPUT_BUFFER_CHUNKS: usize = 8;
/// The most processes (running or exited, not yet removed) the table holds.
pub const MAX_PROCESSES: usize = 16384;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Reaps every child of the agent. Spawning and `waitpid(-1)` happen under one lock, so that a
/// child's status always finds its waiter (registered before the lock is released) and std's
/// own wait on a child whose exec failed never races with the reaper.
#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
    orphans_reaped: AtomicU64,
}

impl Reaper {
    /// Runs `spawn` (which forks) under the reaper lock and registers the child's pid.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> io::Result<(std::process::Child, T)>,
    ) -> io::Result<(std::process::Child, T, oneshot::Receiver<WaitStatus>)> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let (child, extra) = spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, extra, rx))
    }

    /// Reaps every child that has exited; statuses go to their waiters, orphans are counted.
    pub fn reap_exited(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    match waiters.remove(&pid.as_raw()) {
                        Some(tx) => {
                            let _ = tx.send(status);
                        }
                        None => {
                            self.orphans_reaped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break, // ECHILD: no children left
            }
        }
    }

    pub fn orphans_reaped(&self) -> u64 {
        self.orphans_reaped.load(Ordering::Relaxed)
    }

    /// Reaps on every SIGCHLD (and once a second, in case a signal was coalesced away).
    pub async fn run(self: Arc<Self>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => Some(s),
            Err(e) => {
                crate::log!("cannot watch SIGCHLD ({e}); reaping by polling");
                None
            }
        };
        loop {
            self.reap_exited();
            match &mut sigchld {
                Some(s) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), s.recv()).await;
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
}

impl ExitInfo {
    fn from_status(status: Option<WaitStatus>, timed_out: bool) -> ExitInfo {
        let (code, signal) = match status {
            Some(WaitStatus::Exited(_, code)) => (Some(code), None),
            Some(WaitStatus::Signaled(_, sig, _)) => (None, Some(sig as i32)),
            _ => (None, None),
        };
        ExitInfo {
            code,
            signal,
            timed_out,
        }
    }

    pub fn event(&self, seq: u64) -> Event {
        let mut event = Event::new(seq, EventKind::Exit);
        event.code = self.code;
        event.signal = self.signal;
        event.timed_out = self.timed_out;
        event
    }
}

/// The master side of a PTY, non-blocking, driven by tokio.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<PtyMaster> {
        set_nonblocking(&fd)?;
        // SAFETY: an OwnedFd is a valid open descriptor that stays open, unchanged, for as long
        // as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(PtyMaster { fd })
    }

    /// Reads output; end of file (Ok(0)) once every holder of the terminal's slave side is gone.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|inner| {
                // SAFETY: reads into a live, writable buffer of buf.len() bytes from an fd we own.
                let n = unsafe {
                    libc::read(
                        inner.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|inner| {
                // SAFETY: writes from a live buffer of data.len() bytes to an fd we own.
                let n = unsafe {
                    libc::write(
                        inner.get_ref().as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, size: PtySize) -> io::Result<()> {
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize struct, which lives for the duration of the call.
        let rc = unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Where `POST /v1/processes/{id}/stdin` writes.
pub enum StdinSink {
    Pipe(tokio::process::ChildStdin),
    Pty(Arc<PtyMaster>),
}

impl StdinSink {
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            StdinSink::Pipe(pipe) => pipe.write_all(data).await,
            StdinSink::Pty(master) => master.write_all(data).await,
        }
    }

    /// Ends the input: a pipe is closed; a terminal gets end-of-file (Ctrl-D).
    pub async fn close(self) -> io::Result<()> {
        match self {
            StdinSink::Pipe(mut pipe) => pipe.shutdown().await,
            StdinSink::Pty(master) => master.write_all(b"\x04").await,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

pub enum Output {
    Data(OutputStream, Bytes),
    Error(String),
}

/// What a process reports in `GET /v1/processes` and friends.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    pub id: String,
    pub pid: i32,
    pub argv: Vec<String>,
    pub background: bool,
    pub pty: bool,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    pub started_at_ms: u64,
}

/// One process started through the API.
pub struct Process {
    pub id: String,
    pub pid: i32,
    pub argv: Vec<String>,
    pub background: bool,
    pub started_at_ms: u64,
    exit: watch::Receiver<Option<ExitInfo>>,
    output: Arc<tokio::sync::Mutex<mpsc::Receiver<Output>>>,
    stdin: Arc<tokio::sync::Mutex<Option<StdinSink>>>,
    pty: Option<Arc<PtyMaster>>,
    seq: AtomicU64,
    /// The process's own cgroup (where there is a user cgroup): it and all it starts.
    cgroup: Option<Arc<ProcessCgroup>>,
}

impl Process {
    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    pub fn info(&self) -> ProcessInfo {
        let exit = self.exit_info();
        ProcessInfo {
            id: self.id.clone(),
            pid: self.pid,
            argv: self.argv.clone(),
            background: self.background,
            pty: self.pty.is_some(),
            state: if exit.is_some() { "exited" } else { "running" },
            exit,
            started_at_ms: self.started_at_ms,
        }
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&self, timeout: Option<Duration>) -> Option<ExitInfo> {
        let mut rx = self.exit.clone();
        let wait = async move { rx.wait_for(|e| e.is_some()).await.ok().and_then(|e| *e) };
        match timeout {
            Some(t) => tokio::time::timeout(t, wait).await.ok().flatten(),
            None => wait.await,
        }
    }

    /// Sends `signal` to the process, or to its whole process group.
    pub fn signal(&self, signal: i32, group: bool) -> AgentResult<()> {
        if self.exit_info().is_some() {
            return Err(AgentError::Conflict(format!(
                "process {} has already exited",
                self.id
            )));
        }
        let signal = Signal::try_from(signal)
            .map_err(|_| AgentError::bad_request(format!("signal {signal} is not supported")))?;
        let pid = Pid::from_raw(self.pid);
        if group && signal == Signal::SIGKILL {
            self.kill_group();
            return Ok(());
        }
        let result = if group {
            killpg(pid, signal)
        } else {
            kill(pid, signal)
        };
        result.map_err(|e| AgentError::io(format!("signal {} to {}", signal, self.pid), e.into()))
    }

    /// SIGKILLs the process and everything it started: its process group and, where there is a
    /// user cgroup, every process in its own cgroup (children that left the group with `setsid`
    /// and orphans included), until that cgroup is empty.
    pub fn kill_group(&self) {
        kill_process_tree(self.pid, self.exit_info().is_none(), self.cgroup.clone());
    }

    pub fn resize(&self, size: PtySize) -> AgentResult<()> {
        let master = self.pty.as_ref().ok_or_else(|| {
            AgentError::Conflict(format!("process {} has no terminal to resize", self.id))
        })?;
        master
            .resize(size)
            .map_err(|e| AgentError::io("resize the terminal", e))
    }

    pub async fn lock_stdin(&self) -> OwnedMutexGuard<Option<StdinSink>> {
        self.stdin.clone().lock_owned().await
    }

    /// A `started` event line, for the start of a foreground exec's stream.
    pub fn started_line(&self) -> Bytes {
        let mut event = Event::new(self.next_seq(), EventKind::Started);
        event.id = Some(self.id.clone());
        event.pid = Some(self.pid);
        Bytes::from(event.to_line())
    }

    /// The output as NDJSON lines, ending with the `exit` event. One client at a time: a second
    /// attach while one is streaming is refused. Dropping the stream detaches; output not yet
    /// read stays buffered for the next attach.
    pub fn attach(
        self: &Arc<Self>,
        on_drop: DetachAction,
        table: Arc<ProcessTable>,
    ) -> AgentResult<impl Stream<Item = io::Result<Bytes>> + Send + 'static> {
        let output = self.output.clone().try_lock_owned().map_err(|_| {
            AgentError::Conflict(format!(
                "process {} already has a client attached; one at a time",
                self.id
            ))
        })?;
        let state = AttachState {
            output,
            guard: AttachGuard {
                process: self.clone(),
                table,
                on_drop,
                finished: false,
            },
        };
        Ok(futures_util::stream::unfold(state, |mut st| async move {
            if st.guard.finished {
                return None;
            }
            let process = &st.guard.process;
            let line = match st.output.recv().await {
                Some(Output::Data(stream, data)) => {
                    let kind = match stream {
                        OutputStream::Stdout => EventKind::Stdout,
                        OutputStream::Stderr => EventKind::Stderr,
                    };
                    output_line(process.next_seq(), kind, &data)
                }
                Some(Output::Error(message)) => {
                    let mut event = Event::new(process.next_seq(), EventKind::Error);
                    event.message = Some(message);
                    event.to_line()
                }
                None => {
                    let exit = process.wait(None).await.unwrap_or(ExitInfo {
                        code: None,
                        signal: None,
                        timed_out: false,
                    });
                    st.guard.finished = true;
                    exit.event(process.next_seq()).to_line()
                }
            };
            Some((Ok(Bytes::from(line)), st))
        }))
    }
}

/// What happens to a process when its attached client goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachAction {
    /// Foreground exec: kill the process group if still running, and forget the process.
    KillAndRemove,
    /// Attach to a background process: leave it running.
    Detach,
}

struct AttachState {
    output: OwnedMutexGuard<mpsc::Receiver<Output>>,
    guard: AttachGuard,
}

/// Kills process `pid`'s group (while `leader_alive`: its pid may not be reused before it is
/// reaped) and then its cgroup, on a thread of its own: emptying the cgroup of a fork bomb takes
/// repeated passes, which must not hold up the agent's event loop.
fn kill_process_tree(pid: i32, leader_alive: bool, cgroup: Option<Arc<ProcessCgroup>>) {
    if leader_alive {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    if let Some(cgroup) = cgroup {
        if !cgroup.is_empty() {
            let _ = std::thread::Builder::new()
                .name("kill-cgroup".into())
                .spawn(move || {
                    if let Err(e) = cgroup.kill(Duration::from_secs(30)) {
                        crate::log!("killing a process tree: {e}");
                    }
                    cgroup.remove();
                });
        } else {
            cgroup.remove();
        }
    }
}

struct AttachGuard {
    process: Arc<Process>,
    table: Arc<ProcessTable>,
    on_drop: DetachAction,
    finished: bool,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        if self.on_drop == DetachAction::KillAndRemove {
            if !self.finished {
                self.process.kill_group();
            }
            self.table.remove(&self.process.id);
        }
    }
}

/// Who user processes run as unless a request says otherwise.
#[derive(Debug, Clone)]
pub struct UserDefaults {
    pub uid: u32,
    pub gid: u32,
}

pub struct ProcessTable {
    processes: Mutex<BTreeMap<String, Arc<Process>>>,
    next_id: AtomicU64,
    reaper: Arc<Reaper>,
    user: UserDefaults,
    cgroup: Option<Arc<UserCgroup>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn cstring(s: &str) -> CString {
    CString::new(s).expect("validated: no NUL")
}

/// Everything the child needs between fork and exec, computed before the fork so that the hook
/// only makes async-signal-safe calls.
struct ChildSetup {
    with_pty: bool,
    switch_user: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    cgroup_procs: Vec<CString>,
    oom_score_adj: CString,
}

impl ChildSetup {
    /// Runs in the child after fork: own session, controlling terminal, user cgroup, OOM score
    /// reset, then the unprivileged user (last, while still allowed to do the rest).
    fn run(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: every call below is async-signal-safe and uses only memory prepared before
        // the fork (CStrings and integers owned by self), as a pre_exec hook requires.
        unsafe {
            check(libc::setsid())?;
            if self.with_pty {
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            for procs in &self.cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd)?;
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let fd = libc::open(
                self.oom_score_adj.as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            if self.switch_user {
                check(libc::setgroups(1, &self.gid))?;
                check(libc::setgid(self.gid))?;
                check(libc::setuid(self.uid))?;
            }
        }
        Ok(())
    }
}

impl ProcessTable {
    pub fn new(
        reaper: Arc<Reaper>,
        user: UserDefaults,
        cgroup: Option<Arc<UserCgroup>>,
    ) -> ProcessTable {
        ProcessTable {
            processes: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            reaper,
            user,
            cgroup,
        }
    }

    pub fn cgroup(&self) -> Option<&Arc<UserCgroup>> {
        self.cgroup.as_ref()
    }

    pub fn reaper(&self) -> &Arc<Reaper> {
        &self.reaper
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Process>>> {
        self.processes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> AgentResult<Arc<Process>> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("no process {id:?}")))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        self.lock().values().map(|p| p.info()).collect()
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Process>> {
        self.lock().remove(id)
    }

    /// SIGKILLs every running process group (at shutdown).
    pub fn kill_all(&self) {
        for process in self.lock().values() {
            process.kill_group();
        }
    }

    fn resolve_user(&self, spec: &ExecSpec) -> (u32, u32) {
        match (spec.uid, spec.gid) {
            (None, None) => (self.user.uid, self.user.gid),
            (Some(uid), Some(gid)) => (uid, gid),
            (Some(uid), None) => {
                let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map_or(uid, |u| u.gid.as_raw());
                (uid, gid)
            }
            (None, Some(gid)) => (self.user.uid, gid),
        }
    }

    /// Starts a process as `spec` says and registers it in the table.
    pub fn spawn(self: &Arc<Self>, spec: &ExecSpec, background: bool) -> AgentResult<Arc<Process>> {
        {
            let mut processes = self.lock();
            if processes.len() >= MAX_PROCESSES {
                let exited: Vec<String> = processes
                    .iter()
                    .filter(|(_, p)| p.exit_info().is_some())
                    .map(|(id, _)| id.clone())
                    .take(MAX_PROCESSES / 4)
                    .collect();
                if exited.is_empty() {
                    return Err(AgentError::Unavailable(format!(
                        "{MAX_PROCESSES} processes are running; kill or remove some first"
                    )));
                }
                for id in exited {
                    processes.remove(&id);
                }
            }
        }
        let (uid, gid) = self.resolve_user(spec);
        let running_as_root = nix::unistd::geteuid().is_root();
        if !running_as_root && uid != nix::unistd::geteuid().as_raw() {
            return Err(AgentError::bad_request(format!(
                "the agent does not run as root and cannot start a process as uid {uid}"
            )));
        }
        // A missing working directory would fail the spawn with ENOENT, which reads as "no such
        // program" (issue 13, row 12): name it instead.
        if let Some(cwd) = &spec.cwd {
            if !std::path::Path::new(cwd).is_dir() {
                return Err(AgentError::bad_request(format!(
                    "cwd {cwd:?} is not a directory in the sandbox"
                )));
            }
        }
        let home = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        let mut cmd = std::process::Command::new(&spec.argv[0]);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env(
                "HOME",
                home.as_ref()
                    .map_or("/".into(), |u| u.dir.display().to_string()),
            );
        if let Some(user) = &home {
            cmd.env("USER", &user.name).env("LOGNAME", &user.name);
        }
        if spec.pty.is_some() {
            cmd.env("TERM", "xterm-256color");
        }
        cmd.envs(&spec.env)
            .current_dir(spec.cwd.as_deref().unwrap_or("/"));
        let id = format!("p{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let process_cgroup = match &self.cgroup {
            Some(user_cgroup) => Some(Arc::new(
                user_cgroup
                    .process_cgroup(&format!("process-{id}"))
                    .map_err(|e| AgentError::io("create the process's cgroup", e))?,
            )),
            None => None,
        };
        let setup = ChildSetup {
            with_pty: spec.pty.is_some(),
            switch_user: running_as_root,
            uid,
            gid,
            cgroup_procs: process_cgroup
                .as_ref()
                .map(|c| c.procs_files().to_vec())
                .unwrap_or_default(),
            oom_score_adj: cstring("/proc/self/oom_score_adj"),
        };
        // SAFETY: the hook only makes async-signal-safe calls on memory prepared before the fork
        // (see ChildSetup::run).
        unsafe {
            cmd.pre_exec(move || setup.run());
        }
        let pty_size = spec.pty;
        let want_stdin = spec.stdin;
        let (mut child, pty_master, exit_rx) = self
            .reaper
            .spawn(|| {
                // The PTY is opened under the spawn lock too, so that no concurrent fork inherits
                // its descriptors before they are marked close-on-exec.
                let master = match pty_size {
                    Some(size) => {
                        let winsize = nix::pty::Winsize {
                            ws_row: size.rows,
                            ws_col: size.cols,
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        let pty = nix::pty::openpty(&winsize, None)?;
                        set_cloexec(&pty.master)?;
                        set_cloexec(&pty.slave)?;
                        cmd.stdin(Stdio::from(pty.slave.try_clone()?))
                            .stdout(Stdio::from(pty.slave.try_clone()?))
                            .stderr(Stdio::from(pty.slave));
                        Some(pty.master)
                    }
                    None => {
                        cmd.stdin(if want_stdin {
                            Stdio::piped()
                        } else {
                            Stdio::null()
                        })
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped());
                        None
                    }
                };
                let child = cmd.spawn();
                // The parent's copies of the slave side must go, or the terminal never hangs up.
                drop(cmd);
                Ok((child?, master))
            })
            .map_err(|e| {
                if let Some(c) = &process_cgroup {
                    c.remove();
                }
                AgentError::io(format!("cannot start {:?}", spec.argv[0]), e)
            })?;
        let pid = child.id() as i32;
        let (out_tx, out_rx) = mpsc::channel(OUTPUT_BUFFER_CHUNKS);
        let (exit_tx, exit_watch) = watch::channel(None);
        let setup_result: io::Result<(Option<StdinSink>, Option<Arc<PtyMaster>>)> =
            (|| match pty_master {
                Some(master) => {
                    let master = Arc::new(PtyMaster::new(master)?);
                    tokio::spawn(pump_pty(master.clone(), out_tx));
                    Ok((Some(StdinSink::Pty(master.clone())), Some(master)))
                }
                None => {
                    let stdout =
                        tokio::process::ChildStdout::from_std(child.stdout.take().expect("piped"))?;
                    let stderr =
                        tokio::process::ChildStderr::from_std(child.stderr.take().expect("piped"))?;
                    tokio::spawn(pump_pipe(stdout, OutputStream::Stdout, out_tx.clone()));
                    tokio::spawn(pump_pipe(stderr, OutputStream::Stderr, out_tx));
                    let stdin = match child.stdin.take() {
                        Some(s) => Some(StdinSink::Pipe(tokio::process::ChildStdin::from_std(s)?)),
                        None => None,
                    };
                    Ok((stdin, None))
                }
            })();
        let (stdin, pty) = match setup_result {
            Ok(v) => v,
            Err(e) => {
                kill_process_tree(pid, true, process_cgroup);
                return Err(AgentError::io("set up the process's output", e));
            }
        };
        // The reaper owns the exit status; std's Child is only a holder of the pipes.
        drop(child);
        let process = Arc::new(Process {
            id: id.clone(),
            pid,
            argv: spec.argv.clone(),
            background,
            started_at_ms: now_ms(),
            exit: exit_watch,
            output: Arc::new(tokio::sync::Mutex::new(out_rx)),
            stdin: Arc::new(tokio::sync::Mutex::new(stdin)),
            pty,
            seq: AtomicU64::new(0),
            cgroup: process_cgroup.clone(),
        });
        let timeout = spec.timeout_ms.map(Duration::from_millis);
        tokio::spawn(supervise(pid, exit_rx, exit_tx, timeout, process_cgroup));
        self.lock().insert(id, process.clone());
        Ok(process)
    }
}

/// Waits for the process's status from the reaper. When the timeout passes, kills the process
/// and everything it started (its whole cgroup, so a fork bomb or a `setsid` child ends with it).
/// Once the process has exited, its cgroup goes if nothing of it is left.
async fn supervise(
    pid: i32,
    mut exit_rx: oneshot::Receiver<WaitStatus>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    timeout: Option<Duration>,
    cgroup: Option<Arc<ProcessCgroup>>,
) {
    let mut timed_out = false;
    let status = match timeout {
        Some(limit) => match tokio::time::timeout(limit, &mut exit_rx).await {
            Ok(status) => status.ok(),
            Err(_) => {
                timed_out = true;
                kill_process_tree(pid, true, cgroup.clone());
                exit_rx.await.ok()
            }
        },
        None => exit_rx.await.ok(),
    };
    exit_tx.send_replace(Some(ExitInfo::from_status(status, timed_out)));
    if let Some(cgroup) = cgroup {
        if cgroup.is_empty() {
            cgroup.remove();
        }
    }
}

/// Copies a pipe into the output channel, only as fast as the channel is drained.
async fn pump_pipe(
    mut pipe: impl AsyncRead + Unpin,
    stream: OutputStream,
    tx: mpsc::Sender<Output>,
) {
    loop {
        let mut buf = BytesMut::with_capacity(OUTPUT_CHUNK);
        match pipe.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {
                if tx.send(Output::Data(stream, buf.freeze())).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(Output::Error(format!("reading {stream:?}: {e}")))
                    .await;
                break;
            }
        }
    }
}

async fn pump_pty(master: Arc<PtyMaster>, tx: mpsc::Sender<Output>) {
    loop {
        let mut buf = vec![0u8; OUTPUT_CHUNK];
        match master.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx
                    .send(Output::Data(OutputStream::Stdout, Bytes::from(buf)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(Output::Error(format!("reading the terminal: {e}")))
                    .await;
                break;
            }
        }
    }
}
