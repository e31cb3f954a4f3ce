//! The worker's HTTP routes (DESIGN.md "Worker", `.specs/worker-api.md`): health and
//! info, Prometheus metrics, the OpenAI API with SSE streaming, the native `/execute`
//! job stream with `/cancel`, and `/tokenize` / `/detokenize`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use llorch_api::native::{
    CancelRequest, EndEvent, ErrorEvent, ExecuteRequest, MetricsEvent, StartedEvent, TokenEvent,
};
use llorch_api::openai::*;
use llorch_api::{
    DetokenizeRequest, DetokenizeResponse, HealthResponse, TokenizeRequest, TokenizeResponse,
};
use llorch_engine::chat::Message;
use llorch_engine::engine::{Event, Final, FinishReason};
use llorch_engine::Engine;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::job::{self, ready_engine, Job};
use crate::json::ApiJson;
use crate::state::{Phase, Shared};

type SseStream = Response;

pub async fn health(State(st): State<Shared>) -> Response {
    match st.phase() {
        Phase::Loading => ApiError::loading().into_response(),
        Phase::Draining => ApiError::draining().into_response(),
        Phase::Ready => {
            let e = st.engine.get();
            Json(HealthResponse {
                status: "ok".into(),
                worker_id: Some(st.args.worker_id.clone()),
                model: e.map(|e| e.info.id.clone()),
                running: e
                    .map(|e| e.stats.running.load(Ordering::Relaxed))
                    .unwrap_or(0),
                waiting: e
                    .map(|e| e.stats.waiting.load(Ordering::Relaxed))
                    .unwrap_or(0),
            })
            .into_response()
        }
    }
}

pub async fn info(State(st): State<Shared>) -> Json<serde_json::Value> {
    let e = st.engine.get();
    let status = match st.phase() {
        Phase::Loading => "loading",
        Phase::Ready => "ready",
        Phase::Draining => "draining",
    };
    Json(json!({
        "worker_id": st.args.worker_id,
        "status": status,
        "backend": st.backend.name(),
        "device": st.backend.label(),
        "memory_architecture": st.backend.memory_architecture(),
        "model_ref": st.args.model,
        "model": e.map(|e| json!({
            "id": e.info.id,
            "path": e.info.path,
            "architecture": e.info.architecture,
            "parameters": e.info.parameters,
            "quantization": e.info.quantization,
            "context_length": e.config.context_length,
            "model_context_length": e.info.context_length,
            "vocab_size": e.info.vocab_size,
            "memory_bytes": e.info.memory_bytes,
            "format": e.info.format,
        })),
        "limits": {
            "max_batch": e.map(|e| e.config.max_batch).unwrap_or(st.args.max_batch),
            "max_queue": e.map(|e| e.config.max_queue).unwrap_or(st.args.max_queue),
            "context_length": e.map(|e| e.config.context_length),
            "max_stop_sequences": job::MAX_STOP_SEQUENCES,
            "max_body_bytes": st.args.max_body_bytes,
            "kv_cache_tokens": e.map(|e| e.stats.kv_capacity_tokens.load(Ordering::Relaxed)),
        },
        "uptime_seconds": st.started.elapsed().as_secs(),
        "version": llorch_engine::VERSION,
    }))
}

pub async fn metrics(State(st): State<Shared>) -> Response {
    if let Some(e) = st.engine.get() {
        st.metrics
            .running
            .set(e.stats.running.load(Ordering::Relaxed) as i64);
        st.metrics
            .waiting
            .set(e.stats.waiting.load(Ordering::Relaxed) as i64);
        st.metrics.kv_usage.set(e.stats.kv_usage_ratio());
    }
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        st.metrics.render(),
    )
        .into_response()
}

pub async fn models(State(st): State<Shared>) -> Result<Json<ModelList>, ApiError> {
    let e = st.engine.get().ok_or_else(ApiError::loading)?;
    Ok(Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: e.info.id.clone(),
            object: "model".into(),
            created: st_created(&st),
            owned_by: "llorch".into(),
        }],
    }))
}

fn st_created(st: &Shared) -> u64 {
    job::unix_now().saturating_sub(st.started.elapsed().as_secs())
}

fn check_model(st: &Shared, e: &Engine, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if !st.model_matches(m) => Err(ApiError::model_not_found(m, &e.info.id)),
        _ => Ok(()),
    }
}

