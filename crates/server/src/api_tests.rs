//! Handler tests over the fake backend: no model, no sockets (`tower::ServiceExt::oneshot`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::fake::{FakeBackend, FakeMode};
use crate::metrics::{self, Metrics};
use crate::openai::ErrorBody;
use crate::router;
use crate::state::{AppState, ServerOptions};

pub(crate) const KEY: &str = "sekret";

pub(crate) fn setup(opts: ServerOptions) -> (Router, AppState, Arc<FakeBackend>) {
    let fake = FakeBackend::new();
    let state = AppState::with_backend(opts, Metrics::new().unwrap(), fake.clone());
    (router(state.clone()), state, fake)
}

pub(crate) fn keyed() -> ServerOptions {
    ServerOptions {
        api_key: Some(KEY.into()),
        ..Default::default()
    }
}

pub(crate) fn request(
    method: Method,
    path: &str,
    body: impl Into<Body>,
    key: Option<&str>,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    b.body(body.into()).unwrap()
}

pub(crate) async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Bytes) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    (
        status,
        axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
}

pub(crate) async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(
        app,
        request(Method::POST, path, body.to_string(), Some(KEY)),
    )
    .await;
    (
        s,
        serde_json::from_slice(&b)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&b))),
    )
}

/// Strict SSE: every event is exactly one `data: ` line followed by a blank line.
pub(crate) fn sse_data(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("\n\n"), "unterminated stream: {text:?}");
    text.split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|block| {
            assert!(!block.contains('\n'), "multi-line event: {block:?}");
            block
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {block:?}"))
                .to_string()
        })
        .collect()
}

