//! Routing of client requests: pick the least-loaded ready worker serving the requested
//! model, forward the request, and pass the response through as it arrives (SSE token by
//! token). A worker that fails before answering gives a 502 JSON error; one that dies
//! mid-stream ends the stream with an SSE error event.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use llorch_api::ErrorEnvelope;

use crate::manager::Manager;

pub fn error(status: u16, kind: &str, message: impl Into<String>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(ErrorEnvelope::new(status, kind, message, None)),
    )
        .into_response()
}

/// Decrements the worker's in-flight count when the response body is done or dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub async fn forward(mgr: Arc<Manager>, path: &str, headers: HeaderMap, body: Bytes) -> Response {
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(400, "invalid_request_error", format!("malformed JSON: {e}")),
    };
    let model = v
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string();
    let label = if model.is_empty() {
        "(any)".to_string()
    } else {
        model.clone()
    };
    let (wid, uri, inflight) = match mgr.pick(&model) {
        Ok(x) => x,
        Err((status, msg)) => {
            mgr.metrics
                .requests_routed
                .with_label_values(&[&label, &status.to_string()])
                .inc();
            let kind = if status == 404 {
                "not_found_error"
            } else {
                "unavailable_error"
            };
            return error(status, kind, msg);
        }
    };
    inflight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(inflight);
    let mut req = mgr.http.post(format!("{uri}{path}")).body(body);
    for h in ["content-type", "authorization", "accept"] {
        if let Some(v) = headers.get(h) {
            req = req.header(h, v.clone());
        }
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            mgr.metrics
                .requests_routed
                .with_label_values(&[&label, "502"])
                .inc();
            return error(
                502,
                "server_error",
                format!("worker {wid} failed before answering: {e}"),
            );
        }
    };
    let status = resp.status();
    mgr.metrics
        .requests_routed
        .with_label_values(&[&label, status.as_str()])
        .inc();
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let mut out = Response::builder().status(status.as_u16());
    for h in ["content-type", "retry-after", "cache-control"] {
        if let Some(v) = resp.headers().get(h) {
            out = out.header(h, v.as_bytes());
        }
    }
    out = out.header("x-llorch-worker", wid.as_str());
    let native = path == "/execute";
    let wid2 = wid.clone();
    let stream = resp.bytes_stream().map(move |chunk| {
        let _keep = &guard;
        chunk
    });
    // On a mid-stream failure, end with an error the client can parse, then stop.
    let stream = futures::stream::unfold((stream, false), move |(mut s, done)| {
        let wid = wid2.clone();
        async move {
            if done {
                return None;
            }
            match s.next().await {
                Some(Ok(b)) => Some((Ok::<Bytes, std::io::Error>(b), (s, false))),
                Some(Err(e)) => {
                    let msg = format!("worker {wid} failed mid-response: {e}");
                    let tail = if !sse {
                        String::new()
                    } else if native {
                        format!(
                            "event: error\ndata: {}\n\n",
                            serde_json::json!({"code": "WORKER_FAILED", "message": msg})
                        )
                    } else {
                        format!(
                            "data: {}\n\ndata: [DONE]\n\n",
                            serde_json::to_string(&ErrorEnvelope::new(
                                502,
                                "server_error",
                                msg,
                                None
                            ))
                            .unwrap()
                        )
                    };
                    Some((Ok(Bytes::from(tail)), (s, true)))
                }
                None => None,
            }
        }
    });
    out.body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(500, "server_error", "response build failed"))
}
