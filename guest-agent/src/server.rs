//! The HTTP/1.1 server (hyper): one task per connection, keep-alive so a connection carries
//! many requests one after another, every request routed through `protocol::decode_route`.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{header, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;

use crate::acting_user::ActingUser;
use crate::error::{AgentError, AgentResult};
use crate::files::{self, FileWriter, WriteOptions};
use crate::listen::Listener;
use crate::process::{DetachAction, ProcessTable, UserDefaults};
use crate::protocol::{decode_route, Request, Route, MAX_JSON_BODY, PROTOCOL_VERSION};
use crate::{log, system};

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The request header size limit (request line and headers).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Everything the request handlers share.
pub struct AgentState {
    pub table: Arc<ProcessTable>,
    pub started: Instant,
    pub pid1: bool,
    /// Owner of files and directories the API creates unless a request names one.
    /// Who file operations act as when a request names no uid/gid (the sandbox user).
    pub file_owner: UserDefaults,
    /// Why there is no user cgroup, when there is none.
    pub cgroup_error: Option<String>,
    /// A Unix socket to remove at exit.
    pub socket_path: Option<PathBuf>,
}

impl AgentState {
    /// Who a file request acts as: its uid/gid, each defaulting to the sandbox user's.
    pub fn acting_user(&self, uid: Option<u32>, gid: Option<u32>) -> ActingUser {
        ActingUser {
            uid: uid.unwrap_or(self.file_owner.uid),
            gid: gid.unwrap_or(self.file_owner.gid),
        }
    }

    /// Stops user code, tidies up and exits, powering the guest off when PID 1.
    pub fn shutdown(&self) -> ! {
        log!("shutting down");
        self.table.kill_all();
        if let Some(cgroup) = self.table.cgroup() {
            let _ = cgroup.kill_all(Duration::from_secs(2));
            self.table.reaper().reap_exited();
            cgroup.remove();
        }
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
        if self.pid1 {
            crate::init::power_off();
        }
        std::process::exit(0);
    }
}

/// Accepts connections forever.
pub async fn serve(listener: Listener, state: Arc<AgentState>) {
    loop {
        let connection = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.keep_alive(true).max_buf_size(MAX_HEADER_BYTES);
            // Errors here are the client's doing (reset, garbage) and end only its connection.
            let _ = builder
                .serve_connection(TokioIo::new(connection), service)
                .await;
        });
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec(value).expect("responses always serialize");
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("valid response")
}

fn error_response(error: &AgentError) -> Response<Body> {
    json_response(error.status(), &error.body())
}

fn stream_response(content_type: &str) -> http::response::Builder {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
}

fn with_stream(
    builder: http::response::Builder,
    stream: impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
) -> Response<Body> {
    builder
        .body(StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync())
        .expect("valid response")
}

