//! Tiny random-weight Hugging Face folders (Llama with GQA, Qwen2 with q/k/v biases and
//! MQA, Gemma 3 with q/k norms, output norms, GeGLU, sliding-window and global layers,
//! soft-caps) load through the one model code and compute what a naive full-softmax f64
//! reference computes from the same tensors, at every position.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, PartialEq)]
enum Arch {
    Llama,
    /// Llama layout with ALiBi biases instead of RoPE (`"alibi": true`).
    LlamaAlibi,
    Qwen2,
    Gemma3,
}

struct Tiny {
    arch: Arch,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    window: usize,
}

type Weights = HashMap<String, (Vec<f32>, Vec<usize>)>;

fn write_folder(t: &Tiny, dir: &Path, seed: u64) -> Weights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w: Weights = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + rng.random_range(-scale..scale)).collect();
        w.insert(name, (v, shape));
    };
    let (h, q, kv) = (t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim);
    let norm_base = if t.arch == Arch::Gemma3 { 0.0 } else { 1.0 };
    put("model.embed_tokens.weight".into(), vec![t.vocab, h], 1.0, 0.0);
    put("model.norm.weight".into(), vec![h], 0.2, norm_base);
    for l in 0..t.layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![h], 0.2, norm_base);
        put(format!("{p}.self_attn.q_proj.weight"), vec![q, h], 0.3, 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], 0.3, 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], 0.3, 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), vec![h, q], 0.3, 0.0);
        put(format!("{p}.mlp.gate_proj.weight"), vec![t.inter, h], 0.3, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), vec![t.inter, h], 0.3, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), vec![h, t.inter], 0.3, 0.0);
        put(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.2, norm_base);
        if t.arch == Arch::Qwen2 {
            put(format!("{p}.self_attn.q_proj.bias"), vec![q], 0.5, 0.0);
            put(format!("{p}.self_attn.k_proj.bias"), vec![kv], 0.5, 0.0);
            put(format!("{p}.self_attn.v_proj.bias"), vec![kv], 0.5, 0.0);
        }
        if t.arch == Arch::Gemma3 {
            put(format!("{p}.self_attn.q_norm.weight"), vec![t.head_dim], 0.2, 0.0);
            put(format!("{p}.self_attn.k_norm.weight"), vec![t.head_dim], 0.2, 0.0);
            put(format!("{p}.pre_feedforward_layernorm.weight"), vec![h], 0.2, 0.0);
            put(format!("{p}.post_feedforward_layernorm.weight"), vec![h], 0.2, 0.0);
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    let tensors: HashMap<String, Tensor> =
        w.iter().map(|(k, (v, s))| (k.clone(), Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap())).collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let mut cfg = serde_json::json!({
        "model_type": match t.arch { Arch::Llama | Arch::LlamaAlibi => "llama", Arch::Qwen2 => "qwen2", Arch::Gemma3 => "gemma3_text" },
        "hidden_size": h, "intermediate_size": t.inter, "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads, "head_dim": t.head_dim,
        "vocab_size": t.vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true,
    });
    if t.arch == Arch::LlamaAlibi {
        cfg["alibi"] = true.into();
    }
    if t.arch == Arch::Gemma3 {
        cfg["rope_theta"] = 1_000_000.0.into();
        cfg["rope_local_base_freq"] = 10_000.0.into();
        cfg["sliding_window"] = t.window.into();
        cfg["layer_types"] = serde_json::json!(["sliding_attention", "full_attention", "sliding_attention"]);
        cfg["query_pre_attn_scalar"] = 24.into();
        cfg["attn_logit_softcapping"] = 20.0.into();
        cfg["final_logit_softcapping"] = 15.0.into();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json(t.vocab)).unwrap();
    w
}

/// A word-level tokenizer of `vocab` tokens `t0 t1 ...`: the folders need no file from
/// elsewhere (the CUDA check runs them on a machine without the default model).
fn tiny_tokenizer_json(vocab: usize) -> String {
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab).map(|i| (format!("t{i}"), i.into())).collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"},
    })
    .to_string()
}

fn get<'a>(w: &'a Weights, k: &str) -> &'a [f32] {
    &w[k].0
}

fn rms(x: &[f64], w: &[f32], off: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + 1e-6).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * s * (g as f64 + off)).collect()
}

