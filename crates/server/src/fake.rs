//! A fake [`Backend`] for handler tests: tokenizes by bytes, "generates" by echoing the
//! prompt back and then EOS, and can be told to refuse, hang or fail.
//!
//! ```text
//! vocabulary: 0..=255 the bytes, 256 = <s> (BOS), 257 = </s> (EOS)
//! chat:       "<|role|>content\n" per message, then "<|assistant|>"
//! answer:     the prompt's bytes (BOS left out), then EOS -> finish "stop";
//!             max_tokens first -> finish "length"
//! model:      a tiny Llama shape (see [`fake_model_config`]) that LoRA adapters are
//!             validated against; adapters change nothing in the answer
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use engine::chat::ChatMessage;
use engine::handle::LoraActivity;
use engine::model::{ModelConfig, RopeScaling, Variant};
use engine::{
    EngineError, FinishInfo, FinishReason, GenerateRequest, ModelInfo, RequestId, RequestStream,
    TokenEvent, TokenLogprob,
};
use tokio::sync::{mpsc, watch};

use crate::backend::{Backend, ChatRender, EngineLoad, TextCodec};

pub const BOS: u32 = 256;
pub const EOS: u32 = 257;
pub const VOCAB: usize = 258;

/// What the fake does with the next submissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FakeMode {
    /// Echo the prompt, then EOS.
    #[default]
    Echo,
    /// Refuse with `QueueFull`.
    QueueFull,
    /// Send one token, then wait for cancellation or `abort_all`.
    Hang,
    /// Send one token, then finish with an engine error.
    Fail,
}

#[derive(Default)]
struct Counters {
    running: AtomicUsize,
    cancelled: AtomicUsize,
    aborted: AtomicUsize,
    /// Adapter names of the running jobs (one entry per job).
    running_adapters: Mutex<Vec<String>>,
}

/// The fake model's shape: 2 layers, hidden 8, 2 query heads and 1 KV head of 4,
/// intermediate 16 (q_proj is [8, 8], k/v_proj [4, 8], gate/up [16, 8], down [8, 16]).
pub fn fake_model_config() -> ModelConfig {
    ModelConfig {
        name: "fake-model".into(),
        hidden_size: 8,
        intermediate_size: 16,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        vocab_size: VOCAB,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rope_interleaved: false,
        max_position_embeddings: 256,
        variant: Variant::llama(2, 4),
    }
}

pub struct FakeBackend {
    info: ModelInfo,
    model_config: ModelConfig,
    mode: Mutex<FakeMode>,
    with_template: bool,
    accepting: AtomicBool,
    next_id: AtomicU64,
    submitted: Mutex<Vec<GenerateRequest>>,
    failure: Mutex<Option<String>>,
    counters: Arc<Counters>,
    abort: watch::Sender<u64>,
}

impl FakeBackend {
    pub fn new() -> Arc<Self> {
        Self::build(true)
    }

    /// A model without a chat template.
    pub fn without_template() -> Arc<Self> {
        Self::build(false)
    }

    fn build(with_template: bool) -> Arc<Self> {
        let info = ModelInfo {
            name: "fake-model".into(),
            max_model_len: 256,
            vocab_size: VOCAB,
            kv_cache_tokens: 4096,
            kv_bytes_per_token: 64,
            window_kv_bytes_per_token: 0,
            window_tokens: 0,
            block_size: 16,
            num_blocks: 256,
            weight_bytes: 0,
        };
        Arc::new(FakeBackend {
            info,
            model_config: fake_model_config(),
            mode: Mutex::new(FakeMode::Echo),
            with_template,
            accepting: AtomicBool::new(true),
            next_id: AtomicU64::new(0),
            submitted: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            counters: Arc::default(),
            abort: watch::channel(0).0,
        })
    }

    pub fn set_mode(&self, mode: FakeMode) {
        if let Ok(mut m) = self.mode.lock() {
            *m = mode;
        }
    }

