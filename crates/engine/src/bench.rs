//! Single-stream speed measurement (used by `tessera generate` and `tessera bench`).

use std::time::Instant;

use crate::{EngineHandle, GenerateRequest, Result, SamplingParams};

/// Prompt and decode speed of one request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeedReport {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// Prompt tokens per second (prompt length / time to first token).
    pub prompt_tps: f64,
    /// Generated tokens per second after the first.
    pub decode_tps: f64,
    pub ttft_s: f64,
    pub total_s: f64,
}

/// Runs one greedy request of `prompt_tokens` tokens (repeating `seed_ids`) generating
/// exactly `decode_tokens` tokens, and times it. Blocking: call outside an async runtime.
pub fn single_stream(h: &EngineHandle, seed_ids: &[u32], prompt_tokens: usize, decode_tokens: usize) -> Result<SpeedReport> {
    let prompt: Vec<u32> = seed_ids.iter().copied().cycle().take(prompt_tokens).collect();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(decode_tokens) };
    let t0 = Instant::now();
    let rx = h.submit(GenerateRequest { prompt_ids: prompt, params, adapter: None })?;
    Ok(timed(rx, t0, prompt_tokens, |_| {}).0)
}

/// Follows one request to its end, timing its tokens from `t0` (when it was submitted);
/// `on_event` sees every event. Returns the speeds and the finish reason. Blocking.
pub fn timed(
    mut rx: crate::RequestStream,
    t0: Instant,
    prompt_tokens: usize,
    mut on_event: impl FnMut(&crate::TokenEvent),
) -> (SpeedReport, Option<crate::FinishReason>) {
    let (mut first, mut last, mut n, mut reason) = (None, t0, 0usize, None);
    while let Some(ev) = rx.blocking_recv() {
        if !ev.token_ids.is_empty() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            n += ev.token_ids.len();
        }
        on_event(&ev);
        if let Some(f) = &ev.finish {
            reason = Some(f.reason);
            break;
        }
    }
    let first = first.unwrap_or(last);
    let ttft = (first - t0).as_secs_f64();
    let dec = (last - first).as_secs_f64();
    let report = SpeedReport {
        prompt_tokens,
        decode_tokens: n,
        prompt_tps: prompt_tokens as f64 / ttft.max(1e-9),
        decode_tps: n.saturating_sub(1) as f64 / dec.max(1e-9),
        ttft_s: ttft,
        total_s: (last - t0).as_secs_f64(),
    };
    (report, reason)
}

/// Aggregate decode throughput of `streams` concurrent greedy requests (engine only, no HTTP).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchReport {
    pub streams: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// Generated tokens of all streams / wall time from first submit to last token.
    pub tokens_per_s: f64,
    pub wall_s: f64,
}

pub fn concurrent(h: &EngineHandle, seed_ids: &[u32], streams: usize, prompt_tokens: usize, decode_tokens: usize) -> Result<BatchReport> {
    let t0 = Instant::now();
    let mut rxs = Vec::with_capacity(streams);
    for i in 0..streams {
        // Different prompts per stream (rotated), same length.
        let prompt: Vec<u32> = seed_ids.iter().copied().cycle().skip(i % seed_ids.len().max(1)).take(prompt_tokens).collect();
        let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(decode_tokens) };
        rxs.push(h.submit(GenerateRequest { prompt_ids: prompt, params, adapter: None })?);
    }
    let mut total = 0;
    for mut rx in rxs {
        while let Some(ev) = rx.blocking_recv() {
            total += ev.token_ids.len();
            if ev.finish.is_some() {
                break;
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(BatchReport { streams, prompt_tokens, decode_tokens, tokens_per_s: total as f64 / wall, wall_s: wall })
}
