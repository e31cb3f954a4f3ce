//! Wire types shared by the llorch worker, `pool-managerd` and clients.
//!
//! These structs are the API documentation: every JSON body the worker or the manager
//! accepts or returns is one of them. Field names follow OpenAI where OpenAI defines the
//! endpoint, and `.specs/` (from DESIGN.md) everywhere else.

pub mod error;
pub mod models;
pub mod native;
pub mod openai;
pub mod pool;

pub use error::{ErrorBody, ErrorEnvelope};

/// The readiness callback a worker POSTs to `--callback-url` once its model is loaded
/// and warmed up.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReadyCallback {
    pub worker_id: String,
    /// Base URI the worker serves on, e.g. `http://127.0.0.1:41234`.
    pub uri: String,
    /// The model as the worker was asked to load it (path or known name).
    pub model_ref: String,
    /// `cpu`, `cuda` or `metal`.
    pub backend: String,
    /// Device label, e.g. `cpu`, `cuda:0`, `metal:0`.
    pub device: String,
    /// Bytes the loaded model occupies on its device.
    pub memory_bytes: u64,
    /// `host`, `vram-only` or `unified`.
    pub memory_architecture: String,
    pub context_length: usize,
    pub capabilities: Vec<String>,
    pub pid: u32,
    pub version: String,
}

/// `GET /health` body when the worker (or manager) is ready.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HealthResponse {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Requests running and waiting; the manager routes to the least loaded worker.
    #[serde(default)]
    pub running: usize,
    #[serde(default)]
    pub waiting: usize,
}

/// `POST /tokenize`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub content: String,
    /// Add the model's BOS token when the model wants one (default true).
    #[serde(default = "default_true")]
    pub add_special: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DetokenizeResponse {
    pub content: String,
}

fn default_true() -> bool {
    true
}
