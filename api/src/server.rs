//! The HTTP/1.1 JSON API on a Unix socket (hyper). Routes are listed once in [`ROUTES`]; the
//! OpenAPI file (`api/openapi.yaml`) describes each, and a test keeps the two in step.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::net::UnixListener;

use crate::agent::{
    bytes_body, empty_body, read_limited, stream_body, CheckedEvents, ExecEvent, MAX_AGENT_JSON,
};
use crate::daemon::Daemon;
use crate::error::ApiError;
use crate::model::*;

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

/// Every route: (method, path pattern, name). `{x}` matches one path segment.
pub const ROUTES: &[(&str, &str, Route)] = &[
    ("GET", "/v1/health", Route::Health),
    ("GET", "/metrics", Route::Metrics),
    ("GET", "/v1/openapi.yaml", Route::OpenApi),
    ("GET", "/v1/sandboxes", Route::ListSandboxes),
    ("POST", "/v1/sandboxes", Route::CreateSandbox),
    ("GET", "/v1/sandboxes/{id}", Route::GetSandbox),
    ("DELETE", "/v1/sandboxes/{id}", Route::DeleteSandbox),
    ("POST", "/v1/sandboxes/{id}/kill", Route::KillSandbox),
    ("POST", "/v1/sandboxes/{id}/timeout", Route::SetTimeout),
    ("POST", "/v1/sandboxes/{id}/pause", Route::Pause),
    ("POST", "/v1/sandboxes/{id}/resume", Route::Resume),
    ("POST", "/v1/sandboxes/{id}/snapshot", Route::Snapshot),
    ("POST", "/v1/sandboxes/{id}/fork", Route::Fork),
    ("POST", "/v1/sandboxes/{id}/exec", Route::Exec),
    ("GET", "/v1/sandboxes/{id}/processes", Route::ListProcesses),
    ("POST", "/v1/sandboxes/{id}/processes", Route::StartProcess),
    (
        "GET",
        "/v1/sandboxes/{id}/processes/{pid}",
        Route::GetProcess,
    ),
    (
        "DELETE",
        "/v1/sandboxes/{id}/processes/{pid}",
        Route::DeleteProcess,
    ),
    (
        "GET",
        "/v1/sandboxes/{id}/processes/{pid}/attach",
        Route::Attach,
    ),
    (
        "POST",
        "/v1/sandboxes/{id}/processes/{pid}/stdin",
        Route::Stdin,
    ),
    (
        "POST",
        "/v1/sandboxes/{id}/processes/{pid}/signal",
        Route::Signal,
    ),
    ("GET", "/v1/sandboxes/{id}/files", Route::Download),
    ("PUT", "/v1/sandboxes/{id}/files", Route::Upload),
    ("GET", "/v1/sandboxes/{id}/files/list", Route::ListFiles),
    ("GET", "/v1/sandboxes/{id}/files/stat", Route::Stat),
    ("POST", "/v1/sandboxes/{id}/files/mkdir", Route::Mkdir),
    ("POST", "/v1/sandboxes/{id}/files/remove", Route::Remove),
    ("GET", "/v1/templates", Route::ListTemplates),
    ("POST", "/v1/templates", Route::CreateTemplate),
    ("GET", "/v1/templates/{name}", Route::GetTemplate),
    ("DELETE", "/v1/templates/{name}", Route::DeleteTemplate),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    OpenApi,
    ListSandboxes,
    CreateSandbox,
    GetSandbox,
    DeleteSandbox,
    KillSandbox,
    SetTimeout,
    Pause,
    Resume,
    Snapshot,
    Fork,
    Exec,
    ListProcesses,
    StartProcess,
    GetProcess,
    DeleteProcess,
    Attach,
    Stdin,
    Signal,
    Download,
    Upload,
    ListFiles,
    Stat,
    Mkdir,
    Remove,
    ListTemplates,
    CreateTemplate,
    GetTemplate,
    DeleteTemplate,
}

