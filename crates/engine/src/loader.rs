//! Model loading: GGUF files (candle's reader, weights kept in their block format where the
//! kernels read it) and Hugging Face folders (config.json + *.safetensors + tokenizer.json).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::cpu::matmul::{Linear, Weight};
use crate::cpu::ops::Rope;
use crate::model::{Activation, Attention, DecoderLayer, LlamaModel, Mlp, ModelConfig, RopeScaling, Variant};
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};

/// A loaded model with its tokenizer.
pub struct Loaded {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
}

fn err(m: impl Into<String>) -> EngineError {
    EngineError::Load(m.into())
}

pub fn load(path: &Path) -> Result<Loaded> {
    if path.is_dir() {
        load_hf(path)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        load_gguf(path)
    } else if !path.exists() {
        Err(err(format!("model path {} does not exist", path.display())))
    } else {
        Err(err(format!("{}: expected a .gguf file or a folder with config.json", path.display())))
    }
}

// ---------------------------------------------------------------- GGUF

struct Gguf {
    content: gguf_file::Content,
    file: File,
}

impl Gguf {
    fn md(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn u(&self, key: &str) -> Result<usize> {
        let v = self.md(key).ok_or_else(|| err(format!("GGUF metadata {key} is missing")))?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            _ => return Err(err(format!("GGUF metadata {key} is not an unsigned integer"))),
        };
        Ok(n as usize)
    }

