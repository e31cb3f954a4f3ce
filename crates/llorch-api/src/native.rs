//! The native job API: `POST /execute` (SSE events) and `POST /cancel`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecuteRequest {
    /// Caller-chosen id used by `/cancel`; the worker makes one when absent.
    pub job_id: Option<String>,
    pub prompt: String,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub job_id: String,
}

/// SSE `event: started`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartedEvent {
    pub job_id: String,
    pub prompt_tokens: usize,
    pub queue_time_ms: u64,
}

/// SSE `event: token`: `t` the text piece, `i` its index in the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    pub t: String,
    pub i: usize,
}

/// SSE `event: metrics`, sent once before `end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsEvent {
    pub prompt_tokens: usize,
    pub tokens_out: usize,
    pub prefill_time_ms: u64,
    pub decode_time_ms: u64,
    pub tokens_per_second: f64,
}

/// SSE `event: end`. `stop_reason` is `MAX_TOKENS`, `EOS` or `STOP_SEQUENCE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndEvent {
    pub tokens_out: usize,
    pub decode_time_ms: u64,
    pub stop_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequence_matched: Option<String>,
}

/// SSE `event: error`; `code` is e.g. `CANCELLED`, `INTERNAL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEvent {
    pub code: String,
    pub message: String,
}