/// Finds the route of `method path`: Ok((route, params)), or 404 / 405.
pub fn resolve(method: &str, path: &str) -> Result<(Route, Vec<String>), ApiError> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut path_known = false;
    for (m, pattern, route) in ROUTES {
        let pat: Vec<&str> = pattern.split('/').collect();
        if pat.len() != segs.len() {
            continue;
        }
        let mut params = vec![];
        let ok = pat.iter().zip(&segs).all(|(p, s)| {
            if p.starts_with('{') {
                params.push(s.to_string());
                !s.is_empty()
            } else {
                p == s
            }
        });
        if ok {
            if *m == method {
                return Ok((*route, params));
            }
            path_known = true;
        }
    }
    if path_known {
        Err(ApiError::MethodNotAllowed(format!(
            "{method} is not allowed on {path}"
        )))
    } else {
        Err(ApiError::NotFound(format!(
            "no endpoint {method} {path} (see GET /v1/openapi.yaml)"
        )))
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(
        serde_json::to_vec(value).expect("JSON values serialize"),
    ));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json(e.status(), &e.body())
}

/// A streamed NDJSON response fed by `rx`.
fn ndjson(rx: tokio::sync::mpsc::Receiver<Bytes>, process_id: Option<&str>) -> Response<Body> {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    if let Some(id) = process_id.and_then(|p| HeaderValue::from_str(p).ok()) {
        r.headers_mut().insert("x-airlock-process-id", id);
    }
    r
}

/// Reads a JSON body of at most `max` bytes; an empty body reads as `{}`.
async fn read_json<T: DeserializeOwned>(req: Request<Incoming>, max: usize) -> Result<T, ApiError> {
    if let Some(len) = content_length(&req) {
        if len > max as u64 {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request body is {len} bytes; the limit is {max} (--max-request-bytes)"
            )));
        }
    }
    let bytes = match Limited::new(req.into_body(), max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request body is over the limit of {max} bytes (--max-request-bytes)"
            )))
        }
        Err(e) => {
            return Err(ApiError::BadRequest(format!(
                "reading the request body: {e}"
            )))
        }
    };
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        Bytes::from_static(b"{}")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
}

fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn query<T: DeserializeOwned>(req: &Request<Incoming>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(req.uri().query().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("bad query string: {e}")))
}

fn enc(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)]).expect("strings encode")[2..].to_string()
}

fn validate_process_id(p: &str) -> Result<(), ApiError> {
    if p.is_empty()
        || p.len() > 32
        || !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::BadRequest(format!("{p:?} is not a process id")));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
    #[serde(default)]
    depth: Option<u32>,
    #[serde(default)]
    mode: Option<String>,
}

