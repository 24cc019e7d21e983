//! Errors of the engine layer. The server maps each variant to an HTTP status in one place.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    /// The request can never be served with this configuration (too long for the context or the cache).
    #[error("{0}")]
    ContextLength(String),
    /// A sampling or request parameter is out of range; `param` names it.
    #[error("{message}")]
    InvalidParam { param: String, message: String },
    /// The waiting queue is full.
    #[error("the waiting queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The engine is shutting down or its thread has stopped.
    #[error("the engine is not accepting requests: {0}")]
    Unavailable(String),
    /// A model file could not be loaded or is not supported.
    #[error("model load failed: {0}")]
    Load(String),
    /// A LoRA adapter was refused (bad config, files, shapes, rank); the registry is unchanged.
    #[error("{0}")]
    Adapter(String),
    /// Tokenizer or chat template failure.
    #[error("{0}")]
    Tokenizer(String),
    /// The CUDA device, its driver or NVRTC is missing or failed.
    #[error("CUDA: {0}")]
    Device(String),
    /// An internal failure during a step; the affected requests are aborted.
    #[error("internal engine error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        EngineError::InvalidParam { param: param.to_string(), message: message.into() }
    }

    /// What `submit` answers once an internal error stopped the engine (`why`: the panic's
    /// message).
    pub fn stopped(why: &str) -> Self {
        EngineError::Unavailable(format!("the engine stopped after an internal error ({why})"))
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Load(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
