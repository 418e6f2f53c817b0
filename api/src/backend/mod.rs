//! Backends turn a template into a running sandbox: `vm` (a jailed airlock-vmm per sandbox)
//! and `namespace` (the agent jailed on the host). The daemon picks one for its whole life and
//! never falls back from one to the other.

pub mod namespace;
pub mod vm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::Method;

use crate::agent::{AgentAddr, AgentConn};
use crate::error::ApiError;
use crate::model::{BackendKind, CreateTemplateRequest, Runtime, SandboxRecord, TemplateRecord};

/// Where template builds report progress (NDJSON events for the client).
pub type Progress = Option<tokio::sync::mpsc::UnboundedSender<serde_json::Value>>;

pub fn report(progress: &Progress, step: &str, extra: serde_json::Value) {
    if let Some(tx) = progress {
        let mut v = serde_json::json!({"type": "progress", "step": step});
        if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
            for (k, val) in more {
                obj.insert(k.clone(), val.clone());
            }
        }
        let _ = tx.send(v);
    }
}

pub enum Backend {
    Namespace(namespace::NamespaceBackend),
    Vm(vm::VmBackend),
}

impl Backend {
    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Namespace(_) => BackendKind::Namespace,
            Backend::Vm(_) => BackendKind::Vm,
        }
    }

    /// Starts a sandbox; on failure everything it made is gone again.
    pub async fn start(
        &self,
        rec: &SandboxRecord,
        tpl: &TemplateRecord,
    ) -> Result<Runtime, ApiError> {
        match self {
            Backend::Namespace(b) => b.start(rec, tpl).await,
            Backend::Vm(b) => b.start(rec, tpl).await,
        }
    }

    /// Kills the sandbox (if it still runs) and frees what it holds. Idempotent.
    pub async fn stop(&self, rt: &Runtime) -> Result<(), ApiError> {
        match self {
            Backend::Namespace(b) => b.stop(rt).await,
            Backend::Vm(b) => b.stop(rt).await,
        }
    }

    pub fn alive(&self, rt: &Runtime) -> bool {
        crate::sys::reap(rt.pid);
        crate::sys::process_alive(rt.pid, rt.pid_start_time)
    }

    pub async fn pause(&self, rt: &Runtime) -> Result<(), ApiError> {
        match self {
            Backend::Namespace(b) => b.set_paused(rt, true).await,
            Backend::Vm(b) => b.set_paused(rt, true).await,
        }
    }

    pub async fn resume(&self, rt: &Runtime) -> Result<(), ApiError> {
        match self {
            Backend::Namespace(b) => b.set_paused(rt, false).await,
            Backend::Vm(b) => b.set_paused(rt, false).await,
        }
    }

    /// Captures a running sandbox into a new template in `dir` (which does not exist yet).
    pub async fn snapshot(
        &self,
        rec: &SandboxRecord,
        rt: &Runtime,
        tpl: &TemplateRecord,
        name: &str,
        dir: &Path,
    ) -> Result<TemplateRecord, ApiError> {
        match self {
            Backend::Namespace(b) => b.snapshot(rec, rt, name, dir).await,
            Backend::Vm(b) => b.snapshot(rec, rt, tpl, name, dir).await,
        }
    }

    /// Builds a template from an image into `dir` (which does not exist yet).
    pub async fn build_template(
        &self,
        req: &CreateTemplateRequest,
        dir: &Path,
        progress: &Progress,
    ) -> Result<TemplateRecord, ApiError> {
        match self {
            Backend::Namespace(b) => b.build_template(req, dir, progress).await,
            Backend::Vm(b) => b.build_template(req, dir, progress).await,
        }
    }
}

/// Waits until the agent at `addr` answers `GET /v1/health` with 200, for at most `timeout`.
pub async fn wait_for_agent(
    addr: &AgentAddr,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    let mut pause = Duration::from_millis(1);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match AgentConn::connect(addr, left.min(Duration::from_secs(2))).await {
            Ok(mut conn) => {
                match tokio::time::timeout(
                    left.min(Duration::from_secs(5)),
                    conn.json(Method::GET, "/v1/health", None),
                )
                .await
                {
                    Ok(Ok(v)) if v["status"] == "ok" => return Ok(v),
                    Ok(Ok(v)) => last = format!("health answered {v}"),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "health did not answer".into(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    Err(format!(
        "the agent did not become ready within {timeout:?}: {last}"
    ))
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).trim().to_string()
}

/// A daemon-owned directory for one sandbox.
pub fn sandbox_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("sandboxes").join(id)
}

/// Runs blocking work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("background task", e))?
}
