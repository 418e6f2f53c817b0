//! The agent's typed errors and how each maps onto an HTTP status and a JSON error body.

use http::StatusCode;
use serde::Serialize;

/// Everything a request can fail with. Each variant carries a message meant for the caller: it
/// says what was wrong and, where it can, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    Conflict(String),
    #[error("request body is larger than the {limit}-byte limit for this endpoint")]
    PayloadTooLarge { limit: usize },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// The JSON body of every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl AgentError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        AgentError::BadRequest(message.into())
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AgentError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
                std::io::ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
                std::io::ErrorKind::AlreadyExists => StatusCode::CONFLICT,
                std::io::ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
                _ => match source.raw_os_error() {
                    Some(libc::ENOTDIR)
                    | Some(libc::EISDIR)
                    | Some(libc::ENOTEMPTY)
                    | Some(libc::EXDEV) => StatusCode::CONFLICT,
                    Some(libc::EPERM) => StatusCode::FORBIDDEN,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                },
            },
            AgentError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable, machine-readable name for the kind of error.
    pub fn code(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::FORBIDDEN => "permission_denied",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message: self.to_string(),
            },
        }
    }
}

pub type AgentResult<T> = Result<T, AgentError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_statuses() {
        let e = AgentError::io("open /x", std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.code(), "not_found");
        assert!(e.to_string().starts_with("open /x: "));
        let e = AgentError::io(
            "rmdir /x",
            std::io::Error::from_raw_os_error(libc::ENOTEMPTY),
        );
        assert_eq!(e.status(), StatusCode::CONFLICT);
        let e = AgentError::PayloadTooLarge { limit: 10 };
        assert_eq!(e.body().error.code, "payload_too_large");
    }
}
