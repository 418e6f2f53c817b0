//! A client for the daemon's API (used by the `airlock` CLI, the benchmark and the tests).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use hyper::body::Incoming;

use crate::agent::{
    bytes_body, empty_body, read_limited, AgentAddr, AgentConn, LineReader, RequestBody,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach airlockd at {socket}: {message} (is it running? set --socket or AIRLOCK_SOCKET)")]
    Connect { socket: PathBuf, message: String },
    #[error("{message} (HTTP {status})")]
    Api { status: StatusCode, message: String },
    #[error("talking to airlockd: {0}")]
    Transport(String),
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct DaemonClient {
    pub socket: PathBuf,
}

impl DaemonClient {
    pub fn new(socket: impl AsRef<Path>) -> DaemonClient {
        DaemonClient {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    pub async fn connect(&self) -> Result<AgentConn, ClientError> {
        AgentConn::connect(
            &AgentAddr::Unix(self.socket.clone()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| ClientError::Connect {
            socket: self.socket.clone(),
            message: e.to_string(),
        })
    }

    /// Sends a request; the response is the caller's, whatever its status.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: RequestBody,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let mut conn = self.connect().await?;
        let resp = conn
            .send(method, path, body)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        // The connection task lives on until the response body is read.
        Ok(resp)
    }

    /// A JSON request: (status, JSON answer).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        let body = match body {
            Some(v) => bytes_body(v.to_string()),
            None => empty_body(),
        };
        self.request_raw(method, path, body).await
    }

    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        body: RequestBody,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = read_limited(resp.into_body(), 64 << 20)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        Ok((status, value))
    }

    /// Like [`DaemonClient::request`], with non-2xx statuses as errors carrying the message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let (status, value) = self.request(method, path, body).await?;
        check(status, value)
    }

    /// A streamed (NDJSON) answer: the lines, or the error.
    pub async fn stream(
        &self,
        method: Method,
        path: &str,
        body: RequestBody,
        accept_ndjson: bool,
    ) -> Result<NdjsonStream, ClientError> {
        let mut conn = self.connect().await?;
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "airlockd");
        let request = if accept_ndjson {
            request.header(http::header::ACCEPT, "application/x-ndjson")
        } else {
            request
        };
        let request = request
            .body(body)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let resp = conn
            .send_request(request)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = read_limited(resp.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            return Err(check(status, value).unwrap_err());
        }
        let process_id = resp
            .headers()
            .get("x-airlock-process-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(NdjsonStream {
            lines: LineReader::new(resp.into_body()),
            process_id,
            _conn: conn,
        })
    }
}

/// A 2xx answer's JSON, or the API error with the daemon's message.
pub fn check(
    status: StatusCode,
    value: serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    if status.is_success() {
        return Ok(value);
    }
    let message = value["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string());
    Err(ClientError::Api { status, message })
}

/// The lines of an NDJSON answer.
pub struct NdjsonStream {
    lines: LineReader,
    pub process_id: Option<String>,
    _conn: AgentConn,
}

impl NdjsonStream {
    pub async fn next(&mut self) -> Result<Option<serde_json::Value>, ClientError> {
        match self
            .lines
            .next_line()
            .await
            .map_err(ClientError::Transport)?
        {
            None => Ok(None),
            Some(line) => serde_json::from_slice(&line)
                .map(Some)
                .map_err(|e| ClientError::Transport(format!("bad event line: {e}"))),
        }
    }
}

/// What an exec produced, gathered.
#[derive(Debug, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub events: Vec<serde_json::Value>,
}

impl NdjsonStream {
    pub async fn collect_exec(mut self) -> Result<ExecOutput, ClientError> {
        use base64::Engine;
        let mut out = ExecOutput::default();
        while let Some(ev) = self.next().await? {
            let data = || {
                base64::engine::general_purpose::STANDARD
                    .decode(ev["data"].as_str().unwrap_or(""))
                    .unwrap_or_default()
            };
            match ev["type"].as_str() {
                Some("stdout") => out.stdout.extend(data()),
                Some("stderr") => out.stderr.extend(data()),
                Some("exit") => {
                    out.code = ev["code"].as_i64().map(|c| c as i32);
                    out.signal = ev["signal"].as_i64().map(|s| s as i32);
                }
                Some("error") => out.error = ev["message"].as_str().map(str::to_string),
                _ => {}
            }
            out.events.push(ev);
        }
        Ok(out)
    }
}

impl DaemonClient {
    /// `POST /v1/sandboxes/{id}/exec`, gathered.
    pub async fn exec(
        &self,
        id: &str,
        spec: &serde_json::Value,
    ) -> Result<ExecOutput, ClientError> {
        self.stream(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            bytes_body(spec.to_string()),
            false,
        )
        .await?
        .collect_exec()
        .await
    }

    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        body: RequestBody,
    ) -> Result<serde_json::Value, ClientError> {
        let target = format!(
            "/v1/sandboxes/{id}/files?{}",
            serde_urlencoded::to_string([("path", path)]).unwrap_or_default()
        );
        let (status, v) = self.request_raw(Method::PUT, &target, body).await?;
        check(status, v)
    }

    pub async fn download(
        &self,
        id: &str,
        path: &str,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let target = format!(
            "/v1/sandboxes/{id}/files?{}",
            serde_urlencoded::to_string([("path", path)]).unwrap_or_default()
        );
        let resp = self.send(Method::GET, &target, empty_body()).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = read_limited(resp.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            return Err(
                check(status, serde_json::from_slice(&bytes).unwrap_or_default()).unwrap_err(),
            );
        }
        Ok(resp)
    }

    pub async fn download_bytes(&self, id: &str, path: &str) -> Result<Bytes, ClientError> {
        let resp = self.download(id, path).await?;
        read_limited(resp.into_body(), usize::MAX)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }
}
