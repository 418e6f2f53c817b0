//! HTTP/1.1 on a Unix socket (tiny_http), speaking Firecracker's wire format: 204 for accepted
//! changes, 200 with JSON for reads, 400 with `{"fault_message": ...}` for every error.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tiny_http::{Header, Response, Server};

use super::controller::{route, ApiError, ApiResponse, Controller};
use crate::devices::bus::lock;

/// Longest request body accepted; Firecracker's largest bodies are a few hundred bytes.
pub const MAX_BODY_BYTES: u64 = 64 << 10;
/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("API socket path {path} is {len} bytes; Unix socket paths are limited to {MAX_SOCKET_PATH_BYTES}")]
    PathTooLong { path: String, len: usize },
    #[error("API socket path {0} already exists; remove it first (another VMM may be using it)")]
    PathExists(String),
    #[error("cannot listen on API socket {path}: {reason}")]
    Bind { path: String, reason: String },
}

pub fn bind(path: &Path) -> Result<Server, ApiServerError> {
    let shown = path.display().to_string();
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(ApiServerError::PathTooLong { path: shown, len });
    }
    if path.symlink_metadata().is_ok() {
        return Err(ApiServerError::PathExists(shown));
    }
    Server::http_unix(path).map_err(|e| ApiServerError::Bind {
        path: shown,
        reason: e.to_string(),
    })
}

fn read_body(request: &mut tiny_http::Request) -> Result<String, ApiError> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError(format!("cannot read the request body: {e}")))?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(ApiError(format!(
            "request body is larger than the {} KiB limit",
            MAX_BODY_BYTES >> 10
        )));
    }
    String::from_utf8(body).map_err(|_| ApiError("request body is not UTF-8".into()))
}

fn json_header() -> Header {
    Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .expect("static header is valid")
}

/// Serves requests until the process exits.
pub fn serve(server: Server, controller: Arc<Mutex<Controller>>) {
    for mut request in server.incoming_requests() {
        let method = request.method().as_str().to_ascii_uppercase();
        let path = request.url().split('?').next().unwrap_or("").to_string();
        let result = read_body(&mut request)
            .and_then(|body| route(&method, &path, &body))
            .and_then(|req| lock(&controller).handle(req));
        let response = match result {
            Ok(ApiResponse::NoContent) => Response::from_data(Vec::new()).with_status_code(204),
            Ok(ApiResponse::Json(value)) => Response::from_data(value.to_string().into_bytes())
                .with_status_code(200)
                .with_header(json_header()),
            Err(ApiError(message)) => {
                Response::from_data(json!({ "fault_message": message }).to_string().into_bytes())
                    .with_status_code(400)
                    .with_header(json_header())
            }
        };
        // A client that hung up does not need its answer.
        let _ = request.respond(response);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_checks() {
        let long = format!("/tmp/{}", "a".repeat(120));
        assert!(matches!(
            bind(Path::new(&long)).err(),
            Some(ApiServerError::PathTooLong { .. })
        ));
        let existing =
            std::env::temp_dir().join(format!("airlock-api-exists-{}", std::process::id()));
        std::fs::write(&existing, b"").unwrap();
        let err = bind(&existing).err().unwrap().to_string();
        assert!(err.contains("already exists"), "{err}");
        std::fs::remove_file(existing).unwrap();
        let err = bind(Path::new("/nonexistent-dir/api.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot listen on API socket"), "{err}");
    }
}