    /// From now on the engine reports itself stopped by an internal error, as the real
    /// one does after a panicked step, and refuses new requests. Unlike the real one it
    /// does not end the requests already running (tests of that use the real engine).
    pub fn fail(&self, why: &str) {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(why.into());
        }
    }

    /// Every request submitted so far.
    pub fn submitted(&self) -> Vec<GenerateRequest> {
        self.submitted.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn running(&self) -> usize {
        self.counters.running.load(Ordering::SeqCst)
    }

    /// Requests whose receiver was dropped before they finished.
    pub fn cancelled(&self) -> usize {
        self.counters.cancelled.load(Ordering::SeqCst)
    }

    /// Requests ended by `abort_all`.
    pub fn aborted(&self) -> usize {
        self.counters.aborted.load(Ordering::SeqCst)
    }

    fn mode(&self) -> FakeMode {
        self.mode.lock().map(|m| *m).unwrap_or_default()
    }
}

fn token_text(id: u32) -> String {
    match id {
        0..=255 => String::from_utf8_lossy(&[id as u8]).into_owned(),
        _ => String::new(),
    }
}

fn logprobs(id: u32, k: Option<usize>) -> Vec<TokenLogprob> {
    k.map(|k| {
        let top = (0..k)
            .map(|j| ((id + j as u32) % 256, -0.5 - j as f32))
            .collect();
        vec![TokenLogprob {
            token_id: id,
            logprob: -0.5,
            top,
        }]
    })
    .unwrap_or_default()
}

struct Job {
    req: GenerateRequest,
    mode: FakeMode,
    tx: mpsc::UnboundedSender<TokenEvent>,
    arrived: Instant,
    counters: Arc<Counters>,
    abort: watch::Receiver<u64>,
}

