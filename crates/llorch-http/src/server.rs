//! Start-up and shutdown: bind and serve first (`/health` answers 503 while loading),
//! load and warm up the model, then POST the readiness callback; on SIGTERM/SIGINT stop
//! taking requests (503), let running ones finish within the grace period, exit 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use llorch_api::ReadyCallback;
use llorch_engine::device::Backend;
use llorch_engine::{Engine, EngineConfig};

use crate::args::{WorkerArgs, DEFAULT_CTX_CAP};
use crate::error::ApiError;
use crate::json::BodyLimit;
use crate::routes;
use crate::state::{AppState, Phase, Shared};

/// Which binary this is; decides the device flag that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Cpu,
    Cuda,
    Metal,
}

pub fn router(state: Shared) -> Router {
    let limit = state.args.max_body_bytes;
    Router::new()
        .route("/health", get(routes::health))
        .route("/info", get(routes::info))
        .route("/metrics", get(routes::metrics))
        .route("/v1/models", get(routes::models))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/execute", post(routes::execute))
        .route("/cancel", post(routes::cancel))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth_and_count,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
        .with_state(state)
}

/// API-key check (all but /health and /metrics) and failure counting.
async fn auth_and_count(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if let Some(key) = &st.args.api_key {
        if path != "/health" && path != "/metrics" {
            let ok = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|k| constant_time_eq(k.as_bytes(), key.as_bytes()));
            if !ok {
                st.metrics
                    .failure
                    .with_label_values(&["unauthorized"])
                    .inc();
                return ApiError::unauthorized().into_response();
            }
        }
    }
    let t = Instant::now();
    let counted = matches!(
        path.as_str(),
        "/v1/completions" | "/v1/chat/completions" | "/execute"
    );
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    if counted && status >= 400 {
        let reason = match status {
            429 => "overloaded",
            503 => "unavailable",
            400..=499 => "validation",
            _ => "internal",
        };
        st.metrics.failure.with_label_values(&[reason]).inc();
    }
    let label = match path.as_str() {
        "/health"
        | "/info"
        | "/metrics"
        | "/v1/models"
        | "/v1/completions"
        | "/v1/chat/completions"
        | "/execute"
        | "/cancel"
        | "/tokenize"
        | "/detokenize" => path.as_str(),
        _ => "other",
    };
    st.metrics
        .http_requests
        .with_label_values(&[label, &status.to_string()])
        .observe(t.elapsed().as_secs_f64());
    resp
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The whole worker: flags, server, model, callback, shutdown. Returns the exit code.
pub fn run(flavour: Flavour) -> std::process::ExitCode {
    let args = WorkerArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,llorch_http=info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    llorch_engine::device::set_cpu_threads(args.threads);
    if let Some(d) = &args.models_dir {
        std::env::set_var("LLORCH_MODELS_DIR", d);
    }
    let backend = match (flavour, args.cuda_device, args.metal_device) {
        (Flavour::Cuda, n, _) => Backend::Cuda(n.unwrap_or(0)),
        (Flavour::Metal, _, n) => Backend::Metal(n.unwrap_or(0)),
        (Flavour::Cpu, None, None) => Backend::Cpu,
        (Flavour::Cpu, _, _) => {
            tracing::error!("--cuda-device/--metal-device need the llorch-cuda/llorch-metal binary; this is llorch-cpu");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(serve(args, backend)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("worker exiting: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn serve(args: WorkerArgs, backend: Backend) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| {
            format!(
                "--host {} --port {}: not a socket address",
                args.host, args.port
            )
        })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let state: Shared = Arc::new(AppState::new(args.clone(), backend));
    let _ = state.uri.set(format!("http://{local}"));
    tracing::info!(worker_id = %args.worker_id, "listening on http://{local} (loading {})", args.model);
    let app = router(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });

    // Load while already answering /health with 503.
    let loaded = tokio::select! {
        r = load(state.clone()) => r,
        _ = shutdown_signal() => {
            tracing::info!("signal during load: exiting");
            return Ok(());
        }
    };
    let engine = loaded?;
    let _ = state.engine.set(engine);
    state.set_phase(Phase::Ready);
    tracing::info!(
        "ready: {} on {} in {:.2}s",
        state.engine.get().unwrap().info.id,
        backend.label(),
        state.started.elapsed().as_secs_f64()
    );
    if let Some(url) = args.callback_url.clone() {
        tokio::select! {
            r = callback(&state, &url) => r?,
            _ = shutdown_signal() => return Ok(()),
        }
    }
    shutdown_signal().await;
    drain(&state).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    tracing::info!("stopped");
    Ok(())
}

async fn load(state: Shared) -> anyhow::Result<Engine> {
    let args = state.args.clone();
    let backend = state.backend;
    let t = Instant::now();
    let engine = tokio::task::spawn_blocking(move || -> anyhow::Result<Engine> {
        let path = llorch_engine::catalog::resolve(&args.model)?;
        let device = backend.open()?;
        let mut decile = 0;
        let mut progress = |done: usize, total: usize| {
            if total > 0 && done * 10 / total > decile {
                decile = done * 10 / total;
                tracing::info!(
                    "loading {}: {}% ({done}/{total} tensors)",
                    path.display(),
                    decile * 10
                );
            }
        };
        let loaded = llorch_engine::load(&path, &device, &mut progress)
            .with_context(|| format!("cannot load model {}", path.display()))?;
        let ctx = args
            .ctx_size
            .unwrap_or_else(|| loaded.info.context_length.min(DEFAULT_CTX_CAP));
        let engine = Engine::start(
            loaded,
            EngineConfig {
                max_batch: args.max_batch,
                max_queue: args.max_queue,
                context_length: ctx,
                kv_budget_bytes: args.kv_cache_mib << 20,
                ..Default::default()
            },
        )?;
        Ok(engine)
    })
    .await
    .context("loader task")??;
    state
        .metrics
        .model_load_seconds
        .set(t.elapsed().as_secs_f64());
    state
        .metrics
        .info
        .with_label_values(&[
            &state.args.worker_id,
            backend.name(),
            &backend.label(),
            &engine.info.id,
        ])
        .set(1.0);
    let obs_metrics = state.clone();
    *engine.stats.batch_observer.lock().unwrap() = Some(Box::new(move |n| {
        obs_metrics.metrics.batch_size.observe(n as f64);
    }));
    Ok(engine)
}

/// POSTs the readiness callback, retrying with backoff; a 4xx answer means the manager
/// does not know us, which is fatal.
async fn callback(state: &Shared, url: &str) -> anyhow::Result<()> {
    let e = state.engine.get().expect("engine before callback");
    let body = ReadyCallback {
        worker_id: state.args.worker_id.clone(),
        uri: state.uri.get().cloned().unwrap_or_default(),
        model_ref: state.args.model.clone(),
        backend: state.backend.name().into(),
        device: state.backend.label(),
        memory_bytes: e.info.memory_bytes,
        memory_architecture: state.backend.memory_architecture().into(),
        context_length: e.config.context_length,
        capabilities: vec![
            "text-gen".into(),
            "chat".into(),
            "stream".into(),
            "tokenize".into(),
        ],
        pid: std::process::id(),
        version: llorch_engine::VERSION.into(),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(state.args.callback_timeout_secs);
    let mut wait = Duration::from_millis(200);
    loop {
        let mut req = client.post(url).json(&body);
        if let Some(t) = &state.args.callback_token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!("readiness callback accepted by {url}");
                return Ok(());
            }
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                bail!("the manager refused the readiness callback ({status}): {text}");
            }
            Ok(r) => tracing::warn!("readiness callback to {url}: {}; retrying", r.status()),
            Err(err) => tracing::warn!("readiness callback to {url} failed: {err}; retrying"),
        }
        if Instant::now() + wait > deadline {
            bail!(
                "the manager at {url} never accepted the readiness callback within {}s",
                state.args.callback_timeout_secs
            );
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Stops taking requests and waits (up to the grace period) for running ones to end.
async fn drain(state: &Shared) {
    state.set_phase(Phase::Draining);
    let grace = Duration::from_secs(state.args.shutdown_grace_secs);
    tracing::info!(
        "draining: no new requests; waiting up to {}s for running ones",
        grace.as_secs()
    );
    let t = Instant::now();
    while t.elapsed() < grace {
        let busy = state
            .engine
            .get()
            .map(|e| {
                e.stats.running.load(std::sync::atomic::Ordering::SeqCst)
                    + e.stats.waiting.load(std::sync::atomic::Ordering::SeqCst)
            })
            .unwrap_or(0);
        if busy == 0 && state.jobs.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
