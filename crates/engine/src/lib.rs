//! tessera's engine: everything that turns token ids into token ids. No HTTP here.
//!
//! The public surface is [`EngineHandle`] (an actor handle around the engine thread),
//! [`GenerateRequest`] / [`SamplingParams`] going in and [`TokenEvent`] coming out.

pub mod adapters;
pub mod bench;
pub mod chat;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod detok;
pub mod engine;
pub mod error;
pub mod handle;
pub mod kv_cache;
pub mod loader;
pub mod lora;
pub mod model;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod stop;
pub mod threadpool;
pub mod tokenizer;

pub use config::{Device, EngineConfig, KvDtype, PromptActs, Quantize};
pub use engine::Engine;
pub use error::{EngineError, Result};
pub use handle::{EngineHandle, EngineStats, ModelInfo, RequestId, RequestStream, StepObserver, StepStats};
pub use request::{FinishInfo, FinishReason, GenerateRequest, SamplingParams, TokenEvent, TokenLogprob};
