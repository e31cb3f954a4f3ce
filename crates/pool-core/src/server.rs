//! pool-managerd's HTTP API (DESIGN.md "pool-managerd"): health, state, worker control,
//! the readiness callback, metrics, and the routed OpenAI / `/execute` endpoints.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llorch_api::pool::{StartWorkerRequest, StartWorkerResponse, StopWorkerRequest};
use llorch_api::ReadyCallback;
use serde_json::json;

use crate::manager::Manager;
use crate::proxy::{error, forward};

type St = Arc<Manager>;

pub fn router(mgr: St) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v2/state", get(state))
        .route("/v2/workers/start", post(start))
        .route("/v2/workers/stop", post(stop))
        .route("/v2/workers/{id}/drain", post(drain))
        .route("/v2/internal/workers/ready", post(ready))
        .route("/v1/models", get(models))
        .route(
            "/v1/completions",
            post(|s: State<St>, h: HeaderMap, b: Bytes| route(s, "/v1/completions", h, b)),
        )
        .route(
            "/v1/chat/completions",
            post(|s: State<St>, h: HeaderMap, b: Bytes| route(s, "/v1/chat/completions", h, b)),
        )
        .route(
            "/execute",
            post(|s: State<St>, h: HeaderMap, b: Bytes| route(s, "/execute", h, b)),
        )
        .fallback(|| async { error(404, "not_found_error", "no such route") })
        .layer(middleware::from_fn_with_state(mgr.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(4 << 20))
        .with_state(mgr)
}

/// API key on everything but /health, /metrics and the callback (which has its own token).
async fn auth(State(m): State<St>, req: Request, next: Next) -> Response {
    if let Some(key) = &m.cfg.api_key {
        let p = req.uri().path();
        if p != "/health" && p != "/metrics" && p != "/v2/internal/workers/ready" {
            let ok = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                == Some(key.as_str());
            if !ok {
                return error(
                    401,
                    "authentication_error",
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                );
            }
        }
    }
    next.run(req).await
}

async fn route(State(m): State<St>, path: &'static str, h: HeaderMap, b: Bytes) -> Response {
    if m.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        return error(503, "unavailable_error", "the manager is shutting down");
    }
    forward(m, path, h, b).await
}

async fn health(State(m): State<St>) -> Json<serde_json::Value> {
    let s = m.state();
    let ready = s.workers.iter().filter(|w| w.status == "ready").count();
    Json(
        json!({"status": "ok", "pool_id": s.pool_id, "workers": s.workers.len(), "ready_workers": ready}),
    )
}

async fn metrics(State(m): State<St>) -> Response {
    m.update_status_gauges();
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        m.metrics.render(),
    )
        .into_response()
}

async fn state(State(m): State<St>) -> Json<llorch_api::pool::PoolState> {
    Json(m.state())
}

async fn models(State(m): State<St>) -> Json<serde_json::Value> {
    let data: Vec<_> = m
        .ready_models()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "llorch"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn parse<T: serde::de::DeserializeOwned>(b: &Bytes) -> Result<T, String> {
    serde_json::from_slice(b).map_err(|e| format!("invalid request body: {e}"))
}

async fn start(State(m): State<St>, b: Bytes) -> Response {
    let req: StartWorkerRequest = match parse(&b) {
        Ok(r) => r,
        Err(e) => return error(400, "invalid_request_error", e),
    };
    let device = match m.resolve_device(req.device.as_deref().unwrap_or("auto")) {
        Ok(d) => d,
        Err(e) => return error(400, "invalid_request_error", e),
    };
    let mut pool = m
        .cfg
        .pools
        .iter()
        .find(|p| p.model == req.model_ref)
        .cloned()
        .unwrap_or_else(|| {
            crate::config::PoolConfig::default_with(&req.model_ref)
                .pools
                .remove(0)
        });
    pool.replicas = 1;
    let id = m.start_worker(pool, device);
    (
        StatusCode::ACCEPTED,
        Json(StartWorkerResponse { worker_id: id }),
    )
        .into_response()
}

async fn stop(State(m): State<St>, b: Bytes) -> Response {
    let req: StopWorkerRequest = match parse(&b) {
        Ok(r) => r,
        Err(e) => return error(400, "invalid_request_error", e),
    };
    if m.request_stop(&req.worker_id, "requested") {
        (
            StatusCode::ACCEPTED,
            Json(json!({"worker_id": req.worker_id, "status": "stopping"})),
        )
            .into_response()
    } else {
        error(
            404,
            "not_found_error",
            format!("no worker '{}'", req.worker_id),
        )
    }
}

async fn drain(State(m): State<St>, Path(id): Path<String>) -> Response {
    if m.drain(&id) {
        (
            StatusCode::ACCEPTED,
            Json(json!({"worker_id": id, "status": "draining"})),
        )
            .into_response()
    } else {
        error(404, "not_found_error", format!("no worker '{id}'"))
    }
}

async fn ready(State(m): State<St>, h: HeaderMap, b: Bytes) -> Response {
    let cb: ReadyCallback = match parse(&b) {
        Ok(r) => r,
        Err(e) => return error(400, "invalid_request_error", e),
    };
    let bearer = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match m.on_ready(&cb, bearer) {
        Ok(()) => Json(json!({"status": "registered", "worker_id": cb.worker_id})).into_response(),
        Err((404, msg)) => error(404, "not_found_error", msg),
        Err((401, msg)) => error(401, "authentication_error", msg),
        Err((s, msg)) => error(s, "invalid_request_error", msg),
    }
}

/// Serves the API, starts the configured workers, and on SIGTERM/SIGINT stops every
/// worker (SIGTERM, grace, SIGKILL) before returning.
pub async fn run(
    cfg: crate::PoolConfig,
    bind: String,
    bin_dir: std::path::PathBuf,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    let mgr = Manager::new(cfg, bound.clone(), bin_dir);
    tracing::info!(
        "pool-managerd listening on http://{bound}; devices: {}",
        mgr.devices
            .iter()
            .map(|d| format!("{} ({})", d.id, d.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let app = router(mgr.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if let Err(e) = mgr.start_configured() {
        server.abort();
        return Err(e);
    }
    shutdown_signal().await;
    tracing::info!("stopping every worker");
    mgr.shutdown().await;
    server.abort();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
