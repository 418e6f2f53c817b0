//! The daemon's core: sandboxes and templates, their records in the state dir, limits,
//! timeouts, the monitor that notices dead VMMs/agents, and recovery after a restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::{AgentConn, AgentError};
use crate::backend::{self, Backend, Progress};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::*;
use crate::sys::now_ms;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sandboxes: usize,
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    pub max_request_bytes: usize,
    pub max_upload_bytes: u64,
    /// Non-live records kept for `GET` (oldest dropped first).
    pub max_ended_records: usize,
    /// API clients may run commands and file operations as uid/gid 0: the sandbox's own root
    /// (inside the guest, or of the sandbox's user namespace), never the host's.
    /// `airlockd --allow-guest-root`.
    pub allow_guest_root: bool,
    /// Templates are built only from images below these directories (canonical paths);
    /// `airlockd --image-dir`, default `<state-dir>/images`.
    pub image_dirs: Vec<PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sandboxes: 256,
            max_vcpus: 8,
            max_memory_mib: 8192,
            max_request_bytes: 1 << 20,
            max_upload_bytes: 1 << 30,
            max_ended_records: 1000,
            allow_guest_root: false,
            image_dirs: Vec::new(),
        }
    }
}

pub struct Sandbox {
    pub id: String,
    record: Mutex<SandboxRecord>,
    last_activity_ms: AtomicU64,
    /// Exec/attach streams in flight: the idle timeout waits for them.
    pub busy: AtomicUsize,
    /// Serializes lifecycle operations (start, stop, pause, resume, snapshot).
    op: tokio::sync::Mutex<()>,
}

impl Sandbox {
    fn new(record: SandboxRecord) -> Sandbox {
        Sandbox {
            id: record.id.clone(),
            last_activity_ms: AtomicU64::new(now_ms()),
            record: Mutex::new(record),
            busy: AtomicUsize::new(0),
            op: tokio::sync::Mutex::new(()),
        }
    }

    pub fn record(&self) -> SandboxRecord {
        self.record.lock().unwrap().clone()
    }

    pub fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn view(&self) -> serde_json::Value {
        self.record()
            .view(self.last_activity_ms.load(Ordering::Relaxed))
    }
}

