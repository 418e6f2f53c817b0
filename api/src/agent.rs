//! The daemon's connection to a sandbox's agent (guest-agent/PROTOCOL.md): over the agent's Unix
//! socket (namespace backend), or over the VMM's vsock Unix socket after the `CONNECT 52`
//! handshake (vm backend). Nothing the agent says is trusted: bodies are read with size limits,
//! NDJSON lines with a length limit, and event streams are checked for order and sizes.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub use airlock_agent::client::{bytes_body, empty_body, stream_body, RequestBody};
use airlock_agent::client::{AgentClient, ClientError};
use airlock_agent::protocol::{Event, EventKind};

/// The agent's vsock port in the guest.
pub const AGENT_VSOCK_PORT: u32 = 52;
/// Largest JSON answer we read from an agent.
pub const MAX_AGENT_JSON: usize = 8 << 20;
/// Largest NDJSON line we accept (64 KiB of data is ~87 KiB of base64).
pub const MAX_EVENT_LINE: usize = 256 << 10;
/// Largest decoded output chunk the protocol allows.
pub const MAX_CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the sandbox's agent at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock handshake with {path} failed: {message}")]
    Handshake { path: PathBuf, message: String },
    #[error("HTTP error talking to the sandbox's agent: {0}")]
    Http(#[from] hyper::Error),
    #[error("the sandbox's agent answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("the sandbox's agent sent something invalid: {0}")]
    Protocol(String),
    #[error("{0}")]
    Timeout(String),
}

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// The agent's own Unix socket.
    Unix(PathBuf),
    /// A Firecracker-style vsock Unix socket: connect, `CONNECT <port>\n`, `OK <n>\n`.
    Vsock { uds: PathBuf, port: u32 },
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            AgentAddr::Vsock { uds, port } => write!(f, "vsock:{}:{port}", uds.display()),
        }
    }
}

/// Writes `CONNECT <port>\n` and reads the `OK <n>\n` answer (at most 64 bytes).
pub async fn vsock_handshake<S>(stream: &mut S, port: u32) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| format!("writing CONNECT: {e}"))?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed after {:?} (is anything listening on port {port}?)",
                String::from_utf8_lossy(&line)
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > 64 {
            return Err("answer longer than 64 bytes".into());
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(format!("unexpected answer {text:?}")),
    }
}

/// One keep-alive HTTP/1.1 connection to an agent: the agent's own client, reached over its Unix
/// socket or over a VMM's vsock socket after the `CONNECT` handshake.
pub struct AgentConn {
    client: AgentClient,
}

impl From<ClientError> for AgentError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Http(e) => AgentError::Http(e),
            ClientError::Status { status, body } => AgentError::Status {
                status,
                message: body,
            },
            other => AgentError::Protocol(other.to_string()),
        }
    }
}

impl AgentConn {
    pub async fn connect(addr: &AgentAddr, timeout: Duration) -> Result<AgentConn, AgentError> {
        tokio::time::timeout(timeout, Self::connect_inner(addr))
            .await
            .map_err(|_| {
                AgentError::Timeout(format!("connecting to {addr} took over {timeout:?}"))
            })?
    }

    async fn connect_inner(addr: &AgentAddr) -> Result<AgentConn, AgentError> {
        let (path, port) = match addr {
            AgentAddr::Unix(p) => (p, None),
            AgentAddr::Vsock { uds, port } => (uds, Some(*port)),
        };
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|source| AgentError::Connect {
                path: path.clone(),
                source,
            })?;
        if let Some(port) = port {
            vsock_handshake(&mut stream, port)
                .await
                .map_err(|message| AgentError::Handshake {
                    path: path.clone(),
                    message,
                })?;
        }
        Ok(AgentConn {
            client: AgentClient::over_stream(stream).await?,
        })
    }

    /// Sends a request; the response (any status) is the caller's.
    pub async fn send(
        &mut self,
        method: Method,
        target: &str,
        body: RequestBody,
    ) -> Result<http::Response<Incoming>, AgentError> {
        Ok(self.client.send(method, target, body).await?)
    }

    /// Sends a prepared request (custom headers).
    pub async fn send_request(
        &mut self,
        request: http::Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, AgentError> {
        Ok(self.client.send_request(request).await?)
    }

    /// Sends a request and demands a 2xx; an error status becomes [`AgentError::Status`] with
    /// the agent's message.
    pub async fn send_ok(
        &mut self,
        method: Method,
        target: &str,
        body: RequestBody,
    ) -> Result<http::Response<Incoming>, AgentError> {
        let response = self.send(method, target, body).await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(status_error(response).await)
        }
    }

    /// A JSON request; a 2xx JSON answer (at most [`MAX_AGENT_JSON`] bytes) or an error.
    pub async fn json(
        &mut self,
        method: Method,
        target: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, AgentError> {
        let body = match body {
            Some(v) => bytes_body(serde_json::to_vec(v).expect("JSON values serialize")),
            None => empty_body(),
        };
        let response = self.send_ok(method, target, body).await?;
        let bytes = read_limited(response.into_body(), MAX_AGENT_JSON).await?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Protocol(format!("bad JSON: {e}")))
    }
}

