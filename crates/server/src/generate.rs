//! Submitting a [`Plan`] to the engine, following each request (metrics and the one log
//! line per request), collecting whole answers, and the logprobs shapes.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use engine::{FinishInfo, FinishReason, RequestStream, TokenEvent, TokenLogprob};

use crate::backend::TextCodec;
use crate::error::ApiError;
use crate::metrics::{LoraMetrics, ModelMetrics};
use crate::openai::{ChatLogprob, ChatLogprobs, CompletionLogprobs, TopLogprob};
use crate::state::Loaded;
use crate::validate::Plan;

/// One engine request followed to its end. Dropping it before the end cancels the
/// request in the engine (the receiver goes away) and logs the cancellation.
pub struct Tracked {
    stream: RequestStream,
    metrics: Arc<ModelMetrics>,
    /// The counters of the request's adapter, if it has one.
    lora: Option<Arc<LoraMetrics>>,
    api_id: Arc<str>,
    /// Choice index within the response.
    pub index: usize,
    submitted: Instant,
    last_token: Option<Instant>,
    completion_tokens: usize,
    done: bool,
}

impl Tracked {
    pub fn new(
        stream: RequestStream,
        metrics: Arc<ModelMetrics>,
        api_id: Arc<str>,
        index: usize,
    ) -> Self {
        metrics.on_submitted(stream.prompt_tokens);
        Tracked {
            stream,
            metrics,
            lora: None,
            api_id,
            index,
            submitted: Instant::now(),
            last_token: None,
            completion_tokens: 0,
            done: false,
        }
    }

    /// Also counts the request under its adapter.
    pub fn with_lora(mut self, lora: Option<Arc<LoraMetrics>>) -> Self {
        if let Some(l) = &lora {
            l.on_submitted(self.stream.prompt_tokens);
        }
        self.lora = lora;
        self
    }

    pub fn prompt_tokens(&self) -> usize {
        self.stream.prompt_tokens
    }

    /// The next event; `None` after the final one. An engine that drops the request
    /// without a final event yields an error.
    pub async fn next(&mut self) -> Option<Result<TokenEvent, ApiError>> {
        if self.done {
            return None;
        }
        let Some(ev) = self.stream.recv().await else {
            self.done = true;
            tracing::warn!(id = %self.api_id, engine_id = %self.stream.id, "the engine ended a request without a result");
            return Some(Err(ApiError::Internal(
                "the engine ended the request without a result".into(),
            )));
        };
        if !ev.token_ids.is_empty() {
            let now = Instant::now();
            self.metrics
                .on_tokens(ev.token_ids.len(), self.last_token.map(|t| now - t));
            if let Some(l) = &self.lora {
                l.on_tokens(ev.token_ids.len());
            }
            self.last_token = Some(now);
            self.completion_tokens += ev.token_ids.len();
        }
        if let Some(f) = &ev.finish {
            self.done = true;
            self.metrics.on_finished(f);
            if let Some(l) = &self.lora {
                l.on_finished(f);
            }
            self.log_finished(f);
        }
        Some(Ok(ev))
    }

    fn log_finished(&self, f: &FinishInfo) {
        let ms = |a: Instant, b: Option<Instant>| b.map(|b| millis(b.saturating_duration_since(a)));
        tracing::info!(
            id = %self.api_id,
            choice = self.index,
            engine_id = %self.stream.id,
            prompt_tokens = f.prompt_tokens,
            completion_tokens = f.completion_tokens,
            finish_reason = f.reason.as_str(),
            queue_ms = ms(f.arrived, f.first_scheduled),
            ttft_ms = ms(f.arrived, f.first_token),
            total_ms = millis(f.finished.saturating_duration_since(f.arrived)),
            preemptions = f.preemptions,
            "request finished"
        );
    }
}

/// Milliseconds rounded to 0.1 for log lines.
fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(
                id = %self.api_id,
                choice = self.index,
                engine_id = %self.stream.id,
                prompt_tokens = self.stream.prompt_tokens,
                completion_tokens = self.completion_tokens,
                total_ms = millis(self.submitted.elapsed()),
                "request cancelled before it finished (client gone, or a sibling choice refused)"
            );
            // The engine aborts it at its next step; count it as vLLM does.
            self.metrics.on_aborted();
            if let Some(l) = &self.lora {
                l.on_aborted();
            }
        }
    }
}

