//! LoRA adapters in PEFT format (`adapter_config.json` + `adapter_model.safetensors`),
//! validated against the base model and applied unmerged, per row group:
//!
//! ```text
//! y[rows of adapter s] += scale_s * (x[rows] · A_sᵀ) · B_sᵀ      (Punica SGMV semantics)
//!   A_s: [r, in]   (kept as a linear layer, so the shrink is one dot product per element)
//!   B_sᵀ: [r, out] (kept transposed, so the expand is r axpys over contiguous rows)
//! ```
//!
//! A GGUF llama base stores Q and K rows permuted for interleaved RoPE; B's rows of
//! `q_proj` and `k_proj` are permuted the same way at load.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::cpu::matmul::{Linear, Weight};
use crate::model::ModelConfig;
use crate::threadpool::ThreadPool;
use crate::{EngineError, Result};

/// The linear layers an adapter may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down];

    pub fn peft_name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }

    fn from_name(s: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.peft_name() == s)
    }

    /// (out, in) of this module in the base model.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        let (h, q, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        match self {
            Module::Q => (q, h),
            Module::K | Module::V => (kv, h),
            Module::O => (h, q),
            Module::Gate | Module::Up => (i, h),
            Module::Down => (h, i),
        }
    }
}

/// Issued once per loaded adapter version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId(pub u64);

static NEXT_ADAPTER_ID: AtomicU64 = AtomicU64::new(1);

/// One adapted linear layer.
#[derive(Debug)]
pub struct LoraWeights {
    /// `[r, in]`.
    pub a: Linear,
    /// `[r, out]` (B transposed), rows in the base's output order.
    pub bt: Vec<f32>,
    pub r: usize,
    pub out: usize,
    pub scale: f32,
}

/// An immutable adapter; requests hold it by `Arc`, so unloading never disturbs them.
#[derive(Debug)]
pub struct LoraAdapter {
    pub id: AdapterId,
    pub name: String,
    /// `layers[l][module as usize]`.
    pub layers: Vec<[Option<LoraWeights>; 7]>,
    pub max_rank: usize,
    /// Bytes of adapter weights held.
    pub bytes: usize,
}

impl LoraAdapter {
    pub fn get(&self, layer: usize, m: Module) -> Option<&LoraWeights> {
        self.layers.get(layer)?[m as usize].as_ref()
    }
}

fn bad(msg: impl Into<String>) -> EngineError {
    EngineError::Adapter(msg.into())
}

/// The parts of `adapter_config.json` that matter, checked.
#[derive(Debug, Clone)]
struct PeftConfig {
    r: usize,
    alpha: f32,
    use_rslora: bool,
    targets: Vec<Module>,
    rank_pattern: Vec<(regex::Regex, usize)>,
    alpha_pattern: Vec<(regex::Regex, f32)>,
}

fn pattern(key: &str) -> Result<regex::Regex> {
    // PEFT matches `(.*\.)?{key}$` against the module's full name.
    regex::Regex::new(&format!("^(.*\\.)?{key}$")).map_err(|e| bad(format!("adapter_config.json: invalid pattern {key:?}: {e}")))
}

fn parse_config(j: &serde_json::Value) -> Result<PeftConfig> {
    let peft_type = j["peft_type"].as_str().unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad(format!("adapter_config.json: peft_type {peft_type:?} is not supported (only LORA)")));
    }
    if j["use_dora"].as_bool().unwrap_or(false) {
        return Err(bad("adapter_config.json: DoRA adapters (use_dora: true) are not supported"));
    }
    match &j["modules_to_save"] {
        serde_json::Value::Null => {}
        serde_json::Value::Array(a) if a.is_empty() => {}
        other => return Err(bad(format!("adapter_config.json: modules_to_save ({other}) is not supported: the adapter replaces whole modules"))),
    }
    let bias = j["bias"].as_str().unwrap_or("none");
    if bias != "none" {
        return Err(bad(format!("adapter_config.json: bias {bias:?} is not supported (only \"none\")")));
    }
    if j["fan_in_fan_out"].as_bool().unwrap_or(false) {
        return Err(bad("adapter_config.json: fan_in_fan_out adapters are not supported"));
    }
    let r = j["r"].as_u64().filter(|&r| r > 0).ok_or_else(|| bad("adapter_config.json: r must be a positive integer"))? as usize;
    let alpha = j["lora_alpha"].as_f64().unwrap_or(r as f64) as f32;
    let targets = match &j["target_modules"] {
        serde_json::Value::String(s) if s == "all-linear" => Module::ALL.to_vec(),
        serde_json::Value::Array(a) => {
            let mut t = Vec::new();
            for v in a {
                let name = v.as_str().ok_or_else(|| bad("adapter_config.json: target_modules must be names"))?;
                let m = Module::from_name(name).ok_or_else(|| {
                    bad(format!("adapter_config.json: unknown target module {name:?} (supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"))
                })?;
                t.push(m);
            }
            t
        }
        other => return Err(bad(format!("adapter_config.json: target_modules {other} is not supported (give a list of module names or \"all-linear\")"))),
    };
    if targets.is_empty() {
        return Err(bad("adapter_config.json: target_modules is empty"));
    }
    let mut rank_pattern = Vec::new();
    if let Some(m) = j["rank_pattern"].as_object() {
        for (k, v) in m {
            let r = v.as_u64().filter(|&r| r > 0).ok_or_else(|| bad(format!("adapter_config.json: rank_pattern[{k:?}] must be a positive integer")))?;
            rank_pattern.push((pattern(k)?, r as usize));
        }
    }
    let mut alpha_pattern = Vec::new();
    if let Some(m) = j["alpha_pattern"].as_object() {
        for (k, v) in m {
            let a = v.as_f64().ok_or_else(|| bad(format!("adapter_config.json: alpha_pattern[{k:?}] must be a number")))?;
            alpha_pattern.push((pattern(k)?, a as f32));
        }
    }
    Ok(PeftConfig { r, alpha, use_rslora: j["use_rslora"].as_bool().unwrap_or(false), targets, rank_pattern, alpha_pattern })
}