struct ListQuery {
    label: Vec<String>,
    state: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutBody {
    timeout_s: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    #[serde(default)]
    template: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkBody {
    count: usize,
    #[serde(default)]
    template: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdinQuery {
    #[serde(default)]
    close: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MkdirBody {
    path: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    parents: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBody {
    path: String,
    #[serde(default)]
    recursive: bool,
    #[serde(default)]
    missing_ok: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    signal: serde_json::Value,
    #[serde(default)]
    group: Option<bool>,
}

fn validate_mode(mode: &str) -> Result<(), ApiError> {
    if mode.is_empty()
        || mode.len() > 6
        || u32::from_str_radix(mode, 8).map_or(true, |m| m > 0o7777)
    {
        return Err(ApiError::BadRequest(format!(
            "mode {mode:?} must be an octal string such as \"0644\""
        )));
    }
    Ok(())
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("airlockd: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let d = daemon.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let d = d.clone();
                async move { Ok::<_, Infallible>(handle(d, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub async fn handle(d: Arc<Daemon>, req: Request<Incoming>) -> Response<Body> {
    let response = match route(&d, req).await {
        Ok(r) => r,
        Err(e) => {
            d.metrics.error(e.kind());
            error_response(&e)
        }
    };
    d.metrics.request(response.status().as_u16());
    response
}

async fn route(d: &Arc<Daemon>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (r, params) = resolve(req.method().as_str(), req.uri().path())?;
    let p = |i: usize| params.get(i).cloned().unwrap_or_default();
    let max = d.limits.max_request_bytes;
    let ok = |v: serde_json::Value| Ok(json(StatusCode::OK, &v));
    match r {
        Route::Health => ok(health(d)),
        Route::Metrics => {
            let text = d.metrics.render(&d.state_counts(), d.backend.kind().name());
            let mut resp = Response::new(full(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(resp)
        }
        Route::OpenApi => {
            let mut resp = Response::new(full(OPENAPI_YAML));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/yaml"),
            );
            Ok(resp)
        }
        Route::ListSandboxes => {
            // Repeated `label=` keys: read the pairs one by one.
            let pairs: Vec<(String, String)> = query(&req)?;
            let mut q = ListQuery {
                label: vec![],
                state: None,
            };
            for (k, v) in pairs {
                match k.as_str() {
                    "label" => q.label.push(v),
                    "state" => q.state = Some(v),
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "unknown query parameter {other:?} (label, state)"
                        )))
                    }
                }
            }
            let mut labels = vec![];
            for l in q.label {
                let (k, v) = l.split_once('=').ok_or_else(|| {
                    ApiError::BadRequest(format!("label filter {l:?} must be KEY=VALUE"))
                })?;
                labels.push((k.to_string(), v.to_string()));
            }
            if let Some(s) = &q.state {
                if !SandboxState::all().iter().any(|st| st.name() == s) {
                    return Err(ApiError::BadRequest(format!("unknown state {s:?}")));
                }
            }
            ok(serde_json::json!({"sandboxes": d.list(&labels, q.state.as_deref())}))
        }
        Route::CreateSandbox => {
            let body: CreateSandboxRequest = read_json(req, max).await?;
            let v = d.create(body).await?;
            Ok(json(StatusCode::CREATED, &v))
        }
        Route::GetSandbox => ok(d.get(&p(0))?.view()),
        Route::DeleteSandbox => ok(d.kill(&p(0), "killed", true).await?),
        Route::KillSandbox => ok(d.kill(&p(0), "killed", false).await?),
        Route::SetTimeout => {
            let body: TimeoutBody = read_json(req, max).await?;
            ok(d.extend_timeout(&p(0), body.timeout_s)?)
        }
        Route::Pause => ok(d.set_paused(&p(0), true).await?),
        Route::Resume => ok(d.set_paused(&p(0), false).await?),
        Route::Snapshot => {
            let body: SnapshotBody = read_json(req, max).await?;
            let t = d.snapshot(&p(0), body.template).await?;
            Ok(json(StatusCode::CREATED, &t.view()))
        }
        Route::Fork => {
            let body: ForkBody = read_json(req, max).await?;
            let v = d.fork(&p(0), body.count, body.template).await?;
            Ok(json(StatusCode::CREATED, &v))
        }
        Route::Exec => exec(d, &p(0), req).await,
        Route::StartProcess => start_process(d, &p(0), req).await,
        Route::ListProcesses => {
            let (_, mut conn) = d.agent(&p(0)).await?;
            let v = conn.json(Method::GET, "/v1/processes", None).await?;
            if !v["processes"].is_array() {
                return Err(ApiError::BadGateway(
                    "the agent's process list is not a list".into(),
                ));
            }
            ok(v)
        }
        Route::GetProcess | Route::DeleteProcess => {
            validate_process_id(&p(1))?;
            let (_, mut conn) = d.agent(&p(0)).await?;
            let m = if r == Route::GetProcess {
                Method::GET
            } else {
                Method::DELETE
            };
            ok(conn
                .json(m, &format!("/v1/processes/{}", p(1)), None)
                .await?)
        }
        Route::Attach => {
            validate_process_id(&p(1))?;
            let (sb, mut conn) = d.agent(&p(0)).await?;
            let resp = conn
                .send_ok(
                    Method::GET,
                    &format!("/v1/processes/{}/attach", p(1)),
                    empty_body(),
                )
                .await?;
            Ok(pump_events(
                d,
                sb,
                conn,
                resp.into_body(),
                Some(&p(1)),
                false,
            ))
        }
        Route::Stdin => {
            validate_process_id(&p(1))?;
            let q: StdinQuery = query(&req)?;
            let (_, mut conn) = d.agent(&p(0)).await?;
            let target = format!(
                "/v1/processes/{}/stdin?close={}",
                p(1),
                q.close.unwrap_or(false)
            );
            let v = forward_upload(d, &mut conn, &target, Method::POST, req).await?;
            ok(v)
        }
        Route::Signal => {
            validate_process_id(&p(1))?;
            let body: SignalBody = read_json(req, max).await?;
            let (_, mut conn) = d.agent(&p(0)).await?;
            let mut spec = serde_json::json!({"signal": body.signal});
            if let Some(g) = body.group {
                spec["group"] = g.into();
            }
            ok(conn
                .json(
                    Method::POST,
                    &format!("/v1/processes/{}/signal", p(1)),
                    Some(&spec),
                )
                .await?)
        }
        Route::Download => download(d, &p(0), req).await,
        Route::Upload => {
            let q: PathQuery = query(&req)?;
            validate_sandbox_path(&q.path)?;
            let mut target = format!(
                "/v1/files/content?path={}&create_parents=true",
                enc(&q.path)
            );
            if let Some(m) = &q.mode {
                validate_mode(m)?;
                target.push_str(&format!("&mode={m}"));
            }
            if let Some(len) = content_length(&req) {
                if len > d.limits.max_upload_bytes {
                    return Err(ApiError::PayloadTooLarge(format!(
                        "the upload is {len} bytes; the limit is {} (--max-upload-bytes)",
                        d.limits.max_upload_bytes
                    )));
                }
            }
            let (_, mut conn) = d.agent(&p(0)).await?;
            let v = forward_upload(d, &mut conn, &target, Method::PUT, req).await?;
            let written = v["written"].as_u64().ok_or_else(|| {
                ApiError::BadGateway("the agent did not say how much it wrote".into())
            })?;
            Ok(json(
                StatusCode::CREATED,
                &serde_json::json!({"path": q.path, "bytes": written}),
            ))
        }
        Route::ListFiles | Route::Stat => {
            let q: PathQuery = query(&req)?;
            validate_sandbox_path(&q.path)?;
            let (_, mut conn) = d.agent(&p(0)).await?;
            let target = if r == Route::Stat {
                format!("/v1/files/stat?path={}", enc(&q.path))
            } else {
                let depth = q.depth.unwrap_or(1);
                if !(1..=64).contains(&depth) {
                    return Err(ApiError::BadRequest("depth must be 1 to 64".into()));
                }
                format!("/v1/files/list?path={}&depth={depth}", enc(&q.path))
            };
            let v = conn.json(Method::GET, &target, None).await?;
            if !v.is_object() || (r == Route::ListFiles && !v["entries"].is_array()) {
                return Err(ApiError::BadGateway(
                    "the agent answered something that is not a file listing".into(),
                ));
            }
            ok(v)
        }
        Route::Mkdir => {
            let body: MkdirBody = read_json(req, max).await?;
            validate_sandbox_path(&body.path)?;
            let mut spec =
                serde_json::json!({"path": body.path, "parents": body.parents.unwrap_or(true)});
            if let Some(m) = body.mode {
                validate_mode(&m)?;
                spec["mode"] = m.into();
            }
            let (_, mut conn) = d.agent(&p(0)).await?;
            conn.json(Method::POST, "/v1/files/mkdir", Some(&spec))
                .await?;
            Ok(json(
                StatusCode::CREATED,
                &serde_json::json!({"path": body.path}),
            ))
        }
        Route::Remove => {
            let body: RemoveBody = read_json(req, max).await?;
            validate_sandbox_path(&body.path)?;
            if body.path.split('/').all(|c| c.is_empty() || c == ".") {
                return Err(ApiError::BadRequest("refusing to remove /".into()));
            }
            let spec = serde_json::json!({"path": body.path, "recursive": body.recursive, "missing_ok": body.missing_ok});
            let (_, mut conn) = d.agent(&p(0)).await?;
            conn.json(Method::POST, "/v1/files/remove", Some(&spec))
                .await?;
            ok(serde_json::json!({"path": body.path, "removed": true}))
        }
        Route::ListTemplates => ok(
            serde_json::json!({"templates": d.templates().iter().map(|t| t.view()).collect::<Vec<_>>()}),
        ),
        Route::GetTemplate => ok(d.template(&p(0))?.view()),
        Route::DeleteTemplate => {
            d.delete_template(&p(0))?;
            ok(serde_json::json!({"name": p(0), "deleted": true}))
        }
        Route::CreateTemplate => {
            let stream = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/x-ndjson"));
            let body: CreateTemplateRequest = read_json(req, max).await?;
            validate_name("template", &body.name)?;
            if !stream {
                let t = d.create_template(body, None).await?;
                return Ok(json(StatusCode::CREATED, &t.view()));
            }
            let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel();
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
            let d2 = d.clone();
            tokio::spawn(async move {
                let build = d2.create_template(body, Some(ptx));
                tokio::pin!(build);
                let line = |v: serde_json::Value| {
                    let mut b = serde_json::to_vec(&v).expect("JSON values serialize");
                    b.push(b'\n');
                    Bytes::from(b)
                };
                let result = loop {
                    tokio::select! {
                        r = &mut build => break r,
                        Some(ev) = prx.recv() => { let _ = tx.send(line(ev)).await; }
                    }
                };
                while let Ok(ev) = prx.try_recv() {
                    let _ = tx.send(line(ev)).await;
                }
                let last = match result {
                    Ok(t) => serde_json::json!({"type": "done", "template": t.view()}),
                    Err(e) => {
                        serde_json::json!({"type": "error", "status": e.status().as_u16(), "message": e.to_string()})
                    }
                };
                let _ = tx.send(line(last)).await;
            });
            Ok(ndjson(rx, None))
        }
    }
}

fn health(d: &Daemon) -> serde_json::Value {
    let counts: serde_json::Map<String, serde_json::Value> = d
        .state_counts()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "backend": d.backend.kind(),
        "isolation": d.backend.kind().isolation(),
        "uptime_s": d.started.elapsed().as_secs(),
        "sandboxes": counts,
        "templates": d.templates().len(),
        "limits": {
            "max_sandboxes": d.limits.max_sandboxes,
            "max_vcpus": d.limits.max_vcpus,
            "max_memory_mib": d.limits.max_memory_mib,
            "max_request_bytes": d.limits.max_request_bytes,
            "max_upload_bytes": d.limits.max_upload_bytes,
        },
    })
}

/// The agent's exec/process spec from ours.
fn agent_spec(
    sandbox_env: &std::collections::BTreeMap<String, String>,
    body: &ExecRequest,
    stdin: bool,
) -> Result<serde_json::Value, ApiError> {
    if body.cmd.is_empty() || body.cmd[0].is_empty() {
        return Err(ApiError::BadRequest(
            "cmd must name a program: [\"prog\", \"arg\", ...]".into(),
        ));
    }
    if body.cmd.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::BadRequest(
            "cmd arguments may not hold NUL".into(),
        ));
    }
    validate_env(&body.env)?;
    let mut env = sandbox_env.clone();
    env.extend(body.env.clone());
    let mut spec = serde_json::json!({"argv": body.cmd, "env": env, "stdin": stdin});
    if let Some(cwd) = &body.cwd {
        validate_sandbox_path(cwd)?;
        spec["cwd"] = cwd.clone().into();
    }
    if let Some(u) = body.uid {
        spec["uid"] = u.into();
    }
    if let Some(g) = body.gid {
        spec["gid"] = g.into();
    }
    if let Some(t) = body.timeout_ms {
        if t == 0 {
            return Err(ApiError::BadRequest("timeout_ms must be positive".into()));
        }
        spec["timeout_ms"] = t.into();
    }
    if let Some(size) = body.pty {
        spec["pty"] = serde_json::json!({"rows": size.rows, "cols": size.cols});
    }
    Ok(spec)
}

fn stdin_bytes(body: &ExecRequest) -> Result<Option<Bytes>, ApiError> {
    use base64::Engine;
    match (&body.stdin, &body.stdin_base64) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give stdin or stdin_base64, not both".into(),
        )),
        (Some(t), None) => Ok(Some(Bytes::from(t.clone()))),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map(|v| Some(Bytes::from(v)))
            .map_err(|e| ApiError::BadRequest(format!("stdin_base64 is not base64: {e}"))),
        (None, None) => Ok(None),
    }
}