fn matvec(w: &[f32], x: &[f64], out: usize) -> Vec<f64> {
    let k = x.len();
    (0..out).map(|o| (0..k).map(|i| w[o * k + i] as f64 * x[i]).sum()).collect()
}

/// Half-split RoPE at position `pos` with base `theta`.
fn rope(x: &mut [f64], d: usize, pos: usize, theta: f64) {
    for head in x.chunks_mut(d) {
        for i in 0..d / 2 {
            let a = pos as f64 / theta.powf(2.0 * i as f64 / d as f64);
            let (c, s) = (a.cos(), a.sin());
            let (x0, x1) = (head[i], head[i + d / 2]);
            head[i] = x0 * c - x1 * s;
            head[i + d / 2] = x0 * s + x1 * c;
        }
    }
}

/// Logits at every position of `tokens`, computed naively in f64.
fn reference(t: &Tiny, w: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let gemma = t.arch == Arch::Gemma3;
    let off = if gemma { 1.0 } else { 0.0 };
    let (h, d) = (t.hidden, t.head_dim);
    let emb = get(w, "model.embed_tokens.weight");
    let scale = if gemma { (h as f64).sqrt() } else { 1.0 };
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&id| emb[id as usize * h..(id as usize + 1) * h].iter().map(|&v| v as f64 * scale).collect()).collect();
    let n = tokens.len();
    for l in 0..t.layers {
        let p = format!("model.layers.{l}");
        let local = gemma && l != 1;
        let theta = if gemma && !local { 1_000_000.0 } else { 10_000.0 };
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let hn = rms(x, get(w, &format!("{p}.input_layernorm.weight")), off);
            let mut q = matvec(get(w, &format!("{p}.self_attn.q_proj.weight")), &hn, t.heads * d);
            let mut k = matvec(get(w, &format!("{p}.self_attn.k_proj.weight")), &hn, t.kv_heads * d);
            let mut v = matvec(get(w, &format!("{p}.self_attn.v_proj.weight")), &hn, t.kv_heads * d);
            if t.arch == Arch::Qwen2 {
                for (buf, b) in [(&mut q, "q"), (&mut k, "k"), (&mut v, "v")] {
                    buf.iter_mut().zip(get(w, &format!("{p}.self_attn.{b}_proj.bias"))).for_each(|(a, &b)| *a += b as f64);
                }
            }
            if gemma {
                q = q.chunks(d).flat_map(|c| rms(c, get(w, &format!("{p}.self_attn.q_norm.weight")), off)).collect();
                k = k.chunks(d).flat_map(|c| rms(c, get(w, &format!("{p}.self_attn.k_norm.weight")), off)).collect();
            }
            if t.arch != Arch::LlamaAlibi {
                rope(&mut q, d, pos, theta);
                rope(&mut k, d, pos, theta);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let att_scale = if gemma { 1.0 / 24f64.sqrt() } else { 1.0 / (d as f64).sqrt() };
        for i in 0..n {
            let mut o = vec![0f64; t.heads * d];
            for hh in 0..t.heads {
                let g = hh / (t.heads / t.kv_heads);
                let lo = if local { (i + 1).saturating_sub(t.window) } else { 0 };
                let mut sc: Vec<f64> = (lo..=i)
                    .map(|j| {
                        let s = (0..d).map(|e| qs[i][hh * d + e] * ks[j][g * d + e]).sum::<f64>() * att_scale;
                        if t.arch == Arch::LlamaAlibi {
                            // 2^(-8 (h+1) / heads) for a power-of-two head count.
                            let slope = 2f64.powf(-8.0 * (hh + 1) as f64 / t.heads as f64);
                            return s + slope * (j as f64 - i as f64);
                        }
                        if gemma { 20.0 * (s / 20.0).tanh() } else { s }
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                sc.iter_mut().for_each(|s| *s = (*s - m).exp());
                let z: f64 = sc.iter().sum();
                for e in 0..d {
                    o[hh * d + e] = (lo..=i).zip(&sc).map(|(j, p)| p * vs[j][g * d + e]).sum::<f64>() / z;
                }
            }
            let mut a = matvec(get(w, &format!("{p}.self_attn.o_proj.weight")), &o, h);
            if gemma {
                a = rms(&a, get(w, &format!("{p}.post_attention_layernorm.weight")), off);
            }
            let x: Vec<f64> = xs[i].iter().zip(&a).map(|(x, a)| x + a).collect();
            let pre = if gemma { "pre_feedforward_layernorm" } else { "post_attention_layernorm" };
            let hn = rms(&x, get(w, &format!("{p}.{pre}.weight")), off);
            let gt = matvec(get(w, &format!("{p}.mlp.gate_proj.weight")), &hn, t.inter);
            let up = matvec(get(w, &format!("{p}.mlp.up_proj.weight")), &hn, t.inter);
            let act: Vec<f64> = gt
                .iter()
                .zip(&up)
                .map(|(&g, &u)| {
                    let a = if gemma { 0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh()) } else { g / (1.0 + (-g).exp()) };
                    a * u
                })
                .collect();
            let mut m = matvec(get(w, &format!("{p}.mlp.down_proj.weight")), &act, h);
            if gemma {
                m = rms(&m, get(w, &format!("{p}.post_feedforward_layernorm.weight")), off);
            }
            xs[i] = x.iter().zip(&m).map(|(x, m)| x + m).collect();
        }
    }
    xs.iter()
        .map(|x| {
            let hn = rms(x, get(w, "model.norm.weight"), off);
            let l = matvec(emb, &hn, t.vocab);
            if gemma { l.iter().map(|v| 15.0 * (v / 15.0).tanh()).collect() } else { l }
        })
        .collect()
}

fn engine_logits(dir: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    use engine::kv_cache::{KvCache, KvLayout};
    use engine::model::{BatchInput, SeqInput};
    let loaded = engine::loader::load(dir).expect("tiny folder loads");
    let m = &loaded.model;
    let c = &m.config;
    let pool = engine::threadpool::ThreadPool::new(2);
    let bs = 4;
    let nb = tokens.len().div_ceil(bs);
    let mut cache = KvCache::new(KvLayout { num_layers: c.num_layers, num_blocks: nb, block_size: bs, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim });
    let table: Vec<u32> = (0..nb as u32).rev().collect();
    let pos: Vec<usize> = (0..tokens.len()).collect();
    let slots: Vec<usize> = pos.iter().map(|&p| table[p / bs] as usize * bs + p % bs).collect();
    let batch = BatchInput {
        token_ids: tokens,
        positions: &pos,
        seqs: vec![SeqInput { query_start: 0, query_len: tokens.len(), context_len: tokens.len(), block_table: &table, window_block_table: None }],
        slot_mapping: &slots,
        window_slot_mapping: None,
        logits_rows: &pos,
        lora: Vec::new(),
        f32_rows: &[],
    };
    let flat = m.forward(&pool, &batch, &mut cache);
    flat.chunks(c.vocab_size).map(|r| r.to_vec()).collect()
}

fn check(t: Tiny, tag: &str) {
    let dir: PathBuf = std::env::temp_dir().join(format!("tessera-arch-{tag}-{}", std::process::id()));
    let w = write_folder(&t, &dir, 17);
    if t.arch == Arch::Gemma3 {
        generation_through_the_window_pool_equals_full_recompute(&dir);
    }
    let tokens: Vec<u32> = (0..14u32).map(|i| (i * 7919 + 13) % t.vocab as u32).collect();
    let want = reference(&t, &w, &tokens);
    let got = engine_logits(&dir, &tokens);
    let mut worst = 0f64;
    for (g, r) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(r) {
            worst = worst.max((*a as f64 - b).abs() / (1.0 + b.abs()));
        }
    }
    eprintln!("{tag}: worst relative logit difference {worst:e}");
    assert!(worst < 1e-4, "{tag}: engine and reference differ by {worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The engine keeps the sliding-window layers' K/V in a pool whose blocks are released
/// once outside the window; 40 greedy tokens through it (block size 4, window 5, so blocks
/// come and go all the time) equal greedy decoding by full recomputation without a cache.
fn generation_through_the_window_pool_equals_full_recompute(dir: &Path) {
    use engine::{Engine, EngineConfig, GenerateRequest, SamplingParams};
    let prompt: Vec<u32> = (0..9u32).map(|i| (i * 104_729 + 7) % 49152).collect();
    let h = Engine::start(EngineConfig { model: dir.to_path_buf(), block_size: 4, kv_cache_bytes: 1 << 20, max_num_batched_tokens: 8, threads: 2, ..Default::default() }).unwrap();
    assert!(h.info().window_tokens == 5 && h.info().window_kv_bytes_per_token > 0, "{:?}", h.info());
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) };
    let got = collect(h.submit(GenerateRequest { prompt_ids: prompt.clone(), params, adapter: None }).unwrap()).ids;
    h.shutdown();
    let mut seq = prompt.clone();
    for _ in 0..40 {
        let logits = engine_logits(dir, &seq);
        let last = logits.last().unwrap();
        let next = last.iter().enumerate().fold(0, |b, (i, &v)| if v > last[b] { i } else { b });
        seq.push(next as u32);
    }
    assert_eq!(got, seq[prompt.len()..].to_vec(), "window-pool generation differs from full recompute");
}

