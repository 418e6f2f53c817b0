//! Harness for the daemon's end-to-end tests: starts the real `airlockd` (namespace backend by
//! default) in a scratch directory, builds a small root filesystem when the images are not
//! built, and checks answers against `api/openapi.yaml`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use airlockd::client::{ClientError, DaemonClient, ExecOutput};
pub use http::{Method, StatusCode};

/// Why the namespace-backend tests cannot run here, if they cannot.
pub fn cannot_run_reason() -> Option<String> {
    if let Some(r) = crate::agent::cannot_run_reason() {
        return Some(r);
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.lines().any(|l| l.trim_end().ends_with("overlay")) {
        return Some("the kernel has no overlayfs".into());
    }
    if airlockd::cgroup::Hierarchy::detect(Path::new("/sys/fs/cgroup")).is_err() {
        return Some("no usable cgroup hierarchy (v1 memory/cpu/pids/freezer or v2)".into());
    }
    if test_rootfs().is_none() {
        return Some(
            "no root filesystem: run `bash images/build.sh`, or install busybox-static".into(),
        );
    }
    None
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

fn busybox() -> Option<PathBuf> {
    let found = ["/usr/bin/busybox", "/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if found.is_some() {
        return found;
    }
    // Debian's static busybox, as the brief of these tests allows.
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-q", "busybox-static"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    ["/usr/bin/busybox", "/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The root tree templates are made from: `images/out/default/rootfs` when built, else a
/// busybox tree made once per test process.
pub fn test_rootfs() -> Option<PathBuf> {
    static ROOTFS: Mutex<Option<Option<PathBuf>>> = Mutex::new(None);
    let mut cached = ROOTFS.lock().unwrap();
    if let Some(v) = cached.clone() {
        return v;
    }
    let built = crate::repo_root().join("images/out/default/rootfs");
    let result = if built.join("bin").exists() {
        Some(built)
    } else {
        busybox().and_then(|bb| make_busybox_rootfs(&bb).ok())
    };
    *cached = Some(result.clone());
    result
}

fn make_busybox_rootfs(busybox: &Path) -> std::io::Result<PathBuf> {
    let root = std::env::temp_dir().join(format!("airlock-test-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "bin",
        "etc",
        "tmp",
        "root",
        "home/sandbox",
        "proc",
        "sys",
        "dev",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nsandbox:x:1000:\n")?;
    std::os::unix::fs::chown(root.join("home/sandbox"), Some(1000), Some(1000))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    Ok(root)
}

/// A running airlockd. Its sandboxes are deleted and it is stopped on drop.
pub struct DaemonUnderTest {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub args: Vec<String>,
    pub stderr: Arc<Mutex<String>>,
}

fn short_scratch() -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    // Short: sandbox socket paths live below it and must fit a sockaddr_un.
    let dir = PathBuf::from(format!("/tmp/ald-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

impl DaemonUnderTest {
    /// `airlockd --backend namespace` with `extra` flags.
    pub fn start(extra: &[&str]) -> DaemonUnderTest {
        Self::start_with("namespace", extra)
    }

    /// `airlockd --backend vm` with `extra` flags.
    pub fn start_vm(extra: &[&str]) -> DaemonUnderTest {
        Self::start_with("vm", extra)
    }

    fn start_with(backend: &str, extra: &[&str]) -> DaemonUnderTest {
        let dir = short_scratch();
        let mut args: Vec<String> = vec!["--backend".into(), backend.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = DaemonUnderTest {
            child: None,
            socket: dir.join("d.sock"),
            state_dir: dir.join("s"),
            dir,
            args,
            stderr: Arc::new(Mutex::new(String::new())),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(crate::workspace_bin("airlockd"));
        cmd.args(&self.args)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--agent-bin")
            .arg(crate::workspace_bin("airlock-agent"))
            // The images tests build templates from: the trees tests make under the temporary
            // directory, and the built ones once `images/build.sh` has made them (the daemon
            // refuses an image directory that does not exist).
            .arg("--image-dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let built_images = crate::repo_root().join("images/out");
        if built_images.is_dir() {
            cmd.arg("--image-dir").arg(built_images);
        }
        let mut child = cmd.spawn().expect("spawn airlockd");
        let mut pipe = child.stderr.take().expect("stderr");
        let copy = self.stderr.clone();
        std::thread::spawn(move || {
            use std::io::Read;
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
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                // Let the reader thread drain what the daemon said before it exited.
                std::thread::sleep(Duration::from_millis(100));
                let said = self.stderr.lock().unwrap().clone();
                panic!("airlockd exited with {status}: {said}");
            }
            if Instant::now() >= deadline {
                let said = self.stderr.lock().unwrap().clone();
                panic!("airlockd did not listen within 20 s: {said}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn client(&self) -> DaemonClient {
        DaemonClient::new(&self.socket)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the daemon with `signal`, leaving its sandboxes running.
    pub fn stop(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the daemon this harness started.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same socket and state dir.
    pub fn restart(&mut self) {
        self.stop(libc::SIGTERM);
        self.spawn();
    }

    /// `airlock --socket ... ARGS`: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
        self.cli_within(Duration::from_secs(60), args, stdin)
    }

    /// [`Self::cli`] with its own limit (a template build in the nested lab takes minutes).
    pub fn cli_within(
        &self,
        limit: Duration,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> (i32, String, String) {
        let mut cmd = Command::new(crate::workspace_bin("airlock"));
        cmd.env("AIRLOCK_SOCKET", &self.socket)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn airlock");
        if let Some(data) = stdin {
            use std::io::Write;
            let mut s = child.stdin.take().unwrap();
            s.write_all(data).unwrap();
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("airlock {args:?} did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for DaemonUnderTest {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Delete every sandbox so nothing outlives the test, then stop.
            let client = self.client();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let list = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.call(Method::GET, "/v1/sandboxes", None),
                )
                .await;
                if let Ok(Ok(v)) = list {
                    for s in v["sandboxes"].as_array().into_iter().flatten() {
                        let id = s["id"].as_str().unwrap_or("");
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            client.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None),
                        )
                        .await;
                    }
                }
            });
            self.stop(libc::SIGTERM);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates the template `name` from the test root filesystem.
pub async fn make_template(c: &DaemonClient, name: &str) -> serde_json::Value {
    let image = test_rootfs().expect("a root filesystem");
    c.call(
        Method::POST,
        "/v1/templates",
        Some(&serde_json::json!({"name": name, "image": image})),
    )
    .await
    .unwrap_or_else(|e| panic!("create template {name}: {e}"))
}

/// Creates a sandbox from `template`; returns its id.
pub async fn create(c: &DaemonClient, body: serde_json::Value) -> String {
    let v = c
        .call(Method::POST, "/v1/sandboxes", Some(&body))
        .await
        .unwrap_or_else(|e| panic!("create {body}: {e}"));
    v["id"].as_str().expect("an id").to_string()
}

/// `sh -c SCRIPT` in a sandbox.
pub async fn sh(c: &DaemonClient, id: &str, script: &str) -> ExecOutput {
    c.exec(id, &serde_json::json!({"cmd": ["sh", "-c", script]}))
        .await
        .unwrap_or_else(|e| panic!("exec {script}: {e}"))
}

/// The OpenAPI document.
pub fn openapi() -> serde_yaml::Value {
    serde_yaml::from_str(airlockd::server::OPENAPI_YAML).expect("api/openapi.yaml parses")
}

/// Panics unless `status` is documented for `method pattern`.
pub fn assert_documented(doc: &serde_yaml::Value, method: &str, pattern: &str, status: u16) {
    let op = &doc["paths"][pattern][method.to_lowercase()];
    assert!(op.is_mapping(), "{method} {pattern} is not in openapi.yaml");
    let key = status.to_string();
    assert!(
        op["responses"][key.as_str()].is_mapping(),
        "{method} {pattern} answered {status}, which openapi.yaml does not document"
    );
}

/// Sends a request, checks the answer's status against the OpenAPI file, returns it.
pub async fn checked(
    c: &DaemonClient,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let (status, v) = c
        .request(method.clone(), path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let route_path = path.split('?').next().unwrap();
    let (route, _) = airlockd::server::resolve(method.as_str(), route_path)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let pattern = airlockd::server::ROUTES
        .iter()
        .find(|(_, _, r)| *r == route)
        .unwrap()
        .1;
    assert_documented(&openapi(), method.as_str(), pattern, status.as_u16());
    (status, v)
}

pub use crate::agent::run_bounded;