/// Writes `data` to a process's stdin over a connection of its own.
async fn write_stdin(
    addr: crate::agent::AgentAddr,
    pid: String,
    data: Bytes,
    close: bool,
) -> Result<(), ApiError> {
    let mut conn = crate::agent::AgentConn::connect(&addr, Duration::from_secs(5)).await?;
    let target = format!("/v1/processes/{pid}/stdin?close={close}");
    let resp = conn
        .send_ok(Method::POST, &target, bytes_body(data))
        .await?;
    read_limited(resp.into_body(), 64 << 10).await?;
    Ok(())
}

async fn exec(
    d: &Arc<Daemon>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: ExecRequest = read_json(req, d.limits.max_request_bytes).await?;
    let stdin = stdin_bytes(&body)?;
    d.check_identity(body.uid, body.gid)?;
    let (sb, rt) = d.running(id)?;
    let spec = agent_spec(&sb.record().env, &body, stdin.is_some())?;
    let (sb, mut conn) = d.agent(&sb.id).await?;
    let resp = match tokio::time::timeout(
        Duration::from_secs(30),
        conn.send_ok(Method::POST, "/v1/exec", bytes_body(spec.to_string())),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            d.metrics.exec("error");
            return Err(e.into());
        }
        Err(_) => {
            return Err(ApiError::Timeout(
                "the agent did not start the command within 30 s".into(),
            ))
        }
    };
    let pid = resp
        .headers()
        .get("x-airlock-process-id")
        .and_then(|v| v.to_str().ok())
        .filter(|p| validate_process_id(p).is_ok())
        .map(str::to_string);
    if let (Some(data), Some(pid)) = (stdin, pid.clone()) {
        let addr = rt.agent.addr();
        tokio::spawn(async move {
            let _ = write_stdin(addr, pid, data, true).await;
        });
    }
    Ok(pump_events(
        d,
        sb,
        conn,
        resp.into_body(),
        pid.as_deref(),
        true,
    ))
}

