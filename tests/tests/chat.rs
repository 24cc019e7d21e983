//! `/v1/chat/completions` against a real server on the default model: the reference answer
//! without and with streaming (the SSE framing parsed strictly), usage, stop strings,
//! seeded `n > 1` streams, and logprobs with `top_logprobs` against the reference.

use serde_json::{json, Value};
use tessera_tests::{golden, GoldenPrompt, StreamKind, StreamSummary, TestServer};

const PATH: &str = "/v1/chat/completions";

fn capital_request(g: &GoldenPrompt) -> Value {
    json!({"model": TestServer::shared().model_name, "messages": g.messages(), "max_tokens": 32, "temperature": 0})
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn chat_answers_the_capital_of_france_like_the_reference() {
    let s = TestServer::shared();
    let g = golden("chat_capital");
    assert_eq!(
        g.generated_text_skip_special,
        "The capital of France is Paris."
    );
    let v = s.api().ok(PATH, &capital_request(&g)).await;
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(
        v["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")),
        "{v}"
    );
    assert_eq!(v["model"], s.model_name.as_str());
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1, "{v}");
    let c = &choices[0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant", "{v}");
    assert_eq!(
        c["message"]["content"], "The capital of France is Paris.",
        "{v}"
    );
    assert_eq!(c["finish_reason"], "stop", "{v}");
    // The prompt is the rendered template; the completion counts EOS, as the reference.
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], g.prompt_ids.len(), "{v}");
    assert_eq!(u["completion_tokens"], g.generated_ids.len(), "{v}");
    assert_eq!(
        u["total_tokens"],
        g.prompt_ids.len() + g.generated_ids.len(),
        "{v}"
    );
}

/// A system message, several turns and non-ASCII text go through the chat template as the
/// reference renders them: the prompt counts and the greedy answers are the reference's.
#[tokio::test]
async fn greedy_chat_answers_equal_the_reference_for_system_multiturn_and_unicode_prompts() {
    let s = TestServer::shared();
    let api = s.api();
    let fixtures: Vec<GoldenPrompt> =
        ["chat_system_colors", "chat_multiturn", "chat_unicode_emoji"]
            .into_iter()
            .map(golden)
            .collect();
    let bodies: Vec<Value> = fixtures
        .iter()
        .map(|g| json!({"messages": g.messages(), "max_tokens": g.generated_ids.len(), "temperature": 0}))
        .collect();
    let answers = futures::future::join_all(bodies.iter().map(|b| api.ok(PATH, b))).await;
    for (g, v) in fixtures.iter().zip(&answers) {
        let c = &v["choices"][0];
        assert_eq!(
            c["message"]["content"],
            g.generated_text_skip_special.as_str(),
            "{}: {v}",
            g.name
        );
        assert_eq!(
            c["finish_reason"],
            g.openai_finish_reason(),
            "{}: {v}",
            g.name
        );
        assert_eq!(
            v["usage"]["prompt_tokens"],
            g.prompt_ids.len(),
            "{}: {v}",
            g.name
        );
        assert_eq!(
            v["usage"]["completion_tokens"],
            g.generated_ids.len(),
            "{}: {v}",
            g.name
        );
    }
}

