//! LoRA adapters: the PEFT fixtures reproduce the reference generations, unmerged
//! equals merged, mixed batches equal solo runs, and bad adapters are refused.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use engine::lora::{load_adapter, LoadOptions, LoraAdapter, Module};
use engine::model::ModelConfig;
use engine::{EngineConfig, GenerateRequest, SamplingParams};
use rand::{Rng, SeedableRng};

const OPTS: LoadOptions = LoadOptions { max_rank: 64 };

fn base_config() -> ModelConfig {
    engine::loader::load(&model_path()).unwrap().model.config
}

fn fixture_adapter(name: &str, cfg: &ModelConfig) -> Arc<LoraAdapter> {
    Arc::new(load_adapter(name, &fixtures().join("adapters").join(name), cfg, OPTS).expect("fixture adapter loads"))
}

fn run_with(h: &engine::EngineHandle, prompt: Vec<u32>, adapter: Option<Arc<LoraAdapter>>, n: usize) -> Vec<u32> {
    collect(h.submit(GenerateRequest { prompt_ids: prompt, params: SamplingParams::greedy(n), adapter }).unwrap()).ids
}

/// Every fixture adapter, applied unmerged, gives PEFT's greedy tokens on its 4 prompts
/// (32 tokens each; the smallest top1-top2 margin there is ~0.005, our logit error ~5e-5),
/// and the behaviour it was trained for shows in the text.
#[test]
fn fixture_adapters_reproduce_the_peft_reference() {
    let cfg = base_config();
    let h = start(default_cfg());
    for name in ["pirate", "shout", "pirate-r16-qv"] {
        let a = fixture_adapter(name, &cfg);
        let g = golden(&format!("adapter_{name}.json"));
        for p in g["prompts"].as_array().unwrap() {
            let want = ids(&p["generated_ids"]);
            let got = collect(h.submit(GenerateRequest { prompt_ids: ids(&p["prompt_ids"]), params: SamplingParams::greedy(want.len()), adapter: Some(a.clone()) }).unwrap());
            assert_eq!(got.ids, want, "{name} / {}", p["name"]);
            assert_eq!(got.text, p["generated_text_skip_special"].as_str().unwrap());
            if name.starts_with("pirate") {
                assert!(got.text.starts_with("Arr matey!"), "{name}: {}", got.text);
            } else {
                let letters: Vec<char> = got.text.chars().filter(|c| c.is_alphabetic()).collect();
                let upper = letters.iter().filter(|c| c.is_uppercase()).count();
                assert!(upper * 2 > letters.len(), "shout: mostly upper case expected: {}", got.text);
            }
        }
    }
}

