//! Handler tests of the LoRA endpoints and of adapter selection, over the fake backend
//! (its tiny model shape, see `fake::fake_model_config`) with tiny adapters written here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use axum::Router;
use serde_json::{json, Value};

use crate::api_tests::{call, chunks, keyed, parse_exposition, post, request, setup, KEY};
use crate::fake::FakeMode;
use crate::state::{LoraOptions, ServerOptions};

/// A fresh temp folder (canonical).
fn temp(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "tessera-lora-api-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d.canonicalize().unwrap()
}

/// A minimal safetensors file of f32 tensors (8-byte header length, JSON header, data).
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend((0..offset / 4).flat_map(|i| (0.01 * (i % 7) as f32).to_le_bytes()));
    std::fs::write(path, out).unwrap();
}

/// A rank-`r` q_proj adapter for the fake model (2 layers, q_proj [8, 8]).
fn write_adapter(dir: &Path, r: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut t = Vec::new();
    for l in 0..2 {
        let key = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
        t.push((format!("{key}.lora_A.weight"), vec![r, 8]));
        t.push((format!("{key}.lora_B.weight"), vec![8, r]));
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &t);
    let cfg = json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"], "bias": "none"});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

/// A root with adapters `r2` (rank 2), `r4` (rank 4) and `r16` (rank 16, above the limit of 8).
fn root_with_adapters() -> PathBuf {
    let root = temp("root");
    write_adapter(&root.join("r2"), 2);
    write_adapter(&root.join("r4"), 4);
    write_adapter(&root.join("r16"), 16);
    root
}

fn lora_opts(root: Option<&Path>) -> ServerOptions {
    ServerOptions {
        lora: LoraOptions {
            max_loras: 2,
            max_lora_rank: 8,
            max_cpu_loras: 4,
            root: root.map(Path::to_path_buf),
        },
        ..keyed()
    }
}

/// POST with the key; the body as text (the adapter endpoints answer in plain text).
async fn post_text(app: &Router, path: &str, body: Value) -> (StatusCode, String) {
    let (s, b) = call(
        app,
        request(Method::POST, path, body.to_string(), Some(KEY)),
    )
    .await;
    (s, String::from_utf8_lossy(&b).into_owned())
}

async fn load(app: &Router, name: &str, path: &str, inplace: bool) -> (StatusCode, String) {
    let body = json!({"lora_name": name, "lora_path": path, "load_inplace": inplace});
    post_text(app, "/v1/load_lora_adapter", body).await
}

async fn get(app: &Router, path: &str) -> (StatusCode, Value) {
    let (s, b) = call(app, request(Method::GET, path, "", Some(KEY))).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn error_of(text: &str) -> Value {
    serde_json::from_str::<Value>(text).unwrap_or_else(|e| panic!("{e}: {text}"))["error"].clone()
}

#[tokio::test]
async fn adapters_load_list_replace_and_unload() {
    let root = root_with_adapters();
    let (app, _, _) = setup(lora_opts(Some(&root)));
    let (s, t) = load(&app, "a", "r2", false).await;
    assert_eq!(
        (s, t.as_str()),
        (
            StatusCode::OK,
            "Success: LoRA adapter 'a' added successfully."
        )
    );
    let (_, v) = get(&app, "/v1/lora_adapters").await;
    let want_path = root.join("r2").display().to_string();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["name"], "a");
    assert_eq!(v["data"][0]["path"], want_path.as_str());
    assert_eq!(v["data"][0]["rank"], 2);
    assert_eq!(v["data"][0]["state"], "loaded");
    assert_eq!(v["data"][0]["parent"], "fake-model");
    assert_eq!(v["data"][0]["bytes"], 2 * (2 * 8 + 2 * 8) * 4);

    let (s, t) = load(&app, "a", "r4", false).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let e = error_of(&t);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("already been loaded"),
        "{e}"
    );
    assert_eq!(e["param"], "lora_name");
    let (s, _) = load(&app, "a", "r4", true).await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = get(&app, "/v1/lora_adapters").await;
    assert_eq!(v["data"][0]["rank"], 4, "load_inplace replaced it");

    let (s, v) = get(&app, "/v1/models").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"][0]["id"], "fake-model");
    assert!(v["data"][0]["parent"].is_null());
    assert_eq!(v["data"][1]["id"], "a");
    assert_eq!(v["data"][1]["parent"], "fake-model");
    assert_eq!(
        v["data"][1]["root"],
        root.join("r4").display().to_string().as_str()
    );
    let (s, v) = get(&app, "/v1/models/a").await;
    assert_eq!((s, &v["parent"]), (StatusCode::OK, &json!("fake-model")));

    let (s, t) = post_text(&app, "/v1/unload_lora_adapter", json!({"lora_name": "a"})).await;
    assert_eq!(
        (s, t.as_str()),
        (
            StatusCode::OK,
            "Success: LoRA adapter 'a' removed successfully."
        )
    );
    let (s, t) = post_text(&app, "/v1/unload_lora_adapter", json!({"lora_name": "a"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let e = error_of(&t);
    assert_eq!(
        (e["type"].as_str(), e["param"].as_str()),
        (Some("not_found_error"), Some("lora_name"))
    );
    assert_eq!(e["message"], "The lora adapter 'a' cannot be found.");
    let (_, v) = get(&app, "/v1/lora_adapters").await;
    assert_eq!(v["data"], json!([]));
    let (s, _) = get(&app, "/v1/models/a").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn a_request_naming_an_adapter_runs_with_it() {
    let root = root_with_adapters();
    let (app, _, fake) = setup(lora_opts(Some(&root)));
    assert_eq!(load(&app, "a", "r2", false).await.0, StatusCode::OK);
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"model": "a", "prompt": "hi", "n": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["model"], "a", "responses name the adapter");
    let names: Vec<Option<String>> = fake
        .submitted()
        .iter()
        .map(|r| r.adapter.as_ref().map(|a| a.name.clone()))
        .collect();
    assert_eq!(
        names,
        [Some("a".to_string()), Some("a".to_string())],
        "every choice carries the adapter"
    );
    let chat = json!({"model": "a", "messages": [{"role": "user", "content": "x"}]});
    let (s, v) = post(&app, "/v1/chat/completions", chat).await;
    assert_eq!((s, &v["model"]), (StatusCode::OK, &json!("a")));
    assert_eq!(
        fake.submitted()
            .last()
            .unwrap()
            .adapter
            .as_ref()
            .unwrap()
            .max_rank,
        2
    );
    for model in [json!("fake-model"), json!(""), Value::Null] {
        let (s, v) = post(
            &app,
            "/v1/completions",
            json!({"model": model, "prompt": "hi"}),
        )
        .await;
        assert_eq!(
            (s, &v["model"]),
            (StatusCode::OK, &json!("fake-model")),
            "{model}"
        );
        assert!(
            fake.submitted().last().unwrap().adapter.is_none(),
            "{model} runs on the base"
        );
    }
    let (s, v) = post(
        &app,
        "/v1/completions",
        json!({"model": "b", "prompt": "hi"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        v["error"]["message"],
        "The model `b` does not exist. Available models: `fake-model`, `a`."
    );
    post_text(&app, "/v1/unload_lora_adapter", json!({"lora_name": "a"})).await;
    let (s, _) = post(
        &app,
        "/v1/completions",
        json!({"model": "a", "prompt": "hi"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "an unloaded name is a 404");
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn unload_leaves_a_running_request_alone() {
    let root = root_with_adapters();
    let (app, _, fake) = setup(lora_opts(Some(&root)));
    load(&app, "a", "r2", false).await;
    fake.set_mode(FakeMode::Hang);
    let res = tower::ServiceExt::oneshot(
        app.clone(),
        request(
            Method::POST,
            "/v1/completions",
            json!({"model": "a", "prompt": "abc", "stream": true}).to_string(),
            Some(KEY),
        ),
    )
    .await
    .unwrap();
    let reader = tokio::spawn(axum::body::to_bytes(res.into_body(), usize::MAX));
    assert_eq!(
        post_text(&app, "/v1/unload_lora_adapter", json!({"lora_name": "a"}))
            .await
            .0,
        StatusCode::OK
    );
    let held = fake.submitted().pop().unwrap().adapter.unwrap();
    assert_eq!(
        (held.name.as_str(), held.max_rank),
        ("a", 2),
        "the request keeps its version"
    );
    fake.set_mode(FakeMode::Echo);
    fake_abort(&fake);
    let c = chunks(&reader.await.unwrap().unwrap());
    assert_eq!(c.last().unwrap()["choices"][0]["finish_reason"], "abort");
    std::fs::remove_dir_all(root).unwrap();
}

async fn wait_idle(fake: &crate::fake::FakeBackend) {
    for _ in 0..200 {
        if fake.running() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the fake still runs {} jobs", fake.running());
}

fn fake_abort(fake: &crate::fake::FakeBackend) {
    crate::backend::Backend::abort_all(fake);
}

#[rustfmt::skip]
#[tokio::test]
async fn every_refusal_is_a_400_that_says_why_and_changes_nothing() {
    let root = root_with_adapters();
    let outside = temp("outside");
    write_adapter(&outside.join("evil"), 2);
    std::os::unix::fs::symlink(outside.join("evil"), root.join("link-out")).unwrap();
    let broken = root.join("broken");
    write_adapter(&broken, 2);
    std::fs::write(broken.join("adapter_model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let dora = root.join("dora");
    write_adapter(&dora, 2);
    std::fs::write(dora.join("adapter_config.json"), json!({"r": 2, "target_modules": ["q_proj"], "use_dora": true}).to_string()).unwrap();
    let (app, _, _) = setup(lora_opts(Some(&root)));
    load(&app, "keep", "r2", false).await;
    let evil = outside.join("evil").display().to_string();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("missing name", json!({"lora_path": "r2"}), "lora_name", "must be provided"),
        ("missing path", json!({"lora_name": "x"}), "lora_path", "must be provided"),
        ("unknown field", json!({"lora_name": "x", "lora_path": "r2", "base_model_name": "m"}), "base_model_name", "unknown field"),
        ("wrong type", json!({"lora_name": "x", "lora_path": "r2", "load_inplace": "yes"}), "load_inplace", "load_inplace"),
        ("dot-dot", json!({"lora_name": "x", "lora_path": "../outside/evil"}), "lora_path", "`..`"),
        ("absolute outside", json!({"lora_name": "x", "lora_path": evil}), "lora_path", "outside --lora-root"),
        ("symlink out", json!({"lora_name": "x", "lora_path": "link-out"}), "lora_path", "outside --lora-root"),
        ("missing folder", json!({"lora_name": "x", "lora_path": "nope"}), "lora_path", "no such adapter folder"),
        ("rank above the limit", json!({"lora_name": "x", "lora_path": "r16"}), "lora_path", "--max-lora-rank 8"),
        ("rank above the limit, in place", json!({"lora_name": "keep", "lora_path": "r16", "load_inplace": true}), "lora_path", "--max-lora-rank"),
        ("corrupt safetensors", json!({"lora_name": "x", "lora_path": "broken"}), "lora_path", "safetensors"),
        ("DoRA", json!({"lora_name": "x", "lora_path": "dora"}), "lora_path", "DoRA"),
        ("base name", json!({"lora_name": "fake-model", "lora_path": "r2"}), "lora_name", "served base model"),
        ("comma", json!({"lora_name": "a,b", "lora_path": "r2"}), "lora_name", "commas"),
    ];
    let before = get(&app, "/v1/lora_adapters").await.1;
    for (case, body, param, says) in cases {
        let (s, t) = post_text(&app, "/v1/load_lora_adapter", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{case}: {t}");
        let e = error_of(&t);
        assert_eq!(e["param"], param, "{case}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{case}: {e}");
        assert_eq!(get(&app, "/v1/lora_adapters").await.1, before, "{case} changed the registry");
    }
    for (path, body) in [
        ("/v1/load_lora_adapter", json!({"lora_name": "x", "lora_path": "r2"})),
        ("/v1/unload_lora_adapter", json!({"lora_name": "keep"})),
    ] {
        let (s, _) = call(&app, request(Method::POST, path, body.to_string(), None)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        let (s, _) = call(&app, request(Method::POST, path, body.to_string(), Some("wrong"))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (s, _) = call(&app, request(Method::GET, "/v1/lora_adapters", "", None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&app, "/v1/lora_adapters").await.1, before);
    for d in [root, outside] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[tokio::test]
async fn without_a_root_runtime_loading_is_a_clear_400() {
    let root = root_with_adapters();
    let (app, _, _) = setup(lora_opts(None));
    let path = root.join("r2").display().to_string();
    let (s, t) = load(&app, "a", &path, false).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&t)["message"]
            .as_str()
            .unwrap()
            .contains("--lora-root"),
        "{t}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn lora_metrics_count_per_adapter_and_keep_one_info_series() {
    let root = root_with_adapters();
    let (app, _, fake) = setup(lora_opts(Some(&root)));
    load(&app, "a", "r2", false).await;
    post(
        &app,
        "/v1/completions",
        json!({"model": "a", "prompt": "hello", "max_tokens": 2}),
    )
    .await;
    wait_idle(&fake).await;
    let scrape = || async {
        let (_, b) = call(&app, request(Method::GET, "/metrics", "", None)).await;
        String::from_utf8(b.to_vec()).unwrap()
    };
    let text = scrape().await;
    let samples = parse_exposition(&text);
    let value = |series: &str| samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
    assert_eq!(
        value(r#"tessera:lora_prompt_tokens_total{lora_name="a",model_name="fake-model"}"#),
        Some(6.0)
    );
    assert_eq!(
        value(r#"tessera:lora_generation_tokens_total{lora_name="a",model_name="fake-model"}"#),
        Some(2.0)
    );
    assert_eq!(
        value(
            r#"tessera:lora_requests_total{finished_reason="length",lora_name="a",model_name="fake-model"}"#
        ),
        Some(1.0)
    );
    let info = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("tessera:lora_requests_info{"))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
            .collect()
    };
    assert_eq!(
        info(&text),
        [
            r#"tessera:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}"#
        ]
    );
    fake.set_mode(FakeMode::Hang);
    let res = tower::ServiceExt::oneshot(
        app.clone(),
        request(
            Method::POST,
            "/v1/completions",
            json!({"model": "a", "prompt": "abc", "stream": true}).to_string(),
            Some(KEY),
        ),
    )
    .await
    .unwrap();
    let reader = tokio::spawn(axum::body::to_bytes(res.into_body(), usize::MAX));
    for _ in 0..200 {
        if fake.running() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        info(&scrape().await),
        [
            r#"tessera:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""}"#
        ]
    );
    fake_abort(&fake);
    reader.await.unwrap().unwrap();
    wait_idle(&fake).await;
    assert_eq!(
        info(&scrape().await),
        [
            r#"tessera:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}"#
        ]
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn an_evicted_adapter_is_read_back_on_its_next_request() {
    let root = root_with_adapters();
    let opts = ServerOptions {
        lora: LoraOptions {
            max_cpu_loras: 1,
            ..lora_opts(Some(&root)).lora
        },
        ..keyed()
    };
    let (app, _, fake) = setup(opts);
    load(&app, "a", "r2", false).await;
    load(&app, "b", "r4", false).await;
    let states = |v: Value| -> Vec<(String, String)> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().unwrap().into(),
                    a["state"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let s = |a: &str, b: &str| {
        vec![
            ("a".to_string(), a.to_string()),
            ("b".to_string(), b.to_string()),
        ]
    };
    assert_eq!(
        states(get(&app, "/v1/lora_adapters").await.1),
        s("evicted", "loaded")
    );
    let (status, v) = post(
        &app,
        "/v1/completions",
        json!({"model": "a", "prompt": "hi"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        fake.submitted()
            .last()
            .unwrap()
            .adapter
            .as_ref()
            .unwrap()
            .max_rank,
        2
    );
    assert_eq!(
        states(get(&app, "/v1/lora_adapters").await.1),
        s("loaded", "evicted")
    );
    std::fs::remove_dir_all(root).unwrap();
}
