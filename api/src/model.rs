//! The API's types: requests (unknown fields refused), records kept in the state dir, and the
//! views the API answers with.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A jailed airlock-vmm microVM per sandbox (the default).
    Vm,
    /// The agent jailed on the host: namespaces, cgroups, seccomp; no VM. A weaker boundary.
    Namespace,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Vm => "vm",
            BackendKind::Namespace => "namespace",
        }
    }

    /// What the API reports as a sandbox's isolation.
    pub fn isolation(self) -> &'static str {
        match self {
            BackendKind::Vm => "microvm: own guest kernel under KVM, jailed VMM (airlock-jailer)",
            BackendKind::Namespace => {
                "namespace: shared host kernel; mount/pid/uts/ipc/cgroup(/net) namespaces, \
                 cgroup limits, seccomp, reduced capabilities (weaker than vm)"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Starting,
    Running,
    Paused,
    /// Ended by a kill, a timeout or an idle timeout; resources freed.
    Stopped,
    /// Its VMM or agent died, or it never started; resources freed.
    Failed,
}

impl SandboxState {
    pub fn name(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        }
    }

    pub fn all() -> [SandboxState; 5] {
        [
            SandboxState::Starting,
            SandboxState::Running,
            SandboxState::Paused,
            SandboxState::Stopped,
            SandboxState::Failed,
        ]
    }

    pub fn is_live(self) -> bool {
        matches!(
            self,
            SandboxState::Starting | SandboxState::Running | SandboxState::Paused
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    pub template: String,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Seconds until the sandbox is killed (extendable with `POST .../timeout`).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Seconds without API activity after which the sandbox is killed.
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Environment given to every exec (an exec's own `env` wins).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Metadata labels, for `GET /v1/sandboxes?label=k=v`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: bool,
    /// GPUs for the sandbox: `["all"]` or host GPU indices (`["0"]`). The namespace backend binds
    /// the host's NVIDIA device nodes and driver files in (api/src/gpu.rs).
    #[serde(default)]
    pub gpus: Vec<String>,
}

/// How the daemon reaches a sandbox's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AgentEndpoint {
    Unix { path: PathBuf },
    Vsock { uds_path: PathBuf, port: u32 },
}

impl AgentEndpoint {
    pub fn addr(&self) -> crate::agent::AgentAddr {
        match self {
            AgentEndpoint::Unix { path } => crate::agent::AgentAddr::Unix(path.clone()),
            AgentEndpoint::Vsock { uds_path, port } => crate::agent::AgentAddr::Vsock {
                uds: uds_path.clone(),
                port: *port,
            },
        }
    }
}

/// What a backend started: everything needed to reach, check and free a sandbox, also after
/// a daemon restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    /// The process whose life is the sandbox's: the agent (PID 1 of the sandbox, namespace
    /// backend) or the jailer supervising the VMM (vm backend).
    pub pid: i32,
    /// Its start time (/proc/PID/stat field 22), so a reused PID is not mistaken for it.
    pub pid_start_time: u64,
    /// The sandbox's own directory under `<state-dir>/sandboxes/`.
    pub dir: PathBuf,
    pub agent: AgentEndpoint,
    /// cgroup directories to remove when the sandbox ends.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The freezer cgroup (namespace backend pause/resume).
    #[serde(default)]
    pub freezer: Option<PathBuf>,
    /// The VMM's API socket on the host (vm backend).
    #[serde(default)]
    pub vmm_api_socket: Option<PathBuf>,
    /// The jail's id and directory (vm backend).
    #[serde(default)]
    pub jail_id: Option<String>,
    #[serde(default)]
    pub jail_dir: Option<PathBuf>,
    /// The TAP device (vm backend with network).
    #[serde(default)]
    pub tap: Option<String>,
    /// The host uid and gid of the sandbox's root, the base of its own id range (namespace
    /// backend, `userns.rs`); freed when the sandbox stops.
    #[serde(default)]
    pub uid_base: Option<u32>,
}

/// One sandbox, as kept in `<state-dir>/sandboxes/<id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub backend: BackendKind,
    pub template: String,
    pub state: SandboxState,
    #[serde(default)]
    pub state_reason: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub network: bool,
    /// Host GPU indices given to the sandbox (namespace backend).
    #[serde(default)]
    pub gpus: Vec<u32>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: u64,
    #[serde(default)]
    pub timeout_at_ms: Option<u64>,
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    #[serde(default)]
    pub start_latency_ms: Option<f64>,
    #[serde(default)]
    pub runtime: Option<Runtime>,
}

