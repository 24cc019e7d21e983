//! Wire request -> [`Plan`]: the engine requests to submit and how to answer.
//!
//! Every error names the parameter and the value given. The engine checks the sampling
//! ranges again at submit; doing it here first means no request of an `n > 1` batch is
//! submitted when another would be refused.

use std::sync::Arc;

use engine::chat::ChatMessage;
use engine::lora::LoraAdapter;
use engine::request::MAX_LOGPROBS;
use engine::{GenerateRequest, SamplingParams};

use crate::backend::Backend;
use crate::error::ApiError;
use crate::openai::{
    ChatMessageIn, ChatRequest, CompletionRequest, PromptInput, PromptItem, SamplingFields,
};

/// Most choices (`n`) per request.
pub const MAX_N: usize = 128;
/// Most engine requests per HTTP request (prompts x n).
pub const MAX_CHOICES: usize = 256;
/// Most stop strings per request.
pub const MAX_STOP: usize = 64;
/// Completions' default `max_tokens` (OpenAI's).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// A validated request.
#[derive(Debug, Clone)]
pub struct Plan {
    pub prompts: Vec<PlannedPrompt>,
    /// The parameters of choice 0; choice `i` of a seeded request gets `seed + i`.
    pub params: SamplingParams,
    /// Choices per prompt.
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// The adapter every choice runs with (the request's `model` named it); `None`: the base.
    pub adapter: Option<Arc<LoraAdapter>>,
}

#[derive(Debug, Clone)]
pub struct PlannedPrompt {
    pub ids: Vec<u32>,
    /// Text put in front of the completion (`echo`).
    pub echo: Option<String>,
}

impl Plan {
    /// One engine request per choice, in choice order (`prompt * n + i`).
    pub fn requests(&self) -> Vec<GenerateRequest> {
        let mut out = Vec::with_capacity(self.prompts.len() * self.n);
        for p in &self.prompts {
            for i in 0..self.n {
                let mut params = self.params.clone();
                params.seed = self.params.seed.map(|s| s.wrapping_add(i as u64));
                out.push(GenerateRequest {
                    prompt_ids: p.ids.clone(),
                    params,
                    adapter: self.adapter.clone(),
                });
            }
        }
        out
    }

    /// The echoed prompt text of a choice, if any.
    pub fn echo_of(&self, choice: usize) -> Option<&str> {
        self.prompts
            .get(choice / self.n.max(1))
            .and_then(|p| p.echo.as_deref())
    }
}

pub fn completion(req: &CompletionRequest, b: &dyn Backend) -> Result<Plan, ApiError> {
    let f = &req.fields;
    let logprobs = f
        .logprobs
        .map(|k| count_in("logprobs", k, MAX_LOGPROBS))
        .transpose()?;
    let max_tokens = MaxTokens {
        given: req.sampling.max_tokens,
        name: "max_tokens",
        default: DEFAULT_COMPLETION_MAX_TOKENS as i64,
    };
    let (mut params, n) = sampling(&req.sampling, max_tokens)?;
    params.logprobs = logprobs;
    let echo = f.echo.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::Unsupported {
            param: "echo".into(),
            message: "`echo` together with `logprobs` needs prompt logprobs, which tessera does not compute yet".into(),
        });
    }
    if let Some(best_of) = f.best_of {
        if best_of != n as i64 {
            return Err(ApiError::Unsupported {
                param: "best_of".into(),
                message: format!("best_of ({best_of}) different from n ({n}) is not supported"),
            });
        }
    }
    let Some(prompt) = &f.prompt else {
        return Err(ApiError::invalid("prompt", "`prompt` is required"));
    };
    if prompt.0.len() * n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts x n = {n} is more than {MAX_CHOICES} choices per request",
                prompt.0.len()
            ),
        ));
    }
    let prompts = completion_prompts(prompt, echo, b)?;
    params.validate(b.info().vocab_size)?;
    let (stream, include_usage) = stream_flags(&req.sampling);
    Ok(Plan {
        prompts,
        params,
        n,
        stream,
        include_usage,
        adapter: None,
    })
}