impl Job {
    async fn run(mut self) {
        let adapter = self.req.adapter.as_ref().map(|a| a.name.clone());
        self.adapters(|v| v.extend(adapter.clone()));
        self.counters.running.fetch_add(1, Ordering::SeqCst);
        let reason = self.generate().await;
        if let Some(name) = adapter {
            self.adapters(|v| {
                if let Some(i) = v.iter().position(|n| *n == name) {
                    v.remove(i);
                }
            });
        }
        self.counters.running.fetch_sub(1, Ordering::SeqCst);
        if reason.is_none() {
            self.counters.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn adapters(&self, f: impl FnOnce(&mut Vec<String>)) {
        if let Ok(mut v) = self.counters.running_adapters.lock() {
            f(&mut v);
        }
    }

    /// The finish reason sent, or None when the receiver went away first.
    async fn generate(&mut self) -> Option<FinishReason> {
        let answer: Vec<u32> = self
            .req
            .prompt_ids
            .iter()
            .copied()
            .filter(|&t| t < 256)
            .chain([EOS])
            .collect();
        let p = self.req.params.clone();
        let mut first_token = None;
        let mut n = 0;
        for &id in &answer {
            tokio::task::yield_now().await;
            if id == EOS && !p.ignore_eos {
                return self.finish(FinishReason::Stop, n, first_token);
            }
            if n == p.max_tokens {
                return self.finish(FinishReason::Length, n, first_token);
            }
            first_token.get_or_insert_with(Instant::now);
            n += 1;
            let ev = TokenEvent {
                text: token_text(id),
                token_ids: vec![id],
                logprobs: logprobs(id, p.logprobs),
                finish: None,
            };
            self.tx.send(ev).ok()?;
            match self.mode {
                FakeMode::Hang => return self.hang(n, first_token).await,
                FakeMode::Fail => return self.finish(FinishReason::Error, n, first_token),
                _ => {}
            }
        }
        self.finish(FinishReason::Length, n, first_token)
    }

    async fn hang(&mut self, n: usize, first_token: Option<Instant>) -> Option<FinishReason> {
        tokio::select! {
            () = self.tx.closed() => None,
            _ = self.abort.changed() => {
                self.counters.aborted.fetch_add(1, Ordering::SeqCst);
                self.finish(FinishReason::Abort, n, first_token)
            }
        }
    }

    fn finish(
        &self,
        reason: FinishReason,
        n: usize,
        first_token: Option<Instant>,
    ) -> Option<FinishReason> {
        let now = Instant::now();
        let info = FinishInfo {
            reason,
            stopped_by: None,
            prompt_tokens: self.req.prompt_ids.len(),
            completion_tokens: n,
            arrived: self.arrived,
            first_scheduled: Some(self.arrived),
            first_token,
            finished: now,
            preemptions: 0,
        };
        let ev = TokenEvent {
            text: String::new(),
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            finish: Some(info),
        };
        self.tx.send(ev).ok().map(|()| reason)
    }
}

impl Backend for FakeBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    fn submit(&self, req: GenerateRequest) -> Result<RequestStream, EngineError> {
        if let Some(why) = self.failure() {
            return Err(EngineError::stopped(&why));
        }
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(EngineError::Unavailable("the engine is draining".into()));
        }
        let mode = self.mode();
        if mode == FakeMode::QueueFull {
            return Err(EngineError::QueueFull(7));
        }
        req.params.validate(self.info.vocab_size)?;
        let total = req.prompt_ids.len().saturating_add(req.params.max_tokens);
        if total > self.info.max_model_len {
            return Err(EngineError::ContextLength(format!(
                "This model's maximum context length is {} tokens. However, you requested {total} tokens ({} in the prompt, {} for the completion).",
                self.info.max_model_len,
                req.prompt_ids.len(),
                req.params.max_tokens
            )));
        }
        if let Ok(mut s) = self.submitted.lock() {
            s.push(req.clone());
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::SeqCst));
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt_tokens = req.prompt_ids.len();
        let job = Job {
            req,
            mode,
            tx,
            arrived: Instant::now(),
            counters: self.counters.clone(),
            abort: self.abort.subscribe(),
        };
        tokio::spawn(job.run());
        Ok(RequestStream::from_receiver(id, prompt_tokens, rx))
    }

    fn load(&self) -> EngineLoad {
        let mut running = self
            .counters
            .running_adapters
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        running.sort();
        running.dedup();
        EngineLoad {
            running: self.running(),
            waiting: 0,
            kv_cache_usage: self.running() as f64 / 256.0,
            lora: LoraActivity {
                running,
                waiting: Vec::new(),
            },
        }
    }

    fn codec(&self) -> &dyn TextCodec {
        self
    }

    fn chat(&self) -> Option<&dyn ChatRender> {
        self.with_template.then_some(self as &dyn ChatRender)
    }

    fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    fn abort_all(&self) {
        self.abort.send_modify(|g| *g += 1);
    }

    fn shutdown(&self) {
        self.stop_accepting();
        self.abort_all();
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

impl TextCodec for FakeBackend {
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, EngineError> {
        Ok(add_bos
            .then_some(BOS)
            .into_iter()
            .chain(text.bytes().map(u32::from))
            .collect())
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        let mut out = Vec::new();
        for &id in ids {
            match id {
                0..=255 => out.push(id as u8),
                BOS if !skip_special => out.extend_from_slice(b"<s>"),
                EOS if !skip_special => out.extend_from_slice(b"</s>"),
                BOS | EOS => {}
                _ => {
                    return Err(EngineError::Tokenizer(format!(
                        "token id {id} is outside the vocabulary"
                    )))
                }
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        match id {
            0..=255 => vec![id as u8],
            BOS => b"<s>".to_vec(),
            EOS => b"</s>".to_vec(),
            _ => Vec::new(),
        }
    }

    fn add_bos_default(&self) -> bool {
        true
    }
}

impl ChatRender for FakeBackend {
    fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let mut s: String = messages
            .iter()
            .map(|m| format!("<|{}|>{}\n", m.role, m.content))
            .collect();
        if add_generation_prompt {
            s.push_str("<|assistant|>");
        }
        Ok(s)
    }
}
