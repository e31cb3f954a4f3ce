//! The one error envelope every llorch HTTP failure uses (OpenAI style):
//! `{"error":{"code":400,"message":"...","type":"invalid_request_error","param":"max_tokens"}}`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The HTTP status code, repeated in the body for clients that lose the status line.
    pub code: u16,
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `request_too_large`, `overloaded_error`, `unavailable_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl ErrorEnvelope {
    pub fn new(code: u16, kind: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            error: ErrorBody {
                code,
                message: message.into(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape_matches_design() {
        let e = ErrorEnvelope::new(503, "unavailable_error", "Loading model", None);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"code":503,"message":"Loading model","type":"unavailable_error"}})
        );
        let e = ErrorEnvelope::new(400, "invalid_request_error", "bad", Some("max_tokens"));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["error"]["param"], "max_tokens");
    }
}