/// Reads a body of at most `limit` bytes.
pub async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes, AgentError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => match e.downcast::<hyper::Error>() {
            Ok(h) => Err(AgentError::Http(*h)),
            Err(_) => Err(AgentError::Protocol(format!(
                "an answer longer than {limit} bytes"
            ))),
        },
    }
}

/// The agent's error message, from `{"error": {"message": ...}}` or the raw body.
async fn status_error(response: http::Response<Incoming>) -> AgentError {
    let status = response.status();
    let bytes = read_limited(response.into_body(), 64 << 10)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned());
    AgentError::Status { status, message }
}

/// An exec/attach event after checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started {
        process_id: String,
        pid: i32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    /// Always the last event when present.
    Error(String),
}

impl ExecEvent {
    /// The daemon's own NDJSON form (api/README.md, openapi.yaml `ExecEvent`).
    pub fn to_json(&self) -> serde_json::Value {
        let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
        match self {
            ExecEvent::Started { process_id, pid } => {
                serde_json::json!({"type": "started", "process_id": process_id, "pid": pid})
            }
            ExecEvent::Stdout(d) => serde_json::json!({"type": "stdout", "data": b64(d)}),
            ExecEvent::Stderr(d) => serde_json::json!({"type": "stderr", "data": b64(d)}),
            ExecEvent::Exit {
                code,
                signal,
                timed_out,
            } => {
                let mut v = serde_json::json!({"type": "exit", "timed_out": timed_out});
                if let Some(c) = code {
                    v["code"] = (*c).into();
                }
                if let Some(s) = signal {
                    v["signal"] = (*s).into();
                }
                v
            }
            ExecEvent::Error(m) => serde_json::json!({"type": "error", "message": m}),
        }
    }

    pub fn to_line(&self) -> Bytes {
        let mut v = serde_json::to_vec(&self.to_json()).expect("JSON values serialize");
        v.push(b'\n');
        Bytes::from(v)
    }
}

/// Checks one event against the protocol and what came before it.
pub struct EventChecker {
    last_seq: Option<u64>,
    finished: bool,
}

impl Default for EventChecker {
    fn default() -> Self {
        Self::new()
    }
}

impl EventChecker {
    pub fn new() -> EventChecker {
        EventChecker {
            last_seq: None,
            finished: false,
        }
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    pub fn check(&mut self, line: &[u8]) -> Result<ExecEvent, String> {
        if self.finished {
            return Err("an event after the exit event".into());
        }
        let event: Event =
            serde_json::from_slice(line).map_err(|e| format!("an event that is not JSON: {e}"))?;
        if let Some(last) = self.last_seq {
            if event.seq <= last {
                return Err(format!("event seq {} after seq {last}", event.seq));
            }
        }
        self.last_seq = Some(event.seq);
        let data = |e: &Event| -> Result<Vec<u8>, String> {
            let text = e.data.as_deref().ok_or("an output event without data")?;
            if text.len() > MAX_CHUNK * 4 / 3 + 8 {
                return Err(format!("an output chunk of {} base64 bytes", text.len()));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("output that is not base64: {e}"))?;
            if bytes.len() > MAX_CHUNK {
                return Err(format!("an output chunk of {} bytes", bytes.len()));
            }
            Ok(bytes)
        };
        Ok(match event.kind {
            EventKind::Started => ExecEvent::Started {
                process_id: event.id.clone().unwrap_or_default(),
                pid: event.pid.unwrap_or(0),
            },
            EventKind::Stdout => ExecEvent::Stdout(data(&event)?),
            EventKind::Stderr => ExecEvent::Stderr(data(&event)?),
            EventKind::Exit => {
                self.finished = true;
                if event.code.is_none() && event.signal.is_none() {
                    return Err("an exit event with neither code nor signal".into());
                }
                ExecEvent::Exit {
                    code: event.code,
                    signal: event.signal,
                    timed_out: event.timed_out,
                }
            }
            EventKind::Error => {
                self.finished = true;
                ExecEvent::Error(
                    event
                        .message
                        .unwrap_or_else(|| "the agent reported an error".into())
                        .chars()
                        .take(4096)
                        .collect(),
                )
            }
        })
    }
}

/// Reads NDJSON lines (at most [`MAX_EVENT_LINE`] bytes each) from an agent's body.
pub struct LineReader {
    body: Incoming,
    buffer: BytesMut,
    done: bool,
}

impl LineReader {
    pub fn new(body: Incoming) -> LineReader {
        LineReader {
            body,
            buffer: BytesMut::new(),
            done: false,
        }
    }

