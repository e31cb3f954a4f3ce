//! `ApiJson<T>`: the request body extractor. It reads the body whatever the
//! content-type (curl's `-d` sends form encoding), enforces the size limit (413), and
//! turns every parse failure into a 400 that names the field at fault.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request("", format!("cannot read the request body: {e}"))
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// The configured body limit, for the error message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "",
            "the request body is empty; send a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request("", format!("malformed JSON: {inner}"))
        } else if path == "." || path.is_empty() {
            ApiError::bad_request("", format!("invalid request: {inner}"))
        } else {
            let param = path.split(['.', '[']).next().unwrap_or(&path).to_string();
            ApiError::bad_request(&param, format!("{path}: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_api::openai::CompletionRequest;

    #[test]
    fn errors_name_the_field() {
        let e = parse::<CompletionRequest>(br#"{"prompt":"a","max_tokens":"x"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("max_tokens"), "{}", e.message);
        let e = parse::<CompletionRequest>(b"{not json").unwrap_err();
        assert!(e.message.contains("malformed JSON"), "{}", e.message);
        let e = parse::<CompletionRequest>(br#"{"max_tokens":3}"#).unwrap_err();
        assert!(e.message.contains("prompt"), "{}", e.message);
    }
}