    fn f(&self, key: &str) -> Option<f32> {
        match self.md(key)? {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        }
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn vec_f32(&mut self, name: &str) -> Result<Vec<f32>> {
        let t = self.content.tensor(&mut self.file, name, &Device::Cpu)?;
        Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// A 2-D weight `[out, in]`, kept in its block format when the kernels read it.
    fn linear(&mut self, name: &str) -> Result<Linear> {
        let t = self.content.tensor(&mut self.file, name, &Device::Cpu)?;
        let (out, inp) = t.shape().dims2().map_err(|_| err(format!("{name}: expected a 2-D tensor, got {:?}", t.shape())))?;
        let weight = match t.dtype() {
            GgmlDType::Q8_0 => Weight::Q8_0(t.data()?.into_owned()),
            GgmlDType::Q4_0 => Weight::Q4_0(t.data()?.into_owned()),
            GgmlDType::Q4_1 => Weight::Q4_1(t.data()?.into_owned()),
            GgmlDType::Q5_0 => Weight::Q5_0(t.data()?.into_owned()),
            _ => Weight::F32(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?),
        };
        Linear::new(weight, out, inp)
    }
}

fn load_gguf(path: &Path) -> Result<Loaded> {
    let mut file = File::open(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| err(format!("{}: not a readable GGUF file: {e}", path.display())))?;
    let mut g = Gguf { content, file };
    let arch = match g.md("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(err("GGUF metadata general.architecture is missing")),
    };
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2" | "gemma3") {
        return Err(err(format!("GGUF architecture {arch:?} is not supported (supported: llama, mistral, qwen2, gemma3)")));
    }
    let p = |k: &str| format!("{arch}.{k}");
    let hidden = g.u(&p("embedding_length"))?;
    let num_heads = g.u(&p("attention.head_count"))?;
    let num_kv_heads = g.u(&p("attention.head_count_kv")).unwrap_or(num_heads);
    let head_dim = g.u(&p("attention.key_length")).unwrap_or(hidden / num_heads.max(1));
    let mut tokenizer = Tokenizer::from_gguf(&g.content)?;
    if arch == "gemma3" && tokenizer.chat_template().is_none() {
        // Many Gemma 3 GGUF files carry no template; this is Google's, as llama.cpp falls back to.
        tokenizer.set_chat_template(crate::chat::GEMMA3_TEMPLATE.to_string());
    }
    // The file name, as llama-server reports it: GGUF `general.name` is free text
    // (often with spaces), awkward as the `model` field of every request.
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let scaling = match g.md(&p("rope.scaling.type")) {
        None => RopeScaling::None,
        Some(Value::String(s)) if s == "none" => RopeScaling::None,
        Some(Value::String(s)) if s == "linear" => {
            RopeScaling::Linear { factor: g.f(&p("rope.scaling.factor")).unwrap_or(1.0) }
        }
        Some(Value::String(s)) if s == "yarn" => RopeScaling::Yarn {
            factor: g.f(&p("rope.scaling.factor")).unwrap_or(1.0),
            original_max_position: g.u(&p("rope.scaling.original_context_length")).unwrap_or(4096),
            beta_fast: 32.0,
            beta_slow: 1.0,
        },
        Some(v) => return Err(err(format!("GGUF rope scaling {v:?} is not supported yet"))),
    };
    let num_layers = g.u(&p("block_count"))?;
    let variant = if arch == "gemma3" {
        let window = g.u(&p("attention.sliding_window")).unwrap_or(512);
        // llama.cpp's default pattern for Gemma 3: every 6th layer is global.
        let pattern = g.u(&p("attention.sliding_window_pattern")).unwrap_or(6).max(1);
        Variant {
            norm_offset: 0.0, // the GGUF conversion stored 1 + w
            embed_scale: (hidden as f32).sqrt(),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            activation: Activation::GeluTanh,
            local_layers: (0..num_layers).map(|i| i % pattern < pattern - 1).collect(),
            sliding_window: Some(window),
            rope_local_theta: Some(10_000.0),
            attn_softcap: g.f(&p("attn_logit_softcapping")),
            final_softcap: g.f(&p("final_logit_softcapping")),
            alibi_slopes: None,
        }
    } else {
        Variant::llama(num_layers, head_dim)
    };
    let vocab_size = g.content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0]).ok_or_else(|| err("token_embd.weight is missing"))?;
    let config = ModelConfig {
        name,
        hidden_size: hidden,
        intermediate_size: g.u(&p("feed_forward_length"))?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: g.f(&p("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: g.f(&p("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: scaling,
        // llama.cpp's converter permutes Q/K rows of llama-arch models for interleaved RoPE.
        rope_interleaved: matches!(arch.as_str(), "llama" | "mistral"),
        max_position_embeddings: g.u(&p("context_length")).unwrap_or(2048),
        variant,
    };
    config.check()?;
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let b = |s: &str| format!("blk.{i}.{s}");
        let opt = |g: &mut Gguf, s: &str| -> Result<Option<Vec<f32>>> {
            let n = b(s);
            if g.has(&n) {
                g.vec_f32(&n).map(Some)
            } else {
                Ok(None)
            }
        };
        layers.push(DecoderLayer {
            input_layernorm: g.vec_f32(&b("attn_norm.weight"))?,
            self_attn: Attention {
                q_proj: g.linear(&b("attn_q.weight"))?,
                k_proj: g.linear(&b("attn_k.weight"))?,
                v_proj: g.linear(&b("attn_v.weight"))?,
                o_proj: g.linear(&b("attn_output.weight"))?,
                q_bias: opt(&mut g, "attn_q.bias")?,
                k_bias: opt(&mut g, "attn_k.bias")?,
                v_bias: opt(&mut g, "attn_v.bias")?,
                q_norm: opt(&mut g, "attn_q_norm.weight")?,
                k_norm: opt(&mut g, "attn_k_norm.weight")?,
            },
            attn_output_norm: opt(&mut g, "post_attention_norm.weight")?,
            mlp_output_norm: opt(&mut g, "post_ffw_norm.weight")?,
            post_attention_layernorm: g.vec_f32(&b("ffn_norm.weight"))?,
            mlp: Mlp {
                gate_proj: g.linear(&b("ffn_gate.weight"))?,
                up_proj: g.linear(&b("ffn_up.weight"))?,
                down_proj: g.linear(&b("ffn_down.weight"))?,
            },
        });
    }
    let embed_tokens = g.linear("token_embd.weight")?;
    let lm_head = if g.has("output.weight") { g.linear("output.weight")? } else { embed_tokens.clone() };
    let norm = g.vec_f32("output_norm.weight")?;
    let model = finish(config, embed_tokens, layers, norm, lm_head)?;
    Ok(Loaded { model, tokenizer })
}

fn finish(config: ModelConfig, embed_tokens: Linear, layers: Vec<DecoderLayer>, norm: Vec<f32>, lm_head: Linear) -> Result<LlamaModel> {
    let c = &config;
    let shape_ok = |l: &Linear, o: usize, i: usize| l.out_features == o && l.in_features == i;
    for (i, l) in layers.iter().enumerate() {
        let a = &l.self_attn;
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let ok = shape_ok(&a.q_proj, qd, c.hidden_size)
            && shape_ok(&a.k_proj, kvd, c.hidden_size)
            && shape_ok(&a.v_proj, kvd, c.hidden_size)
            && shape_ok(&a.o_proj, c.hidden_size, qd)
            && shape_ok(&l.mlp.gate_proj, c.intermediate_size, c.hidden_size)
            && shape_ok(&l.mlp.up_proj, c.intermediate_size, c.hidden_size)
            && shape_ok(&l.mlp.down_proj, c.hidden_size, c.intermediate_size)
            && l.input_layernorm.len() == c.hidden_size
            && l.post_attention_layernorm.len() == c.hidden_size;
        if !ok {
            return Err(err(format!("layer {i}: weight shapes do not match the config")));
        }
    }
    if !shape_ok(&embed_tokens, c.vocab_size, c.hidden_size) || !shape_ok(&lm_head, c.vocab_size, c.hidden_size) {
        return Err(err("embedding or output weights do not match the config"));
    }
    let rope = Rope::new(
        &config.rope_inv_freq(config.rope_theta),
        config.max_position_embeddings,
        config.rope_interleaved,
        config.rope_scaling.attention_factor(),
    );
    let rope_local = config
        .variant
        .rope_local_theta
        .filter(|&t| t != config.rope_theta)
        .map(|t| Rope::new(&config.rope_inv_freq_unscaled(t), config.max_position_embeddings, config.rope_interleaved, 1.0));
    Ok(LlamaModel { config, embed_tokens, layers, norm, lm_head, rope, rope_local })
}

