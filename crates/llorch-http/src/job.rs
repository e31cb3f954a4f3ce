//! One generation request from the HTTP side: validation of the sampling fields, the
//! queue submission (429 when full), the cancel registration, and the event stream
//! that updates the per-request and per-token metrics as it is read.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use llorch_api::openai::SamplingFields;
use llorch_engine::engine::{Event, FinishReason, GenerationRequest};
use llorch_engine::{Engine, SamplingParams};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::state::{JobGuard, Phase, Shared};

/// Most stop sequences per request (as OpenAI and TGI).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// The engine, if the worker takes requests now.
pub fn ready_engine(state: &Shared) -> Result<Engine, ApiError> {
    match state.phase() {
        Phase::Loading => Err(ApiError::loading()),
        Phase::Draining => Err(ApiError::draining()),
        Phase::Ready => state.engine.get().cloned().ok_or_else(ApiError::loading),
    }
}

/// Checks OpenAI-style sampling fields and turns them into engine parameters.
pub fn sampling(f: &SamplingFields) -> Result<(SamplingParams, Vec<String>), ApiError> {
    let mut p = SamplingParams::default();
    if let Some(t) = f.temperature {
        if !(0.0..=10.0).contains(&t) || t.is_nan() {
            return Err(ApiError::bad_request(
                "temperature",
                format!("temperature must be between 0 and 10, got {t}"),
            ));
        }
        p.temperature = t as f32;
    }
    if let Some(tp) = f.top_p {
        if !(tp > 0.0 && tp <= 1.0) {
            return Err(ApiError::bad_request(
                "top_p",
                format!("top_p must be in (0, 1], got {tp}"),
            ));
        }
        p.top_p = tp as f32;
    }
    if let Some(k) = f.top_k {
        if k < 0 {
            return Err(ApiError::bad_request(
                "top_k",
                format!("top_k must be 0 (off) or positive, got {k}"),
            ));
        }
        p.top_k = k as usize;
    }
    if let Some(m) = f.min_p {
        if !(0.0..=1.0).contains(&m) {
            return Err(ApiError::bad_request(
                "min_p",
                format!("min_p must be in [0, 1], got {m}"),
            ));
        }
        p.min_p = m as f32;
    }
    if let Some(r) = f.repetition_penalty {
        if !(r > 0.0 && r <= 10.0) {
            return Err(ApiError::bad_request(
                "repetition_penalty",
                format!("repetition_penalty must be in (0, 10], got {r}"),
            ));
        }
        p.repetition_penalty = r as f32;
    }
    if let Some(n) = f.n {
        if n != 1 {
            return Err(ApiError::bad_request(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    p.seed = f.seed;
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    check_stops(&stop)?;
    Ok((p, stop))
}

pub fn check_stops(stop: &[String]) -> Result<(), ApiError> {
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::bad_request(
            "stop",
            format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(|s| s.len() > MAX_STOP_LEN) {
        return Err(ApiError::bad_request(
            "stop",
            format!("a stop sequence is longer than {MAX_STOP_LEN} bytes"),
        ));
    }
    Ok(())
}

pub struct Job {
    pub id: String,
    pub prompt_tokens: usize,
    rx: UnboundedReceiver<Event>,
    state: Shared,
    _guard: JobGuard,
    arrived: Instant,
    last_token: Option<Instant>,
    finished: bool,
}

/// What a handler asks the engine for.
pub struct JobSpec {
    pub id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: Option<i64>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// When the request arrived (TTFT and queue time count from here).
    pub arrived: Instant,
}

/// Validates the budget and queues the request.
pub fn start(state: &Shared, engine: &Engine, spec: JobSpec) -> Result<Job, ApiError> {
    let JobSpec {
        id,
        prompt,
        max_tokens,
        sampling,
        stop,
        arrived,
    } = spec;
    let budget = engine.budget(prompt.len(), max_tokens)?;
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let mut jobs = state.jobs.lock().unwrap();
        if jobs.contains_key(&id) {
            return Err(ApiError::bad_request(
                "job_id",
                format!("job '{id}' is already running"),
            ));
        }
        jobs.insert(id.clone(), cancel.clone());
    }
    let guard = JobGuard {
        state: state.clone(),
        id: id.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    engine.submit(GenerationRequest {
        prompt,
        max_tokens: budget.max_tokens,
        sampling,
        stop,
        ignore_eos: false,
        events: tx,
        cancel,
        enqueued: arrived,
    })?;
    Ok(Job {
        id,
        prompt_tokens,
        rx,
        state: state.clone(),
        _guard: guard,
        arrived,
        last_token: None,
        finished: false,
    })
}

impl Job {
    /// The next engine event, with metrics recorded.
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await?;
        let m = &self.state.metrics;
        let now = Instant::now();
        match &ev {
            Event::Started {
                prompt_tokens,
                queue_time,
            } => {
                m.queue_time.observe(queue_time.as_secs_f64());
                m.prompt_tokens.inc_by(*prompt_tokens as u64);
            }
            Event::Token { .. } => {
                match self.last_token {
                    None => m
                        .ttft
                        .observe(now.duration_since(self.arrived).as_secs_f64()),
                    Some(t) => m.itl.observe(now.duration_since(t).as_secs_f64()),
                }
                m.generation_tokens.inc();
                self.last_token = Some(now);
            }
            Event::Text(_) => {}
            Event::Done(f) => {
                self.finished = true;
                m.e2e
                    .observe(now.duration_since(self.arrived).as_secs_f64());
                match f.finish {
                    FinishReason::Cancelled => m.failure.with_label_values(&["cancelled"]).inc(),
                    other => m.success.with_label_values(&[other.as_str()]).inc(),
                }
            }
            Event::Error(_) => {
                self.finished = true;
                m.failure.with_label_values(&["internal"]).inc();
            }
        }
        Some(ev)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away before the end: the engine drops the sequence at its next step.
            self.state
                .metrics
                .failure
                .with_label_values(&["cancelled"])
                .inc();
        }
    }
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
