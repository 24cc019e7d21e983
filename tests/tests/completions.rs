//! `/v1/completions` against a real server on the default model: every prompt shape,
//! greedy output equal to the reference, usage equal to the tokenizer's counts, seeded
//! `n > 1`, stop strings, and the legacy logprobs shape with the reference values.

use futures::future::join_all;
use serde_json::{json, Value};
use tessera_tests::{golden, StreamKind, StreamSummary, TestServer};

const PATH: &str = "/v1/completions";

/// The texts of a completion response by choice index (indices must be 0..n, in order).
fn texts(v: &Value) -> Vec<String> {
    let choices = v["choices"]
        .as_array()
        .unwrap_or_else(|| panic!("no choices: {v}"));
    choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "choice {i} has index {}: {v}", c["index"]);
            c["text"]
                .as_str()
                .unwrap_or_else(|| panic!("no text: {v}"))
                .to_string()
        })
        .collect()
}

fn finish_reasons(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["finish_reason"]
                .as_str()
                .unwrap_or_else(|| panic!("finish_reason: {v}"))
                .to_string()
        })
        .collect()
}

/// `(prompt_tokens, completion_tokens)`, checking `total_tokens` is their sum.
fn usage(v: &Value) -> (u64, u64) {
    let u = &v["usage"];
    let (p, c, t) = (
        u["prompt_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("usage: {v}")),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    );
    assert_eq!(t, p + c, "total_tokens: {v}");
    (p, c)
}

fn assert_envelope(v: &Value, model: &str) {
    assert_eq!(v["object"], "text_completion", "{v}");
    assert!(
        v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")),
        "id: {v}"
    );
    assert!(v["created"].is_u64(), "created: {v}");
    assert_eq!(v["model"], model, "{v}");
}

#[tokio::test]
async fn every_prompt_shape_gives_one_choice_per_prompt_and_the_tokenizers_usage() {
    let s = TestServer::shared();
    let api = s.api();
    let story = golden("text_story");
    let other = "The three primary colors are";
    let (ids_a, ids_b) = (s.encode(&story.prompt_text), s.encode(other));
    assert_eq!(
        ids_a, story.prompt_ids,
        "the tokenizer encodes the fixture prompt as the reference"
    );
    let max_tokens = 4;
    let body = |prompt: Value| json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    // Each prompt alone, as text.
    let solo_bodies = [body(json!(story.prompt_text)), body(json!(other))];
    let solo = join_all(solo_bodies.iter().map(|b| api.ok(PATH, b))).await;
    let (a, b) = (texts(&solo[0])[0].clone(), texts(&solo[1])[0].clone());
    assert_eq!(usage(&solo[0]), (ids_a.len() as u64, max_tokens));
    assert_eq!(usage(&solo[1]), (ids_b.len() as u64, max_tokens));
    let cases = [
        ("a string", json!(story.prompt_text), vec![&a], vec![&ids_a]),
        (
            "a list of strings",
            json!([other, story.prompt_text]),
            vec![&b, &a],
            vec![&ids_b, &ids_a],
        ),
        ("token ids", json!(ids_b), vec![&b], vec![&ids_b]),
        (
            "a list of token-id lists",
            json!([ids_a, ids_b, ids_a]),
            vec![&a, &b, &a],
            vec![&ids_a, &ids_b, &ids_a],
        ),
    ];
    let bodies: Vec<Value> = cases
        .iter()
        .map(|(_, prompt, _, _)| body(prompt.clone()))
        .collect();
    let answers = join_all(bodies.iter().map(|b| api.ok(PATH, b))).await;
    for ((shape, _, want_texts, want_ids), v) in cases.iter().zip(&answers) {
        assert_envelope(v, &s.model_name);
        let got = texts(v);
        let want: Vec<String> = want_texts.iter().map(|t| t.to_string()).collect();
        assert_eq!(
            got, want,
            "prompt as {shape}: one choice per prompt, in order, as when alone"
        );
        assert!(
            finish_reasons(v).iter().all(|r| r == "length"),
            "{shape}: {v}"
        );
        let prompt_tokens: usize = want_ids.iter().map(|ids| ids.len()).sum();
        assert_eq!(
            usage(v),
            (prompt_tokens as u64, max_tokens * want_ids.len() as u64),
            "prompt as {shape}: usage"
        );
    }
}

#[tokio::test]
async fn greedy_completions_equal_the_reference_text_from_token_ids_or_text() {
    let s = TestServer::shared();
    let api = s.api();
    let mut requests = Vec::new();
    for name in ["text_story", "text_code"] {
        let g = golden(name);
        for prompt in [json!(g.prompt_ids), json!(g.prompt_text)] {
            let body =
                json!({"prompt": prompt, "max_tokens": g.generated_ids.len(), "temperature": 0});
            requests.push((g.clone(), body));
        }
    }
    let answers = join_all(requests.iter().map(|(_, body)| api.ok(PATH, body))).await;
    for ((g, body), v) in requests.iter().zip(&answers) {
        let what = format!(
            "{} (prompt as {})",
            g.name,
            if body["prompt"].is_string() {
                "text"
            } else {
                "ids"
            }
        );
        assert_envelope(v, &s.model_name);
        assert_eq!(texts(v), [g.generated_text_skip_special.as_str()], "{what}");
        assert_eq!(finish_reasons(v), [g.openai_finish_reason()], "{what}");
        assert_eq!(
            usage(v),
            (g.prompt_ids.len() as u64, g.generated_ids.len() as u64),
            "{what}: usage"
        );
    }
}

#[tokio::test]
async fn seeded_choices_differ_from_each_other_and_repeat_with_the_same_seed() {
    let s = TestServer::shared();
    let api = s.api();
    let story = golden("text_story");
    let (n, max_tokens) = (4, 12);
    let body = |seed: u64, stream: bool| {
        json!({"prompt": story.prompt_ids, "n": n, "seed": seed, "temperature": 1.0, "max_tokens": max_tokens,
               "ignore_eos": true, "stream": stream, "stream_options": {"include_usage": stream}})
    };
    let (seeded, other_seed) = (body(1234, false), body(99, false));
    let (first, again, other) = tokio::join!(
        api.ok(PATH, &seeded),
        api.ok(PATH, &seeded),
        api.ok(PATH, &other_seed)
    );
    let (first_texts, other_texts) = (texts(&first), texts(&other));
    assert_eq!(first_texts.len(), n);
    for i in 0..n {
        for j in 0..i {
            assert_ne!(
                first_texts[i], first_texts[j],
                "choices {j} and {i} of one seeded request are equal"
            );
        }
    }
    assert_eq!(
        texts(&again),
        first_texts,
        "the same seed gives the same choices"
    );
    assert_ne!(other_texts, first_texts, "another seed gives other choices");
    // The prompt counts once, whatever n is.
    assert_eq!(
        usage(&first),
        (story.prompt_ids.len() as u64, (n * max_tokens) as u64)
    );
    // Streamed, the interleaved chunks add up to the same choices.
    let events = api.stream(PATH, &body(1234, true)).await.collect().await;
    let streamed = StreamSummary::fold(StreamKind::Completion, &events);
    assert_eq!(
        streamed.texts(),
        first_texts,
        "streaming with the same seed"
    );
    assert!(streamed
        .choices
        .values()
        .all(|c| c.finish_reason == "length"));
    assert_eq!(
        streamed.usage.as_ref(),
        Some(&first["usage"]),
        "streamed usage"
    );
}

#[tokio::test]
async fn a_stop_string_split_across_tokens_ends_the_text_before_it() {
    let s = TestServer::shared();
    let api = s.api();
    // The reference continues " had a daughter named Elara." with the tokens " El" + "ara".
    let story = golden("text_story");
    assert!(story
        .generated_text_skip_special
        .starts_with(" had a daughter named Elara."));
    let want = " had a daughter named ";
    for stop in [json!("Elara"), json!(["never appears", "Elara"])] {
        let body =
            json!({"prompt": story.prompt_ids, "max_tokens": 20, "temperature": 0, "stop": stop});
        let v = api.ok(PATH, &body).await;
        assert_eq!(texts(&v), [want], "stop {stop}");
        assert_eq!(finish_reasons(&v), ["stop"], "stop {stop}");
        // The tokens up to the one that completed the stop string were generated.
        assert_eq!(
            usage(&v),
            (story.prompt_ids.len() as u64, 6),
            "stop {stop}: usage"
        );
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = api.stream(PATH, &streamed).await.collect().await;
        let sum = StreamSummary::fold(StreamKind::Completion, &events);
        let c = sum.only();
        assert_eq!(
            c.text, want,
            "streamed with stop {stop}: pieces {:?}",
            c.pieces
        );
        assert_eq!(c.finish_reason, "stop");
    }
}

/// The reference chat_capital prompt as raw token ids: greedy gives "The capital of France
/// is Paris." then EOS; each token's logprob and top 5 within 1e-3 of the reference.
#[tokio::test]
async fn completion_logprobs_have_the_legacy_shape_and_the_reference_values() {
    let s = TestServer::shared();
    let api = s.api();
    let g = golden("chat_capital");
    let body = json!({"prompt": g.prompt_ids, "max_tokens": 16, "temperature": 0, "logprobs": 5});
    let v = api.ok(PATH, &body).await;
    assert_eq!(texts(&v), [g.generated_text_skip_special.as_str()]);
    assert_eq!(finish_reasons(&v), ["stop"]);
    assert_eq!(
        usage(&v),
        (g.prompt_ids.len() as u64, g.generated_ids.len() as u64)
    );
    let lp = &v["choices"][0]["logprobs"];
    check_legacy_logprobs(s, &g, lp, &g.generated_text_skip_special);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = api.stream(PATH, &streamed).await.collect().await;
    let sum = StreamSummary::fold(StreamKind::Completion, &events);
    let c = sum.only();
    assert_eq!(c.text, g.generated_text_skip_special);
    let slp = c.legacy_logprobs.as_ref().expect("logprobs in the stream");
    check_legacy_logprobs(s, &g, slp, &g.generated_text_skip_special);
    assert_eq!(slp["tokens"], lp["tokens"], "streamed tokens");
    assert_eq!(
        slp["text_offset"], lp["text_offset"],
        "streamed text offsets"
    );
}

fn check_legacy_logprobs(s: &TestServer, g: &tessera_tests::GoldenPrompt, lp: &Value, text: &str) {
    let arr = |k: &str| {
        lp[k]
            .as_array()
            .unwrap_or_else(|| panic!("logprobs.{k}: {lp}"))
            .clone()
    };
    let (tokens, token_lps, tops, offsets) = (
        arr("tokens"),
        arr("token_logprobs"),
        arr("top_logprobs"),
        arr("text_offset"),
    );
    let n = g.generated_ids.len();
    for (k, a) in [
        ("tokens", &tokens),
        ("token_logprobs", &token_lps),
        ("top_logprobs", &tops),
        ("text_offset", &offsets),
    ] {
        assert_eq!(
            a.len(),
            n,
            "logprobs.{k} has one entry per generated token: {lp}"
        );
    }
    let mut offset = 0u64;
    let mut joined = String::new();
    for (i, step) in g.steps.iter().enumerate() {
        let tok = tokens[i].as_str().unwrap();
        assert_eq!(tok, s.token_text(g.generated_ids[i]), "token {i}");
        assert_eq!(offsets[i], offset, "text_offset {i}: {lp}");
        offset += tok.chars().count() as u64;
        if i + 1 < n {
            joined.push_str(tok);
        }
        let got = token_lps[i].as_f64().unwrap();
        assert!(
            (got - step.logprob).abs() < 1e-3,
            "token {i}: logprob {got} vs reference {}",
            step.logprob
        );
        let top = tops[i]
            .as_object()
            .unwrap_or_else(|| panic!("top_logprobs {i}: {lp}"));
        assert_eq!(top.len(), 5, "top_logprobs {i} has 5 alternatives: {top:?}");
        for (&id, &want) in step.top5_ids.iter().zip(&step.top5_logprobs) {
            let key = s.token_text(id);
            let got = top
                .get(&key)
                .and_then(Value::as_f64)
                .unwrap_or_else(|| panic!("top_logprobs {i} lacks {key:?}: {top:?}"));
            assert!(
                (got - want).abs() < 1e-3,
                "token {i}, alternative {key:?}: {got} vs reference {want}"
            );
        }
    }
    assert_eq!(joined, text, "the tokens before EOS spell the text");
}
