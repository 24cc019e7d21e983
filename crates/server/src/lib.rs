//! tessera's HTTP server: the OpenAI-compatible API in front of the engine.
//!
//! ```text
//! HTTP JSON ─► error::AppJson ─► openai (wire types) ─► validate (Plan) ─► generate::submit
//!                                                                              │ Backend::submit
//! JSON / stream (SSE) ◄── generate::collect_all / stream::respond ◄── Tracked (metrics, log line)
//! ```
//!
//! The router's state holds the engine behind [`backend::Backend`], so handler tests run
//! against [`fake::FakeBackend`] and need no model.

pub mod backend;
pub mod commands;
pub mod config;
pub mod error;
pub mod fake;
pub mod generate;
pub mod lora;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod serve;
pub mod state;
pub mod stream;
pub mod validate;

#[cfg(test)]
mod api_tests;
#[cfg(test)]
mod lora_tests;

pub use backend::{Backend, EngineBackend};
pub use error::ApiError;
pub use routes::router;
pub use state::{AppState, ServerOptions};