#[tokio::test]
async fn chat_stream_sends_role_then_content_then_finish_then_usage_then_done() {
    let s = TestServer::shared();
    let api = s.api();
    let g = golden("chat_capital");
    let body = with(
        capital_request(&g),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let events = api.stream(PATH, &body).await.collect().await;
    let sum = StreamSummary::fold(StreamKind::Chat, &events);
    // fold checked: role on the first chunk only, nothing after finish_reason, the usage
    // chunk last with `choices: []`, one id and model throughout; the reader checked the
    // framing and that [DONE] came exactly once, last.
    let first = &events[0]["choices"][0];
    assert_eq!(
        first["delta"]["role"], "assistant",
        "the first chunk carries the role: {}",
        events[0]
    );
    let c = sum.only();
    assert_eq!(
        c.text, "The capital of France is Paris.",
        "pieces {:?}",
        c.pieces
    );
    assert!(
        c.pieces.len() > 1,
        "content comes in several deltas: {:?}",
        c.pieces
    );
    assert_eq!(c.finish_reason, "stop");
    let last_choice_chunk = &events[events.len() - 2];
    assert_eq!(
        last_choice_chunk["choices"][0]["finish_reason"], "stop",
        "{last_choice_chunk}"
    );
    let usage = sum
        .usage
        .as_ref()
        .expect("a usage chunk with include_usage");
    assert_eq!(usage["prompt_tokens"], g.prompt_ids.len(), "{usage}");
    assert_eq!(usage["completion_tokens"], g.generated_ids.len(), "{usage}");
    assert_eq!(
        usage["total_tokens"],
        g.prompt_ids.len() + g.generated_ids.len(),
        "{usage}"
    );
    assert_eq!(sum.model, s.model_name);

    // Without include_usage there is no usage chunk.
    let plain = with(capital_request(&g), json!({"stream": true}));
    let events = api.stream(PATH, &plain).await.collect().await;
    let sum = StreamSummary::fold(StreamKind::Chat, &events);
    assert!(sum.usage.is_none(), "a usage chunk without include_usage");
    assert_eq!(sum.only().text, "The capital of France is Paris.");
}

#[tokio::test]
async fn content_as_text_parts_gives_the_same_answer_as_a_string() {
    let s = TestServer::shared();
    let g = golden("chat_capital");
    let body = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
                      "max_tokens": 32, "temperature": 0});
    let v = s.api().ok(PATH, &body).await;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        g.generated_text_skip_special.as_str(),
        "{v}"
    );
    assert_eq!(v["usage"]["prompt_tokens"], g.prompt_ids.len(), "{v}");
}

