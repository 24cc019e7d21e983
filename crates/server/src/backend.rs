//! What the HTTP layer needs from an engine, as small traits, so handler tests run
//! against a fake (see [`crate::fake`]) and need no model.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use engine::chat::{ChatMessage, ChatTemplate};
use engine::handle::LoraActivity;
use engine::model::ModelConfig;
use engine::tokenizer::Tokenizer;
use engine::{EngineError, EngineHandle, GenerateRequest, ModelInfo, RequestStream};

/// Gauges read at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineLoad {
    pub running: usize,
    pub waiting: usize,
    /// Fraction of KV blocks in use, 0..1.
    pub kv_cache_usage: f64,
    /// Adapter names of the running and of the waiting requests (sorted, distinct).
    pub lora: LoraActivity,
}

/// The generation engine behind the API.
pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;
    /// The base model's shapes (LoRA adapters are validated against them).
    fn model_config(&self) -> &ModelConfig;
    /// Queues a request; refuses with the numbers what can never fit.
    fn submit(&self, req: GenerateRequest) -> Result<RequestStream, EngineError>;
    fn load(&self) -> EngineLoad;
    /// Text <-> token ids.
    fn codec(&self) -> &dyn TextCodec;
    /// The chat template; `None` when the model has none.
    fn chat(&self) -> Option<&dyn ChatRender>;
    /// Refuse new requests from now on; running ones go on.
    fn stop_accepting(&self);
    /// End every running and waiting request with finish reason `abort`.
    fn abort_all(&self);
    /// Stop the engine thread.
    fn shutdown(&self);
    /// Why the engine stopped on its own (an internal error ended every request), if it did.
    fn failure(&self) -> Option<String>;
}

/// Tokenization as the API needs it.
pub trait TextCodec: Send + Sync {
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, EngineError>;
    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError>;
    /// The raw bytes of one token (for logprobs); empty for an unknown id.
    fn token_bytes(&self, id: u32) -> Vec<u8>;
    /// Whether plain prompts get a BOS token in front.
    fn add_bos_default(&self) -> bool;
}

/// A chat template.
pub trait ChatRender: Send + Sync {
    fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError>;
}

impl TextCodec for Tokenizer {
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, EngineError> {
        Tokenizer::encode(self, text, add_bos)
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        Tokenizer::decode(self, ids, skip_special)
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        Tokenizer::token_bytes(self, id).to_vec()
    }

    fn add_bos_default(&self) -> bool {
        Tokenizer::add_bos_default(self)
    }
}

impl ChatRender for ChatTemplate {
    fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        ChatTemplate::render(self, messages, add_generation_prompt)
    }
}

/// The real engine.
pub struct EngineBackend {
    handle: EngineHandle,
}

impl EngineBackend {
    pub fn new(handle: EngineHandle) -> Arc<Self> {
        Arc::new(EngineBackend { handle })
    }
}

impl Backend for EngineBackend {
    fn info(&self) -> &ModelInfo {
        self.handle.info()
    }

    fn model_config(&self) -> &ModelConfig {
        self.handle.model_config()
    }

    fn submit(&self, req: GenerateRequest) -> Result<RequestStream, EngineError> {
        self.handle.submit(req)
    }

    fn load(&self) -> EngineLoad {
        let stats = self.handle.stats();
        EngineLoad {
            running: stats.num_running.load(Ordering::Relaxed),
            waiting: stats.num_waiting.load(Ordering::Relaxed),
            kv_cache_usage: self.handle.kv_cache_usage(),
            lora: stats.lora.lock().map(|l| l.clone()).unwrap_or_default(),
        }
    }

    fn codec(&self) -> &dyn TextCodec {
        self.handle.tokenizer().as_ref()
    }

    fn chat(&self) -> Option<&dyn ChatRender> {
        self.handle
            .chat_template()
            .map(|t| t.as_ref() as &dyn ChatRender)
    }

    fn stop_accepting(&self) {
        self.handle.stop_accepting();
    }

    fn failure(&self) -> Option<String> {
        self.handle.failure().map(str::to_string)
    }

    fn abort_all(&self) {
        self.handle.abort_all();
    }

    fn shutdown(&self) {
        self.handle.shutdown();
    }
}