#[test]
fn llama_gqa_folder_matches_the_reference() {
    check(Tiny { arch: Arch::Llama, hidden: 32, inter: 48, layers: 2, heads: 4, kv_heads: 2, head_dim: 8, vocab: 49152, window: 0 }, "llama");
}

#[test]
fn alibi_folder_matches_the_reference() {
    check(Tiny { arch: Arch::LlamaAlibi, hidden: 32, inter: 48, layers: 2, heads: 4, kv_heads: 2, head_dim: 8, vocab: 49152, window: 0 }, "alibi");
}

#[test]
fn qwen2_mqa_folder_with_biases_matches_the_reference() {
    check(Tiny { arch: Arch::Qwen2, hidden: 32, inter: 48, layers: 2, heads: 4, kv_heads: 1, head_dim: 8, vocab: 49152, window: 0 }, "qwen2");
}

/// Window 5 over 14 tokens and block size 4: blocks straddle the window's edge, and the
/// global layer in the middle sees everything.
#[test]
fn gemma3_folder_with_sliding_window_and_softcaps_matches_the_reference() {
    check(Tiny { arch: Arch::Gemma3, hidden: 32, inter: 48, layers: 3, heads: 4, kv_heads: 1, head_dim: 16, vocab: 49152, window: 5 }, "gemma3");
}

