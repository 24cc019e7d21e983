//! `/metrics` of a real server: clients that drop mid-stream are cancelled in the engine
//! (the gauges return to 0 and the counters add up), and `promtool check metrics` accepts
//! the exposition. Each test has its own server, so the counters are its own.

use std::time::{Duration, Instant};

use engine::EngineConfig;
use futures::future::join_all;
use serde_json::json;
use server::metrics as names;
use tessera_tests::{golden, poll_until, promtool_check, Samples, ServerSpec, TestServer};

const CMPL: &str = "/v1/completions";

fn gauges(m: &Samples, model: &str) -> (f64, f64, f64) {
    let l = [("model_name", model)];
    (
        m.value(names::NUM_REQUESTS_RUNNING, &l),
        m.value(names::NUM_REQUESTS_WAITING, &l),
        m.value(names::KV_CACHE_USAGE_PERC, &l),
    )
}

/// Three clients read two events each of a 1000-token stream, then drop it. Generating
/// the rest would take tens of seconds; the gauges must be back at 0 within 5 s.
#[tokio::test]
async fn dropped_streams_are_cancelled_and_the_gauges_return_to_zero() {
    let spec = ServerSpec {
        engine: EngineConfig {
            threads: 2,
            kv_cache_bytes: 256 << 20,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = TestServer::start_with(spec);
    let api = s.api();
    let model = s.model_name.as_str();
    let story = golden("text_story");
    let prompt_len = story.prompt_ids.len() as f64;
    let (clients, max_tokens) = (3, 1000);
    let body = json!({"prompt": story.prompt_ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut streams = join_all((0..clients).map(|_| api.stream(CMPL, &body))).await;
    for st in &mut streams {
        for _ in 0..2 {
            st.next().await.expect("an event before the drop");
        }
    }
    let (running, waiting, kv) = gauges(&api.metrics().await, model);
    assert_eq!(
        (running, waiting),
        (clients as f64, 0.0),
        "while the streams run"
    );
    assert!(
        kv > 0.0 && kv <= 1.0,
        "kv_cache_usage_perc while the streams run: {kv}"
    );

    let dropped_at = Instant::now();
    drop(streams);
    let settled = poll_until(Duration::from_secs(5), || async {
        let m = api.metrics().await;
        (gauges(&m, model) == (0.0, 0.0, 0.0)).then_some(m)
    })
    .await;
    let m = match settled {
        Some(m) => m,
        None => panic!(
            "5 s after the clients dropped, (running, waiting, kv usage) = {:?}",
            gauges(&api.metrics().await, model)
        ),
    };
    eprintln!("gauges back at 0 {:?} after the drop", dropped_at.elapsed());
    let l = [("model_name", model)];
    let reason = |r: &str| {
        m.value(
            names::REQUEST_SUCCESS_TOTAL,
            &[("model_name", model), ("finished_reason", r)],
        )
    };
    assert_eq!(
        reason("length") + reason("stop") + reason("error"),
        0.0,
        "a dropped request is no success"
    );
    let generated = m.value(names::GENERATION_TOKENS_TOTAL, &l);
    assert!(
        generated >= (clients * 2) as f64 && generated < (clients * max_tokens) as f64,
        "generation_tokens_total after the drop: {generated}"
    );
    assert_eq!(
        reason("abort"),
        clients as f64,
        "every dropped request counts as request_success_total{{finished_reason=\"abort\"}}"
    );

    // One request to its end afterwards; the counters add it exactly.
    let v = api
        .ok(CMPL, &json!({"prompt": story.prompt_ids, "max_tokens": 5, "temperature": 0, "ignore_eos": true}))
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // The engine publishes its gauges at the end of the step that sent the last token,
    // so they may lag the response by a moment.
    let after = poll_until(Duration::from_secs(5), || async {
        let m = api.metrics().await;
        (gauges(&m, model) == (0.0, 0.0, 0.0)).then_some(m)
    })
    .await
    .expect("the gauges return to 0 after the last request");
    assert_eq!(
        after.value(names::PROMPT_TOKENS_TOTAL, &l),
        prompt_len * (clients + 1) as f64,
        "prompt_tokens_total"
    );
    assert_eq!(
        after.value(names::GENERATION_TOKENS_TOTAL, &l),
        generated + 5.0,
        "generation_tokens_total"
    );
    let reason_after = |r: &str| {
        after.value(
            names::REQUEST_SUCCESS_TOTAL,
            &[("model_name", model), ("finished_reason", r)],
        )
    };
    assert_eq!(
        reason_after("length"),
        1.0,
        "request_success_total{{length}}"
    );
    assert_eq!(reason_after("stop"), 0.0);
    assert_eq!(
        reason_after("abort"),
        reason("abort"),
        "the finished request is no abort"
    );
    for h in [
        names::E2E_REQUEST_LATENCY_SECONDS,
        names::TIME_TO_FIRST_TOKEN_SECONDS,
        names::REQUEST_QUEUE_TIME_SECONDS,
    ] {
        let count = after.value(&format!("{h}_count"), &l);
        assert_eq!(
            count, 1.0,
            "{h}_count counts requests that ran to their end"
        );
    }
    let ok = after.value(
        "tessera:http_requests_total",
        &[("route", CMPL), ("method", "POST"), ("status", "200")],
    );
    assert_eq!(ok, (clients + 1) as f64, "http_requests_total{{200}}");
    s.stop().expect("clean shutdown");
}

#[tokio::test]
async fn promtool_accepts_the_metrics_after_traffic() {
    let s = TestServer::start();
    let api = s.api();
    let story = golden("text_story");
    let chat = golden("chat_capital");
    api.ok(
        CMPL,
        &json!({"prompt": story.prompt_text, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    let events = api
        .stream(
            "/v1/chat/completions",
            &json!({"messages": chat.messages(), "max_tokens": 3, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await
        .collect()
        .await;
    assert!(!events.is_empty());
    let (status, _) = api
        .post(CMPL, &json!({"prompt": "x", "temperature": -1}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(api.get("/no/such/route").await.0, 404);
    assert_eq!(api.get("/v1/models").await.0, 200);

    let res = api.client.get(api.url("/metrics")).send().await.unwrap();
    let ctype = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "content-type {ctype}"
    );
    let text = res.text().await.unwrap();
    if let Err(e) = promtool_check(&text) {
        panic!("{e}\n--- the exposition:\n{text}");
    }
    for name in [
        names::NUM_REQUESTS_RUNNING,
        names::NUM_REQUESTS_WAITING,
        names::KV_CACHE_USAGE_PERC,
        names::PROMPT_TOKENS_TOTAL,
        names::GENERATION_TOKENS_TOTAL,
        names::REQUEST_SUCCESS_TOTAL,
        names::NUM_PREEMPTIONS_TOTAL,
        names::TIME_TO_FIRST_TOKEN_SECONDS,
        names::INTER_TOKEN_LATENCY_SECONDS,
        names::E2E_REQUEST_LATENCY_SECONDS,
        names::REQUEST_QUEUE_TIME_SECONDS,
        names::ITERATION_TOKENS_TOTAL,
    ] {
        assert!(name.starts_with("tessera:"), "{name}");
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(name)
                    && l.contains(&format!("model_name=\"{}\"", s.model_name))),
            "{name} has no sample labelled with the model name:\n{text}"
        );
    }
    let m = Samples::parse(&text);
    let l = [("model_name", s.model_name.as_str())];
    assert_eq!(
        m.value(
            names::REQUEST_SUCCESS_TOTAL,
            &[l[0], ("finished_reason", "length")]
        ),
        2.0
    );
    assert_eq!(m.value(names::GENERATION_TOKENS_TOTAL, &l), 6.0);
    s.stop().expect("clean shutdown");
}
