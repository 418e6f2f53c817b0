//! Typed errors of the daemon, each mapped to one HTTP status and a `{"error": "..."}` body.

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The daemon's policy refuses what was asked (an identity it does not hand out).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    LimitReached(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The sandbox's agent (or VMM) failed or answered something we refuse to trust.
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::LimitReached(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::LimitReached(_) => "limit_reached",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::BadGateway(_) => "agent",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.to_string() })
    }

    pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(format!("{context}: {e}"))
    }
}

impl From<crate::agent::AgentError> for ApiError {
    fn from(e: crate::agent::AgentError) -> Self {
        use crate::agent::AgentError;
        match e {
            // The agent's own 4xx answers are the caller's problem, passed on with its message.
            AgentError::Status { status, message } if status.is_client_error() => {
                let message = format!("the sandbox's agent refused the request: {message}");
                match status.as_u16() {
                    404 => ApiError::NotFound(message),
                    409 => ApiError::Conflict(message),
                    413 => ApiError::PayloadTooLarge(message),
                    403 => ApiError::Conflict(message),
                    _ => ApiError::BadRequest(message),
                }
            }
            AgentError::Timeout(what) => ApiError::Timeout(format!(
                "the sandbox's agent did not answer in time: {what}"
            )),
            other => ApiError::BadGateway(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_bodies() {
        let e = ApiError::NotFound("no sandbox \"x\"".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.body()["error"], "no sandbox \"x\"");
        assert_eq!(
            ApiError::PayloadTooLarge(String::new()).status().as_u16(),
            413
        );
        assert_eq!(ApiError::LimitReached(String::new()).status().as_u16(), 429);
    }

    #[test]
    fn agent_client_errors_keep_their_meaning() {
        let e: ApiError = crate::agent::AgentError::Status {
            status: StatusCode::NOT_FOUND,
            message: "cannot start \"nope\"".into(),
        }
        .into();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert!(e.to_string().contains("nope"));
        let e: ApiError = crate::agent::AgentError::Status {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "boom".into(),
        }
        .into();
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    }
}