impl SandboxRecord {
    /// The API's view: no environment values (they may be secrets), no internals beyond the
    /// process id.
    pub fn view(&self, last_activity_ms: u64) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "template": self.template,
            "backend": self.backend,
            "isolation": self.backend.isolation(),
            "state": self.state,
            "state_reason": self.state_reason,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "network": self.network,
            "gpus": self.gpus,
            "labels": self.labels,
            "env_keys": self.env.keys().collect::<Vec<_>>(),
            "created_at_ms": self.created_at_ms,
            "timeout_at_ms": self.timeout_at_ms,
            "idle_timeout_s": self.idle_timeout_s,
            "last_activity_ms": last_activity_ms,
            "start_latency_ms": self.start_latency_ms,
            "pid": self.runtime.as_ref().map(|r| r.pid),
            "tap": self.runtime.as_ref().and_then(|r| r.tap.clone()),
        })
    }
}

/// A template, as kept in `<state-dir>/templates/<name>/template.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub name: String,
    pub backend: BackendKind,
    pub created_at_ms: u64,
    /// The image directory or sandbox it was made from.
    pub source: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub size_bytes: u64,
    /// Namespace templates: the root filesystem tree. vm templates: the files below.
    #[serde(default)]
    pub rootfs_dir: Option<PathBuf>,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub rootfs_image: Option<PathBuf>,
    #[serde(default)]
    pub boot_args: Option<String>,
    /// vm templates: the snapshot taken when the agent was ready.
    #[serde(default)]
    pub snapshot_state: Option<PathBuf>,
    #[serde(default)]
    pub snapshot_mem: Option<PathBuf>,
    /// What a sandbox made from it carries over.
    pub carries: String,
}

impl TemplateRecord {
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "backend": self.backend,
            "created_at_ms": self.created_at_ms,
            "source": self.source,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "size_bytes": self.size_bytes,
            "carries": self.carries,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplateRequest {
    pub name: String,
    /// A directory: `images/out/<name>` (with `rootfs/`, `vmlinux`, `rootfs.ext4`, ...), or a
    /// root filesystem tree itself (namespace backend).
    pub image: PathBuf,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub boot_args: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in PATH.
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this uid (default: the sandbox's unprivileged user).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Text written to stdin, which is then closed.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Bytes (base64) written to stdin, which is then closed.
    #[serde(default)]
    pub stdin_base64: Option<String>,
    /// Background processes only: keep stdin open for `POST .../stdin`.
    #[serde(default)]
    pub open_stdin: bool,
    /// Run on a pseudo-terminal of this size (`{"rows", "cols"}`): stdin, stdout and stderr all
    /// on it, output arriving as `stdout`. The agent's own type: one definition for both sides.
    #[serde(default)]
    pub pty: Option<airlock_agent::protocol::PtySize>,
}

/// Sandbox ids: `sb-` and 16 hex digits, or names the caller cannot choose.
pub fn validate_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{id:?} is not a valid id (letters, digits, '-', '_'; 1 to 64)"
        )))
    }
}

/// Template names: like ids, and not starting with '.'.
pub fn validate_name(what: &str, name: &str) -> Result<(), ApiError> {
    validate_id(name).map_err(|_| {
        ApiError::BadRequest(format!(
            "{what} name {name:?} is not valid: use letters, digits, '-' and '_', 1 to 64 characters"
        ))
    })
}