fn openai_finish(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

pub async fn completions(
    State(st): State<Shared>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let e = ready_engine(&st)?;
    check_model(&st, &e, &req.model)?;
    let prompt = match &req.prompt {
        Prompt::Text(t) => encode_text(&e, t)?,
        Prompt::Texts(v) if v.len() == 1 => encode_text(&e, &v[0])?,
        Prompt::Texts(v) => {
            return Err(ApiError::bad_request(
                "prompt",
                format!("one prompt per request is supported, got {}", v.len()),
            ))
        }
        Prompt::Tokens(ids) => {
            let vocab = e.tokenizer.vocab_size().max(e.info.vocab_size);
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(ApiError::bad_request(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary ({vocab})"),
                ));
            }
            ids.clone()
        }
    };
    let (sampling, stop) = job::sampling(&req.sampling())?;
    let job = job::start(
        &st,
        &e,
        job::JobSpec {
            id: job::new_id("cmpl"),
            prompt,
            max_tokens: req.max_tokens,
            sampling,
            stop,
            arrived,
        },
    )?;
    let model = e.info.id.clone();
    if req.stream {
        let usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream(job, usage, move |piece, id, created| {
            let (text, finish, usage, choices) = match piece {
                Piece::Start => return None,
                Piece::Text(t) => (t, None, None, true),
                Piece::Finish(f) => (String::new(), Some(f.to_string()), None, true),
                Piece::Usage(u) => (String::new(), None, Some(u), false),
            };
            Some(json!(CompletionResponse {
                id: id.to_string(),
                object: "text_completion".into(),
                created,
                model: model.clone(),
                choices: if choices {
                    vec![CompletionChoice {
                        index: 0,
                        text,
                        logprobs: None,
                        finish_reason: finish,
                    }]
                } else {
                    vec![]
                },
                usage,
            }))
        })
        .into_response());
    }
    let (text, f) = collect(job).await?;
    Ok(Json(CompletionResponse {
        id: job::new_id("cmpl"),
        object: "text_completion".into(),
        created: job::unix_now(),
        model: e.info.id.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason: Some(openai_finish(f.finish).into()),
        }],
        usage: Some(usage_of(&f)),
    })
    .into_response())
}

pub async fn chat_completions(
    State(st): State<Shared>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let e = ready_engine(&st)?;
    check_model(&st, &e, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages",
            "messages must not be empty",
        ));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::bad_request(
                "messages",
                format!("messages[{i}].role '{}' is not one of system, user, assistant, developer, tool", m.role),
            ));
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        msgs.push(Message::new(role, &m.text()));
    }
    if msgs.iter().all(|m| m.content.trim().is_empty()) {
        return Err(ApiError::bad_request("messages", "every message is empty"));
    }
    let prompt = e.chat_prompt(&msgs)?;
    let (sampling, stop) = job::sampling(&req.sampling())?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let job = job::start(
        &st,
        &e,
        job::JobSpec {
            id: job::new_id("chatcmpl"),
            prompt,
            max_tokens,
            sampling,
            stop,
            arrived,
        },
    )?;
    let model = e.info.id.clone();
    if req.stream {
        let usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream(job, usage, move |piece, id, created| {
            let (delta, finish, usage, choices) = match piece {
                // the first chunk names the role, as OpenAI's does
                Piece::Start => (
                    Delta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                    },
                    None,
                    None,
                    true,
                ),
                Piece::Text(t) => (
                    Delta {
                        role: None,
                        content: Some(t),
                    },
                    None,
                    None,
                    true,
                ),
                Piece::Finish(f) => (Delta::default(), Some(f.to_string()), None, true),
                Piece::Usage(u) => (Delta::default(), None, Some(u), false),
            };
            Some(json!(ChatCompletionChunk {
                id: id.to_string(),
                object: "chat.completion.chunk".into(),
                created,
                model: model.clone(),
                choices: if choices {
                    vec![ChatChunkChoice {
                        index: 0,
                        delta,
                        logprobs: None,
                        finish_reason: finish,
                    }]
                } else {
                    vec![]
                },
                usage,
            }))
        })
        .into_response());
    }
    let (text, f) = collect(job).await?;
    Ok(Json(ChatCompletionResponse {
        id: job::new_id("chatcmpl"),
        object: "chat.completion".into(),
        created: job::unix_now(),
        model: e.info.id.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: text,
            },
            logprobs: None,
            finish_reason: Some(openai_finish(f.finish).into()),
        }],
        usage: usage_of(&f),
    })
    .into_response())
}

