//! Shared helpers of the engine's integration tests: the default model and the fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

use engine::{Engine, EngineConfig, EngineHandle, GenerateRequest, SamplingParams, TokenEvent};

pub fn model_path() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(p.exists(), "the default model is missing: run scripts/fetch-model first ({})", p.display());
    p
}

pub fn fixtures() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    assert!(p.exists(), "../shared/fixtures is missing ({})", p.display());
    p
}

pub fn golden(name: &str) -> serde_json::Value {
    let p = fixtures().join("golden").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn start(cfg: EngineConfig) -> EngineHandle {
    Engine::start(EngineConfig { model: model_path(), ..cfg }).expect("engine starts")
}

pub fn default_cfg() -> EngineConfig {
    EngineConfig { threads: 2, kv_cache_bytes: 64 << 20, max_num_batched_tokens: 256, ..Default::default() }
}

/// Collected output of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub ids: Vec<u32>,
    pub text: String,
    pub events: Vec<TokenEvent>,
}

pub fn collect(mut rx: engine::RequestStream) -> Done {
    let mut d = Done { ids: vec![], text: String::new(), events: vec![] };
    while let Some(ev) = rx.blocking_recv() {
        d.ids.extend(&ev.token_ids);
        d.text.push_str(&ev.text);
        let fin = ev.finish.is_some();
        d.events.push(ev);
        if fin {
            break;
        }
    }
    d
}

pub fn run(h: &EngineHandle, prompt: Vec<u32>, params: SamplingParams) -> Done {
    collect(h.submit(GenerateRequest { prompt_ids: prompt, params, adapter: None }).expect("submit"))
}
