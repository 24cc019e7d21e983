//! A strict reader of the server-sent events of the OpenAI streaming API, and the folding
//! of the chunks into whole answers with every framing rule checked.
//!
//! ```text
//! stream  := block* done EOF
//! block   := line+ "\n"                 a blank line ends each block
//! line    := "data: " payload "\n"      at most one per block; payload is a JSON object
//!          | ":" comment "\n"           keep-alive; a block of comments only is allowed
//! done    := "data: [DONE]\n\n"         exactly once, and nothing after it
//! ```
//!
//! Anything else (other fields such as `event:`, `\r`, two data lines in one block, a
//! payload that is not a JSON object, bytes after `[DONE]`, a stream that ends without
//! `[DONE]` or inside a block) is a failure.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

/// Longest wait for the next bytes of a stream.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    Json(Value),
    Done,
}

/// Incremental parser: feed bytes as they arrive, then [`SseParser::finish`] at the end.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// The payload of the block being read.
    data: Option<String>,
    /// Lines of the block being read.
    block_lines: usize,
    done: bool,
    /// Keep-alive comment lines seen.
    pub comments: usize,
}

impl SseParser {
    /// The events completed by `bytes`.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseItem>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = std::str::from_utf8(&raw[..raw.len() - 1])
                .map_err(|e| format!("an SSE line is not UTF-8 ({e}): {raw:?}"))?;
            if let Some(item) = self.line(line)? {
                out.push(item);
            }
        }
        if self.done && !self.buf.is_empty() {
            return Err(format!(
                "bytes after data: [DONE]: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        Ok(out)
    }

    fn line(&mut self, line: &str) -> Result<Option<SseItem>, String> {
        if self.done {
            return Err(format!("a line after data: [DONE]: {line:?}"));
        }
        if line.contains('\r') {
            return Err(format!("a carriage return in an SSE line: {line:?}"));
        }
        if line.is_empty() {
            let lines = std::mem::take(&mut self.block_lines);
            return match self.data.take() {
                Some(d) if d == "[DONE]" => {
                    self.done = true;
                    Ok(Some(SseItem::Done))
                }
                Some(d) => match serde_json::from_str::<Value>(&d) {
                    Ok(v) if v.is_object() => Ok(Some(SseItem::Json(v))),
                    Ok(v) => Err(format!("an event payload is not a JSON object: {v}")),
                    Err(e) => Err(format!("an event payload is not JSON ({e}): {d:?}")),
                },
                None if lines > 0 => Ok(None),
                None => Err("a blank line outside any event".into()),
            };
        }
        self.block_lines += 1;
        if line.starts_with(':') {
            self.comments += 1;
            return Ok(None);
        }
        if let Some(payload) = line.strip_prefix("data: ") {
            if self.data.is_some() {
                return Err(format!("two data lines in one event: {line:?}"));
            }
            self.data = Some(payload.to_string());
            return Ok(None);
        }
        Err(format!(
            "unexpected SSE line {line:?}: only `data: <json>` and `: comment` lines are allowed"
        ))
    }

    /// The stream ended: it must have ended right after `[DONE]`.
    pub fn finish(&self) -> Result<(), String> {
        if !self.buf.is_empty() || self.block_lines > 0 {
            return Err(format!(
                "the stream ended inside an event: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        if !self.done {
            return Err("the stream ended without data: [DONE]".into());
        }
        Ok(())
    }

    /// Parses a whole stream.
    pub fn parse_all(bytes: &[u8]) -> Result<Vec<SseItem>, String> {
        let mut p = SseParser::default();
        let items = p.feed(bytes)?;
        p.finish()?;
        Ok(items)
    }
}

/// A streaming response read event by event; every framing violation panics.
pub struct SseStream {
    res: reqwest::Response,
    parser: SseParser,
    queue: VecDeque<SseItem>,
    ended: bool,
    /// Every JSON event returned so far.
    pub seen: Vec<Value>,
}

impl SseStream {
    /// Checks the status (200) and content type (`text/event-stream`).
    pub async fn open(res: reqwest::Response) -> SseStream {
        let status = res.status();
        let ctype = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if status != StatusCode::OK {
            let body = res.text().await.unwrap_or_default();
            panic!("a streaming request answered {status}: {body}");
        }
        assert!(
            ctype.starts_with("text/event-stream"),
            "a streaming response has content-type {ctype:?}"
        );
        SseStream {
            res,
            parser: SseParser::default(),
            queue: VecDeque::new(),
            ended: false,
            seen: Vec::new(),
        }
    }

    /// The next JSON event; `None` after `[DONE]` once the body has ended right after it.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            match self.queue.pop_front() {
                Some(SseItem::Json(v)) => {
                    self.seen.push(v.clone());
                    return Some(v);
                }
                Some(SseItem::Done) => {
                    assert!(
                        self.queue.is_empty(),
                        "events after [DONE]: {:?}",
                        self.queue
                    );
                    while let Some(bytes) = self.read().await {
                        if let Err(e) = self.parser.feed(&bytes) {
                            panic!("{e}");
                        }
                    }
                    self.parser.finish().unwrap_or_else(|e| panic!("{e}"));
                    self.ended = true;
                    return None;
                }
                None if self.ended => return None,
                None => match self.read().await {
                    Some(bytes) => {
                        let items = self.parser.feed(&bytes).unwrap_or_else(|e| panic!("{e}"));
                        self.queue.extend(items);
                    }
                    None => {
                        self.parser.finish().unwrap_or_else(|e| panic!("{e}"));
                        unreachable!("finish() fails without [DONE]");
                    }
                },
            }
        }
    }

    async fn read(&mut self) -> Option<Vec<u8>> {
        match tokio::time::timeout(CHUNK_TIMEOUT, self.res.chunk()).await {
            Err(_) => panic!("no stream bytes for {CHUNK_TIMEOUT:?}"),
            Ok(Err(e)) => panic!("the stream broke: {e:?}"),
            Ok(Ok(b)) => b.map(|b| b.to_vec()),
        }
    }

    /// Every remaining JSON event (all of them, with those already read, in `seen`).
    pub async fn collect(mut self) -> Vec<Value> {
        while self.next().await.is_some() {}
        self.seen
    }

    /// Keep-alive comments seen so far.
    pub fn comments(&self) -> usize {
        self.parser.comments
    }
}