fn encode_text(e: &Engine, t: &str) -> Result<Vec<u32>, ApiError> {
    if t.is_empty() {
        return Err(ApiError::bad_request("prompt", "the prompt is empty"));
    }
    Ok(e.tokenizer.encode(t, true)?)
}

fn usage_of(f: &Final) -> Usage {
    Usage::new(f.prompt_tokens, f.completion_tokens)
}

fn data(v: serde_json::Value) -> Sse {
    Sse::default().data(v.to_string())
}

/// Collects a non-streaming request's text.
async fn collect(mut job: Job) -> Result<(String, Final), ApiError> {
    let mut text = String::new();
    while let Some(ev) = job.next().await {
        match ev {
            Event::Token { text: t, .. } | Event::Text(t) => text.push_str(&t),
            Event::Done(f) => return Ok((text, f)),
            Event::Error(m) => return Err(ApiError::internal(m)),
            Event::Started { .. } => {}
        }
    }
    Err(ApiError::internal(
        "the engine stopped before the request finished",
    ))
}

/// Events to send for one engine event.
pub struct Out(Vec<Sse>);

impl Out {
    fn push(&mut self, e: Sse) {
        self.0.push(e);
    }
}

/// What one OpenAI streaming chunk carries; the endpoint turns it into its chunk type.
enum Piece {
    /// Before the first text (chat names the role here).
    Start,
    Text(String),
    Finish(&'static str),
    /// The usage chunk of `stream_options.include_usage` (no choices).
    Usage(Usage),
}

/// An OpenAI SSE stream: `chunk` turns each [`Piece`] into a `data:` chunk (or nothing);
/// errors become an error chunk; `data: [DONE]` ends it. The stream ends the job as soon
/// as the client goes away.
fn stream(
    job: Job,
    include_usage: bool,
    mut chunk: impl FnMut(Piece, &str, u64) -> Option<serde_json::Value> + Send + 'static,
) -> SseStream {
    let id = job.id.clone();
    let created = job::unix_now();
    let mut started = false;
    pump(job, move |ev, out| {
        let mut emit = |p: Piece, out: &mut Out| {
            if let Some(v) = chunk(p, &id, created) {
                out.push(data(v));
            }
        };
        if let Event::Error(m) = ev {
            out.push(data(json!(ApiError::internal(m).envelope())));
            return true;
        }
        if !started {
            started = true;
            emit(Piece::Start, out);
        }
        match ev {
            Event::Done(f) => {
                emit(Piece::Finish(openai_finish(f.finish)), out);
                if include_usage {
                    emit(Piece::Usage(usage_of(&f)), out);
                }
                out.push(Sse::default().data("[DONE]"));
                true
            }
            Event::Token { text, .. } | Event::Text(text) if !text.is_empty() => {
                emit(Piece::Text(text), out);
                false
            }
            _ => false,
        }
    })
}

/// Runs `job` in a task, sending what `on_event` makes for each event (it returns true
/// at the last one). The job is dropped, and so cancelled in the engine, the moment the
/// client disconnects.
fn pump(
    mut job: Job,
    mut on_event: impl FnMut(Event, &mut Out) -> bool + Send + 'static,
) -> SseStream {
    let (tx, rx) = mpsc::channel::<Result<Sse, Infallible>>(64);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = job.next() => ev,
            };
            let Some(ev) = ev else {
                let _ = tx
                    .send(Ok(data(json!(
                        ApiError::internal("the engine stopped").envelope()
                    ))))
                    .await;
                return;
            };
            let mut out = Out(Vec::new());
            let last = on_event(ev, &mut out);
            for e in out.0 {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if last {
                return;
            }
        }
    });
    axum::response::sse::Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn named(name: &str, v: impl serde::Serialize) -> Sse {
    Sse::default()
        .event(name)
        .data(serde_json::to_string(&v).expect("serializable event"))
}

