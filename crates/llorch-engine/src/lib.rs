//! llorch's engine: models, tokenizer, chat template, sampler and scheduler on Candle.
//! No HTTP here; `llorch-http` serves this and the `llorch` CLI drives it directly.

pub mod catalog;
pub mod chat;
pub mod device;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod model;
pub mod profile;
pub mod sampler;
pub mod stop;
pub mod synth;
pub mod tokenizer;

pub use engine::{Engine, EngineConfig, Event, FinishReason, GenerationRequest};
pub use error::{EngineError, Result};
pub use model::{load, LoadedModel, ModelInfo};
pub use sampler::SamplingParams;

/// The version every binary and API reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
