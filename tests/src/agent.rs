//! Harness for the guest agent's integration tests: runs `airlock-agent` as PID 1 of fresh
//! mount, PID, UTS and network namespaces (`unshare`), serving on a Unix socket, so that the
//! host is not touched: the agent mounts its own /proc and a tmpfs /tmp there, and its user
//! cgroup has a name of its own.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use airlock_agent::client::{AgentClient, CollectedOutput, EventStream};
pub use airlock_agent::protocol::{Event, EventKind};

/// Why the agent tests cannot run on this machine, if they cannot.
pub fn cannot_run_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the agent tests need root (namespaces, cgroups, switching users)".into());
    }
    let probe = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--uts", "--net", "true"])
        .status();
    match probe {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!(
            "`unshare --mount --pid --uts --net` fails here ({s})"
        )),
        Err(e) => Some(format!("cannot run `unshare` (util-linux): {e}")),
    }
}

/// Prints one line and returns true when the tests cannot run here.
pub fn skip_if_unsupported(test: &str) -> bool {
    match cannot_run_reason() {
        Some(reason) => {
            crate::not_run(test, &reason);
            true
        }
        None => false,
    }
}

/// A running agent inside its own namespaces. Shut down (then killed) on drop.
pub struct AgentUnderTest {
    child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub cgroup_name: String,
    pub stderr: Arc<Mutex<String>>,
}

impl AgentUnderTest {
    /// Starts the agent with `extra` flags and waits until it answers health.
    pub fn start(extra: &[&str]) -> AgentUnderTest {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = crate::scratch_dir("agent");
        let socket = dir.join("agent.sock");
        let cgroup_name = format!("airlock-test-{}-{n}", std::process::id());
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--pid", "--uts", "--net", "--kill-child", "--"])
            .arg(crate::workspace_bin("airlock-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .args(["--cgroup-name", &cgroup_name, "--hostname", "airlock-test"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn unshare + airlock-agent");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let copy = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                copy.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let agent = AgentUnderTest {
            child,
            socket,
            dir,
            cgroup_name,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((200, _)) = agent.raw_request("GET", "/v1/health", "") {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer health within 10 s; stderr:\n{}",
                agent.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A new client connection.
    pub async fn client(&self) -> AgentClient {
        AgentClient::connect_unix(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connect to the agent: {e}"))
    }

    /// One blocking request with its own connection; None when the agent cannot be reached.
    pub fn raw_request(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let mut stream = UnixStream::connect(&self.socket).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())?;
        Some((status, body))
    }

    /// The `unshare` process's pid on the host.
    pub fn unshare_pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's pid on the host (the child of `unshare`).
    pub fn host_pid(&self) -> Option<u32> {
        let parent = self.child.id();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after = stat.rsplit_once(") ")?.1;
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
    }

    /// The agent's resident memory in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.host_pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// Waits for the agent (and so `unshare`) to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for AgentUnderTest {
    fn drop(&mut self) {
        // A clean shutdown removes the user cgroup; a kill is the fallback.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.raw_request("POST", "/v1/shutdown", "");
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs an async test body on its own runtime, failing it if it takes longer than `limit`.
pub fn run_bounded<F: std::future::Future<Output = ()>>(limit: Duration, body: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        tokio::time::timeout(limit, body)
            .await
            .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"));
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Runs argv through `POST /v1/exec` and gathers everything.
pub async fn exec(client: &mut AgentClient, spec: serde_json::Value) -> CollectedOutput {
    client
        .exec(&spec)
        .await
        .unwrap_or_else(|e| panic!("exec {spec}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("collect {spec}: {e}"))
}

/// `sh -c SCRIPT` as root (uid 0) inside the agent's namespaces; returns stdout as text.
pub async fn sh_root(client: &mut AgentClient, script: &str) -> String {
    let out = exec(
        client,
        serde_json::json!({"argv": ["sh", "-c", script], "uid": 0, "gid": 0}),
    )
    .await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}