/// Streams checked agent events to the client as the daemon's NDJSON events.
fn pump_events(
    d: &Arc<Daemon>,
    sb: Arc<crate::daemon::Sandbox>,
    conn: crate::agent::AgentConn,
    body: Incoming,
    process_id: Option<&str>,
    count_exec: bool,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let d = d.clone();
    let busy = d.busy(&sb);
    tokio::spawn(async move {
        let _busy = busy;
        // Holding the connection keeps the agent's stream (and the process) alive; dropping it
        // when the client goes away makes the agent kill an exec's process group.
        let _conn = conn;
        let mut events = CheckedEvents::new(body);
        let mut result = "error";
        loop {
            // A client that goes away while its command prints nothing is noticed here, not
            // at the next event (which may never come): the sandbox stops counting as busy,
            // so its idle timeout runs again, and the agent ends the command.
            let next = tokio::select! {
                ev = events.next() => ev,
                () = tx.closed() => {
                    result = "client_gone";
                    break;
                }
            };
            let Some(ev) = next else { break };
            if let ExecEvent::Exit { code, .. } = &ev {
                result = match code {
                    Some(0) => "ok",
                    Some(_) => "nonzero",
                    None => "signal",
                };
            }
            if tx.send(ev.to_line()).await.is_err() {
                result = "client_gone";
                break;
            }
        }
        if count_exec {
            d.metrics.exec(result);
        }
    });
    ndjson(rx, process_id)
}

