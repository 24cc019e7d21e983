//! SIGTERM on the real `tessera` binary: stop accepting, let in-flight streams finish within
//! `--shutdown-timeout`, end the rest with finish_reason "abort", exit 0.
//!
//! Needs `target/release/tessera` built from the current sources (scripts/test builds every
//! target first; by hand: `cargo build --release -p tessera-server --bin tessera`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::{
    error_shape, golden, poll_until, Api, ServerProcess, StreamKind, StreamSummary,
};

const CMPL: &str = "/v1/completions";

fn story_stream(max_tokens: usize) -> Value {
    json!({"prompt": golden("text_story").prompt_ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
           "stream": true, "stream_options": {"include_usage": true}})
}

/// What `/ready` says after the signal: 503, or nothing (the listener is closed).
async fn not_ready(api: &Api) -> Option<String> {
    match api.client.get(api.url("/ready")).send().await {
        Ok(r) if r.status() == 503 => Some("503".into()),
        Ok(_) => None,
        Err(e) if e.is_connect() => Some("listener closed".into()),
        Err(e) => Some(format!("error {e}")),
    }
}

#[tokio::test]
async fn sigterm_lets_the_inflight_stream_finish_then_exits_0() {
    let mut p = ServerProcess::spawn(&["--shutdown-timeout", "20"]);
    p.wait_ready(Duration::from_secs(30)).await;
    let api = p.api();
    let max_tokens = 60;
    let mut stream = api.stream(CMPL, &story_stream(max_tokens)).await;
    stream
        .next()
        .await
        .expect("a first chunk before the signal");
    p.sigterm();

    let seen = poll_until(Duration::from_secs(5), || not_ready(&api)).await;
    let seen =
        seen.unwrap_or_else(|| panic!("/ready still 200 5 s after SIGTERM; log:\n{}", p.logs()));
    assert!(!seen.starts_with("error"), "/ready after SIGTERM: {seen}");
    eprintln!("/ready after SIGTERM: {seen}");
    // A new request is refused while draining (or finds the listener closed).
    match api
        .try_post_raw(CMPL, br#"{"prompt": "x", "max_tokens": 1}"#.to_vec())
        .await
    {
        Ok((status, text)) => {
            assert_eq!(status, 503, "a new request while draining: {text}");
            let body: Value = serde_json::from_str(&text).unwrap();
            let err = error_shape(&body).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(err["type"], "service_unavailable", "{text}");
        }
        // The listener closed: refused too.
        Err(e) => eprintln!("a new request while draining: {e}"),
    }

    let events = stream.collect().await;
    let sum = StreamSummary::fold(StreamKind::Completion, &events);
    let c = sum.only();
    assert_eq!(
        c.finish_reason,
        "length",
        "the in-flight stream finishes normally; log:\n{}",
        p.logs()
    );
    assert_eq!(
        sum.usage.as_ref().unwrap()["completion_tokens"],
        max_tokens,
        "all its tokens"
    );
    assert!(
        c.text
            .starts_with(&golden("text_story").generated_text_skip_special),
        "text {:?}",
        c.text
    );

    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{}",
        p.logs()
    );
}

#[tokio::test]
async fn sigterm_aborts_a_stream_still_running_at_the_shutdown_timeout_and_exits_0() {
    let mut p = ServerProcess::spawn(&["--shutdown-timeout", "1"]);
    p.wait_ready(Duration::from_secs(30)).await;
    let api = p.api();
    let max_tokens = 2000;
    let mut stream = api.stream(CMPL, &story_stream(max_tokens)).await;
    stream
        .next()
        .await
        .expect("a first chunk before the signal");
    p.sigterm();
    let signalled = Instant::now();

    let events = stream.collect().await;
    let waited = signalled.elapsed();
    let sum = StreamSummary::fold(StreamKind::Completion, &events);
    assert_eq!(sum.only().finish_reason, "abort", "log:\n{}", p.logs());
    let generated = sum.usage.as_ref().expect("the usage chunk still comes")["completion_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        generated > 0 && generated < max_tokens as u64,
        "completion_tokens {generated}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "the stream was aborted {waited:?} after SIGTERM, before the 1 s shutdown timeout"
    );

    eprintln!("aborted {waited:?} after SIGTERM, after {generated} tokens");
    let status = p.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{}",
        p.logs()
    );
    assert!(
        waited < Duration::from_secs(10),
        "the abort took {waited:?}"
    );
}
