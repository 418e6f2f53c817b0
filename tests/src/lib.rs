//! Shared harness for Airlock's integration tests and benchmarks: finds the real binaries and
//! images, runs `airlock-vmm` with a deadline on everything, and talks to its API socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod agent;
pub mod daemon;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repo root")
        .to_path_buf()
}

/// A binary built by this workspace, next to the running test executable's profile directory
/// (target/<profile>/deps/test-xxx -> target/<profile>/NAME), or from `AIRLOCK_<NAME>_BIN`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("AIRLOCK_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(path) = std::env::var(&var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (cargo build --release --workspace), or set {var}",
        path.display()
    );
    path
}

pub fn vmm_bin() -> PathBuf {
    workspace_bin("airlock-vmm")
}

/// The test guest built by images/build.sh.
pub fn test_guest(format: &str) -> PathBuf {
    let name = match format {
        "bzImage" => "test-guest.bzImage",
        _ => "test-guest",
    };
    let path = repo_root().join("images/out").join(name);
    assert!(
        path.exists(),
        "{} not found: run `bash images/build.sh` first",
        path.display()
    );
    path
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("airlock-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A Firecracker-format config for the test guest.
pub fn guest_config(kernel: &Path, boot_args: &str, vcpus: u32, mem_mib: u64) -> String {
    serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "boot_args": boot_args,
        },
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    })
    .to_string()
}

/// A running `airlock-vmm`: its stdout (the guest console) is read line by line on a thread, its
/// stderr collected. Killed on drop, so no test leaves a VMM behind.
pub struct VmmProcess {
    child: Child,
    lines: Receiver<String>,
    pub console: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<String>>,
    pub spawned_at: Instant,
}

impl VmmProcess {
    pub fn spawn(args: &[&str]) -> VmmProcess {
        let mut cmd = Command::new(vmm_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned_at = Instant::now();
        let mut child = cmd.spawn().expect("spawn airlock-vmm");
        let (tx, lines) = channel();
        let console = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let console_copy = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                console_copy.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let stderr_copy = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr_copy
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        VmmProcess {
            child,
            lines,
            console,
            stderr,
            spawned_at,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next console line matching `pred`, or None when `timeout` passes or output ends.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Some(line),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Console lines that arrive within `window`, without waiting for any in particular.
    pub fn drain_lines(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(line);
        }
        out
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for the VMM to exit and its output to be read; panics with everything it printed if
    /// it does not exit in time.
    pub fn finish(&mut self, timeout: Duration) -> (ExitStatus, Vec<String>, String) {
        let (status, console, stderr) = self.finish_or_kill(timeout);
        let Some(status) = status else {
            panic!(
                "airlock-vmm did not exit within {timeout:?}\nconsole:\n{}\nstderr:\n{stderr}",
                console.join("\n")
            );
        };
        (status, console, stderr)
    }

    /// Waits for the VMM to exit and its output to be read; kills it if it does not exit in time
    /// (then the status is `None`). For tests where a VMM that never stops is an answer, not a
    /// failure: a guest that cannot boot on this host.
    pub fn finish_or_kill(
        &mut self,
        timeout: Duration,
    ) -> (Option<ExitStatus>, Vec<String>, String) {
        let status = self.wait_exit(timeout);
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Let the reader threads drain the pipes.
        std::thread::sleep(Duration::from_millis(20));
        let console = self.console.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        (status, console, stderr)
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over a Unix socket; returns the status code and body.
pub fn api_request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = connect_with_retry(socket, Duration::from_secs(5));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The API socket appears shortly after the VMM starts.
pub fn connect_with_retry(socket: &Path, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => {
                panic!("cannot connect to {}: {e}", socket.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// `airlock-vmm check-host --json`.
pub fn host_report() -> serde_json::Value {
    let out = Command::new(vmm_bin())
        .args(["check-host", "--json"])
        .output()
        .expect("run check-host");
    assert!(out.status.success(), "check-host failed: {out:?}");
    serde_json::from_slice(&out.stdout).expect("check-host prints JSON")
}

/// Says, in the one line every skipped test prints, that `test` did not run and why. Straight to
/// stderr: libtest captures `print!`/`eprint!` of passing tests, and this line must be seen.
/// `tests/run-all.sh` and the lab's summary list every such line (the format is theirs to parse).
pub fn not_run(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "NOT RUN {test}: {reason}");
}

/// None where `airlock-vmm check-host` says this host runs Linux guests; otherwise its reason.
/// The verdict comes from the host check, never from a guess.
pub fn linux_guests_unavailable() -> Option<String> {
    let report = host_report();
    if report["linux_guests"] == serde_json::Value::Bool(true) {
        None
    } else {
        Some(format!(
            "airlock-vmm check-host says this host cannot run Linux guests: {}",
            report["reason"].as_str().unwrap_or("no reason given")
        ))
    }
}

/// True, for a test that needs Linux guests, where this host runs them; otherwise prints the
/// test's NOT RUN line.
pub fn can_run_linux_guests(test: &str) -> bool {
    match linux_guests_unavailable() {
        None => true,
        Some(reason) => {
            not_run(test, &reason);
            false
        }
    }
}

/// A sorted sample's percentile (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 90.0), 9.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn config_is_firecracker_shaped() {
        let c: serde_json::Value =
            serde_json::from_str(&guest_config(Path::new("/k"), "probe=boot", 2, 64)).unwrap();
        assert_eq!(c["boot-source"]["kernel_image_path"], "/k");
        assert_eq!(c["machine-config"]["vcpu_count"], 2);
    }
}