// ---------------------------------------------------------------- Hugging Face folders

fn load_hf(dir: &Path) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    let raw = std::fs::read_to_string(&cfg_path).map_err(|e| err(format!("{}: {e}", cfg_path.display())))?;
    let j: serde_json::Value = serde_json::from_str(&raw).map_err(|e| err(format!("{}: {e}", cfg_path.display())))?;
    let model_type = j["model_type"].as_str().unwrap_or("llama");
    if !matches!(model_type, "llama" | "mistral" | "qwen2" | "gemma3_text") {
        return Err(err(format!("model_type {model_type:?} is not supported (supported: llama, mistral, qwen2, gemma3_text)")));
    }
    let gemma = model_type == "gemma3_text";
    let get = |k: &str| j[k].as_u64().map(|v| v as usize).ok_or_else(|| err(format!("config.json: {k} is missing")));
    let hidden = get("hidden_size")?;
    let num_heads = get("num_attention_heads")?;
    let rope_theta = j["rope_theta"].as_f64().or_else(|| j["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(10_000.0) as f32;
    let num_layers = get("num_hidden_layers")?;
    let head_dim = get("head_dim").unwrap_or(hidden / num_heads.max(1));
    let mut variant = if gemma { gemma3_variant(&j, num_layers, hidden)? } else { Variant::llama(num_layers, head_dim) };
    // ALiBi instead of RoPE, as Falcon/BLOOM-style configs say it.
    if j["alibi"].as_bool().unwrap_or(false) || j["position_embedding_type"].as_str() == Some("alibi") {
        variant.alibi_slopes = Some(crate::model::alibi_slopes(num_heads));
    }
    let config = ModelConfig {
        name: dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        hidden_size: hidden,
        intermediate_size: get("intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads: get("num_key_value_heads").unwrap_or(num_heads),
        head_dim,
        vocab_size: get("vocab_size")?,
        rms_norm_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        rope_theta,
        rope_scaling: hf_rope_scaling(&j)?,
        rope_interleaved: false,
        max_position_embeddings: get("max_position_embeddings").unwrap_or(2048),
        variant,
    };
    config.check()?;
    let tie = j["tie_word_embeddings"].as_bool().unwrap_or(gemma);
    let mut tensors = HashMap::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| err(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(format!("{}: no *.safetensors files", dir.display())));
    }
    for f in &files {
        tensors.extend(candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| err(format!("{}: {e}", f.display())))?);
    }
    let mut take = |name: &str| -> Result<Tensor> { tensors.remove(name).ok_or_else(|| err(format!("tensor {name} is missing"))) };
    let to_vec = |t: Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let linear = |t: Tensor| -> Result<Linear> {
        let (o, i) = t.dims2().map_err(|_| err(format!("expected a 2-D weight, got {:?}", t.shape())))?;
        Linear::new(Weight::F32(to_vec(t)?), o, i)
    };
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let pre = format!("model.layers.{i}");
        let mut opt = |n: &str| tensors_opt(&mut take, &format!("{pre}.{n}"));
        let q_bias = opt("self_attn.q_proj.bias").map(to_vec).transpose()?;
        let k_bias = opt("self_attn.k_proj.bias").map(to_vec).transpose()?;
        let v_bias = opt("self_attn.v_proj.bias").map(to_vec).transpose()?;
        let q_norm = opt("self_attn.q_norm.weight").map(to_vec).transpose()?;
        let k_norm = opt("self_attn.k_norm.weight").map(to_vec).transpose()?;
        // Gemma: post_attention_layernorm normalizes the attention output and
        // pre_feedforward_layernorm comes before the MLP; Llama has only the latter,
        // under the name post_attention_layernorm.
        let (attn_output_norm, pre_mlp, mlp_output_norm) = if gemma {
            (
                Some(to_vec(take(&format!("{pre}.post_attention_layernorm.weight"))?)?),
                to_vec(take(&format!("{pre}.pre_feedforward_layernorm.weight"))?)?,
                Some(to_vec(take(&format!("{pre}.post_feedforward_layernorm.weight"))?)?),
            )
        } else {
            (None, to_vec(take(&format!("{pre}.post_attention_layernorm.weight"))?)?, None)
        };
        layers.push(DecoderLayer {
            input_layernorm: to_vec(take(&format!("{pre}.input_layernorm.weight"))?)?,
            attn_output_norm,
            mlp_output_norm,
            self_attn: Attention {
                q_proj: linear(take(&format!("{pre}.self_attn.q_proj.weight"))?)?,
                k_proj: linear(take(&format!("{pre}.self_attn.k_proj.weight"))?)?,
                v_proj: linear(take(&format!("{pre}.self_attn.v_proj.weight"))?)?,
                o_proj: linear(take(&format!("{pre}.self_attn.o_proj.weight"))?)?,
                q_bias,
                k_bias,
                v_bias,
                q_norm,
                k_norm,
            },
            post_attention_layernorm: pre_mlp,
            mlp: Mlp {
                gate_proj: linear(take(&format!("{pre}.mlp.gate_proj.weight"))?)?,
                up_proj: linear(take(&format!("{pre}.mlp.up_proj.weight"))?)?,
                down_proj: linear(take(&format!("{pre}.mlp.down_proj.weight"))?)?,
            },
        });
    }
    let embed_tokens = linear(take("model.embed_tokens.weight")?)?;
    let lm_head = if tie { embed_tokens.clone() } else { linear(take("lm_head.weight")?)? };
    let norm = to_vec(take("model.norm.weight")?)?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let model = finish(config, embed_tokens, layers, norm, lm_head)?;
    Ok(Loaded { model, tokenizer })
}