/// Writes a random PEFT adapter (rank r, given targets) into `dir`.
fn write_random_adapter(dir: &Path, cfg: &ModelConfig, r: usize, targets: &[Module], seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    for l in 0..cfg.num_layers {
        for &m in targets {
            let (out, inp) = match m {
                Module::Q => (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
                Module::K | Module::V => (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size),
                Module::O => (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
                Module::Gate | Module::Up => (cfg.intermediate_size, cfg.hidden_size),
                Module::Down => (cfg.hidden_size, cfg.intermediate_size),
            };
            let parent = if matches!(m, Module::Q | Module::K | Module::V | Module::O) { "self_attn" } else { "mlp" };
            let key = format!("base_model.model.model.layers.{l}.{parent}.{}", m.peft_name());
            let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            t.insert(format!("{key}.lora_A.weight"), Tensor::from_vec(a, (r, inp), &Device::Cpu).unwrap());
            t.insert(format!("{key}.lora_B.weight"), Tensor::from_vec(b, (out, r), &Device::Cpu).unwrap());
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    let names: Vec<&str> = targets.iter().map(|m| m.peft_name()).collect();
    let config = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": names, "bias": "none"});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// For random adapters of several ranks, the unmerged delta equals a base whose weights
/// had scale * B A added (logits within 1e-3; merging changes rounding only).
#[test]
fn unmerged_equals_merged() {
    use engine::cpu::matmul::{Linear, Weight};
    use engine::lora::AdapterRows;
    let pool = engine::threadpool::ThreadPool::new(2);
    let prompt = ids(&golden("base.json")["prompts"][0]["prompt_ids"]);
    for (r, targets) in [(4, vec![Module::Q, Module::V]), (16, Module::ALL.to_vec()), (32, vec![Module::K, Module::O, Module::Down])] {
        let mut loaded = engine::loader::load(&model_path()).unwrap();
        let dir = temp_dir(&format!("merge{r}"));
        write_random_adapter(&dir, &loaded.model.config, r, &targets, r as u64);
        let a = load_adapter("rand", &dir, &loaded.model.config, OPTS).unwrap();
        let forward = |model: &engine::model::LlamaModel, lora: Vec<AdapterRows<'_>>| model.forward_sequence(&pool, &prompt, &[prompt.len() - 1], lora);
        let unmerged = forward(&loaded.model, vec![AdapterRows { adapter: &a, segments: vec![(0, prompt.len())] }]);
        // Merge: W[o, i] += scale * sum_j B[o, j] A[j, i]  (B already in the base's row order).
        for (li, layer) in loaded.model.layers.iter_mut().enumerate() {
            let at = &mut layer.self_attn;
            let mlp = &mut layer.mlp;
            let lins: [(&mut Linear, Module); 7] = [
                (&mut at.q_proj, Module::Q),
                (&mut at.k_proj, Module::K),
                (&mut at.v_proj, Module::V),
                (&mut at.o_proj, Module::O),
                (&mut mlp.gate_proj, Module::Gate),
                (&mut mlp.up_proj, Module::Up),
                (&mut mlp.down_proj, Module::Down),
            ];
            for (lin, m) in lins {
                let Some(w) = a.get(li, m) else { continue };
                let (out, inp) = (lin.out_features, lin.in_features);
                let mut dense = vec![0f32; out * inp];
                lin.weight.dequant_rows(0, inp, &mut dense);
                let mut am = vec![0f32; w.r * inp];
                w.a.weight.dequant_rows(0, inp, &mut am);
                for o in 0..out {
                    for i in 0..inp {
                        let d: f64 = (0..w.r).map(|j| w.bt[j * out + o] as f64 * am[j * inp + i] as f64).sum();
                        dense[o * inp + i] += (w.scale as f64 * d) as f32;
                    }
                }
                *lin = Linear::new(Weight::F32(dense), out, inp).unwrap();
            }
        }
        let merged = forward(&loaded.model, Vec::new());
        let diff = unmerged.iter().zip(&merged).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        eprintln!("rank {r}: max |unmerged - merged| logit = {diff:e}");
        assert!(diff < 1e-3, "rank {r}: unmerged and merged differ by {diff}");
        let base = engine::loader::load(&model_path()).unwrap();
        let plain = forward(&base.model, Vec::new());
        let effect = plain.iter().zip(&merged).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(effect > 1e-2, "rank {r}: the random adapter should change the logits ({effect})");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The base and four adapters (ranks 8, 8, 16 and a random 32) in one batch: each
/// response is identical to the same request run alone.
#[test]
fn mixed_adapter_batch_equals_solo_runs() {
    let cfg = base_config();
    let dir = temp_dir("mixed");
    write_random_adapter(&dir, &cfg, 32, &[Module::Q, Module::Up, Module::Down], 99);
    let adapters: Vec<Option<Arc<LoraAdapter>>> = vec![
        None,
        Some(fixture_adapter("pirate", &cfg)),
        Some(fixture_adapter("shout", &cfg)),
        Some(fixture_adapter("pirate-r16-qv", &cfg)),
        Some(Arc::new(load_adapter("rand32", &dir, &cfg, OPTS).unwrap())),
    ];
    let prompts: Vec<Vec<u32>> = golden("adapter_pirate.json")["prompts"].as_array().unwrap().iter().map(|p| ids(&p["prompt_ids"])).collect();
    let h = start(EngineConfig { max_num_batched_tokens: 96, max_loras: 4, ..default_cfg() });
    let jobs: Vec<(Vec<u32>, Option<Arc<LoraAdapter>>)> =
        (0..10).map(|i| (prompts[i % prompts.len()].clone(), adapters[i % adapters.len()].clone())).collect();
    let solo: Vec<Vec<u32>> = jobs.iter().map(|(p, a)| run_with(&h, p.clone(), a.clone(), 12)).collect();
    let rxs: Vec<_> = jobs
        .iter()
        .map(|(p, a)| h.submit(GenerateRequest { prompt_ids: p.clone(), params: SamplingParams::greedy(12), adapter: a.clone() }).unwrap())
        .collect();
    let together: Vec<Vec<u32>> = rxs.into_iter().map(|rx| collect(rx).ids).collect();
    assert_eq!(solo, together);
    // With max_loras 4 and 4 distinct adapters plus the base, all ran; the pirate rows differ from the base rows.
    assert_ne!(solo[0], solo[1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_adapters_are_refused_with_the_reason() {
    let cfg = base_config();
    let good = fixtures().join("adapters/pirate");
    let dir = temp_dir("bad");
    let case = |tag: &str, edit: &dyn Fn(&Path)| -> String {
        let d = dir.join(tag);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        edit(&d);
        load_adapter(tag, &d, &cfg, OPTS).expect_err(tag).to_string()
    };
    let set = |key: &'static str, v: serde_json::Value| {
        move |d: &Path| {
            let p = d.join("adapter_config.json");
            let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            j[key] = v.clone();
            std::fs::write(&p, j.to_string()).unwrap();
        }
    };
    assert!(case("dora", &set("use_dora", true.into())).contains("DoRA"));
    assert!(case("save", &set("modules_to_save", serde_json::json!(["lm_head"]))).contains("modules_to_save"));
    assert!(case("bias", &set("bias", "lora_only".into())).contains("bias"));
    assert!(case("target", &set("target_modules", serde_json::json!(["q_proj", "lm_head"]))).contains("unknown target module"));
    assert!(case("rank", &set("r", 128.into())).contains("--max-lora-rank"));
    assert!(case("shape", &set("r", 4.into())).contains("do not fit"));
    let truncated = case("truncated", &|d: &Path| {
        let p = d.join("adapter_model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(truncated.contains("safetensors"), "{truncated}");
    let garbage = case("garbage", &|d: &Path| std::fs::write(d.join("adapter_model.safetensors"), b"not a safetensors file").unwrap());
    assert!(garbage.contains("safetensors"), "{garbage}");
    let missing = case("missing", &|d: &Path| std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap());
    assert!(missing.contains("missing"), "{missing}");
    let no_config = case("noconfig", &|d: &Path| std::fs::remove_file(d.join("adapter_config.json")).unwrap());
    assert!(no_config.contains("adapter_config.json"), "{no_config}");
    std::fs::remove_dir_all(&dir).unwrap();
}