/// Submits every choice of `plan` (each with the plan's adapter); on a refusal the ones
/// already submitted are dropped (cancelled) and the refusal is returned.
pub fn submit(plan: &Plan, loaded: &Loaded, api_id: &Arc<str>) -> Result<Vec<Tracked>, ApiError> {
    let lora = plan
        .adapter
        .as_ref()
        .map(|a| Arc::new(loaded.metrics.lora(&a.name)));
    plan.requests()
        .into_iter()
        .enumerate()
        .map(|(i, req)| {
            let s = loaded.backend.submit(req)?;
            Ok(Tracked::new(s, loaded.metrics.clone(), api_id.clone(), i).with_lora(lora.clone()))
        })
        .collect()
}

/// A whole answer of one choice.
#[derive(Debug)]
pub struct Collected {
    pub index: usize,
    pub prompt_tokens: usize,
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: FinishInfo,
}

/// Reads one choice to its end; an engine failure becomes an error.
pub async fn collect(mut t: Tracked) -> Result<Collected, ApiError> {
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some(ev) = t.next().await {
        let ev = ev?;
        text.push_str(&ev.text);
        logprobs.extend(ev.logprobs);
        if let Some(finish) = ev.finish {
            if finish.reason == FinishReason::Error {
                return Err(engine_failure());
            }
            return Ok(Collected {
                index: t.index,
                prompt_tokens: t.prompt_tokens(),
                text,
                logprobs,
                finish,
            });
        }
    }
    Err(ApiError::Internal(
        "the engine ended the request without a result".into(),
    ))
}

/// Reads every choice concurrently, in choice order.
pub async fn collect_all(choices: Vec<Tracked>) -> Result<Vec<Collected>, ApiError> {
    futures::future::join_all(choices.into_iter().map(collect))
        .await
        .into_iter()
        .collect()
}

pub fn engine_failure() -> ApiError {
    ApiError::Internal("the engine failed while generating this request".into())
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: Arc<str>,
    pub created: u64,
    pub model: String,
}

/// Prompt tokens of a response: each prompt counted once, whatever `n` is.
pub fn prompt_usage(n: usize, per_choice: impl Iterator<Item = usize>) -> usize {
    per_choice.step_by(n.max(1)).sum()
}

/// A fresh response id such as `chatcmpl-5f3a...`: random per process, unique per request.
pub fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    format!("{prefix}-{:016x}{:08x}", h.finish(), n as u32)
}

/// -inf (impossible tokens) cannot go in JSON; OpenAI-compatible servers send -9999.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

fn token_text(codec: &dyn TextCodec, id: u32) -> String {
    String::from_utf8_lossy(&codec.token_bytes(id)).into_owned()
}

/// The legacy completions shape; `offset` is the length (in chars) of the choice's text
/// before these tokens, and is moved past them.
pub fn completion_logprobs(
    codec: &dyn TextCodec,
    lps: &[TokenLogprob],
    offset: &mut usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for lp in lps {
        let tok = token_text(codec, lp.token_id);
        out.text_offset.push(*offset);
        *offset += tok.chars().count();
        out.tokens.push(tok);
        out.token_logprobs.push(finite(lp.logprob));
        let top: BTreeMap<String, f32> = lp
            .top
            .iter()
            .map(|&(id, l)| (token_text(codec, id), finite(l)))
            .collect();
        out.top_logprobs.push(top);
    }
    out
}

/// The chat shape: one entry per token with its bytes and the top alternatives.
pub fn chat_logprobs(codec: &dyn TextCodec, lps: &[TokenLogprob]) -> ChatLogprobs {
    let entry = |id: u32| {
        let bytes = codec.token_bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let content = lps
        .iter()
        .map(|lp| {
            let (token, bytes) = entry(lp.token_id);
            let top_logprobs = lp
                .top
                .iter()
                .map(|&(id, l)| {
                    let (token, bytes) = entry(id);
                    TopLogprob {
                        token,
                        logprob: finite(l),
                        bytes,
                    }
                })
                .collect();
            ChatLogprob {
                token,
                logprob: finite(lp.logprob),
                bytes,
                top_logprobs,
            }
        })
        .collect();
    ChatLogprobs { content }
}