impl PeftConfig {
    /// Rank and scale of one module (`model.layers.N.self_attn.q_proj`).
    fn rank_and_scale(&self, full_name: &str) -> (usize, f32) {
        let r = self.rank_pattern.iter().find(|(p, _)| p.is_match(full_name)).map_or(self.r, |(_, r)| *r);
        let alpha = self.alpha_pattern.iter().find(|(p, _)| p.is_match(full_name)).map_or(self.alpha, |(_, a)| *a);
        let scale = if self.use_rslora { alpha / (r as f32).sqrt() } else { alpha / r as f32 };
        (r, scale)
    }
}

/// Options of [`load_adapter`].
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Larger ranks are refused.
    pub max_rank: usize,
}

/// Reads and validates a PEFT adapter folder against the base model. Every refusal is an
/// [`EngineError::Adapter`] that says why; nothing is half-loaded.
pub fn load_adapter(name: &str, dir: &Path, base: &ModelConfig, opts: LoadOptions) -> Result<LoraAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    let raw = std::fs::read_to_string(&cfg_path).map_err(|e| bad(format!("cannot read {}: {e}", cfg_path.display())))?;
    let j: serde_json::Value = serde_json::from_str(&raw).map_err(|e| bad(format!("{} is not valid JSON: {e}", cfg_path.display())))?;
    let cfg = parse_config(&j)?;
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.is_file() {
        return Err(bad(format!("{} is missing (only safetensors adapters are supported)", st_path.display())));
    }
    let mut tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)
        .map_err(|e| bad(format!("{} is not a valid safetensors file: {e}", st_path.display())))?;
    let mut layers: Vec<[Option<LoraWeights>; 7]> = (0..base.num_layers).map(|_| Default::default()).collect();
    let (mut max_rank, mut bytes) = (0, 0);
    for (l, slots) in layers.iter_mut().enumerate() {
        for &m in &cfg.targets {
            let module = format!("model.layers.{l}.{}.{}", m.parent(), m.peft_name());
            let key = |ab: &str| format!("base_model.model.{module}.lora_{ab}.weight");
            let (a, b) = match (tensors.remove(&key("A")), tensors.remove(&key("B"))) {
                (Some(a), Some(b)) => (a, b),
                (None, None) if j["layers_to_transform"].is_array() => continue,
                _ => return Err(bad(format!("adapter tensors for {module} are missing (lora_A and lora_B expected)"))),
            };
            let (r, scale) = cfg.rank_and_scale(&module);
            if r > opts.max_rank {
                return Err(bad(format!("{module}: rank {r} is above --max-lora-rank {}", opts.max_rank)));
            }
            let (out, inp) = m.shape(base);
            if a.dims() != [r, inp] || b.dims() != [out, r] {
                return Err(bad(format!(
                    "{module}: lora_A {:?} / lora_B {:?} do not fit the base ([{r}, {inp}] and [{out}, {r}] expected)",
                    a.dims(),
                    b.dims()
                )));
            }
            let to_vec = |t: Tensor| -> Result<Vec<f32>> {
                let v = t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(|e| bad(format!("{module}: {e}")))?;
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(bad(format!("{module}: adapter weights contain NaN or infinity")));
                }
                Ok(v)
            };
            let (a, b) = (to_vec(a)?, to_vec(b)?);
            let permute = base.rope_interleaved && matches!(m, Module::Q | Module::K);
            let mut bt = vec![0f32; r * out];
            for g in 0..out {
                let f = if permute { hf_row_of_gguf_row(g, base.head_dim) } else { g };
                for j in 0..r {
                    bt[j * out + g] = b[f * r + j];
                }
            }
            bytes += (a.len() + bt.len()) * 4;
            max_rank = max_rank.max(r);
            let a = Linear::new(Weight::F32(a), r, inp).map_err(|e| bad(e.to_string()))?;
            slots[m as usize] = Some(LoraWeights { a, bt, r, out, scale });
        }
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(bad(format!("adapter tensor {extra} targets a module that is not supported or not in target_modules")));
    }
    Ok(LoraAdapter { id: AdapterId(NEXT_ADAPTER_ID.fetch_add(1, Ordering::Relaxed)), name: name.to_string(), layers, max_rank, bytes })
}