async fn start_process(
    d: &Arc<Daemon>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: ExecRequest = read_json(req, d.limits.max_request_bytes).await?;
    let stdin = stdin_bytes(&body)?;
    d.check_identity(body.uid, body.gid)?;
    let (sb, rt) = d.running(id)?;
    let spec = agent_spec(&sb.record().env, &body, stdin.is_some() || body.open_stdin)?;
    let (_, mut conn) = d.agent(id).await?;
    let v = conn
        .json(Method::POST, "/v1/processes", Some(&spec))
        .await?;
    let pid = v["id"]
        .as_str()
        .filter(|p| validate_process_id(p).is_ok())
        .ok_or_else(|| ApiError::BadGateway("the agent gave no valid process id".into()))?
        .to_string();
    if let Some(data) = stdin {
        write_stdin(rt.agent.addr(), pid.clone(), data, !body.open_stdin).await?;
    }
    d.metrics.exec("background");
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({"process_id": pid, "pid": v["pid"].as_i64()}),
    ))
}

/// Streams the request body to the agent, refusing more than --max-upload-bytes.
async fn forward_upload(
    d: &Arc<Daemon>,
    conn: &mut crate::agent::AgentConn,
    target: &str,
    method: Method,
    req: Request<Incoming>,
) -> Result<serde_json::Value, ApiError> {
    let limit = d.limits.max_upload_bytes;
    let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let over2 = over.clone();
    let mut total = 0u64;
    let stream = BodyStream::new(req.into_body()).filter_map(move |frame| {
        let out = match frame {
            Ok(f) => f.into_data().ok().map(|data| {
                total += data.len() as u64;
                if total > limit {
                    over2.store(true, std::sync::atomic::Ordering::Relaxed);
                    Err(std::io::Error::other("upload over the limit"))
                } else {
                    Ok(data)
                }
            }),
            Err(e) => Some(Err(std::io::Error::other(e))),
        };
        async move { out }
    });
    let result = conn.send_ok(method, target, stream_body(stream)).await;
    if over.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::PayloadTooLarge(format!(
            "the upload is over the limit of {limit} bytes (--max-upload-bytes)"
        )));
    }
    let resp = result?;
    let bytes = read_limited(resp.into_body(), MAX_AGENT_JSON).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadGateway(format!("the agent's answer is not JSON: {e}")))
}

