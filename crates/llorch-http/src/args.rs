//! The worker's flags (DESIGN.md, "Worker"); every flag also reads a `LLORCH_*` variable.

use std::path::PathBuf;

#[derive(clap::Parser, Debug, Clone)]
#[command(
    version,
    about = "llorch worker: serves one model on one device over HTTP (OpenAI API, /execute SSE, /metrics)"
)]
pub struct WorkerArgs {
    /// This worker's id (reported in /info, /metrics and the readiness callback).
    #[arg(long, env = "LLORCH_WORKER_ID", default_value = "worker-0")]
    pub worker_id: String,
    /// GGUF file, SafeTensors folder, or a known model name resolved in $LLORCH_MODELS_DIR.
    #[arg(long, env = "LLORCH_MODEL")]
    pub model: String,
    /// Port to listen on (0 picks a free one; the callback reports it).
    #[arg(long, env = "LLORCH_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "LLORCH_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// POST the readiness callback here once the model is loaded and warm. No callback when absent.
    #[arg(long, env = "LLORCH_CALLBACK_URL")]
    pub callback_url: Option<String>,
    /// Bearer token sent with the readiness callback (given by pool-managerd).
    #[arg(long, env = "LLORCH_CALLBACK_TOKEN")]
    pub callback_token: Option<String>,
    /// How long to keep retrying the callback before giving up (seconds).
    #[arg(long, env = "LLORCH_CALLBACK_TIMEOUT_SECS", default_value_t = 30)]
    pub callback_timeout_secs: u64,
    /// CUDA device index (llorch-cuda).
    #[arg(long, env = "LLORCH_CUDA_DEVICE")]
    pub cuda_device: Option<usize>,
    /// Metal device index (llorch-metal).
    #[arg(long, env = "LLORCH_METAL_DEVICE")]
    pub metal_device: Option<usize>,
    /// Context length served (default: the model's, capped at 8192).
    #[arg(long, env = "LLORCH_CTX_SIZE")]
    pub ctx_size: Option<usize>,
    /// Sequences decoded together per step (continuous batching).
    #[arg(long, env = "LLORCH_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// Requests allowed to wait for a place in the batch; more get 429.
    #[arg(long, env = "LLORCH_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// KV-cache budget for all running sequences, in MiB.
    #[arg(long, env = "LLORCH_KV_CACHE_MIB", default_value_t = 2048)]
    pub kv_cache_mib: u64,
    /// Require `Authorization: Bearer KEY` on every route but /health and /metrics.
    #[arg(long, env = "LLORCH_API_KEY")]
    pub api_key: Option<String>,
    /// CPU threads (default: physical cores).
    #[arg(long, env = "LLORCH_THREADS")]
    pub threads: Option<usize>,
    /// Largest request body accepted, in bytes (413 above).
    #[arg(long, env = "LLORCH_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// On SIGTERM, how long running requests may take to finish (seconds).
    #[arg(long, env = "LLORCH_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Where known model names are resolved (default ~/.cache/llorch/models).
    #[arg(long, env = "LLORCH_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
}

/// Context length cap when the flag is absent: model contexts of 32k-128k would let a
/// single request reserve far more KV memory than a small worker has.
pub const DEFAULT_CTX_CAP: usize = 8192;