/// GGUF llama row `h*hd + 2i + j` holds Hugging Face row `h*hd + j*hd/2 + i`.
fn hf_row_of_gguf_row(g: usize, hd: usize) -> usize {
    let (h, w) = (g / hd, g % hd);
    let (i, j) = (w / 2, w % 2);
    h * hd + j * hd / 2 + i
}

/// Rows of the packed step that use one adapter: `(first row, row count)` segments.
#[derive(Debug, Clone)]
pub struct AdapterRows<'a> {
    pub adapter: &'a LoraAdapter,
    pub segments: Vec<(usize, usize)>,
}

/// Adds every adapter's delta for `module` of `layer`: `y[rows] += scale (x A^T) B^T`.
/// `x`: `[tokens, in]`, `y`: `[tokens, out]`.
pub fn apply(pool: &ThreadPool, groups: &[AdapterRows<'_>], layer: usize, module: Module, x: &[f32], y: &mut [f32]) {
    for g in groups {
        let Some(w) = g.adapter.get(layer, module) else { continue };
        let inp = w.a.in_features;
        let rows: usize = g.segments.iter().map(|s| s.1).sum();
        // Gather the group's rows, shrink, scale.
        let mut xs = Vec::with_capacity(rows * inp);
        for &(start, n) in &g.segments {
            xs.extend_from_slice(&x[start * inp..(start + n) * inp]);
        }
        let mut t = vec![0f32; rows * w.r];
        w.a.forward(pool, &xs, rows, &mut t);
        t.iter_mut().for_each(|v| *v *= w.scale);
        // Expand into each row: r axpys over contiguous rows of Bᵀ, in a fixed order.
        let mut i = 0;
        for &(start, n) in &g.segments {
            for row in start..start + n {
                let yr = &mut y[row * w.out..(row + 1) * w.out];
                for j in 0..w.r {
                    let c = t[i * w.r + j];
                    for (o, &b) in yr.iter_mut().zip(&w.bt[j * w.out..(j + 1) * w.out]) {
                        *o += c * b;
                    }
                }
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_row_permutation_is_a_bijection_per_head() {
        let hd = 8;
        let mut seen: Vec<usize> = (0..3 * hd).map(|g| hf_row_of_gguf_row(g, hd)).collect();
        seen.sort();
        assert_eq!(seen, (0..3 * hd).collect::<Vec<_>>());
        assert_eq!(hf_row_of_gguf_row(1, hd), 4);
        assert_eq!(hf_row_of_gguf_row(2, hd), 1);
    }

    #[test]
    fn rank_and_alpha_patterns_override_per_module() {
        let j = serde_json::json!({
            "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers.1.self_attn.v_proj": 2}
        });
        let c = parse_config(&j).unwrap();
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.q_proj"), (4, 4.0));
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.v_proj"), (8, 2.0));
        assert_eq!(c.rank_and_scale("model.layers.1.self_attn.v_proj"), (8, 0.25));
        let rs = parse_config(&serde_json::json!({"r": 16, "lora_alpha": 16, "use_rslora": true, "target_modules": ["q_proj"]})).unwrap();
        assert_eq!(rs.rank_and_scale("model.layers.0.self_attn.q_proj"), (16, 4.0));
    }

    #[test]
    fn unsupported_configs_are_refused_with_the_reason() {
        let base = serde_json::json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]});
        let with = |k: &str, v: serde_json::Value| {
            let mut j = base.clone();
            j[k] = v;
            parse_config(&j).unwrap_err().to_string()
        };
        assert!(with("use_dora", true.into()).contains("DoRA"));
        assert!(with("modules_to_save", serde_json::json!(["lm_head"])).contains("modules_to_save"));
        assert!(with("bias", "all".into()).contains("bias"));
        assert!(with("target_modules", serde_json::json!(["embed_tokens"])).contains("unknown target module"));
        assert!(with("r", 0.into()).contains("r must be"));
    }
}