/// Which endpoint's chunks these are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Chat,
    Completion,
}

/// What one choice of a stream added up to.
#[derive(Debug, Clone, Default)]
pub struct ChoiceSummary {
    pub text: String,
    /// The content of each chunk that carried some.
    pub pieces: Vec<String>,
    pub finish_reason: String,
    /// Chat: the `logprobs.content` entries of every chunk, in order.
    pub chat_logprobs: Vec<Value>,
    /// Completions: the legacy logprobs of every chunk, concatenated
    /// (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
    pub legacy_logprobs: Option<Value>,
}

/// A stream folded into its answers, with the framing rules checked.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    pub id: String,
    pub model: String,
    pub choices: BTreeMap<usize, ChoiceSummary>,
    /// The `choices: []` usage chunk, when there was one.
    pub usage: Option<Value>,
}

impl StreamSummary {
    /// Folds the JSON events of one stream (without `[DONE]`). Panics when:
    /// an event is an error; id, model or object vary or are wrong; a chat choice's first
    /// chunk lacks the assistant role or a later one repeats it; a choice has chunks after
    /// its finish_reason or never finishes; a non-usage chunk has a non-null usage; the
    /// usage chunk has choices or is not the last event.
    pub fn fold(kind: StreamKind, events: &[Value]) -> StreamSummary {
        assert!(!events.is_empty(), "a stream without events");
        let object = match kind {
            StreamKind::Chat => "chat.completion.chunk",
            StreamKind::Completion => "text_completion",
        };
        let first = &events[0];
        let id = first["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id: {first}"))
            .to_string();
        let model = first["model"]
            .as_str()
            .unwrap_or_else(|| panic!("no model: {first}"))
            .to_string();
        let mut s = StreamSummary {
            id,
            model,
            choices: BTreeMap::new(),
            usage: None,
        };
        let mut finished: BTreeMap<usize, bool> = BTreeMap::new();
        for (i, ev) in events.iter().enumerate() {
            assert!(
                ev.get("error").is_none(),
                "an error event in the stream: {ev}"
            );
            assert_eq!(ev["id"], s.id.as_str(), "event {i}: the id changed: {ev}");
            assert_eq!(
                ev["model"],
                s.model.as_str(),
                "event {i}: the model changed: {ev}"
            );
            assert_eq!(ev["object"], object, "event {i}: object: {ev}");
            assert!(ev["created"].is_u64(), "event {i}: created: {ev}");
            assert!(s.usage.is_none(), "event {i} after the usage chunk: {ev}");
            let choices = ev["choices"]
                .as_array()
                .unwrap_or_else(|| panic!("event {i}: no choices array: {ev}"));
            if choices.is_empty() {
                let usage = &ev["usage"];
                assert!(
                    usage.is_object(),
                    "event {i}: no choices and no usage: {ev}"
                );
                s.usage = Some(usage.clone());
                continue;
            }
            assert!(
                ev.get("usage").is_none_or(Value::is_null),
                "event {i}: usage on a chunk with choices: {ev}"
            );
            for c in choices {
                let index = c["index"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("event {i}: no choice index: {ev}"))
                    as usize;
                let is_new = !s.choices.contains_key(&index);
                let done = finished.entry(index).or_insert(false);
                assert!(
                    !*done,
                    "event {i}: choice {index} continues after its finish_reason: {ev}"
                );
                let choice = s.choices.entry(index).or_default();
                let content = match kind {
                    StreamKind::Chat => {
                        let delta = c["delta"]
                            .as_object()
                            .unwrap_or_else(|| panic!("event {i}: no delta: {ev}"));
                        match (is_new, delta.get("role")) {
                            (true, Some(r)) => assert_eq!(r, "assistant", "event {i}: {ev}"),
                            (true, None) => panic!(
                                "event {i}: the first chunk of choice {index} has no role: {ev}"
                            ),
                            (false, Some(r)) if !r.is_null() => {
                                panic!("event {i}: the role again on choice {index}: {ev}")
                            }
                            _ => {}
                        }
                        delta
                            .get("content")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string()
                    }
                    StreamKind::Completion => c["text"]
                        .as_str()
                        .unwrap_or_else(|| panic!("event {i}: no text: {ev}"))
                        .to_string(),
                };
                if !content.is_empty() {
                    choice.text.push_str(&content);
                    choice.pieces.push(content);
                }
                fold_logprobs(kind, choice, &c["logprobs"]);
                match &c["finish_reason"] {
                    Value::Null => {}
                    Value::String(r) => {
                        choice.finish_reason = r.clone();
                        *done = true;
                    }
                    other => panic!("event {i}: finish_reason {other}"),
                }
            }
        }
        for (index, done) in &finished {
            assert!(*done, "choice {index} never got a finish_reason");
        }
        s
    }

    /// The one choice of an `n = 1` stream.
    pub fn only(&self) -> &ChoiceSummary {
        assert_eq!(
            self.choices.len(),
            1,
            "expected one choice: {:?}",
            self.choices.keys()
        );
        &self.choices[&0]
    }

    /// The texts of all choices by index (indices must be 0..n).
    pub fn texts(&self) -> Vec<String> {
        let keys: Vec<usize> = self.choices.keys().copied().collect();
        assert_eq!(keys, (0..keys.len()).collect::<Vec<_>>(), "choice indices");
        self.choices.values().map(|c| c.text.clone()).collect()
    }
}