/// Gemma 3 text config: local/global layer pattern, scales, soft-caps.
fn gemma3_variant(j: &serde_json::Value, num_layers: usize, hidden: usize) -> Result<Variant> {
    let local_layers = match j["layer_types"].as_array() {
        Some(types) => {
            if types.len() != num_layers {
                return Err(err(format!("config.json: layer_types has {} entries for {num_layers} layers", types.len())));
            }
            types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect()
        }
        None => {
            let pattern = j["sliding_window_pattern"].as_u64().unwrap_or(6).max(1) as usize;
            (0..num_layers).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    let qpas = j["query_pre_attn_scalar"].as_f64().unwrap_or(256.0);
    Ok(Variant {
        norm_offset: 1.0,
        embed_scale: (hidden as f32).sqrt(),
        attn_scale: (1.0 / qpas.sqrt()) as f32,
        activation: Activation::GeluTanh,
        local_layers,
        sliding_window: Some(j["sliding_window"].as_u64().unwrap_or(512) as usize),
        rope_local_theta: Some(j["rope_local_base_freq"].as_f64().unwrap_or(10_000.0) as f32),
        attn_softcap: j["attn_logit_softcapping"].as_f64().map(|v| v as f32),
        final_softcap: j["final_logit_softcapping"].as_f64().map(|v| v as f32),
        alibi_slopes: None,
    })
}

fn tensors_opt(take: &mut impl FnMut(&str) -> Result<Tensor>, name: &str) -> Option<Tensor> {
    take(name).ok()
}

fn hf_rope_scaling(j: &serde_json::Value) -> Result<RopeScaling> {
    let s = &j["rope_scaling"];
    if s.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = s["rope_type"].as_str().or_else(|| s["type"].as_str()).unwrap_or("default");
    let f = |k: &str, d: f64| s[k].as_f64().unwrap_or(d) as f32;
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: f("factor", 1.0) }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: f("factor", 8.0),
            low_freq_factor: f("low_freq_factor", 1.0),
            high_freq_factor: f("high_freq_factor", 4.0),
            original_max_position: s["original_max_position_embeddings"].as_u64().unwrap_or(8192) as usize,
        }),
        "dynamic" => Ok(RopeScaling::DynamicNtk {
            factor: f("factor", 1.0),
            original_max_position: j["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
        }),
        "yarn" => Ok(RopeScaling::Yarn {
            factor: f("factor", 1.0),
            original_max_position: s["original_max_position_embeddings"].as_u64().or(j["max_position_embeddings"].as_u64()).unwrap_or(2048) as usize,
            beta_fast: f("beta_fast", 32.0),
            beta_slow: f("beta_slow", 1.0),
        }),
        other => Err(err(format!("rope_scaling type {other:?} is not supported (supported: linear, dynamic, yarn, llama3)"))),
    }
}