/// `POST /execute`: the native job API as typed SSE events.
pub async fn execute(
    State(st): State<Shared>,
    ApiJson(req): ApiJson<ExecuteRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let e = ready_engine(&st)?;
    let fields = SamplingFields {
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
        seed: req.seed,
        stop: Some(Stop::Many(req.stop.clone())),
        n: None,
    };
    let (sampling, stop) = job::sampling(&fields)?;
    let prompt = encode_text(&e, &req.prompt)?;
    let job_id = match req.job_id.as_deref() {
        Some("") => return Err(ApiError::bad_request("job_id", "job_id must not be empty")),
        Some(j) => j.to_string(),
        None => job::new_id("job"),
    };
    let job = job::start(
        &st,
        &e,
        job::JobSpec {
            id: job_id.clone(),
            prompt,
            max_tokens: req.max_tokens,
            sampling,
            stop,
            arrived,
        },
    )?;
    let prompt_tokens = job.prompt_tokens;
    let mut index = 0usize;
    let sse = pump(job, move |ev, out| match ev {
        Event::Started { queue_time, .. } => {
            out.push(named(
                "started",
                StartedEvent {
                    job_id: job_id.clone(),
                    prompt_tokens,
                    queue_time_ms: queue_time.as_millis() as u64,
                },
            ));
            false
        }
        Event::Token { text, .. } | Event::Text(text) => {
            if !text.is_empty() {
                out.push(named("token", TokenEvent { t: text, i: index }));
                index += 1;
            }
            false
        }
        Event::Done(f) if f.finish == FinishReason::Cancelled => {
            out.push(named(
                "error",
                ErrorEvent {
                    code: "CANCELLED".into(),
                    message: "the job was cancelled".into(),
                },
            ));
            true
        }
        Event::Done(f) => {
            let decode_ms = f.decode_time.as_millis() as u64;
            out.push(named(
                "metrics",
                MetricsEvent {
                    prompt_tokens: f.prompt_tokens,
                    tokens_out: f.completion_tokens,
                    prefill_time_ms: f.prefill_time.as_millis() as u64,
                    decode_time_ms: decode_ms,
                    tokens_per_second: if f.decode_time.as_secs_f64() > 0.0
                        && f.completion_tokens > 1
                    {
                        (f.completion_tokens - 1) as f64 / f.decode_time.as_secs_f64()
                    } else {
                        0.0
                    },
                },
            ));
            out.push(named(
                "end",
                EndEvent {
                    tokens_out: f.completion_tokens,
                    decode_time_ms: decode_ms,
                    stop_reason: match f.finish {
                        FinishReason::Eos => "EOS",
                        FinishReason::Length => "MAX_TOKENS",
                        FinishReason::Stop => "STOP_SEQUENCE",
                        FinishReason::Cancelled => "CANCELLED",
                    }
                    .into(),
                    stop_sequence_matched: f.stop_sequence,
                },
            ));
            true
        }
        Event::Error(m) => {
            out.push(named(
                "error",
                ErrorEvent {
                    code: "INTERNAL".into(),
                    message: m,
                },
            ));
            true
        }
    });
    Ok(sse.into_response())
}

/// `POST /cancel`: 202 whether or not the job still runs (idempotent).
pub async fn cancel(State(st): State<Shared>, ApiJson(req): ApiJson<CancelRequest>) -> Response {
    let found = match st.jobs.lock().unwrap().get(&req.job_id) {
        Some(flag) => {
            flag.store(true, Ordering::SeqCst);
            true
        }
        None => false,
    };
    (
        StatusCode::ACCEPTED,
        Json(json!({"job_id": req.job_id, "status": if found { "cancelling" } else { "not_running" }})),
    )
        .into_response()
}

pub async fn tokenize(
    State(st): State<Shared>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let e = st.engine.get().ok_or_else(ApiError::loading)?;
    Ok(Json(TokenizeResponse {
        tokens: e.tokenizer.encode(&req.content, req.add_special)?,
    }))
}

pub async fn detokenize(
    State(st): State<Shared>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let e = st.engine.get().ok_or_else(ApiError::loading)?;
    let vocab = e.tokenizer.vocab_size().max(e.info.vocab_size);
    if let Some(bad) = req.tokens.iter().find(|&&i| i as usize >= vocab) {
        return Err(ApiError::bad_request(
            "tokens",
            format!("token id {bad} is outside the vocabulary ({vocab})"),
        ));
    }
    Ok(Json(DetokenizeResponse {
        content: e.tokenizer.decode(&req.tokens)?,
    }))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such route; see /v1/models, /v1/completions, /v1/chat/completions, /execute",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