/// Guard that counts an exec stream as activity for its whole life.
pub struct BusyGuard(Arc<Sandbox>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

pub struct Daemon {
    pub limits: Limits,
    pub state_dir: PathBuf,
    pub backend: Backend,
    pub metrics: Metrics,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    templates: Mutex<BTreeMap<String, TemplateRecord>>,
    building: Mutex<HashSet<String>>,
    pub started: Instant,
}

/// The identity policy (api/README.md, "Who commands run as"): which uid and gid an API client
/// may ask a command or a file operation to run as. Unset means the sandbox user (uid 1000).
/// Any unprivileged id is allowed. 0 is the sandbox's own root, never the host's (the guest's
/// root in the vm backend; in the namespace backend, root of the sandbox's user namespace, a
/// host uid range of its own), and is refused unless the operator allows it.
pub fn check_identity(
    backend: BackendKind,
    allow_guest_root: bool,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), ApiError> {
    let asks_root = uid == Some(0) || gid == Some(0);
    if !asks_root || allow_guest_root {
        return Ok(());
    }
    let whose = match backend {
        BackendKind::Namespace => "the sandbox's root, in its own user namespace",
        BackendKind::Vm => "root inside the guest",
    };
    Err(ApiError::Forbidden(format!(
        "uid/gid 0 ({whose}) is refused: airlockd runs without --allow-guest-root. Run as the \
         sandbox user (leave uid unset) or another unprivileged id"
    )))
}

/// An image directory a template may be built from: `image` with its links resolved, when it
/// lies below one of the operator's image directories. Any other host path is refused (a client
/// once built a template from an arbitrary host directory and downloaded root-only files).
pub fn served_image(image: &Path, image_dirs: &[PathBuf]) -> Result<PathBuf, ApiError> {
    let real = image
        .canonicalize()
        .map_err(|e| ApiError::BadRequest(format!("image {}: {e}", image.display())))?;
    if image_dirs.iter().any(|dir| real.starts_with(dir)) {
        return Ok(real);
    }
    let served: Vec<String> = image_dirs.iter().map(|d| d.display().to_string()).collect();
    Err(ApiError::Forbidden(format!(
        "image {} is not below an image directory this daemon serves ({}); the operator adds \
         directories with airlockd --image-dir",
        image.display(),
        if served.is_empty() {
            "none".to_string()
        } else {
            served.join(", ")
        }
    )))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // SAFETY: getrandom writes at most buf.len() bytes into the buffer we own.
    unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Daemon {
    /// [`check_identity`] under this daemon's backend and flags.
    pub fn check_identity(&self, uid: Option<u32>, gid: Option<u32>) -> Result<(), ApiError> {
        check_identity(self.backend.kind(), self.limits.allow_guest_root, uid, gid)
    }

    /// Opens the state dir and loads templates and sandbox records (call
    /// [`Daemon::recover`] next).
    pub fn open(state_dir: &Path, backend: Backend, limits: Limits) -> Result<Daemon, String> {
        for d in ["sandboxes", "templates"] {
            std::fs::create_dir_all(state_dir.join(d))
                .map_err(|e| format!("cannot create {}: {e}", state_dir.join(d).display()))?;
        }
        let mut templates = BTreeMap::new();
        for entry in std::fs::read_dir(state_dir.join("templates"))
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let file = entry.path().join("template.json");
            match std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<TemplateRecord>(&b).ok())
            {
                Some(t) => {
                    templates.insert(t.name.clone(), t);
                }
                // A build the daemon did not finish.
                None => {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let mut sandboxes = HashMap::new();
        for entry in std::fs::read_dir(state_dir.join("sandboxes"))
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<SandboxRecord>(&b).ok())
                {
                    Some(r) => {
                        sandboxes.insert(r.id.clone(), Arc::new(Sandbox::new(r)));
                    }
                    None => eprintln!("airlockd: ignoring unreadable record {}", path.display()),
                }
            }
        }
        Ok(Daemon {
            limits,
            state_dir: state_dir.to_path_buf(),
            backend,
            metrics: Metrics::new(),
            sandboxes: Mutex::new(sandboxes),
            templates: Mutex::new(templates),
            building: Mutex::new(HashSet::new()),
            started: Instant::now(),
        })
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(format!("{id}.json"))
    }

    fn persist(&self, rec: &SandboxRecord) {
        let data = serde_json::to_vec_pretty(rec).expect("records serialize");
        if let Err(e) = crate::sys::write_atomic(&self.record_path(&rec.id), &data) {
            eprintln!("airlockd: cannot write the record of {}: {e}", rec.id);
        }
    }

    fn update(&self, sb: &Sandbox, f: impl FnOnce(&mut SandboxRecord)) -> SandboxRecord {
        let rec = {
            let mut r = sb.record.lock().unwrap();
            f(&mut r);
            r.clone()
        };
        self.persist(&rec);
        rec
    }

    /// After a restart: sandboxes whose process and agent still answer keep running; the
    /// others are marked failed and their resources freed.
    pub async fn recover(&self) {
        let all: Vec<Arc<Sandbox>> = self.sandboxes.lock().unwrap().values().cloned().collect();
        let mut checks = Vec::new();
        for sb in all {
            checks.push(async move {
                let rec = sb.record();
                if !rec.state.is_live() {
                    return;
                }
                if let (Backend::Vm(vm), Some(tap)) = (
                    &self.backend,
                    rec.runtime.as_ref().and_then(|r| r.tap.clone()),
                ) {
                    vm.note_tap(&tap);
                }
                let Some(rt) = rec.runtime.clone() else {
                    self.fail(
                        &sb,
                        "the daemon stopped while the sandbox was starting".into(),
                    )
                    .await;
                    return;
                };
                if !self.backend.alive(&rt) {
                    self.fail(
                        &sb,
                        format!(
                            "found dead when the daemon restarted (process {} is gone)",
                            rt.pid
                        ),
                    )
                    .await;
                    return;
                }
                if rec.state == SandboxState::Running {
                    if let Err(e) =
                        backend::wait_for_agent(&rt.agent.addr(), Duration::from_secs(3)).await
                    {
                        self.fail(
                            &sb,
                            format!("its agent did not answer when the daemon restarted: {e}"),
                        )
                        .await;
                        return;
                    }
                }
                if rec.state == SandboxState::Starting {
                    self.update(&sb, |r| r.state = SandboxState::Running);
                }
                sb.touch();
            });
        }
        futures_util::future::join_all(checks).await;
    }

    /// Marks a sandbox failed and frees its resources.
    async fn fail(&self, sb: &Arc<Sandbox>, reason: String) {
        eprintln!("airlockd: sandbox {} failed: {reason}", sb.id);
        self.metrics
            .sandboxes_failed
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.error("sandbox_died");
        if let Some(rt) = sb.record().runtime {
            if let Err(e) = self.backend.stop(&rt).await {
                eprintln!("airlockd: freeing {}: {e}", sb.id);
            }
        }
        self.update(sb, |r| {
            r.state = SandboxState::Failed;
            r.state_reason = Some(reason);
        });
        self.prune_ended();
    }

    fn prune_ended(&self) {
        let mut map = self.sandboxes.lock().unwrap();
        let mut ended: Vec<(u64, String)> = map
            .values()
            .map(|s| s.record())
            .filter(|r| !r.state.is_live())
            .map(|r| (r.created_at_ms, r.id))
            .collect();
        if ended.len() <= self.limits.max_ended_records {
            return;
        }
        ended.sort();
        let excess = ended.len() - self.limits.max_ended_records;
        for (_, id) in ended.into_iter().take(excess) {
            map.remove(&id);
            let _ = std::fs::remove_file(self.record_path(&id));
        }
    }

    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>, ApiError> {
        validate_id(id)?;
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no sandbox {id:?}")))
    }

    fn not_running(rec: &SandboxRecord) -> ApiError {
        let reason = rec
            .state_reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        let hint = match rec.state {
            SandboxState::Paused => ": resume it first",
            SandboxState::Starting => ": it is still starting",
            _ => ": create a new one",
        };
        ApiError::Conflict(format!(
            "sandbox {} is {}{reason}{hint}",
            rec.id,
            rec.state.name()
        ))
    }

    /// A running sandbox and how to reach it; counts as activity.
    pub fn running(&self, id: &str) -> Result<(Arc<Sandbox>, Runtime), ApiError> {
        let sb = self.get(id)?;
        let rec = sb.record();
        if rec.state != SandboxState::Running {
            return Err(Self::not_running(&rec));
        }
        sb.touch();
        let rt = rec
            .runtime
            .ok_or_else(|| ApiError::Internal("a running sandbox without a runtime".into()))?;
        Ok((sb, rt))
    }

    pub fn busy(&self, sb: &Arc<Sandbox>) -> BusyGuard {
        sb.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(sb.clone())
    }

    /// A fresh connection to a running sandbox's agent.
    pub async fn agent(&self, id: &str) -> Result<(Arc<Sandbox>, AgentConn), ApiError> {
        let (sb, rt) = self.running(id)?;
        let conn = AgentConn::connect(&rt.agent.addr(), Duration::from_secs(5))
            .await
            .map_err(|e| match e {
                AgentError::Connect { .. } => ApiError::BadGateway(format!(
                    "cannot reach the agent of sandbox {id}: {e} (the monitor checks whether it died)"
                )),
                other => other.into(),
            })?;
        Ok((sb, conn))
    }

    pub fn list(&self, labels: &[(String, String)], state: Option<&str>) -> Vec<serde_json::Value> {
        let mut all: Vec<Arc<Sandbox>> = self.sandboxes.lock().unwrap().values().cloned().collect();
        all.sort_by_key(|s| (s.record().created_at_ms, s.id.clone()));
        all.iter()
            .filter(|s| {
                let r = s.record();
                labels.iter().all(|(k, v)| r.labels.get(k) == Some(v))
                    && state.is_none_or(|st| r.state.name() == st)
            })
            .map(|s| s.view())
            .collect()
    }

    pub fn state_counts(&self) -> Vec<(&'static str, u64)> {
        let map = self.sandboxes.lock().unwrap();
        SandboxState::all()
            .iter()
            .map(|st| {
                (
                    st.name(),
                    map.values().filter(|s| s.record().state == *st).count() as u64,
                )
            })
            .collect()
    }

    pub fn template(&self, name: &str) -> Result<TemplateRecord, ApiError> {
        validate_name("template", name)?;
        self.templates
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no template {name:?} (GET /v1/templates lists them)"
                ))
            })
    }

    pub fn templates(&self) -> Vec<TemplateRecord> {
        self.templates.lock().unwrap().values().cloned().collect()
    }

    /// Creates and starts a sandbox.
    pub async fn create(&self, req: CreateSandboxRequest) -> Result<serde_json::Value, ApiError> {
        let tpl = self.template(&req.template)?;
        if tpl.backend != self.backend.kind() {
            return Err(ApiError::Conflict(format!(
                "template {:?} is for the {} backend; this daemon runs {}",
                tpl.name,
                tpl.backend.name(),
                self.backend.kind().name()
            )));
        }
        validate_labels(&req.labels)?;
        validate_env(&req.env)?;
        let vcpus = req.vcpus.unwrap_or(tpl.vcpus);
        let memory_mib = req.memory_mib.unwrap_or(tpl.memory_mib);
        if vcpus == 0 || vcpus > self.limits.max_vcpus {
            return Err(ApiError::BadRequest(format!(
                "vcpus must be 1 to {} (--max-vcpus); got {vcpus}",
                self.limits.max_vcpus
            )));
        }
        if !(32..=self.limits.max_memory_mib).contains(&memory_mib) {
            return Err(ApiError::BadRequest(format!(
                "memory_mib must be 32 to {} (--max-memory-mib); got {memory_mib}",
                self.limits.max_memory_mib
            )));
        }
        let gpus = match self.backend.kind() {
            BackendKind::Namespace => {
                crate::gpu::select(&req.gpus, &crate::gpu::host_gpus(Path::new("/dev")))
                    .map_err(ApiError::BadRequest)?
            }
            BackendKind::Vm if !req.gpus.is_empty() => return Err(ApiError::BadRequest(
                "gpus: the vm backend passes devices through with VFIO, which the daemon does not \
                     wire yet; use airlock-vmm's device-passthrough (docs/gpu-passthrough.md)"
                    .into(),
            )),
            BackendKind::Vm => vec![],
        };
        // A GPU sandbox's commands find CUDA and nvidia-smi; the caller's own values win.
        let mut env = req.env;
        if !gpus.is_empty() {
            for (k, v) in crate::gpu::environment() {
                env.entry(k).or_insert(v);
            }
        }
        const WEEK: u64 = 7 * 86400;
        for (what, v) in [
            ("timeout_s", req.timeout_s),
            ("idle_timeout_s", req.idle_timeout_s),
        ] {
            if let Some(v) = v {
                if v == 0 || v > WEEK {
                    return Err(ApiError::BadRequest(format!(
                        "{what} must be 1 to {WEEK} seconds"
                    )));
                }
            }
        }
        let now = now_ms();
        let rec = SandboxRecord {
            id: format!("sb-{}", random_hex(8)),
            backend: self.backend.kind(),
            template: tpl.name.clone(),
            state: SandboxState::Starting,
            state_reason: None,
            vcpus,
            memory_mib,
            network: req.network,
            gpus,
            env,
            labels: req.labels,
            created_at_ms: now,
            timeout_at_ms: req.timeout_s.map(|s| now + s * 1000),
            idle_timeout_s: req.idle_timeout_s,
            start_latency_ms: None,
            runtime: None,
        };
        let sb = Arc::new(Sandbox::new(rec.clone()));
        let guard = sb.op.lock().await;
        {
            let mut map = self.sandboxes.lock().unwrap();
            let live = map.values().filter(|s| s.record().state.is_live()).count();
            if live >= self.limits.max_sandboxes {
                self.metrics.error("limit_reached");
                return Err(ApiError::LimitReached(format!(
                    "the daemon already runs {live} sandboxes, its limit (--max-sandboxes {}): kill one first",
                    self.limits.max_sandboxes
                )));
            }
            map.insert(rec.id.clone(), sb.clone());
        }
        self.persist(&rec);
        let started = Instant::now();
        match self.backend.start(&rec, &tpl).await {
            Ok(rt) => {
                let secs = started.elapsed().as_secs_f64();
                self.metrics.observe_start(secs);
                self.metrics
                    .sandboxes_created
                    .fetch_add(1, Ordering::Relaxed);
                self.update(&sb, |r| {
                    r.runtime = Some(rt);
                    r.state = SandboxState::Running;
                    r.start_latency_ms = Some(secs * 1000.0);
                });
                drop(guard);
                sb.touch();
                Ok(sb.view())
            }
            Err(e) => {
                self.metrics
                    .sandboxes_failed
                    .fetch_add(1, Ordering::Relaxed);
                self.sandboxes.lock().unwrap().remove(&rec.id);
                let _ = std::fs::remove_file(self.record_path(&rec.id));
                Err(e)
            }
        }
    }

    /// Kills a sandbox and frees its resources; `forget` also drops its record (DELETE).
    pub async fn kill(
        &self,
        id: &str,
        reason: &str,
        forget: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let sb = self.get(id)?;
        let _guard = tokio::time::timeout(Duration::from_secs(60), sb.op.lock())
            .await
            .map_err(|_| {
                ApiError::Timeout(format!("sandbox {id} is busy with another operation"))
            })?;
        let rec = sb.record();
        if rec.state.is_live() {
            if let Some(rt) = &rec.runtime {
                self.backend.stop(rt).await?;
            }
            self.update(&sb, |r| {
                r.state = SandboxState::Stopped;
                r.state_reason = Some(reason.to_string());
            });
        }
        let view = sb.view();
        if forget {
            self.sandboxes.lock().unwrap().remove(id);
            let _ = std::fs::remove_file(self.record_path(id));
        } else {
            self.prune_ended();
        }
        Ok(view)
    }

    pub async fn set_paused(&self, id: &str, pause: bool) -> Result<serde_json::Value, ApiError> {
        let sb = self.get(id)?;
        let _guard = sb.op.lock().await;
        let rec = sb.record();
        let (from, to) = if pause {
            (SandboxState::Running, SandboxState::Paused)
        } else {
            (SandboxState::Paused, SandboxState::Running)
        };
        if rec.state == to {
            return Ok(sb.view());
        }
        if rec.state != from {
            return Err(Self::not_running(&rec));
        }
        let rt = rec
            .runtime
            .clone()
            .ok_or_else(|| ApiError::Internal("no runtime".into()))?;
        if pause {
            self.backend.pause(&rt).await?;
        } else {
            self.backend.resume(&rt).await?;
        }
        self.update(&sb, |r| r.state = to);
        sb.touch();
        Ok(sb.view())
    }

    pub fn extend_timeout(&self, id: &str, timeout_s: u64) -> Result<serde_json::Value, ApiError> {
        let sb = self.get(id)?;
        let rec = sb.record();
        if !rec.state.is_live() {
            return Err(Self::not_running(&rec));
        }
        if timeout_s == 0 || timeout_s > 7 * 86400 {
            return Err(ApiError::BadRequest(
                "timeout_s must be 1 to 604800 seconds".into(),
            ));
        }
        self.update(&sb, |r| r.timeout_at_ms = Some(now_ms() + timeout_s * 1000));
        sb.touch();
        Ok(sb.view())
    }

    fn reserve_template(&self, name: &str) -> Result<PathBuf, ApiError> {
        validate_name("template", name)?;
        let mut building = self.building.lock().unwrap();
        if self.templates.lock().unwrap().contains_key(name) || building.contains(name) {
            return Err(ApiError::Conflict(format!(
                "template {name:?} already exists"
            )));
        }
        building.insert(name.to_string());
        Ok(self.state_dir.join("templates").join(name))
    }

    fn finish_template(
        &self,
        name: &str,
        result: Result<TemplateRecord, ApiError>,
        dir: &Path,
    ) -> Result<TemplateRecord, ApiError> {
        self.building.lock().unwrap().remove(name);
        match result {
            Ok(t) => {
                let data = serde_json::to_vec_pretty(&t).expect("records serialize");
                crate::sys::write_atomic(&dir.join("template.json"), &data)
                    .map_err(|e| ApiError::internal("writing the template record", e))?;
                self.templates
                    .lock()
                    .unwrap()
                    .insert(t.name.clone(), t.clone());
                Ok(t)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                Err(e)
            }
        }
    }

    /// Builds a template from an image; for the namespace backend the result is then started
    /// once to check that its agent comes up.
    pub async fn create_template(
        &self,
        mut req: CreateTemplateRequest,
        progress: Progress,
    ) -> Result<TemplateRecord, ApiError> {
        if !req.image.is_absolute() || !req.image.is_dir() {
            return Err(ApiError::BadRequest(format!(
                "image {} must be an absolute path to an existing directory",
                req.image.display()
            )));
        }
        req.image = served_image(&req.image, &self.limits.image_dirs)?;
        if let Some(v) = req.vcpus {
            if v == 0 || v > self.limits.max_vcpus {
                return Err(ApiError::BadRequest(format!(
                    "vcpus must be 1 to {}",
                    self.limits.max_vcpus
                )));
            }
        }
        if let Some(m) = req.memory_mib {
            if !(32..=self.limits.max_memory_mib).contains(&m) {
                return Err(ApiError::BadRequest(format!(
                    "memory_mib must be 32 to {}",
                    self.limits.max_memory_mib
                )));
            }
        }
        if self.backend.kind() == BackendKind::Namespace {
            backend::namespace::NamespaceBackend::image_rootfs(&req.image)?;
        }
        let dir = self.reserve_template(&req.name)?;
        let mut result = self.backend.build_template(&req, &dir, &progress).await;
        if let (Ok(tpl), BackendKind::Namespace) = (&result, self.backend.kind()) {
            backend::report(
                &progress,
                "starting the template once to check its agent",
                serde_json::json!({}),
            );
            if let Err(e) = self.probe_template(tpl).await {
                result = Err(e);
            }
        }
        let t = self.finish_template(&req.name, result, &dir)?;
        backend::report(
            &progress,
            "template ready",
            serde_json::json!({"size_bytes": t.size_bytes}),
        );
        Ok(t)
    }

    async fn probe_template(&self, tpl: &TemplateRecord) -> Result<(), ApiError> {
        let rec = SandboxRecord {
            id: format!("probe-{}", random_hex(6)),
            backend: tpl.backend,
            template: tpl.name.clone(),
            state: SandboxState::Starting,
            state_reason: None,
            vcpus: tpl.vcpus,
            memory_mib: tpl.memory_mib,
            network: false,
            gpus: vec![],
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            created_at_ms: now_ms(),
            timeout_at_ms: None,
            idle_timeout_s: None,
            start_latency_ms: None,
            runtime: None,
        };
        let rt = self.backend.start(&rec, tpl).await.map_err(|e| {
            ApiError::BadRequest(format!("the template's agent did not start: {e}"))
        })?;
        self.backend.stop(&rt).await
    }

    pub fn delete_template(&self, name: &str) -> Result<(), ApiError> {
        let tpl = self.template(name)?;
        let users = self
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .filter(|s| {
                let r = s.record();
                r.template == tpl.name && r.state.is_live()
            })
            .count();
        if users > 0 {
            return Err(ApiError::Conflict(format!(
                "template {name:?} is in use by {users} running sandbox(es): kill them first"
            )));
        }
        self.templates.lock().unwrap().remove(name);
        let dir = self.state_dir.join("templates").join(name);
        std::fs::remove_dir_all(&dir).map_err(|e| ApiError::internal("removing the template", e))
    }

    /// Captures a running sandbox into a new template.
    pub async fn snapshot(
        &self,
        id: &str,
        name: Option<String>,
    ) -> Result<TemplateRecord, ApiError> {
        let sb = self.get(id)?;
        let name = name.unwrap_or_else(|| format!("snap-{id}-{}", random_hex(3)));
        let dir = self.reserve_template(&name)?;
        let guard = sb.op.lock().await;
        let rec = sb.record();
        let result = if rec.state != SandboxState::Running {
            Err(Self::not_running(&rec))
        } else {
            let tpl = self.template(&rec.template).ok();
            match (rec.runtime.as_ref(), tpl) {
                (Some(rt), Some(tpl)) => self.backend.snapshot(&rec, rt, &tpl, &name, &dir).await,
                (Some(rt), None) if self.backend.kind() == BackendKind::Namespace => {
                    // The source template may be gone; a namespace snapshot does not need it.
                    let fake = TemplateRecord {
                        name: rec.template.clone(),
                        backend: rec.backend,
                        created_at_ms: 0,
                        source: String::new(),
                        vcpus: rec.vcpus,
                        memory_mib: rec.memory_mib,
                        size_bytes: 0,
                        rootfs_dir: None,
                        kernel: None,
                        initrd: None,
                        rootfs_image: None,
                        boot_args: None,
                        snapshot_state: None,
                        snapshot_mem: None,
                        carries: String::new(),
                    };
                    self.backend.snapshot(&rec, rt, &fake, &name, &dir).await
                }
                _ => Err(ApiError::Conflict(format!(
                    "the template {:?} of sandbox {id} is gone",
                    rec.template
                ))),
            }
        };
        drop(guard);
        sb.touch();
        self.finish_template(&name, result, &dir)
    }

    /// Snapshots a sandbox and starts `count` sandboxes from the snapshot.
    pub async fn fork(
        &self,
        id: &str,
        count: usize,
        name: Option<String>,
    ) -> Result<serde_json::Value, ApiError> {
        if count == 0 || count > self.limits.max_sandboxes {
            return Err(ApiError::BadRequest(format!(
                "count must be 1 to {}",
                self.limits.max_sandboxes
            )));
        }
        let live = self
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.record().state.is_live())
            .count();
        if live + count > self.limits.max_sandboxes {
            return Err(ApiError::LimitReached(format!(
                "{count} forks would exceed --max-sandboxes {} ({live} running)",
                self.limits.max_sandboxes
            )));
        }
        let parent = self.get(id)?.record();
        let tpl = self.snapshot(id, name).await?;
        let creates = (0..count).map(|_| {
            let mut labels = parent.labels.clone();
            labels.insert("airlock.forked-from".into(), parent.id.clone());
            self.create(CreateSandboxRequest {
                template: tpl.name.clone(),
                vcpus: Some(parent.vcpus),
                memory_mib: Some(parent.memory_mib),
                timeout_s: parent
                    .timeout_at_ms
                    .map(|t| t.saturating_sub(now_ms()) / 1000)
                    .filter(|s| *s > 0),
                idle_timeout_s: parent.idle_timeout_s,
                env: parent.env.clone(),
                labels,
                network: parent.network,
                gpus: parent.gpus.iter().map(u32::to_string).collect(),
            })
        });
        let results = futures_util::future::join_all(creates).await;
        let mut sandboxes = vec![];
        let mut errors = vec![];
        for r in results {
            match r {
                Ok(v) => sandboxes.push(v),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Ok(serde_json::json!({"template": tpl.view(), "sandboxes": sandboxes, "errors": errors}))
    }

    /// One pass of the monitor: dead sandboxes, timeouts, idle timeouts.
    pub async fn monitor_once(&self) {
        let all: Vec<Arc<Sandbox>> = self.sandboxes.lock().unwrap().values().cloned().collect();
        let now = now_ms();
        for sb in all {
            let Ok(guard) = sb.op.try_lock() else {
                continue;
            };
            let rec = sb.record();
            if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
                continue;
            }
            let Some(rt) = rec.runtime.clone() else {
                continue;
            };
            let what = match self.backend.kind() {
                BackendKind::Vm => "VMM",
                BackendKind::Namespace => "agent",
            };
            if !self.backend.alive(&rt) {
                drop(guard);
                let _g = sb.op.lock().await;
                self.fail(&sb, format!("its {what} (process {}) exited", rt.pid))
                    .await;
                continue;
            }
            let idle_for = now.saturating_sub(sb.last_activity_ms.load(Ordering::Relaxed));
            let reason = if rec.timeout_at_ms.is_some_and(|t| now >= t) {
                Some("timeout")
            } else if rec.state == SandboxState::Running
                && sb.busy.load(Ordering::Relaxed) == 0
                && rec.idle_timeout_s.is_some_and(|s| idle_for >= s * 1000)
            {
                Some("idle timeout")
            } else {
                None
            };
            if let Some(reason) = reason {
                let _ = self.backend.stop(&rt).await;
                self.update(&sb, |r| {
                    r.state = SandboxState::Stopped;
                    r.state_reason = Some(reason.into());
                });
                drop(guard);
                self.prune_ended();
            }
        }
    }

    pub async fn monitor(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.monitor_once().await;
        }
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    /// Row 1 of issue 13: `exec --uid 0` ran as host root in the namespace backend. Sandbox
    /// root is now root of the sandbox's user namespace only, and still needs the operator's
    /// leave.
    #[test]
    fn root_is_refused_unless_the_operator_allows_it() {
        let ns = BackendKind::Namespace;
        assert!(check_identity(ns, false, Some(0), None).is_err());
        assert!(check_identity(ns, false, None, Some(0)).is_err());
        assert!(check_identity(ns, true, Some(0), Some(0)).is_ok());
        assert!(check_identity(ns, false, Some(1000), Some(1000)).is_ok());
        assert!(check_identity(ns, false, None, None).is_ok());
        let vm = BackendKind::Vm;
        let refused = check_identity(vm, false, Some(0), Some(0)).unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::FORBIDDEN);
        assert!(
            refused.to_string().contains("--allow-guest-root"),
            "{refused}"
        );
        assert!(check_identity(vm, true, Some(0), Some(0)).is_ok());
        assert!(check_identity(vm, false, Some(65534), None).is_ok());
    }

    /// Row 5 of issue 13: any host directory with bin/ was accepted as an image.
    #[test]
    fn templates_come_only_from_served_image_dirs() {
        let base = std::env::temp_dir().join(format!("airlock-images-{}", std::process::id()));
        let served = base.join("served");
        let elsewhere = base.join("elsewhere");
        std::fs::create_dir_all(served.join("img/bin")).unwrap();
        std::fs::create_dir_all(elsewhere.join("bin")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, served.join("link")).unwrap();
        let dirs = vec![served.canonicalize().unwrap()];
        assert_eq!(
            served_image(&served.join("img"), &dirs).unwrap(),
            dirs[0].join("img")
        );
        let refused = served_image(&elsewhere, &dirs).unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::FORBIDDEN);
        assert!(refused.to_string().contains("--image-dir"), "{refused}");
        // A link inside a served directory that leads out of it is refused too.
        assert!(served_image(&served.join("link"), &dirs).is_err());
        assert!(served_image(Path::new("/etc"), &[]).is_err());
        assert!(served_image(&served.join("img/../../elsewhere"), &dirs).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