#[tokio::test]
async fn a_chat_stop_string_split_across_tokens_ends_the_text_before_it() {
    let s = TestServer::shared();
    let api = s.api();
    let g = golden("chat_capital");
    // "s Par" spans the tokens " is" and " Paris".
    let body = with(capital_request(&g), json!({"stop": ["s Par"]}));
    let v = api.ok(PATH, &body).await;
    assert_eq!(
        v["choices"][0]["message"]["content"], "The capital of France i",
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let events = api
        .stream(PATH, &with(body, json!({"stream": true})))
        .await
        .collect()
        .await;
    let sum = StreamSummary::fold(StreamKind::Chat, &events);
    let c = sum.only();
    assert_eq!(
        c.text, "The capital of France i",
        "no piece of the stop string is sent: {:?}",
        c.pieces
    );
    assert_eq!(c.finish_reason, "stop");
}

#[tokio::test]
async fn seeded_chat_streams_of_n_choices_repeat_the_non_streamed_choices() {
    let s = TestServer::shared();
    let api = s.api();
    let g = golden("chat_poem");
    let body = json!({"messages": g.messages(), "n": 3, "seed": 7, "temperature": 0.9, "max_tokens": 10, "ignore_eos": true});
    let streamed = with(
        body.clone(),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let (whole, events) = tokio::join!(api.ok(PATH, &body), async {
        api.stream(PATH, &streamed).await.collect().await
    });
    let whole_texts: Vec<String> = whole["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "{whole}");
            c["message"]["content"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(whole_texts.len(), 3);
    assert!(
        whole_texts[0] != whole_texts[1]
            && whole_texts[1] != whole_texts[2]
            && whole_texts[0] != whole_texts[2],
        "the choices of one seeded request differ: {whole_texts:?}"
    );
    let sum = StreamSummary::fold(StreamKind::Chat, &events);
    assert_eq!(
        sum.texts(),
        whole_texts,
        "the stream gives the same choices as the same seed without it"
    );
    assert!(sum.choices.values().all(|c| c.finish_reason == "length"));
    let usage = sum.usage.expect("usage chunk");
    assert_eq!(usage, whole["usage"], "usage");
    assert_eq!(
        usage["prompt_tokens"],
        g.prompt_ids.len(),
        "the prompt counts once for n = 3"
    );
    assert_eq!(usage["completion_tokens"], 30);
}

#[tokio::test]
async fn chat_logprobs_and_top_logprobs_match_the_reference() {
    let s = TestServer::shared();
    let api = s.api();
    let g = golden("chat_capital");
    let body = with(
        capital_request(&g),
        json!({"logprobs": true, "top_logprobs": 5}),
    );
    let v = api.ok(PATH, &body).await;
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs.content: {v}"))
        .clone();
    check_chat_logprobs(s, &g, &content);

    let events = api
        .stream(PATH, &with(body, json!({"stream": true})))
        .await
        .collect()
        .await;
    let sum = StreamSummary::fold(StreamKind::Chat, &events);
    check_chat_logprobs(s, &g, &sum.only().chat_logprobs);
    assert_eq!(
        sum.only().chat_logprobs,
        content,
        "streamed logprobs equal the whole answer's"
    );

    // logprobs without top_logprobs: the chosen tokens only.
    let v = api
        .ok(PATH, &with(capital_request(&g), json!({"logprobs": true})))
        .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), g.generated_ids.len(), "{v}");
    assert!(
        content
            .iter()
            .all(|e| e["top_logprobs"].as_array().is_some_and(Vec::is_empty)),
        "{v}"
    );
}

/// One entry per generated token (EOS included): token, logprob, bytes and 5 alternatives,
/// most likely first, each within 1e-3 of the reference (alternatives compared by rank;
/// near-equal ones may swap places).
fn check_chat_logprobs(s: &TestServer, g: &GoldenPrompt, content: &[Value]) {
    assert_eq!(
        content.len(),
        g.generated_ids.len(),
        "one logprobs entry per token: {content:?}"
    );
    for (i, (e, step)) in content.iter().zip(&g.steps).enumerate() {
        let id = g.generated_ids[i];
        assert_eq!(e["token"], s.token_text(id).as_str(), "token {i}: {e}");
        let bytes: Vec<u8> = s.tokenizer().token_bytes(id).to_vec();
        assert_eq!(e["bytes"], json!(bytes), "token {i}: bytes: {e}");
        let lp = e["logprob"].as_f64().unwrap();
        assert!(
            (lp - step.logprob).abs() < 1e-3,
            "token {i}: logprob {lp} vs reference {}",
            step.logprob
        );
        let top = e["top_logprobs"]
            .as_array()
            .unwrap_or_else(|| panic!("token {i}: {e}"));
        assert_eq!(top.len(), 5, "token {i}: {e}");
        let mut prev = f64::INFINITY;
        for (j, (alt, (&ref_id, &ref_lp))) in top
            .iter()
            .zip(step.top5_ids.iter().zip(&step.top5_logprobs))
            .enumerate()
        {
            let alt_lp = alt["logprob"].as_f64().unwrap();
            assert!(alt_lp <= prev, "token {i}: alternatives not sorted: {e}");
            prev = alt_lp;
            assert!(
                (alt_lp - ref_lp).abs() < 1e-3,
                "token {i} rank {j}: {alt_lp} vs reference {ref_lp}: {e}"
            );
            let near_tie = step
                .top5_logprobs
                .iter()
                .enumerate()
                .any(|(k, &o)| k != j && (o - ref_lp).abs() < 2e-3);
            if !near_tie {
                assert_eq!(
                    alt["token"],
                    s.token_text(ref_id).as_str(),
                    "token {i} rank {j}: {e}"
                );
            }
            assert!(alt["bytes"].is_array(), "token {i} rank {j}: bytes: {e}");
        }
    }
}
