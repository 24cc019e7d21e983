//! Bad input against a real server: each case gets its status and an OpenAI-shaped error
//! body, the HTTP metrics count them, and a streaming request running beside them all
//! completes untouched, with the same text as when it runs alone.

use std::time::Instant;

use futures::future::join_all;
use serde_json::{json, Value};
use tessera_tests::{error_shape, golden, StreamKind, StreamSummary, TestServer};

const CMPL: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// What the error's `param` must be.
#[derive(Debug, Clone, Copy)]
enum Param {
    Null,
    Is(&'static str),
    /// The server may or may not name one.
    Any,
}

struct Case {
    name: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    kind: &'static str,
    param: Param,
    code: Option<&'static str>,
    /// Strings the message must contain (the parameter's value, the limits).
    mentions: &'static [&'static str],
}

fn case(
    name: &'static str,
    path: &'static str,
    body: impl Into<Body>,
    status: u16,
    param: Param,
) -> Case {
    let kind = match status {
        400 | 413 => "invalid_request_error",
        404 => "not_found_error",
        _ => panic!("no error type for {status}"),
    };
    Case {
        name,
        path,
        body: body.into().0,
        status,
        kind,
        param,
        code: None,
        mentions: &[],
    }
}

impl Case {
    fn code(mut self, code: &'static str) -> Case {
        self.code = Some(code);
        self
    }

    fn mentions(mut self, m: &'static [&'static str]) -> Case {
        self.mentions = m;
        self
    }
}

struct Body(Vec<u8>);

impl From<Value> for Body {
    fn from(v: Value) -> Body {
        Body(serde_json::to_vec(&v).unwrap())
    }
}