fn fold_logprobs(kind: StreamKind, choice: &mut ChoiceSummary, lp: &Value) {
    if lp.is_null() {
        return;
    }
    match kind {
        StreamKind::Chat => {
            let content = lp["content"]
                .as_array()
                .unwrap_or_else(|| panic!("chat logprobs without content: {lp}"));
            choice.chat_logprobs.extend(content.iter().cloned());
        }
        StreamKind::Completion => {
            let acc = choice.legacy_logprobs.get_or_insert_with(|| {
                serde_json::json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
            });
            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                let part = lp[key]
                    .as_array()
                    .unwrap_or_else(|| panic!("legacy logprobs without `{key}`: {lp}"));
                acc[key]
                    .as_array_mut()
                    .unwrap()
                    .extend(part.iter().cloned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_comments_and_done_parse_across_any_split() {
        let text = b": keep-alive\n\ndata: {\"a\":1}\n\n:\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
        let want = vec![
            SseItem::Json(json!({"a":1})),
            SseItem::Json(json!({"b":2})),
            SseItem::Done,
        ];
        assert_eq!(SseParser::parse_all(text).unwrap(), want);
        for cut in 0..text.len() {
            let mut p = SseParser::default();
            let mut got = p.feed(&text[..cut]).unwrap();
            got.extend(p.feed(&text[cut..]).unwrap());
            p.finish().unwrap();
            assert_eq!(got, want, "split at {cut}");
        }
    }

    #[test]
    fn framing_violations_are_errors() {
        for bad in [
            &b"data: {}\n\n"[..],                      // no [DONE]
            b"data: [DONE]\n\ndata: [DONE]\n\n",       // twice
            b"data: [DONE]\n\ndata: {}\n\n",           // events after it
            b"data: [DONE]\n\n:\n\n",                  // even a comment
            b"data: {}\n\ndata: [DONE]\n",             // ends inside a block
            b"event: x\ndata: {}\n\ndata: [DONE]\n\n", // other fields
            b"data: {}\r\n\r\ndata: [DONE]\r\n\r\n",   // CR
            b"data: {}\ndata: {}\n\ndata: [DONE]\n\n", // two data lines
            b"data: [1]\n\ndata: [DONE]\n\n",          // not an object
            b"data: {\n\ndata: [DONE]\n\n",            // not JSON
            b"data:{}\n\ndata: [DONE]\n\n",            // no space
            b"\ndata: [DONE]\n\n",                     // stray blank line
        ] {
            assert!(
                SseParser::parse_all(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn chunk(choices: Value) -> Value {
        json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices})
    }

    #[test]
    fn fold_adds_up_a_chat_stream() {
        let evs = vec![
            chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
            ),
            chunk(json!([{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}])),
            chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])),
            json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], "usage": {"prompt_tokens": 1}}),
        ];
        let s = StreamSummary::fold(StreamKind::Chat, &evs);
        assert_eq!(s.only().text, "Hi");
        assert_eq!(s.only().finish_reason, "stop");
        assert!(s.usage.is_some());
    }

    #[test]
    #[should_panic(expected = "continues after its finish_reason")]
    fn fold_refuses_content_after_the_finish() {
        let evs = vec![
            chunk(json!([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": "stop"}])),
            chunk(json!([{"index": 0, "delta": {"content": "late"}, "finish_reason": null}])),
        ];
        StreamSummary::fold(StreamKind::Chat, &evs);
    }

    #[test]
    #[should_panic(expected = "has no role")]
    fn fold_refuses_a_chat_choice_without_a_role_chunk() {
        let evs = vec![chunk(
            json!([{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]),
        )];
        StreamSummary::fold(StreamKind::Chat, &evs);
    }
}
