//! `ApiError`: every failure the worker answers, mapped to an HTTP status and the one
//! JSON envelope of `.specs/errors.md`. Never a bare text body.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llorch_api::ErrorEnvelope;
use llorch_engine::EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
    pub fn bad_request(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        if !param.is_empty() {
            e.param = Some(param.to_string());
        }
        e
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        let mut e = Self::not_found(format!(
            "model '{asked}' is not served here; this worker serves '{served}'"
        ));
        e.param = Some("model".into());
        e
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
    }
    pub fn overloaded(waiting: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded_error",
            format!("the worker is overloaded: the queue is full ({waiting} waiting); retry later"),
        );
        e.retry_after = Some(1);
        e
    }
    pub fn loading() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            "Loading model",
        )
    }
    pub fn draining() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            "the worker is shutting down and takes no new requests",
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed on this path",
        )
    }

    /// The metrics label of this failure.
    pub fn reason(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 413 => "validation",
            401 => "unauthorized",
            429 => "overloaded",
            503 => "unavailable",
            _ => "internal",
        }
    }

    pub fn envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope::new(
            self.status.as_u16(),
            self.kind,
            self.message.clone(),
            self.param.as_deref(),
        )
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest { param, message } => {
                ApiError::bad_request(&param, message)
            }
            EngineError::PromptTooLong { .. } => ApiError::bad_request("prompt", e.to_string()),
            EngineError::QueueFull(n) => ApiError::overloaded(n),
            EngineError::EngineStopped => ApiError::draining(),
            EngineError::Tokenizer(m) => {
                ApiError::bad_request("prompt", format!("cannot tokenize: {m}"))
            }
            EngineError::ChatTemplate(m) => {
                ApiError::bad_request("messages", format!("chat template: {m}"))
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.envelope())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        r
    }
}
