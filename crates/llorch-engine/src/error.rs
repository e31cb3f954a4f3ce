//! Engine errors. Each variant names what is wrong in words a user can act on; the HTTP
//! layer maps them onto status codes.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("model file not found: {0}")]
    NotFound(String),
    #[error("{path}: not a valid model file: {reason}")]
    BadModelFile { path: String, reason: String },
    #[error("{path}: unsupported architecture '{arch}' (supported: {supported})")]
    UnknownArchitecture {
        path: String,
        arch: String,
        supported: String,
    },
    #[error("{path}: {what} is missing")]
    MissingFile { path: String, what: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("{param}: {message}")]
    InvalidRequest { param: String, message: String },
    #[error("the prompt has {prompt_tokens} tokens but the context holds {context_length}")]
    PromptTooLong {
        prompt_tokens: usize,
        context_length: usize,
    },
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("device: {0}")]
    Device(String),
    #[error("model fetch: {0}")]
    Fetch(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        EngineError::InvalidRequest {
            param: param.to_string(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