/// Tokenizes each prompt (token-id prompts pass through); keeps the text to echo.
fn completion_prompts(
    prompt: &PromptInput,
    echo: bool,
    b: &dyn Backend,
) -> Result<Vec<PlannedPrompt>, ApiError> {
    let (codec, vocab) = (b.codec(), b.info().vocab_size);
    let mut prompts = Vec::with_capacity(prompt.0.len());
    for item in &prompt.0 {
        let (ids, text) = match item {
            PromptItem::Text(t) => (codec.encode(t, codec.add_bos_default())?, Some(t)),
            PromptItem::Ids(ids) => (ids.clone(), None),
        };
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "prompt",
                "the prompt is empty: give at least one token",
            ));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            let msg = format!("prompt token id {bad} is outside the vocabulary (size {vocab})");
            return Err(ApiError::invalid("prompt", msg));
        }
        let echo = match (echo, text) {
            (false, _) => None,
            (true, Some(t)) => Some(t.clone()),
            (true, None) => Some(codec.decode(&ids, false)?),
        };
        prompts.push(PlannedPrompt { ids, echo });
    }
    Ok(prompts)
}

pub fn chat(req: &ChatRequest, b: &dyn Backend) -> Result<Plan, ApiError> {
    let f = &req.fields;
    let messages = chat_messages(f.messages.as_deref())?;
    let top = f
        .top_logprobs
        .map(|k| count_in("top_logprobs", k, MAX_LOGPROBS))
        .transpose()?;
    let logprobs = match (f.logprobs.unwrap_or(false), top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs ({k}) needs `logprobs: true`"),
            ))
        }
        (false, _) => None,
    };
    let Some(template) = b.chat() else {
        return Err(ApiError::invalid(
            "messages",
            "this model has no chat template; use /v1/completions with a plain prompt",
        ));
    };
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let ids = b.codec().encode(&text, false)?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the rendered conversation is empty",
        ));
    }
    // Without a limit, generate until the context (or the whole KV cache) is full.
    let info = b.info();
    let room = info
        .max_model_len
        .min(info.kv_cache_tokens)
        .saturating_sub(ids.len())
        .max(1) as i64;
    let max_tokens = match f.max_completion_tokens {
        Some(v) => MaxTokens {
            given: Some(v),
            name: "max_completion_tokens",
            default: room,
        },
        None => MaxTokens {
            given: req.sampling.max_tokens,
            name: "max_tokens",
            default: room,
        },
    };
    let (mut params, n) = sampling(&req.sampling, max_tokens)?;
    params.logprobs = logprobs;
    params.validate(b.info().vocab_size)?;
    let (stream, include_usage) = stream_flags(&req.sampling);
    Ok(Plan {
        prompts: vec![PlannedPrompt { ids, echo: None }],
        params,
        n,
        stream,
        include_usage,
        adapter: None,
    })
}

fn stream_flags(s: &SamplingFields) -> (bool, bool) {
    let stream = s.stream.unwrap_or(false);
    let usage = stream
        && s.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
    (stream, usage)
}

const ROLES: &str = "system, developer, user or assistant";