async fn download(
    d: &Arc<Daemon>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let q: PathQuery = query(&req)?;
    validate_sandbox_path(&q.path)?;
    let (sb, mut conn) = d.agent(id).await?;
    let resp = conn
        .send_ok(
            Method::GET,
            &format!("/v1/files/content?path={}", enc(&q.path)),
            empty_body(),
        )
        .await?;
    let size: u64 = resp
        .headers()
        .get("x-airlock-file-size")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ApiError::BadGateway("the agent did not give the file's size".into()))?;
    let busy = d.busy(&sb);
    let mut sent = 0u64;
    let stream = BodyStream::new(resp.into_body()).filter_map(move |frame| {
        let _keep = (&busy, &conn);
        let out = match frame {
            Ok(f) => f.into_data().ok().map(|data| {
                sent += data.len() as u64;
                if sent > size {
                    Err(std::io::Error::other(
                        "the agent sent more than the file's size",
                    ))
                } else {
                    Ok(Frame::data(data))
                }
            }),
            Err(e) => Some(Err(std::io::Error::other(e))),
        };
        async move { out }
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut()
        .insert("x-airlock-file-size", HeaderValue::from(size));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve() {
        assert_eq!(resolve("GET", "/v1/health").unwrap().0, Route::Health);
        let (r, p) = resolve("POST", "/v1/sandboxes/sb-1/exec").unwrap();
        assert_eq!(r, Route::Exec);
        assert_eq!(p, vec!["sb-1"]);
        let (r, p) = resolve("GET", "/v1/sandboxes/sb-1/processes/p3/attach").unwrap();
        assert_eq!(r, Route::Attach);
        assert_eq!(p, vec!["sb-1", "p3"]);
        assert_eq!(
            resolve("PATCH", "/v1/health").unwrap_err().status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            resolve("GET", "/v2/nope").unwrap_err().status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            resolve("GET", "/v1/sandboxes//exec").unwrap_err().status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn every_route_is_in_the_openapi_file() {
        let doc: serde_yaml::Value = serde_yaml::from_str(OPENAPI_YAML).unwrap();
        assert_eq!(doc["openapi"].as_str().unwrap().chars().next(), Some('3'));
        for (method, pattern, _) in ROUTES {
            let op = &doc["paths"][*pattern][method.to_lowercase()];
            assert!(op.is_mapping(), "{method} {pattern} is not in openapi.yaml");
            assert!(
                op["responses"].is_mapping(),
                "{method} {pattern} has no responses"
            );
        }
        // And nothing documented that is not served.
        for (path, item) in doc["paths"].as_mapping().unwrap() {
            for (method, _) in item.as_mapping().unwrap() {
                let m = method.as_str().unwrap().to_uppercase();
                if m == "PARAMETERS" {
                    continue;
                }
                assert!(
                    ROUTES
                        .iter()
                        .any(|(rm, rp, _)| *rm == m && *rp == path.as_str().unwrap()),
                    "{m} {path:?} is documented but not served"
                );
            }
        }
    }

    #[test]
    fn modes_and_specs() {
        assert!(validate_mode("0644").is_ok());
        assert!(validate_mode("999").is_err());
        assert!(validate_mode("").is_err());
        let body: ExecRequest = serde_json::from_str(r#"{"cmd":["ls"],"env":{"B":"2"}}"#).unwrap();
        let mut env = std::collections::BTreeMap::new();
        env.insert("A".to_string(), "1".to_string());
        env.insert("B".to_string(), "1".to_string());
        let spec = agent_spec(&env, &body, false).unwrap();
        assert_eq!(spec["env"]["A"], "1");
        assert_eq!(spec["env"]["B"], "2");
        let empty: ExecRequest = serde_json::from_str(r#"{"cmd":[]}"#).unwrap();
        assert!(agent_spec(&env, &empty, false).is_err());
        assert_eq!(enc("/a b&c"), "%2Fa+b%26c");
    }
}