    /// The next line, None at a clean end.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(pos) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(pos + 1).freeze();
                return Ok(Some(line.slice(..pos)));
            }
            if self.buffer.len() > MAX_EVENT_LINE {
                return Err(format!("an event line over {MAX_EVENT_LINE} bytes"));
            }
            if self.done {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err("the stream ended inside a line".into())
                };
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => return Err(format!("reading the stream: {e}")),
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buffer.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

/// Checked events from an agent's exec/attach stream; ends with exactly one `Exit` or `Error`.
pub struct CheckedEvents {
    reader: LineReader,
    checker: EventChecker,
    ended: bool,
}

impl CheckedEvents {
    pub fn new(body: Incoming) -> CheckedEvents {
        CheckedEvents {
            reader: LineReader::new(body),
            checker: EventChecker::new(),
            ended: false,
        }
    }

    pub async fn next(&mut self) -> Option<ExecEvent> {
        if self.ended {
            return None;
        }
        let event = match self.reader.next_line().await {
            Ok(Some(line)) => match self.checker.check(&line) {
                Ok(e) => e,
                Err(m) => ExecEvent::Error(format!("the sandbox's agent sent {m}")),
            },
            Ok(None) => ExecEvent::Error(
                "the sandbox's agent ended the stream before the exit event".into(),
            ),
            Err(m) => ExecEvent::Error(format!("the sandbox's agent stream failed: {m}")),
        };
        if matches!(event, ExecEvent::Exit { .. } | ExecEvent::Error(_)) {
            self.ended = true;
        }
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_accepts_a_normal_stream() {
        let mut c = EventChecker::new();
        assert_eq!(
            c.check(br#"{"seq":0,"type":"started","id":"p1","pid":7}"#)
                .unwrap(),
            ExecEvent::Started {
                process_id: "p1".into(),
                pid: 7
            }
        );
        assert_eq!(
            c.check(br#"{"seq":1,"type":"stdout","data":"aGkK"}"#)
                .unwrap(),
            ExecEvent::Stdout(b"hi\n".to_vec())
        );
        assert!(matches!(
            c.check(br#"{"seq":2,"type":"exit","code":3}"#).unwrap(),
            ExecEvent::Exit { code: Some(3), .. }
        ));
        assert!(c.finished());
        assert!(c.check(br#"{"seq":3,"type":"stdout","data":""}"#).is_err());
    }

    #[test]
    fn checker_refuses_lies() {
        let mut c = EventChecker::new();
        c.check(br#"{"seq":5,"type":"stdout","data":"aGkK"}"#)
            .unwrap();
        assert!(c
            .check(br#"{"seq":5,"type":"stdout","data":"aGkK"}"#)
            .unwrap_err()
            .contains("seq"));
        let mut c = EventChecker::new();
        assert!(c
            .check(br#"{"seq":0,"type":"stdout","data":"!!"}"#)
            .is_err());
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; MAX_CHUNK + 1]);
        let line = format!(r#"{{"seq":0,"type":"stdout","data":"{big}"}}"#);
        assert!(EventChecker::new().check(line.as_bytes()).is_err());
        assert!(EventChecker::new().check(b"not json").is_err());
        assert!(EventChecker::new()
            .check(br#"{"seq":0,"type":"exit"}"#)
            .is_err());
    }

    #[test]
    fn daemon_events_serialize() {
        let v = ExecEvent::Exit {
            code: None,
            signal: Some(9),
            timed_out: true,
        }
        .to_json();
        assert_eq!(v["type"], "exit");
        assert_eq!(v["signal"], 9);
        assert!(v.get("code").is_none());
        assert_eq!(ExecEvent::Stdout(b"hi".to_vec()).to_json()["data"], "aGk=");
    }

    #[tokio::test]
    async fn vsock_handshake_against_a_fake_vmm() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 11];
            b.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 52\n");
            b.write_all(b"OK 1073741824\n").await.unwrap();
            b
        });
        vsock_handshake(&mut a, 52).await.unwrap();
        server.await.unwrap();

        let (mut a, mut b) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 11];
            let _ = b.read_exact(&mut buf).await;
            drop(b);
        });
        assert!(vsock_handshake(&mut a, 52)
            .await
            .unwrap_err()
            .contains("closed"));

        let (mut a, mut b) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 11];
            let _ = b.read_exact(&mut buf).await;
            let _ = b.write_all(b"NOPE\n").await;
        });
        assert!(vsock_handshake(&mut a, 52)
            .await
            .unwrap_err()
            .contains("unexpected"));
    }
}