fn chat_messages(messages: Option<&[ChatMessageIn]>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(messages) = messages else {
        return Err(ApiError::invalid("messages", "`messages` is required"));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` is empty: give at least one message",
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" | "function" => {
                return Err(ApiError::Unsupported {
                    param: format!("messages[{i}].role"),
                    message: format!(
                        "messages[{i}]: role `{}` is not supported yet (no tool calling)",
                        m.role
                    ),
                })
            }
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("messages[{i}]: unknown role `{other}`; expected {ROLES}"),
                ))
            }
        };
        for (name, v) in [
            ("tool_calls", &m.tool_calls),
            ("tool_call_id", &m.tool_call_id),
            ("function_call", &m.function_call),
        ] {
            if v.as_ref()
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
            {
                return Err(ApiError::Unsupported {
                    param: format!("messages[{i}].{name}"),
                    message: format!(
                        "messages[{i}].{name}: tool calling is not supported by tessera yet"
                    ),
                });
            }
        }
        let content = match (&m.content, role) {
            (Some(c), _) => c.0.clone(),
            (None, "assistant") => String::new(),
            (None, _) => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].content"),
                    format!("messages[{i}]: `content` is required"),
                ))
            }
        };
        out.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    Ok(out)
}

fn count_in(param: &str, v: i64, max: usize) -> Result<usize, ApiError> {
    usize::try_from(v)
        .ok()
        .filter(|&k| k <= max)
        .ok_or_else(|| ApiError::invalid(param, format!("{param} must be in 0..={max}, got {v}")))
}

fn float(
    param: &str,
    v: Option<f64>,
    default: f32,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && ok(x) => Ok(x as f32),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("{param} must be {range}, got {x}"),
        )),
    }
}

/// The completion length limit as given, under the name it was given.
struct MaxTokens {
    given: Option<i64>,
    name: &'static str,
    default: i64,
}

/// The shared sampling fields -> engine parameters and `n`.
fn sampling(s: &SamplingFields, max: MaxTokens) -> Result<(SamplingParams, usize), ApiError> {
    let n = s.n.unwrap_or(1);
    if !(1..=MAX_N as i64).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be in 1..={MAX_N}, got {n}"),
        ));
    }
    let max_tokens = max.given.unwrap_or(max.default);
    if max_tokens < 1 {
        let name = max.name;
        return Err(ApiError::invalid(
            name,
            format!("{name} must be at least 1, got {max_tokens}"),
        ));
    }
    let top_k = match s.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1, 0 (off) or positive, got {k}"),
            ))
        }
    };
    let params = SamplingParams {
        max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
        temperature: float("temperature", s.temperature, 1.0, |x| x >= 0.0, ">= 0")?,
        top_p: float("top_p", s.top_p, 1.0, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?,
        top_k,
        min_p: float(
            "min_p",
            s.min_p,
            0.0,
            |x| (0.0..=1.0).contains(&x),
            "in [0, 1]",
        )?,
        presence_penalty: float(
            "presence_penalty",
            s.presence_penalty,
            0.0,
            |x| (-2.0..=2.0).contains(&x),
            "in [-2, 2]",
        )?,
        frequency_penalty: float(
            "frequency_penalty",
            s.frequency_penalty,
            0.0,
            |x| (-2.0..=2.0).contains(&x),
            "in [-2, 2]",
        )?,
        repetition_penalty: float(
            "repetition_penalty",
            s.repetition_penalty,
            1.0,
            |x| x > 0.0,
            "> 0",
        )?,
        logit_bias: logit_bias(s)?,
        seed: seed(s)?,
        stop: stops(s)?,
        stop_token_ids: stop_token_ids(s)?,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        logprobs: None,
        skip_special_tokens: s.skip_special_tokens.unwrap_or(true),
    };
    Ok((params, n as usize))
}

fn logit_bias(s: &SamplingFields) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = &s.logit_bias else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(k, &v)| {
            let id = k.trim().parse::<u32>().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias key `{k}` is not a token id"),
                )
            })?;
            if !v.is_finite() || !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias values must be in [-100, 100], got {v} for token {id}"),
                ));
            }
            Ok((id, v as f32))
        })
        .collect()
}

fn seed(s: &SamplingFields) -> Result<Option<u64>, ApiError> {
    let Some(n) = &s.seed else { return Ok(None) };
    n.as_u64()
        .or_else(|| n.as_i64().map(|x| x as u64))
        .map(Some)
        .ok_or_else(|| ApiError::invalid("seed", format!("seed must be an integer, got {n}")))
}

fn stops(s: &SamplingFields) -> Result<Vec<String>, ApiError> {
    let stop = s.stop.clone().unwrap_or_default().0;
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    Ok(stop)
}

fn stop_token_ids(s: &SamplingFields) -> Result<Vec<u32>, ApiError> {
    s.stop_token_ids
        .iter()
        .flatten()
        .map(|&id| {
            u32::try_from(id).map_err(|_| {
                ApiError::invalid(
                    "stop_token_ids",
                    format!("stop_token_ids must be token ids, got {id}"),
                )
            })
        })
        .collect()
}
