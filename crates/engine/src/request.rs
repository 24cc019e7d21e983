//! What goes into the engine and what comes out of it.

use std::time::Instant;

/// Sampling and stopping parameters of one request, already validated by the caller
/// (the server) and checked again by [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling; 1.0 disables it.
    pub top_p: f32,
    /// 0 disables it.
    pub top_k: usize,
    /// 0.0 disables it.
    pub min_p: f32,
    /// OpenAI-style additive penalties over the generated tokens.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// HF-style multiplicative penalty over prompt and generated tokens; 1.0 disables it.
    pub repetition_penalty: f32,
    /// Added to the logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// Per-request seed: the same seed gives the same tokens whatever else runs.
    pub seed: Option<u64>,
    /// Stop strings; the text returned ends before the stop string.
    pub stop: Vec<String>,
    /// Extra token ids that end the request (the token itself is not part of the text).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Number of top alternatives to return per generated token (None: no logprobs).
    pub logprobs: Option<usize>,
    /// Leave special tokens (such as `<|im_end|>`) out of the text.
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            skip_special_tokens: true,
        }
    }
}

/// Largest `logprobs` alternatives count accepted.
pub const MAX_LOGPROBS: usize = 20;

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams { max_tokens, temperature: 0.0, ..Default::default() }
    }

    /// Checks ranges; the error names the parameter and the value given.
    pub fn validate(&self, vocab_size: usize) -> crate::Result<()> {
        use crate::EngineError as E;
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(E::invalid(name, format!("{name} must be a finite number, got {v}")))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        if self.max_tokens == 0 {
            return Err(E::invalid("max_tokens", "max_tokens must be at least 1, got 0"));
        }
        if self.temperature < 0.0 {
            return Err(E::invalid("temperature", format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(E::invalid("top_p", format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(E::invalid("min_p", format!("min_p must be in [0, 1], got {}", self.min_p)));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(E::invalid(
                "presence_penalty",
                format!("presence_penalty must be in [-2, 2], got {}", self.presence_penalty),
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(E::invalid(
                "frequency_penalty",
                format!("frequency_penalty must be in [-2, 2], got {}", self.frequency_penalty),
            ));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(E::invalid(
                "repetition_penalty",
                format!("repetition_penalty must be > 0, got {}", self.repetition_penalty),
            ));
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(E::invalid("logit_bias", format!("logit_bias token id {id} is outside the vocabulary (size {vocab_size})")));
            }
            if !bias.is_finite() || !(-100.0..=100.0).contains(&bias) {
                return Err(E::invalid("logit_bias", format!("logit_bias values must be in [-100, 100], got {bias} for token {id}")));
            }
        }
        for &id in &self.stop_token_ids {
            if id as usize >= vocab_size {
                return Err(E::invalid("stop_token_ids", format!("stop token id {id} is outside the vocabulary (size {vocab_size})")));
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(E::invalid("logprobs", format!("logprobs must be at most {MAX_LOGPROBS}, got {n}")));
            }
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(E::invalid("stop", "stop strings must not be empty"));
        }
        Ok(())
    }
}

/// One generation request: token ids in, a stream of [`TokenEvent`]s out.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    /// The LoRA adapter version this request runs with to its end (None: the base).
    pub adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
}

/// A generated token with its log-probability and the top alternatives (when asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// Top alternatives, most likely first: (token id, logprob).
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// max_tokens or the context length reached.
    Length,
    /// Cancelled or ended at shutdown.
    Abort,
    /// An internal error ended it.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

/// Timings and counts of a finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishInfo {
    pub reason: FinishReason,
    /// The stop string or stop token that ended it, if any.
    pub stopped_by: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// When the request arrived at the engine.
    pub arrived: Instant,
    /// When it was first scheduled (None when it never ran).
    pub first_scheduled: Option<Instant>,
    /// When its first token was produced.
    pub first_token: Option<Instant>,
    pub finished: Instant,
    /// How often it was preempted.
    pub preemptions: usize,
}

/// One step's output for one request. Events arrive in order; the last one has `finish`.
/// The default: no text, no tokens, not final.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenEvent {
    /// Text that became final in this step (never half a UTF-8 character, never a part of
    /// a possible stop string); may be empty while text is held back.
    pub text: String,
    /// Token ids generated in this step (usually one; none in a pure finish event).
    pub token_ids: Vec<u32>,
    /// One entry per token id when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishInfo>,
}
