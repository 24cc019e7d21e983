//! The engine as an actor: [`EngineHandle`] is a cheap `Clone` around a channel into the
//! engine thread, which owns the scheduler, the KV cache and the model.
//!
//! Each request gets its own receiver of [`TokenEvent`]s; dropping the receiver cancels
//! the request, and its blocks return to the pool at the next step.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::chat::ChatTemplate;
use crate::request::{GenerateRequest, TokenEvent};
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};

/// Issued by the engine handle, unique within a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// Facts about the loaded model that callers need.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The model's own name (GGUF `general.name` or the folder name).
    pub name: String,
    /// Longest prompt + completion, in tokens.
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Tokens of context the whole KV cache can hold.
    pub kv_cache_tokens: usize,
    /// KV cache bytes per token of context (all full-attention layers, K and V).
    pub kv_bytes_per_token: usize,
    /// Bytes per token of the sliding-window layers, which keep only `window_tokens`
    /// tokens per request (0 when the model has none).
    pub window_kv_bytes_per_token: usize,
    pub window_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// Bytes of weights one decode step reads (linear layers and output head, in their
    /// loaded format): the roofline of decode against memory bandwidth.
    pub weight_bytes: usize,
}

/// Gauges and counters the engine keeps up to date after every step.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub num_running: AtomicUsize,
    pub num_waiting: AtomicUsize,
    /// Used KV blocks (kv_cache_usage = used / ModelInfo::num_blocks).
    pub used_blocks: AtomicUsize,
    pub num_preemptions_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Names of the adapters of running and of waiting requests (sorted, distinct).
    pub lora: std::sync::Mutex<LoraActivity>,
    /// Set once when a step panicked: the engine thread ended every request with finish
    /// reason `error` and stopped; what the panic said.
    pub(crate) failure: std::sync::OnceLock<String>,
}

/// Which adapters are in use, for `tessera:lora_requests_info`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraActivity {
    pub running: Vec<String>,
    pub waiting: Vec<String>,
}

/// What one engine step did; given to the [`StepObserver`].
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Tokens in the packed forward (prefill chunk tokens + decode rows).
    pub num_tokens: usize,
    pub num_prefill_tokens: usize,
    pub num_decode_rows: usize,
    pub num_running: usize,
    pub num_waiting: usize,
    pub kv_cache_usage: f64,
    /// Requests preempted in this step.
    pub num_preempted: usize,
    pub duration: std::time::Duration,
}

/// Receives every step's statistics on the engine thread; keep it cheap.
pub trait StepObserver: Send + Sync {
    fn on_step(&self, stats: &StepStats);
}

pub(crate) enum Command {
    Add { id: RequestId, req: Box<GenerateRequest>, tx: mpsc::UnboundedSender<TokenEvent>, arrived: std::time::Instant },
    AbortAll,
    Shutdown,
}

/// The receiving end of one request. Dropping it cancels the request.
pub struct RequestStream {
    pub id: RequestId,
    /// Prompt length in tokens (for usage accounting before the first event).
    pub prompt_tokens: usize,
    rx: mpsc::UnboundedReceiver<TokenEvent>,
}

impl RequestStream {
    /// The next event; `None` after the final event (the one with `finish`).
    pub async fn recv(&mut self) -> Option<TokenEvent> {
        self.rx.recv().await
    }

    /// Blocking variant for non-async callers (the CLI, tests). Must not run inside a tokio runtime.
    pub fn blocking_recv(&mut self) -> Option<TokenEvent> {
        self.rx.blocking_recv()
    }
}

pub(crate) struct Shared {
    pub(crate) tx: std::sync::mpsc::Sender<Command>,
    pub(crate) info: ModelInfo,
    pub(crate) model_config: crate::model::ModelConfig,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) chat_template: Option<Arc<ChatTemplate>>,
    pub(crate) stats: Arc<EngineStats>,
    pub(crate) next_id: AtomicU64,
    pub(crate) accepting: AtomicBool,
    /// Requests submitted and not yet scheduled for the first time.
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) max_queued: usize,
}

/// Cheap to clone; all clones talk to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) shared: Arc<Shared>,
}

impl EngineHandle {
    /// Queues a request. Refuses at once (with the numbers) a request that can never fit:
    /// prompt + max_tokens beyond max_model_len or beyond the whole KV cache.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream> {
        let s = &self.shared;
        if let Some(why) = self.failure() {
            return Err(EngineError::stopped(why));
        }
        if !s.accepting.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable("the engine is draining".into()));
        }
        req.params.validate(s.info.vocab_size)?;
        let prompt_len = req.prompt_ids.len();
        if prompt_len == 0 {
            return Err(EngineError::invalid("prompt", "the prompt is empty: give at least one token"));
        }
        if let Some(&bad) = req.prompt_ids.iter().find(|&&t| t as usize >= s.info.vocab_size) {
            return Err(EngineError::invalid(
                "prompt",
                format!("prompt token id {bad} is outside the vocabulary (size {})", s.info.vocab_size),
            ));
        }
        let total = prompt_len.saturating_add(req.params.max_tokens);
        if total > s.info.max_model_len {
            return Err(EngineError::ContextLength(format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} for the completion). Please reduce the prompt or max_tokens.",
                s.info.max_model_len, total, prompt_len, req.params.max_tokens
            )));
        }
        if total > s.info.kv_cache_tokens {
            return Err(EngineError::ContextLength(format!(
                "The KV cache holds {} tokens in all, but this request needs {} ({} in the prompt, {} for the completion). Please reduce the prompt or max_tokens.",
                s.info.kv_cache_tokens, total, prompt_len, req.params.max_tokens
            )));
        }
        let queued = s.queued.fetch_add(1, Ordering::AcqRel);
        if queued >= s.max_queued {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::QueueFull(queued));
        }
        let id = RequestId(s.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        let arrived = std::time::Instant::now();
        if s.tx.send(Command::Add { id, req: Box::new(req), tx, arrived }).is_err() {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Unavailable("the engine thread has stopped".into()));
        }
        Ok(RequestStream { id, prompt_tokens: prompt_len, rx })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// The resolved configuration of the loaded model (adapters are validated against it).
    pub fn model_config(&self) -> &crate::model::ModelConfig {
        &self.shared.model_config
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.shared.tokenizer
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.shared.chat_template.as_ref()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// Why the engine stopped, if an internal error (a panic in a step) stopped it: every
    /// request it held ended with finish reason `error` and new ones are refused. A process
    /// in this state should be restarted (the server's `/health` answers 503).
    pub fn failure(&self) -> Option<&str> {
        self.shared.stats.failure.get().map(String::as_str)
    }

    /// Fraction of KV blocks in use, 0..1.
    pub fn kv_cache_usage(&self) -> f64 {
        let used = self.shared.stats.used_blocks.load(Ordering::Relaxed) as f64;
        used / self.shared.info.num_blocks.max(1) as f64
    }

    /// Stop taking new requests (submit answers `Unavailable`); running ones go on.
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::Acquire)
    }

    /// End every running and waiting request with finish reason `abort`.
    pub fn abort_all(&self) {
        let _ = self.shared.tx.send(Command::AbortAll);
    }

    /// Ends the engine thread after aborting everything.
    pub fn shutdown(&self) {
        self.stop_accepting();
        let _ = self.shared.tx.send(Command::Shutdown);
    }
}

impl RequestStream {
    /// A stream fed by the given receiver: for test doubles of the engine.
    pub fn from_receiver(id: RequestId, prompt_tokens: usize, rx: mpsc::UnboundedReceiver<TokenEvent>) -> Self {
        RequestStream { id, prompt_tokens, rx }
    }
}
