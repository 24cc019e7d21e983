//! Engine configuration, resolved by the caller (the server's `main`) and passed down.

use std::path::PathBuf;
use std::sync::Arc;

use crate::handle::StepObserver;

#[derive(Clone)]
pub struct EngineConfig {
    /// A `.gguf` file or a Hugging Face folder (config.json + *.safetensors + tokenizer.json).
    pub model: PathBuf,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Byte budget of the KV cache (all layers, K and V).
    pub kv_cache_bytes: usize,
    /// Most requests running in one step.
    pub max_num_seqs: usize,
    /// Most tokens in one step's packed forward (decode rows + prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Overrides the model's context length (must not exceed it).
    pub max_model_len: Option<usize>,
    /// Compute threads owned by the engine.
    pub threads: usize,
    /// Most requests waiting for their first step; more are refused with `QueueFull`.
    pub max_queued_requests: usize,
    /// Most distinct LoRA adapters in one step.
    pub max_loras: usize,
    /// Gets every step's statistics (metrics).
    pub observer: Option<Arc<dyn StepObserver>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: PathBuf::new(),
            block_size: 16,
            kv_cache_bytes: 512 << 20,
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: None,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            max_queued_requests: 1024,
            max_loras: 8,
            observer: None,
        }
    }
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("model", &self.model)
            .field("block_size", &self.block_size)
            .field("kv_cache_bytes", &self.kv_cache_bytes)
            .field("max_num_seqs", &self.max_num_seqs)
            .field("max_num_batched_tokens", &self.max_num_batched_tokens)
            .field("max_model_len", &self.max_model_len)
            .field("threads", &self.threads)
            .field("max_queued_requests", &self.max_queued_requests)
            .field("max_loras", &self.max_loras)
            .finish()
    }
}