impl From<&[u8]> for Body {
    fn from(b: &[u8]) -> Body {
        Body(b.to_vec())
    }
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Body {
        Body(b)
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn cases(max_model_len: usize) -> Vec<Case> {
    use Param::*;
    let past_context = vec![100u32; max_model_len + 1];
    let mut ten_mb = br#"{"prompt": ""#.to_vec();
    ten_mb.extend(std::iter::repeat_n(b'a', 10 << 20));
    ten_mb.extend(br#"", "max_tokens": 1}"#);
    vec![
        case("malformed JSON", CMPL, &br#"{"prompt": "x","#[..], 400, Null),
        case("malformed JSON (chat)", CHAT, &br#"{"messages": [{"role": "user""#[..], 400, Null),
        case("a body that is not an object", CMPL, &b"[1, 2]"[..], 400, Null),
        case("an empty body", CHAT, &b""[..], 400, Null),
        case("invalid UTF-8", CMPL, &b"{\"prompt\": \"caf\xe9\", \"max_tokens\": 1}"[..], 400, Null),
        case("max_tokens of the wrong type", CMPL, json!({"prompt": "x", "max_tokens": "ten"}), 400, Is("max_tokens")),
        case("temperature of the wrong type", CHAT, json!({"messages": user("hi"), "temperature": "hot"}), 400, Is("temperature"))
            .mentions(&["hot"]),
        case("prompt of the wrong type", CMPL, json!({"prompt": {"text": "x"}}), 400, Is("prompt")),
        case("messages of the wrong type", CHAT, json!({"messages": "hi"}), 400, Is("messages")),
        case("stop of the wrong type", CMPL, json!({"prompt": "x", "stop": 5}), 400, Is("stop")),
        case("negative max_tokens", CMPL, json!({"prompt": "x", "max_tokens": -5}), 400, Is("max_tokens")).mentions(&["-5"]),
        case("zero max_tokens", CHAT, json!({"messages": user("hi"), "max_tokens": 0}), 400, Is("max_tokens")),
        case("negative max_completion_tokens", CHAT, json!({"messages": user("hi"), "max_completion_tokens": -1}), 400, Is("max_completion_tokens")),
        case("huge max_tokens", CMPL, json!({"prompt": "x", "max_tokens": 1_000_000_000u64}), 400, Any)
            .code("context_length_exceeded")
            .mentions(&["1000000000"]),
        case("max_tokens past 64 bits", CMPL, &br#"{"prompt": "x", "max_tokens": 100000000000000000000000}"#[..], 400, Is("max_tokens")),
        case("temperature < 0", CHAT, json!({"messages": user("hi"), "temperature": -0.5}), 400, Is("temperature")).mentions(&["-0.5"]),
        case("top_p > 1", CMPL, json!({"prompt": "x", "top_p": 1.5}), 400, Is("top_p")).mentions(&["1.5"]),
        case("top_p > 1 on a stream", CHAT, json!({"messages": user("hi"), "top_p": 2, "stream": true}), 400, Is("top_p")),
        case("n = 1000000", CMPL, json!({"prompt": "x", "n": 1_000_000}), 400, Is("n")).mentions(&["1000000"]),
        case("n = 1000000 (chat)", CHAT, json!({"messages": user("hi"), "n": 1_000_000}), 400, Is("n")).mentions(&["1000000"]),
        case("presence_penalty out of range", CMPL, json!({"prompt": "x", "presence_penalty": 3}), 400, Is("presence_penalty")),
        case("logprobs above 20", CMPL, json!({"prompt": "x", "logprobs": 50}), 400, Is("logprobs")).mentions(&["50"]),
        case("top_logprobs without logprobs", CHAT, json!({"messages": user("hi"), "top_logprobs": 3}), 400, Is("top_logprobs")),
        case("empty messages", CHAT, json!({"messages": []}), 400, Is("messages")),
        case("no messages", CHAT, json!({"max_tokens": 3}), 400, Is("messages")),
        case("unknown role", CHAT, json!({"messages": [{"role": "wizard", "content": "hi"}]}), 400, Is("messages[0].role"))
            .mentions(&["wizard"]),
        case("an unknown field", CMPL, json!({"prompt": "x", "frobnicate": 1}), 400, Is("frobnicate")),
        case("tools (not implemented)", CHAT, json!({"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]}), 400, Is("tools"))
            .code("unsupported_parameter"),
        case("a token id outside the vocabulary", CMPL, json!({"prompt": [1, 2, 49152]}), 400, Is("prompt")).mentions(&["49152"]),
        case("a prompt past the context", CMPL, json!({"prompt": past_context, "max_tokens": 1}), 400, Any)
            .code("context_length_exceeded")
            .mentions(&["8192", "8193"]),
        case("a 10 MB body", CMPL, ten_mb, 413, Null).code("request_too_large"),
        case("an unknown model", CMPL, json!({"model": "gpt-4o", "prompt": "x"}), 404, Is("model"))
            .code("model_not_found")
            .mentions(&["gpt-4o"]),
        case("an unknown model (chat)", CHAT, json!({"model": "gpt-4o", "messages": user("hi")}), 404, Is("model"))
            .code("model_not_found"),
    ]
}

#[tokio::test]
async fn bad_inputs_get_openai_errors_while_a_stream_beside_them_completes_untouched() {
    let s = TestServer::start();
    let api = s.api();
    let story = golden("text_story");
    let stream_body = json!({"prompt": story.prompt_ids, "max_tokens": 48, "temperature": 0, "ignore_eos": true,
                             "stream": true, "stream_options": {"include_usage": true}});
    let t0 = Instant::now();
    let alone = StreamSummary::fold(
        StreamKind::Completion,
        &api.stream(CMPL, &stream_body).await.collect().await,
    );
    assert!(
        alone
            .only()
            .text
            .starts_with(&story.generated_text_skip_special),
        "the greedy stream starts with the reference text: {:?}",
        alone.only().text
    );

    eprintln!("the stream alone took {:?}", t0.elapsed());
    let t0 = Instant::now();
    let cases = cases(s.info.max_model_len);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let streamer = async {
        let mut st = api.stream(CMPL, &stream_body).await;
        st.next().await.expect("a first chunk");
        let _ = started_tx.send(());
        let events = st.collect().await;
        (events, Instant::now())
    };
    let attacker = async {
        started_rx.await.expect("the stream started");
        let answers = join_all(
            cases
                .iter()
                .map(|c| api.try_post_raw(c.path, c.body.clone())),
        )
        .await;
        (answers, Instant::now())
    };
    let ((events, stream_end), (answers, bad_end)) = tokio::join!(streamer, attacker);

    eprintln!(
        "beside the stream ({:?}), the {} bad requests took {:?}",
        stream_end - t0,
        cases.len(),
        bad_end - t0
    );
    let mut failures = Vec::new();
    for (c, answer) in cases.iter().zip(answers) {
        if let Err(f) = check(c, answer) {
            failures.push(format!("{}: {f}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    let beside = StreamSummary::fold(StreamKind::Completion, &events);
    assert!(
        bad_end < stream_end,
        "the stream ended before the bad requests did; nothing ran beside it"
    );
    assert_eq!(
        beside.only().text,
        alone.only().text,
        "the stream beside the bad requests"
    );
    assert_eq!(beside.only().finish_reason, "length");
    assert_eq!(beside.usage, alone.usage);
    assert_eq!(beside.usage.as_ref().unwrap()["completion_tokens"], 48);

    // Every refusal is counted by route and status, with its error type.
    let m = api.metrics().await;
    for (route, status) in [
        (CMPL, 400),
        (CMPL, 413),
        (CMPL, 404),
        (CHAT, 400),
        (CHAT, 404),
    ] {
        let want = cases
            .iter()
            .filter(|c| c.path == route && c.status == status)
            .count() as f64;
        let got = m
            .get(
                "tessera:http_requests_total",
                &[
                    ("route", route),
                    ("method", "POST"),
                    ("status", &status.to_string()),
                ],
            )
            .unwrap_or(0.0);
        assert_eq!(got, want, "http_requests_total for {route} {status}");
    }
    for route in [CMPL, CHAT] {
        for kind in ["invalid_request_error", "not_found_error"] {
            let want = cases
                .iter()
                .filter(|c| c.path == route && c.kind == kind)
                .count() as f64;
            let got = m
                .get(
                    "tessera:http_request_errors_total",
                    &[("route", route), ("error_type", kind)],
                )
                .unwrap_or(0.0);
            assert_eq!(got, want, "http_request_errors_total for {route} {kind}");
        }
    }
    let (status, _) = api.get("/ready").await;
    assert_eq!(status, 200, "still ready");
    s.stop().expect("clean shutdown");
}

fn check(c: &Case, answer: Result<(reqwest::StatusCode, String), String>) -> Result<(), String> {
    let (status, text) = answer?;
    if status.as_u16() != c.status {
        return Err(format!("status {status}, expected {}: {text}", c.status));
    }
    let body: Value =
        serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text:?}"))?;
    let shape = error_shape(&body)?;
    if shape["type"] != c.kind {
        return Err(format!(
            "type {}, expected {}: {body}",
            shape["type"], c.kind
        ));
    }
    match c.param {
        Param::Null if !shape["param"].is_null() => {
            return Err(format!("param should be null: {body}"))
        }
        Param::Is(p) if shape["param"] != p => {
            return Err(format!("param should be {p:?}: {body}"))
        }
        _ => {}
    }
    if let Some(code) = c.code {
        if shape["code"] != code {
            return Err(format!("code should be {code:?}: {body}"));
        }
    }
    let message = shape["message"].as_str().unwrap_or("");
    for m in c.mentions {
        if !message.contains(m) {
            return Err(format!("the message does not mention {m:?}: {message}"));
        }
    }
    Ok(())
}