/// The single entry point of every request; never fails at the HTTP level.
pub async fn handle(
    state: Arc<AgentState>,
    req: hyper::Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().as_str().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let result = match decode_route(&method, &target) {
        Err(e) => Err(e),
        Ok(Route::Ready(request)) => dispatch(&state, request, Some(req.into_body())).await,
        Ok(Route::Json(route)) => match read_json_body(req.into_body()).await {
            Ok(body) => match route.decode(&body) {
                Ok(request) => dispatch(&state, request, None).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
    };
    Ok(result.unwrap_or_else(|e| error_response(&e)))
}

async fn read_json_body(body: Incoming) -> AgentResult<Bytes> {
    use http_body::Body as _;
    if body.size_hint().lower() > MAX_JSON_BODY as u64 {
        return Err(AgentError::PayloadTooLarge {
            limit: MAX_JSON_BODY,
        });
    }
    match Limited::new(body, MAX_JSON_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(AgentError::PayloadTooLarge {
            limit: MAX_JSON_BODY,
        }),
        Err(e) => Err(AgentError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// The next chunk of a streamed request body (stdin, file content).
async fn next_data(body: &mut Incoming) -> AgentResult<Option<Bytes>> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
            Some(Err(e)) => {
                return Err(AgentError::bad_request(format!(
                    "cannot read the request body: {e}"
                )))
            }
        }
    }
}

async fn dispatch(
    state: &Arc<AgentState>,
    request: Request,
    body: Option<Incoming>,
) -> AgentResult<Response<Body>> {
    let table = &state.table;
    let ok = |v: serde_json::Value| Ok(json_response(StatusCode::OK, &v));
    match request {
        Request::Health => ok(json!({
            "status": "ok",
            "version": AGENT_VERSION,
            "protocol": PROTOCOL_VERSION,
            "pid1": state.pid1,
            "uptime_ms": state.started.elapsed().as_millis() as u64,
            "processes": table.list().len(),
            "orphans_reaped": table.reaper().orphans_reaped(),
            "cgroup": table.cgroup().map(|c| c.info()),
            "cgroup_error": state.cgroup_error,
        })),
        Request::Version => ok(json!({"version": AGENT_VERSION, "protocol": PROTOCOL_VERSION})),
        Request::Exec(spec) => {
            let process = table.spawn(&spec, false)?;
            let started = process.started_line();
            let output = process.attach(DetachAction::KillAndRemove, table.clone())?;
            let stream = futures_util::stream::once(async move { Ok(started) }).chain(output);
            let builder = stream_response("application/x-ndjson")
                .header("x-airlock-process-id", process.id.as_str());
            Ok(with_stream(builder, stream))
        }
        Request::Start(spec) => {
            let process = table.spawn(&spec, true)?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"id": process.id, "pid": process.pid}),
            ))
        }
        Request::ListProcesses => ok(json!({"processes": table.list()})),
        Request::GetProcess { id } => Ok(json_response(StatusCode::OK, &table.get(&id)?.info())),
        Request::Attach { id } => {
            let process = table.get(&id)?;
            let stream = process.attach(DetachAction::Detach, table.clone())?;
            let builder = stream_response("application/x-ndjson")
                .header("x-airlock-process-id", process.id.as_str());
            Ok(with_stream(builder, stream))
        }
        Request::Wait { id, timeout_ms } => {
            let process = table.get(&id)?;
            process.wait(timeout_ms.map(Duration::from_millis)).await;
            Ok(json_response(StatusCode::OK, &process.info()))
        }
        Request::Stdin { id, close } => {
            let process = table.get(&id)?;
            let mut sink = process.lock_stdin().await;
            if sink.is_none() {
                return Err(AgentError::Conflict(format!(
                    "process {id} has no open stdin (start it with \"stdin\": true; a closed stdin stays closed)"
                )));
            }
            let mut written = 0u64;
            if let Some(mut body) = body {
                while let Some(data) = next_data(&mut body).await? {
                    let writer = sink.as_mut().expect("checked above");
                    if let Err(e) = writer.write_all(&data).await {
                        *sink = None;
                        return Err(AgentError::Conflict(format!(
                            "process {id} stopped reading its stdin ({e}); stdin is now closed"
                        )));
                    }
                    written += data.len() as u64;
                }
            }
            if close {
                if let Some(writer) = sink.take() {
                    let _ = writer.close().await;
                }
            }
            ok(json!({"written": written, "closed": sink.is_none()}))
        }
        Request::Signal { id, signal, group } => {
            table.get(&id)?.signal(signal, group)?;
            ok(json!({}))
        }
        Request::Kill { id } => {
            table.get(&id)?.signal(libc::SIGKILL, true)?;
            ok(json!({}))
        }
        Request::Resize { id, size } => {
            table.get(&id)?.resize(size)?;
            ok(json!({}))
        }
        Request::RemoveProcess { id } => {
            let process = table.get(&id)?;
            process.kill_group();
            table.remove(&id);
            Ok(json_response(StatusCode::OK, &process.info()))
        }
        Request::KillUserProcesses => {
            table.kill_all();
            let cgroup = table.cgroup().cloned();
            let killed = tokio::task::spawn_blocking(move || match cgroup {
                Some(c) => c.kill_all(Duration::from_secs(10)),
                None => Ok(0),
            })
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| AgentError::io("kill the user cgroup", e))?;
            ok(json!({"killed": killed}))
        }
        Request::Stat { path, user } => Ok(json_response(
            StatusCode::OK,
            &files::stat(path, state.acting_user(user.uid, user.gid)).await?,
        )),
        Request::ListDir { path, depth, user } => Ok(json_response(
            StatusCode::OK,
            &files::list(path, depth, state.acting_user(user.uid, user.gid)).await?,
        )),
        Request::ReadFile {
            path,
            offset,
            length,
            user,
        } => {
            let user = state.acting_user(user.uid, user.gid);
            let (size, stream) = files::read_stream(path, offset, length, user).await?;
            let builder =
                stream_response("application/octet-stream").header("x-airlock-file-size", size);
            Ok(with_stream(builder, stream))
        }
        Request::WriteFile(spec) => {
            let mut writer = FileWriter::create(
                &spec.path,
                WriteOptions {
                    mode: spec.mode.map_or(0o644, |m| m.0),
                    user: state.acting_user(spec.uid, spec.gid),
                    create_parents: spec.create_parents,
                    append: spec.append,
                },
            )
            .await?;
            if let Some(mut body) = body {
                while let Some(data) = next_data(&mut body).await? {
                    writer.write(&data).await?;
                }
            }
            let written = writer.finish().await?;
            ok(json!({"path": spec.path, "written": written}))
        }
        Request::Mkdir(spec) => {
            let user = state.acting_user(spec.uid, spec.gid);
            files::mkdir(spec, user).await?;
            ok(json!({}))
        }
        Request::Remove(spec) => {
            let user = state.acting_user(spec.uid, spec.gid);
            files::remove(spec, user).await?;
            ok(json!({}))
        }
        Request::Rename(spec) => {
            let user = state.acting_user(spec.uid, spec.gid);
            files::rename(spec, user).await?;
            ok(json!({}))
        }
        Request::Chmod(spec) => {
            let user = state.acting_user(spec.uid, spec.gid);
            files::chmod(spec, user).await?;
            ok(json!({}))
        }
        Request::SetTime { unix_ns } => {
            system::set_time(unix_ns)?;
            ok(json!({}))
        }
        Request::AddEntropy { seed } => {
            let result = tokio::task::spawn_blocking(move || system::add_entropy(&seed))
                .await
                .map_err(|e| AgentError::Internal(e.to_string()))??;
            Ok(json_response(StatusCode::OK, &result))
        }
        Request::Shutdown => {
            let power_off = state.pid1;
            let state = state.clone();
            tokio::spawn(async move {
                // Let the response reach the client first.
                tokio::time::sleep(Duration::from_millis(50)).await;
                tokio::task::spawn_blocking(move || state.shutdown());
            });
            Ok(json_response(
                StatusCode::ACCEPTED,
                &json!({"status": "shutting down", "power_off": power_off}),
            ))
        }
    }
}
