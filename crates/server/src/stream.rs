//! Server-sent events for completions and chat.
//!
//! ```text
//! chat:         data: {role chunk, one per choice}      (delta: {"role":"assistant","content":""})
//!               data: {content delta}*                  (choices of n > 1 interleave by index)
//!               data: {final chunk with finish_reason}  (one per choice)
//!               data: {"choices":[], "usage":{...}}     (only with stream_options.include_usage)
//!               data: [DONE]
//! completions:  the same without the role chunk; with echo, the prompt text comes first.
//! failure:      data: {"error":{...}} then data: [DONE]
//! ```
//!
//! The body owns every engine request: a client that disconnects drops the body, which
//! drops the request streams, which cancels them in the engine at its next step.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use engine::{FinishReason, TokenEvent};
use futures::stream::{self, BoxStream, SelectAll, StreamExt};

use crate::backend::Backend;
use crate::error::{to_json, ApiError};
use crate::generate::{chat_logprobs, completion_logprobs, engine_failure, ResponseMeta, Tracked};
use crate::openai::{
    ChatChoice, ChatDelta, ChatLogprobs, ChatResponse, CompletionChoice, CompletionLogprobs,
    CompletionResponse, Usage,
};
use crate::state::InflightGuard;

/// Which API the stream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// How to shape the chunks of one streamed response.
pub struct StreamSpec {
    pub kind: Kind,
    pub meta: ResponseMeta,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Per choice: the echoed prompt text (completions with `echo`).
    pub echo: Vec<Option<String>>,
    /// Prompt tokens of the whole response (each prompt once).
    pub prompt_tokens: usize,
    pub backend: Arc<dyn Backend>,
}

type ChoiceStream = BoxStream<'static, (usize, Result<TokenEvent, ApiError>)>;

struct SseState {
    spec: StreamSpec,
    merged: SelectAll<ChoiceStream>,
    usage: Usage,
    /// Per choice: chars sent so far (for completions' `text_offset`).
    offsets: Vec<usize>,
    started: bool,
    finished: bool,
    _inflight: InflightGuard,
}