/// The CUDA forward against the CPU forward on every architecture above: three packed
/// steps mixing prefill chunks and decode rows of three sequences (one of them through a
/// LoRA adapter), shuffled cache blocks, logits of every row within 1e-4 relative. Then the whole engine on the device through
/// Gemma 3's sliding-window pool (blocks released while generating): the same greedy
/// tokens as on the CPU.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_forward_matches_cpu_on_every_architecture() {
    use engine::config::Quantize;
    use engine::cuda::kernels::KernelCache;
    use engine::cuda::model::CudaModel;
    use engine::cuda::CudaBackend;
    use engine::kv_cache::{KvCache, KvLayout};
    use engine::model::{BatchInput, SeqInput};
    let archs = [
        (Tiny { arch: Arch::Llama, hidden: 64, inter: 96, layers: 2, heads: 4, kv_heads: 2, head_dim: 16, vocab: 49152, window: 0 }, "llama"),
        (Tiny { arch: Arch::LlamaAlibi, hidden: 64, inter: 96, layers: 2, heads: 4, kv_heads: 2, head_dim: 16, vocab: 49152, window: 0 }, "alibi"),
        (Tiny { arch: Arch::Qwen2, hidden: 64, inter: 96, layers: 2, heads: 4, kv_heads: 1, head_dim: 16, vocab: 49152, window: 0 }, "qwen2"),
        (Tiny { arch: Arch::Gemma3, hidden: 64, inter: 96, layers: 3, heads: 4, kv_heads: 1, head_dim: 32, vocab: 49152, window: 5 }, "gemma3"),
    ];
    for (t, tag) in archs {
        let dir: PathBuf = std::env::temp_dir().join(format!("tessera-cuda-{tag}-{}", std::process::id()));
        write_folder(&t, &dir, 23);
        let loaded = engine::loader::load(&dir).expect("tiny folder loads");
        let m = &loaded.model;
        let c = &m.config;
        let pool = engine::threadpool::ThreadPool::new(2);
        let bs = 4;
        let layout = KvLayout { num_layers: c.num_layers, num_blocks: 24, block_size: bs, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let mut cache = KvCache::new(layout);
        let backend = CudaBackend::open(0, &KernelCache::new(None)).unwrap_or_else(|e| panic!("{e}"));
        let mut cm = CudaModel::new(backend, m, Quantize::None, layout, (0, &[])).unwrap_or_else(|e| panic!("{e}"));
        let adapter = tiny_adapter(&t, m, &dir.join("adapter"));
        // Three sequences, each with its own shuffled blocks: (prompt tokens, block table).
        let tables: [Vec<u32>; 3] = [vec![7, 2, 19, 4, 11], vec![0, 15, 8, 21, 3], vec![13, 1, 22, 6, 17]];
        let toks = |s: usize, p: usize| ((s * 104_729 + p * 7919 + 13) % t.vocab) as u32;
        // (sequence, first position, tokens) per step: prefill chunks, then decode rows.
        let steps: [&[(usize, usize, usize)]; 3] = [&[(0, 0, 7), (1, 0, 5)], &[(0, 7, 1), (1, 5, 3), (2, 0, 9)], &[(0, 8, 1), (1, 8, 1), (2, 9, 1)]];
        let mut worst = 0f64;
        for step in steps {
            let (mut ids, mut pos, mut slots, mut seqs) = (vec![], vec![], vec![], vec![]);
            for &(s, p0, n) in step {
                seqs.push(SeqInput { query_start: ids.len(), query_len: n, context_len: p0 + n, block_table: &tables[s], window_block_table: None });
                for p in p0..p0 + n {
                    ids.push(toks(s, p));
                    pos.push(p);
                    slots.push(tables[s][p / bs] as usize * bs + p % bs);
                }
            }
            let rows: Vec<usize> = (0..ids.len()).collect();
            // Sequence 1 runs with the adapter, the others on the base weights.
            let segments: Vec<(usize, usize)> = step.iter().zip(&seqs).filter(|(st, _)| st.0 == 1).map(|(_, q)| (q.query_start, q.query_len)).collect();
            let lora = vec![engine::lora::AdapterRows { adapter: &adapter, segments }];
            let batch = BatchInput { token_ids: &ids, positions: &pos, seqs, slot_mapping: &slots, window_slot_mapping: None, logits_rows: &rows, lora, f32_rows: &[] };
            let want = m.forward(&pool, &batch, &mut cache);
            let got = cm.forward(&batch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                worst = worst.max((*a as f64 - *b as f64).abs() / (1.0 + b.abs() as f64));
            }
        }
        println!("{tag}: worst relative logit difference CUDA vs CPU {worst:e}");
        assert!(worst < 1e-4, "{tag}: CUDA and CPU logits differ by {worst}");
        if t.arch == Arch::Gemma3 {
            use engine::{Device, Engine, EngineConfig, GenerateRequest, SamplingParams};
            let prompt: Vec<u32> = (0..9u32).map(|i| (i * 104_729 + 7) % 49152).collect();
            let run = |device: Device| {
                let h = Engine::start(EngineConfig { model: dir.clone(), block_size: 4, kv_cache_bytes: 1 << 20, max_num_batched_tokens: 8, threads: 2, device, ..Default::default() }).unwrap();
                let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(40) };
                let ids = collect(h.submit(GenerateRequest { prompt_ids: prompt.clone(), params, adapter: None }).unwrap()).ids;
                h.shutdown();
                ids
            };
            assert_eq!(run(Device::Cuda), run(Device::Cpu), "window-pool generation on CUDA differs from the CPU");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A PEFT LoRA folder (rank 4, alpha 8) on five of the seven modules of a tiny model,
/// loaded as the server loads adapters.
#[cfg(feature = "cuda")]
fn tiny_adapter(t: &Tiny, m: &engine::model::LlamaModel, dir: &Path) -> engine::lora::LoraAdapter {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (h, q, kv) = (t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim);
    let r = 4;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for l in 0..t.layers {
        for (module, out, inp) in [("self_attn.q_proj", q, h), ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, q), ("mlp.gate_proj", t.inter, h), ("mlp.down_proj", h, t.inter)] {
            let key = |ab: &str| format!("base_model.model.model.layers.{l}.{module}.lora_{ab}.weight");
            let mut rand_t = |n: usize, shape: &[usize]| {
                Tensor::from_vec((0..n).map(|_| rng.random_range(-0.3f32..0.3)).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
            };
            tensors.insert(key("A"), rand_t(r * inp, &[r, inp]));
            tensors.insert(key("B"), rand_t(out * r, &[out, r]));
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    engine::lora::load_adapter("tiny", dir, &m.config, engine::lora::LoadOptions { max_rank: 64 }).unwrap_or_else(|e| panic!("{e}"))
}
