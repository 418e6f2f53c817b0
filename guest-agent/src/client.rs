//! A small client for the agent protocol (hyper, one keep-alive connection): used by the host
//! side, the integration tests and the benchmark.

use std::io;
use std::path::Path;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::protocol::{Event, EventKind};

/// Re-exported so callers need no direct hyper dependency.
pub use hyper::body as hyper_body;

pub type RequestBody = UnsyncBoxBody<Bytes, io::Error>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent: {0}")]
    Connect(#[source] io::Error),
    #[error("HTTP error talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    #[error("the agent answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("cannot decode the agent's answer: {0}")]
    Decode(String),
}

pub fn empty_body() -> RequestBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn bytes_body(bytes: impl Into<Bytes>) -> RequestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A streamed request body from any stream of chunks.
pub fn stream_body(
    stream: impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
) -> RequestBody {
    use futures_util::TryStreamExt;
    StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync()
}

/// One connection to an agent.
pub struct AgentClient {
    sender: SendRequest<RequestBody>,
}

impl AgentClient {
    pub async fn connect_unix(path: &Path) -> Result<AgentClient, ClientError> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(ClientError::Connect)?;
        Self::over_stream(stream).await
    }

    /// HTTP/1.1 over an already connected stream (e.g. a vsock Unix socket after its
    /// `CONNECT` handshake).
    pub async fn over_stream(stream: tokio::net::UnixStream) -> Result<AgentClient, ClientError> {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(AgentClient { sender })
    }

    /// Sends a prepared request (custom headers); the response body is left to the caller.
    pub async fn send_request(
        &mut self,
        request: http::Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        self.sender.ready().await?;
        Ok(self.sender.send_request(request).await?)
    }

    /// Sends a request; the response body is left to the caller.
    pub async fn send(
        &mut self,
        method: Method,
        target: &str,
        body: RequestBody,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let request = http::Request::builder()
            .method(method)
            .uri(target)
            .header(http::header::HOST, "agent")
            .body(body)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        self.send_request(request).await
    }

    /// A request with an optional JSON body; returns the status and the JSON answer.
    pub async fn json(
        &mut self,
        method: Method,
        target: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), ClientError> {
        let body = match body {
            Some(v) => bytes_body(serde_json::to_vec(v).expect("JSON values serialize")),
            None => empty_body(),
        };
        let response = self.send(method, target, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Decode(format!("{e}: {:?}", String::from_utf8_lossy(&bytes)))
        })?;
        Ok((status, value))
    }

    /// Like [`AgentClient::json`], but any status other than 2xx is an error.
    pub async fn call(
        &mut self,
        method: Method,
        target: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let (status, value) = self.json(method, target, body).await?;
        if !status.is_success() {
            return Err(ClientError::Status {
                status,
                body: value.to_string(),
            });
        }
        Ok(value)
    }

    /// `POST /v1/exec`: the stream of events.
    pub async fn exec(&mut self, spec: &serde_json::Value) -> Result<EventStream, ClientError> {
        let body = bytes_body(serde_json::to_vec(spec).expect("JSON values serialize"));
        let response = self.send(Method::POST, "/v1/exec", body).await?;
        EventStream::from_response(response).await
    }

    /// `GET /v1/processes/{id}/attach`.
    pub async fn attach(&mut self, id: &str) -> Result<EventStream, ClientError> {
        let response = self
            .send(
                Method::GET,
                &format!("/v1/processes/{id}/attach"),
                empty_body(),
            )
            .await?;
        EventStream::from_response(response).await
    }
}

/// The NDJSON events of an exec or attach.
pub struct EventStream {
    body: Incoming,
    buffer: BytesMut,
    /// The `x-airlock-process-id` header.
    pub process_id: Option<String>,
}

/// All the output of a process, gathered.
#[derive(Debug, Default)]
pub struct CollectedOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub events: Vec<Event>,
    pub exit: Option<Event>,
}

impl EventStream {
    async fn from_response(response: http::Response<Incoming>) -> Result<EventStream, ClientError> {
        let status = response.status();
        if status != StatusCode::OK {
            let bytes = response.into_body().collect().await?.to_bytes();
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        let process_id = response
            .headers()
            .get("x-airlock-process-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(EventStream {
            body: response.into_body(),
            buffer: BytesMut::new(),
            process_id,
        })
    }

    /// The next raw NDJSON line (without the newline), or None at the end of the stream.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            if let Some(pos) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(pos + 1).freeze();
                return Ok(Some(line.slice(..pos)));
            }
            match self.body.frame().await {
                None if self.buffer.is_empty() => return Ok(None),
                None => {
                    return Err(ClientError::Decode(format!(
                        "stream ended inside a line: {:?}",
                        String::from_utf8_lossy(&self.buffer[..self.buffer.len().min(200)])
                    )))
                }
                Some(frame) => {
                    if let Ok(mut data) = frame?.into_data() {
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

    pub async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        match self.next_line().await? {
            None => Ok(None),
            Some(line) => serde_json::from_slice(&line).map(Some).map_err(|e| {
                ClientError::Decode(format!(
                    "{e}: {:?}",
                    String::from_utf8_lossy(&line[..line.len().min(200)])
                ))
            }),
        }
    }

    /// Reads to the end, gathering stdout and stderr.
    pub async fn collect(mut self) -> Result<CollectedOutput, ClientError> {
        let mut out = CollectedOutput::default();
        while let Some(event) = self.next_event().await? {
            match event.kind {
                EventKind::Stdout => out.stdout.extend(event.bytes().unwrap_or_default()),
                EventKind::Stderr => out.stderr.extend(event.bytes().unwrap_or_default()),
                EventKind::Exit => out.exit = Some(event.clone()),
                _ => {}
            }
            if !matches!(event.kind, EventKind::Stdout | EventKind::Stderr) {
                out.events.push(event);
            }
        }
        Ok(out)
    }
}

/// The whole body of a response (for `GET /v1/files/content` and the like).
pub async fn read_body(response: http::Response<Incoming>) -> Result<Bytes, ClientError> {
    Ok(response.into_body().collect().await?.to_bytes())
}