/// The SSE response for already-submitted choices.
pub fn respond(spec: StreamSpec, choices: Vec<Tracked>, inflight: InflightGuard) -> Response {
    let offsets = spec
        .echo
        .iter()
        .map(|e| e.as_ref().map_or(0, |t| t.chars().count()))
        .collect();
    let mut usage = Usage::default();
    usage.add(spec.prompt_tokens, 0);
    let merged = stream::select_all(choices.into_iter().map(choice_stream));
    let state = SseState {
        spec,
        merged,
        usage,
        offsets,
        started: false,
        finished: false,
        _inflight: inflight,
    };
    let events = stream::unfold(state, |mut s| async move {
        let batch = s.advance().await?;
        Some((
            stream::iter(batch.into_iter().map(Ok::<Event, Infallible>)),
            s,
        ))
    })
    .flatten();
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn choice_stream(t: Tracked) -> ChoiceStream {
    stream::unfold(t, |mut t| async move {
        let index = t.index;
        t.next().await.map(|ev| ((index, ev), t))
    })
    .boxed()
}

fn done() -> Event {
    Event::default().data("[DONE]")
}

fn error_event(e: &ApiError) -> Event {
    Event::default().data(to_json(&e.body()))
}

impl SseState {
    /// The events of the next step; `None` once `[DONE]` was sent.
    async fn advance(&mut self) -> Option<Vec<Event>> {
        if self.finished {
            return None;
        }
        if !self.started {
            self.started = true;
            return Some(self.opening());
        }
        match self.merged.next().await {
            None => {
                self.finished = true;
                let mut out = Vec::new();
                if self.spec.include_usage {
                    out.push(self.usage_event());
                }
                out.push(done());
                Some(out)
            }
            Some((_, Err(e))) => Some(self.fail(&e)),
            Some((index, Ok(ev))) => Some(self.on_event(index, ev)),
        }
    }

    fn fail(&mut self, e: &ApiError) -> Vec<Event> {
        self.finished = true;
        // Dropping the other choices cancels them in the engine.
        self.merged = SelectAll::new();
        vec![error_event(e), done()]
    }

    /// Chat: the role chunk of every choice. Completions: the echoed prompts.
    fn opening(&mut self) -> Vec<Event> {
        let n = self.spec.echo.len();
        match self.spec.kind {
            Kind::Chat => (0..n)
                .map(|i| {
                    let delta = ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    };
                    self.chat_chunk(i, delta, None, None)
                })
                .collect(),
            Kind::Completion => (0..n)
                .filter_map(|i| {
                    let text = self.spec.echo[i].clone().filter(|t| !t.is_empty())?;
                    Some(self.completion_chunk(i, text, None, None))
                })
                .collect(),
        }
    }

    fn on_event(&mut self, index: usize, ev: TokenEvent) -> Vec<Event> {
        let mut out = Vec::new();
        if !ev.text.is_empty() || !ev.logprobs.is_empty() {
            out.push(self.content_chunk(index, &ev));
        }
        if let Some(f) = &ev.finish {
            if f.reason == FinishReason::Error {
                out.extend(self.fail(&engine_failure()));
                return out;
            }
            self.usage.add(0, f.completion_tokens);
            let reason = Some(f.reason.as_str());
            out.push(match self.spec.kind {
                Kind::Chat => self.chat_chunk(index, ChatDelta::default(), None, reason),
                Kind::Completion => self.completion_chunk(index, String::new(), None, reason),
            });
        }
        out
    }

    fn content_chunk(&mut self, index: usize, ev: &TokenEvent) -> Event {
        let codec = self.spec.backend.codec();
        match self.spec.kind {
            Kind::Chat => {
                let lp = self
                    .spec
                    .logprobs
                    .then(|| chat_logprobs(codec, &ev.logprobs));
                let delta = ChatDelta {
                    role: None,
                    content: Some(ev.text.clone()),
                };
                self.chat_chunk(index, delta, lp, None)
            }
            Kind::Completion => {
                let mut offset = self.offsets.get(index).copied().unwrap_or(0);
                let lp = self
                    .spec
                    .logprobs
                    .then(|| completion_logprobs(codec, &ev.logprobs, &mut offset));
                if let Some(o) = self.offsets.get_mut(index) {
                    *o = offset;
                }
                self.completion_chunk(index, ev.text.clone(), lp, None)
            }
        }
    }

    fn chat_chunk(
        &self,
        index: usize,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> Event {
        let choice = ChatChoice {
            index,
            message: None,
            delta: Some(delta),
            logprobs,
            finish_reason,
        };
        self.chunk_event_chat(vec![choice], None)
    }

    fn completion_chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> Event {
        let choice = CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason,
        };
        self.chunk_event_completion(vec![choice], None)
    }

    /// The usage chunk: no choices, the whole response's usage.
    fn usage_event(&self) -> Event {
        match self.spec.kind {
            Kind::Chat => self.chunk_event_chat(Vec::new(), Some(self.usage)),
            Kind::Completion => self.chunk_event_completion(Vec::new(), Some(self.usage)),
        }
    }

    fn chunk_event_chat(&self, choices: Vec<ChatChoice>, usage: Option<Usage>) -> Event {
        let m = &self.spec.meta;
        let chunk = ChatResponse {
            id: m.id.to_string(),
            object: "chat.completion.chunk",
            created: m.created,
            model: m.model.clone(),
            choices,
            usage,
        };
        Event::default().data(to_json(&chunk))
    }

    fn chunk_event_completion(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
    ) -> Event {
        let m = &self.spec.meta;
        let chunk = CompletionResponse {
            id: m.id.to_string(),
            object: "text_completion",
            created: m.created,
            model: m.model.clone(),
            choices,
            usage,
        };
        Event::default().data(to_json(&chunk))
    }
}