/// The JSON chunks before `[DONE]`, asserting `[DONE]` is last and only once.
pub(crate) fn chunks(body: &[u8]) -> Vec<Value> {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// (case, path, body, api key, expected status, expected `param`)
type Case = (
    &'static str,
    &'static str,
    Vec<u8>,
    Option<&'static str>,
    u16,
    Option<&'static str>,
);

#[rustfmt::skip]
fn bad_cases() -> Vec<Case> {
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let big = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(10 << 20));
    vec![
        ("malformed json", cmpl, br#"{"prompt": "#.to_vec(), Some(KEY), 400, None),
        ("not an object", cmpl, b"[1, 2]".to_vec(), Some(KEY), 400, None),
        ("empty body", cmpl, Vec::new(), Some(KEY), 400, None),
        ("invalid utf-8", cmpl, b"{\"prompt\": \"\xff\xfe\"}".to_vec(), Some(KEY), 400, None),
        ("wrong type", cmpl, br#"{"prompt": "hi", "temperature": "hot"}"#.to_vec(), Some(KEY), 400, Some("temperature")),
        ("prompt of objects", cmpl, br#"{"prompt": [{"a": 1}]}"#.to_vec(), Some(KEY), 400, Some("prompt")),
        ("missing prompt", cmpl, br#"{"max_tokens": 3}"#.to_vec(), Some(KEY), 400, Some("prompt")),
        ("negative max_tokens", cmpl, br#"{"prompt": "hi", "max_tokens": -5}"#.to_vec(), Some(KEY), 400, Some("max_tokens")),
        ("zero max_tokens", cmpl, br#"{"prompt": "hi", "max_tokens": 0}"#.to_vec(), Some(KEY), 400, Some("max_tokens")),
        ("huge max_tokens", cmpl, br#"{"prompt": "hi", "max_tokens": 1000000000000}"#.to_vec(), Some(KEY), 400, None),
        ("max_tokens beyond i64", cmpl, br#"{"prompt": "hi", "max_tokens": 1e30}"#.to_vec(), Some(KEY), 400, Some("max_tokens")),
        ("temperature < 0", cmpl, br#"{"prompt": "hi", "temperature": -0.5}"#.to_vec(), Some(KEY), 400, Some("temperature")),
        ("top_p > 1", cmpl, br#"{"prompt": "hi", "top_p": 1.5}"#.to_vec(), Some(KEY), 400, Some("top_p")),
        ("n = 1000000", cmpl, br#"{"prompt": "hi", "n": 1000000}"#.to_vec(), Some(KEY), 400, Some("n")),
        ("bad logit_bias key", cmpl, br#"{"prompt": "hi", "logit_bias": {"x": 1}}"#.to_vec(), Some(KEY), 400, Some("logit_bias")),
        ("logit_bias out of vocab", cmpl, br#"{"prompt": "hi", "logit_bias": {"999999": 1}}"#.to_vec(), Some(KEY), 400, Some("logit_bias")),
        ("echo with logprobs", cmpl, br#"{"prompt": "hi", "echo": true, "logprobs": 1}"#.to_vec(), Some(KEY), 400, Some("echo")),
        ("logprobs too many", cmpl, br#"{"prompt": "hi", "logprobs": 21}"#.to_vec(), Some(KEY), 400, Some("logprobs")),
        ("prompt past the context", cmpl, json!({"prompt": "x".repeat(300)}).to_string().into_bytes(), Some(KEY), 400, None),
        ("token id out of vocab", cmpl, br#"{"prompt": [1, 2, 99999]}"#.to_vec(), Some(KEY), 400, Some("prompt")),
        ("unknown field", cmpl, br#"{"prompt": "hi", "frobnicate": true}"#.to_vec(), Some(KEY), 400, Some("frobnicate")),
        ("suffix", cmpl, br#"{"prompt": "hi", "suffix": "end"}"#.to_vec(), Some(KEY), 400, Some("suffix")),
        ("unknown model", cmpl, br#"{"prompt": "hi", "model": "gpt-9"}"#.to_vec(), Some(KEY), 404, Some("model")),
        ("10 MB body", cmpl, big.into_bytes(), Some(KEY), 413, None),
        ("missing api key", cmpl, br#"{"prompt": "hi"}"#.to_vec(), None, 401, None),
        ("wrong api key", cmpl, br#"{"prompt": "hi"}"#.to_vec(), Some("nope"), 401, None),
        ("empty messages", chat, br#"{"messages": []}"#.to_vec(), Some(KEY), 400, Some("messages")),
        ("missing messages", chat, br#"{"model": "fake-model"}"#.to_vec(), Some(KEY), 400, Some("messages")),
        ("unknown role", chat, br#"{"messages": [{"role": "wizard", "content": "hi"}]}"#.to_vec(), Some(KEY), 400, Some("messages[0].role")),
        ("tool role", chat, br#"{"messages": [{"role": "tool", "content": "hi"}]}"#.to_vec(), Some(KEY), 400, Some("messages[0].role")),
        ("image content", chat, br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#.to_vec(), Some(KEY), 400, Some("messages")),
        ("tools", chat, json!({"messages": msgs, "tools": [{"type": "function"}]}).to_string().into_bytes(), Some(KEY), 400, Some("tools")),
        ("response_format json", chat, json!({"messages": msgs, "response_format": {"type": "json_object"}}).to_string().into_bytes(), Some(KEY), 400, Some("response_format")),
        ("top_logprobs without logprobs", chat, json!({"messages": msgs, "top_logprobs": 2}).to_string().into_bytes(), Some(KEY), 400, Some("top_logprobs")),
        ("chat max_completion_tokens < 1", chat, json!({"messages": msgs, "max_completion_tokens": -1}).to_string().into_bytes(), Some(KEY), 400, Some("max_completion_tokens")),
        ("unknown route", "/v1/embeddings", br#"{}"#.to_vec(), Some(KEY), 404, None),
    ]
}

#[tokio::test]
async fn bad_inputs_get_the_right_status_and_error_shape() {
    let (app, _, fake) = setup(keyed());
    let cmpl = "/v1/completions";
    // A request running beside the bad ones.
    let beside = app.clone().oneshot(request(
        Method::POST,
        cmpl,
        json!({"prompt": "beside", "max_tokens": 50, "stream": true}).to_string(),
        Some(KEY),
    ));
    let beside = beside.await.unwrap();
    for (case, path, body, key, status, param) in bad_cases() {
        let (s, b) = call(&app, request(Method::POST, path, body, key)).await;
        assert_eq!(
            s.as_u16(),
            status,
            "{case}: {}",
            String::from_utf8_lossy(&b)
        );
        let e: ErrorBody = serde_json::from_slice(&b)
            .unwrap_or_else(|e| panic!("{case}: {e}: {}", String::from_utf8_lossy(&b)));
        assert!(
            !e.error.message.is_empty() && !e.error.kind.is_empty(),
            "{case}"
        );
        if let Some(p) = param {
            assert_eq!(
                e.error.param.as_deref(),
                Some(p),
                "{case}: {}",
                e.error.message
            );
        }
        if case.contains("huge") || case.contains("context") {
            assert_eq!(
                e.error.code.as_deref(),
                Some("context_length_exceeded"),
                "{case}"
            );
            assert!(
                e.error.message.contains("256"),
                "{case}: numbers missing: {}",
                e.error.message
            );
        }
    }
    let body = axum::body::to_bytes(beside.into_body(), usize::MAX)
        .await
        .unwrap();
    let text: String = chunks(&body)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "beside");
    assert_eq!(
        fake.submitted().len(),
        1,
        "no bad request reached the engine"
    );
}

#[tokio::test]
async fn wrong_method_is_405_and_queue_full_is_429() {
    let (app, _, fake) = setup(keyed());
    let (s, _) = call(&app, request(Method::GET, "/v1/completions", "", Some(KEY))).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    fake.set_mode(FakeMode::QueueFull);
    let (s, v) = post(&app, "/v1/completions", json!({"prompt": "hi"})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn completion_echoes_and_counts_usage() {
    let (app, _, _) = setup(keyed());
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"model": "fake-model", "prompt": "hello", "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "fake-model");
    assert_eq!(v["choices"][0]["text"], "hel");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9})
    );
    let (_, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "hey", "echo": true, "max_tokens": 10}),
    )
    .await;
    assert_eq!(v["choices"][0]["text"], "heyhey");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn every_prompt_shape_and_n_with_seeds() {
    let (app, _, fake) = setup(keyed());
    let (_, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": ["ab", "cd"], "n": 2, "seed": 5}),
    )
    .await;
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["ab", "ab", "cd", "cd"]);
    let idx: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2, 3]);
    assert_eq!(v["usage"]["prompt_tokens"], 6, "each prompt counted once");
    let seeds: Vec<Option<u64>> = fake.submitted().iter().map(|r| r.params.seed).collect();
    assert_eq!(seeds, [Some(5), Some(6), Some(5), Some(6)]);
    let (_, v) = post(&app, "/v1/completions", json!({"prompt": [104, 105]})).await;
    assert_eq!(v["choices"][0]["text"], "hi");
    let (_, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": [[104], [105, 105]], "echo": true}),
    )
    .await;
    assert_eq!(v["choices"][0]["text"], "hh");
    assert_eq!(v["choices"][1]["text"], "iiii");
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "x", "stop": "y", "top_k": -1, "best_of": 1, "user": "u"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(fake.submitted().last().unwrap().params.stop, ["y"]);
}

#[tokio::test]
async fn chat_renders_the_template_and_answers() {
    let (app, _, fake) = setup(keyed());
    let body = json!({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    ], "temperature": 0});
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let prompt = "<|system|>be brief\n<|user|>hi\n<|assistant|>";
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": prompt})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let n = prompt.len() as u64;
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n})
    );
    let req = fake.submitted().pop().unwrap();
    assert_eq!(
        req.params.max_tokens,
        256 - prompt.len(),
        "default: the rest of the context"
    );
    assert_eq!(req.params.temperature, 0.0);
}

#[tokio::test]
async fn chat_stream_framing_with_usage() {
    let (app, _, _) = setup(keyed());
    let body = json!({"messages": [{"role": "user", "content": "yo"}], "stream": true,
                      "stream_options": {"include_usage": true}, "max_tokens": 5});
    let (s, b) = call(
        &app,
        request(
            Method::POST,
            "/v1/chat/completions",
            body.to_string(),
            Some(KEY),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let c = chunks(&b);
    let id = c[0]["id"].clone();
    assert!(id.as_str().unwrap().starts_with("chatcmpl-"));
    assert!(c.iter().all(|x| x["object"] == "chat.completion.chunk"
        && x["id"] == id
        && x["model"] == "fake-model"));
    assert_eq!(
        c[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let last = c.len() - 1;
    let content: String = c[1..last - 1]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, "<|use");
    assert!(c[1..last - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(c[last - 1]["choices"][0]["finish_reason"], "length");
    assert_eq!(c[last - 1]["choices"][0]["delta"], json!({}));
    assert_eq!(c[last]["choices"], json!([]));
    assert_eq!(
        c[last]["usage"],
        json!({"prompt_tokens": 24, "completion_tokens": 5, "total_tokens": 29})
    );
}

#[tokio::test]
async fn completion_stream_interleaves_n_choices() {
    let (app, _, _) = setup(keyed());
    let body = json!({"prompt": "abc", "n": 3, "stream": true, "stream_options": {"include_usage": true}, "logprobs": 1});
    let (s, b) = call(
        &app,
        request(Method::POST, "/v1/completions", body.to_string(), Some(KEY)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let c = chunks(&b);
    let usage = c.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13})
    );
    for i in 0..3 {
        let mine: Vec<&Value> = c
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|ch| ch["index"] == i)
            .collect();
        let text: String = mine.iter().map(|ch| ch["text"].as_str().unwrap()).collect();
        assert_eq!(text, "abc", "choice {i}");
        assert_eq!(mine.last().unwrap()["finish_reason"], "stop");
        let offsets: Vec<u64> = mine
            .iter()
            .filter_map(|ch| ch["logprobs"]["text_offset"][0].as_u64())
            .collect();
        assert_eq!(offsets, [0, 1, 2]);
    }
}

#[tokio::test]
async fn logprobs_have_both_shapes() {
    let (app, _, _) = setup(keyed());
    let (_, v) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "ab", "logprobs": 2, "max_tokens": 2}),
    )
    .await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["a", "b"]));
    assert_eq!(lp["token_logprobs"], json!([-0.5, -0.5]));
    assert_eq!(lp["text_offset"], json!([0, 1]));
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    let body = json!({"messages": [{"role": "user", "content": "q"}], "logprobs": true, "top_logprobs": 2, "max_tokens": 1});
    let (_, v) = post(&app, "/v1/chat/completions", body).await;
    let c = &v["choices"][0]["logprobs"]["content"][0];
    assert_eq!(c["token"], "<");
    assert_eq!(c["bytes"], json!([60]));
    assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 2);
    let (_, v) = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "q"}]}),
    )
    .await;
    assert!(v["choices"][0]["logprobs"].is_null());
}

#[tokio::test]
async fn an_engine_failure_mid_stream_is_an_error_event_then_done() {
    let (app, _, fake) = setup(keyed());
    fake.set_mode(FakeMode::Fail);
    let body = json!({"messages": [{"role": "user", "content": "yo"}], "stream": true});
    let (s, b) = call(
        &app,
        request(
            Method::POST,
            "/v1/chat/completions",
            body.to_string(),
            Some(KEY),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let c = chunks(&b);
    let err = c.last().unwrap();
    assert_eq!(err["error"]["type"], "server_error", "{err}");
    assert!(c[..c.len() - 1].iter().all(|c| c.get("error").is_none()));
    let (s, v) = post(&app, "/v1/completions", json!({"prompt": "yo"})).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
}

#[tokio::test]
async fn client_disconnect_cancels_the_engine_request() {
    let (app, state, fake) = setup(keyed());
    fake.set_mode(FakeMode::Hang);
    let body = json!({"prompt": "abc", "stream": true, "n": 2});
    let res = app
        .clone()
        .oneshot(request(
            Method::POST,
            "/v1/completions",
            body.to_string(),
            Some(KEY),
        ))
        .await
        .unwrap();
    let mut data = res.into_body().into_data_stream();
    let first = data.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(state.inflight(), 1);
    drop(data);
    for _ in 0..200 {
        if fake.cancelled() == 2 && fake.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        (fake.cancelled(), fake.running(), state.inflight()),
        (2, 0, 0)
    );
}

#[tokio::test]
async fn drain_refuses_new_requests_and_aborts_the_rest_after_the_timeout() {
    let (app, state, fake) = setup(keyed());
    fake.set_mode(FakeMode::Hang);
    let body = json!({"messages": [{"role": "user", "content": "yo"}], "stream": true});
    let res = app
        .clone()
        .oneshot(request(
            Method::POST,
            "/v1/chat/completions",
            body.to_string(),
            Some(KEY),
        ))
        .await
        .unwrap();
    let reader = tokio::spawn(axum::body::to_bytes(res.into_body(), usize::MAX));
    let drain = tokio::spawn({
        let state = state.clone();
        async move { crate::serve::drain(&state, Duration::from_millis(200)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, _) = call(&app, request(Method::GET, "/ready", "", None)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = post(&app, "/v1/completions", json!({"prompt": "late"})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    drain.await.unwrap();
    let c = chunks(&reader.await.unwrap().unwrap());
    assert_eq!(c.last().unwrap()["choices"][0]["finish_reason"], "abort");
    assert_eq!((fake.aborted(), state.inflight()), (1, 0));
}

#[tokio::test]
async fn readiness_follows_loading_and_health_does_not() {
    let state = AppState::new(ServerOptions::default(), Metrics::new().unwrap());
    let app = router(state.clone());
    let get = |p: &str| request(Method::GET, p, "", None);
    assert_eq!(call(&app, get("/health")).await.0, StatusCode::OK);
    assert_eq!(
        call(&app, get("/ready")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(call(&app, get("/metrics")).await.0, StatusCode::OK);
    let (s, b) = call(
        &app,
        request(Method::POST, "/v1/completions", r#"{"prompt": "x"}"#, None),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&b)
    );
    state.set_backend(FakeBackend::new());
    assert_eq!(call(&app, get("/ready")).await.0, StatusCode::OK);
}

/// After an internal error stopped the engine, the process says so everywhere: `/health`
/// (the liveness probe) and `/ready` answer 503 with the reason, generation requests get
/// an OpenAI-shaped 503, and `/metrics` still answers for the alert that follows.
#[tokio::test]
async fn a_stopped_engine_fails_health_readiness_and_requests_with_the_reason() {
    let (app, _, fake) = setup(keyed());
    let get = |p: &str| request(Method::GET, p, "", None);
    assert_eq!(call(&app, get("/health")).await.0, StatusCode::OK);
    fake.fail("index out of bounds in step 7");
    for path in ["/health", "/ready"] {
        let (s, b) = call(&app, get(path)).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let body: Value = serde_json::from_slice(&b).unwrap();
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("index out of bounds in step 7") && msg.contains("restart"),
            "{path}: {body}"
        );
    }
    let (s, body) = post(&app, "/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("index out of bounds"),
        "{body}"
    );
    assert_eq!(call(&app, get("/metrics")).await.0, StatusCode::OK);
    assert!(fake.submitted().is_empty());
}

#[tokio::test]
async fn models_lists_the_served_name_first() {
    let opts = ServerOptions {
        served_model_name: Some("smol".into()),
        ..keyed()
    };
    let (app, _, _) = setup(opts);
    let (s, b) = call(&app, request(Method::GET, "/v1/models", "", Some(KEY))).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "smol");
    assert_eq!(v["data"][0]["owned_by"], "tessera");
    assert_eq!(
        call(&app, request(Method::GET, "/v1/models/smol", "", Some(KEY)))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(
            &app,
            request(Method::GET, "/v1/models/other", "", Some(KEY))
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&app, request(Method::GET, "/v1/models", "", None))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"model": "fake-model", "prompt": "x"}),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "only the served name is listed: {v}"
    );
    let (s, _) = post(
        &app,
        "/v1/completions",
        json!({"model": "smol", "prompt": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn chat_without_a_template_is_a_clear_400() {
    let state = AppState::with_backend(
        keyed(),
        Metrics::new().unwrap(),
        FakeBackend::without_template(),
    );
    let (s, v) = post(
        &router(state),
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("chat template"));
}

/// Checks the text exposition line by line: comments, then `name{labels} value`.
pub(crate) fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if series.contains('{') {
            assert!(series.ends_with('}'), "{line}");
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("{line}")),
        };
        samples.push((series.to_string(), v));
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_carry_every_name() {
    let (app, _, _) = setup(keyed());
    post(
        &app,
        "/v1/completions",
        json!({"prompt": "hello", "max_tokens": 2}),
    )
    .await;
    post(
        &app,
        "/v1/completions",
        json!({"prompt": "hi", "n": 1000000}),
    )
    .await;
    let (s, b) = call(&app, request(Method::GET, "/metrics", "", None)).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(b.to_vec()).unwrap();
    let samples = parse_exposition(&text);
    promtool_accepts(&text);
    let get = |series: &str| samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
    for name in [
        metrics::NUM_REQUESTS_RUNNING,
        metrics::NUM_REQUESTS_WAITING,
        metrics::KV_CACHE_USAGE_PERC,
        metrics::PROMPT_TOKENS_TOTAL,
        metrics::GENERATION_TOKENS_TOTAL,
        metrics::REQUEST_SUCCESS_TOTAL,
        metrics::NUM_PREEMPTIONS_TOTAL,
        metrics::TIME_TO_FIRST_TOKEN_SECONDS,
        metrics::INTER_TOKEN_LATENCY_SECONDS,
        metrics::E2E_REQUEST_LATENCY_SECONDS,
        metrics::REQUEST_QUEUE_TIME_SECONDS,
        metrics::ITERATION_TOKENS_TOTAL,
        metrics::HTTP_REQUESTS_TOTAL,
        metrics::HTTP_REQUEST_DURATION_SECONDS,
        metrics::HTTP_REQUEST_ERRORS_TOTAL,
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert_eq!(
        get(r#"tessera:prompt_tokens_total{model_name="fake-model"}"#),
        Some(6.0)
    );
    assert_eq!(
        get(r#"tessera:generation_tokens_total{model_name="fake-model"}"#),
        Some(2.0)
    );
    assert_eq!(
        get(r#"tessera:request_success_total{finished_reason="length",model_name="fake-model"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(r#"tessera:num_requests_running{model_name="fake-model"}"#),
        Some(0.0)
    );
    assert_eq!(
        get(r#"tessera:time_to_first_token_seconds_count{model_name="fake-model"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(r#"tessera:http_requests_total{method="POST",route="/v1/completions",status="200"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(r#"tessera:http_requests_total{method="POST",route="/v1/completions",status="400"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(
            r#"tessera:http_request_errors_total{error_type="invalid_request_error",route="/v1/completions"}"#
        ),
        Some(1.0)
    );
}

/// `promtool check metrics` (when installed) must parse the exposition. Its only lint
/// findings may be the ones vLLM's names imply: the `tessera:` colon, and the histogram
/// named `iteration_tokens_total`.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed; exposition checked by the parser above only");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool failed:\n{report}"
    );
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let known = line.ends_with("metric names should not contain ':'")
            || line
                == r#"tessera:iteration_tokens_total non-counter metrics should not have "_total" suffix"#;
        assert!(known, "unexpected promtool finding: {line}");
    }
}