/// Labels: keys like names; values printable, at most 256 bytes; at most 64 labels.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > 64 {
        return Err(ApiError::BadRequest("at most 64 labels".into()));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 128
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !key_ok {
            return Err(ApiError::BadRequest(format!(
                "label key {k:?} is not valid (letters, digits, '-', '_', '.', '/'; 1 to 128)"
            )));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(ApiError::BadRequest(format!(
                "label {k:?}: the value must be at most 256 printable bytes"
            )));
        }
    }
    Ok(())
}

pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ApiError::BadRequest(format!(
                "environment variable {k:?}: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    Ok(())
}

/// A path inside a sandbox: absolute, no `..` component, no NUL, at most 4096 bytes.
pub fn validate_sandbox_path(path: &str) -> Result<(), ApiError> {
    if path.is_empty() || !path.starts_with('/') {
        return Err(ApiError::BadRequest(format!(
            "path {path:?} must be absolute (start with '/')"
        )));
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err(ApiError::BadRequest(
            "path must be at most 4096 bytes with no NUL".into(),
        ));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(ApiError::BadRequest(format!(
            "path {path:?} contains '..': give the path without parent references"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names() {
        assert!(validate_id("sb-0123abcd").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("../x").is_err());
        assert!(validate_id(&"a".repeat(65)).is_err());
        assert!(validate_name("template", "default").is_ok());
        assert!(validate_name("template", "a/b").is_err());
    }

    #[test]
    fn paths() {
        assert!(validate_sandbox_path("/tmp/x").is_ok());
        assert!(validate_sandbox_path("tmp/x").is_err());
        assert!(validate_sandbox_path("/tmp/../etc/shadow")
            .unwrap_err()
            .to_string()
            .contains(".."));
        assert!(validate_sandbox_path("/a\0b").is_err());
        assert!(validate_sandbox_path("/a/..b").is_ok());
    }

    #[test]
    fn labels_and_env() {
        let mut l = BTreeMap::new();
        l.insert("team".to_string(), "infra".to_string());
        assert!(validate_labels(&l).is_ok());
        l.insert("bad key".to_string(), "x".to_string());
        assert!(validate_labels(&l).is_err());
        let mut e = BTreeMap::new();
        e.insert("A=B".to_string(), "x".to_string());
        assert!(validate_env(&e).is_err());
    }

    #[test]
    fn create_request_refuses_unknown_fields() {
        let r: Result<CreateSandboxRequest, _> =
            serde_json::from_str(r#"{"template":"t","vcpu":2}"#);
        assert!(r.is_err());
        let r: CreateSandboxRequest = serde_json::from_str(r#"{"template":"t"}"#).unwrap();
        assert!(!r.network);
    }

    #[test]
    fn records_round_trip() {
        let r = SandboxRecord {
            id: "sb-1".into(),
            backend: BackendKind::Namespace,
            template: "t".into(),
            state: SandboxState::Running,
            state_reason: None,
            vcpus: 1,
            memory_mib: 256,
            network: false,
            gpus: vec![],
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            created_at_ms: 1,
            timeout_at_ms: Some(2),
            idle_timeout_s: None,
            start_latency_ms: Some(1.5),
            runtime: Some(Runtime {
                pid: 42,
                pid_start_time: 7,
                dir: "/x".into(),
                agent: AgentEndpoint::Vsock {
                    uds_path: "/x/v.sock".into(),
                    port: 52,
                },
                cgroups: vec![],
                freezer: None,
                vmm_api_socket: None,
                jail_id: None,
                jail_dir: None,
                tap: None,
                uid_base: None,
            }),
        };
        let text = serde_json::to_string(&r).unwrap();
        let back: SandboxRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.view(0)["backend"], "namespace");
    }
}
