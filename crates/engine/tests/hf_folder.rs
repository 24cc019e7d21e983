//! A Hugging Face folder (config.json + model.safetensors + tokenizer.json) loads through
//! the same model code: the default GGUF model, exported to such a folder with its Q/K rows
//! put back in Hugging Face order (half-split RoPE), gives the reference tokens.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;
use engine::cpu::matmul::Linear;
use engine::{Engine, EngineConfig, SamplingParams};

fn dense(l: &Linear) -> Vec<f32> {
    let mut out = vec![0f32; l.out_features * l.in_features];
    l.weight.dequant_rows(0, l.in_features, &mut out);
    out
}

/// GGUF llama rows are permuted for interleaved RoPE: GGUF row h*hd + 2i + j holds HF row
/// h*hd + j*hd/2 + i.
fn unpermute(w: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * hd / 2 + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn exported_hf_folder_gives_the_reference_tokens() {
    let loaded = engine::loader::load(&model_path()).unwrap();
    let (m, c) = (&loaded.model, &loaded.model.config);
    let dir = std::env::temp_dir().join(format!("tessera-hf-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let lin = |l: &Linear| tensor(dense(l), &[l.out_features, l.in_features]);
    t.insert("model.embed_tokens.weight".into(), lin(&m.embed_tokens));
    t.insert("model.norm.weight".into(), tensor(m.norm.clone(), &[c.hidden_size]));
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &l.self_attn;
        let q = unpermute(&dense(&a.q_proj), c.num_heads, c.head_dim, c.hidden_size);
        let k = unpermute(&dense(&a.k_proj), c.num_kv_heads, c.head_dim, c.hidden_size);
        t.insert(format!("{p}.self_attn.q_proj.weight"), tensor(q, &[c.num_heads * c.head_dim, c.hidden_size]));
        t.insert(format!("{p}.self_attn.k_proj.weight"), tensor(k, &[c.num_kv_heads * c.head_dim, c.hidden_size]));
        t.insert(format!("{p}.self_attn.v_proj.weight"), lin(&a.v_proj));
        t.insert(format!("{p}.self_attn.o_proj.weight"), lin(&a.o_proj));
        t.insert(format!("{p}.mlp.gate_proj.weight"), lin(&l.mlp.gate_proj));
        t.insert(format!("{p}.mlp.up_proj.weight"), lin(&l.mlp.up_proj));
        t.insert(format!("{p}.mlp.down_proj.weight"), lin(&l.mlp.down_proj));
        t.insert(format!("{p}.input_layernorm.weight"), tensor(l.input_layernorm.clone(), &[c.hidden_size]));
        t.insert(format!("{p}.post_attention_layernorm.weight"), tensor(l.post_attention_layernorm.clone(), &[c.hidden_size]));
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    drop(t);
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), loaded.tokenizer.to_tokenizer_json().unwrap()).unwrap();
    let tok_cfg = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
        "chat_template": loaded.tokenizer.chat_template().unwrap(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string()).unwrap();
    drop(loaded);

    let h = Engine::start(EngineConfig { model: dir.clone(), ..default_cfg() }).expect("HF folder loads");
    let g = golden("base.json");
    for p in g["prompts"].as_array().unwrap().iter().take(3) {
        let got = run(&h, ids(&p["prompt_ids"]), SamplingParams::greedy(32));
        assert_eq!(got.ids, ids(&p["generated_ids"]), "{}", p["name"]);
    }
    let chat = h.chat_template().expect("chat template from tokenizer_config.json");
    let msgs = [engine::chat::ChatMessage { role: "user".into(), content: "What is the capital of France?".into() }];
    assert_eq!(chat.render(&msgs, true).unwrap(), g["prompts"][0]["prompt_text"].as_str().unwrap());
    h.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}
