//! Llama-family decoder (Llama, Mistral, Qwen2, SmolLM): GQA/MQA through `num_kv_heads`,
//! RoPE, RMSNorm, SwiGLU, tied or separate output embeddings.
//!
//! The forward takes a packed batch: all tokens of a step as one `[num_tokens, hidden]`
//! matrix; every linear layer is one matmul over all of them; attention alone is per
//! sequence through the paged KV cache.

use crate::cpu::attention::{paged_attention, AttnParams, SeqAttn};
use crate::cpu::matmul::{matmul_many, matmul_many_acts, Linear, Weight};
use crate::cpu::ops::{self, Rope};
use crate::kv_cache::KvCache;
use crate::lora::{self, AdapterRows, Module};
use crate::threadpool::ThreadPool;

/// RoPE frequency scaling from the model config.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::enum_variant_names)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.x wavelength-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position: usize },
    /// NTK-aware base change for a context `factor` times the trained one. Computed once
    /// for the scaled length (as vLLM does), not per request length.
    DynamicNtk { factor: f32, original_max_position: usize },
    /// YaRN: interpolate low frequencies, keep high ones, blend between; cos/sin scaled by
    /// `0.1 ln(factor) + 1`.
    Yarn { factor: f32, original_max_position: usize, beta_fast: f32, beta_slow: f32 },
}

impl RopeScaling {
    /// Multiplier of cos and sin (YaRN's attention temperature); 1 otherwise.
    pub fn attention_factor(&self) -> f32 {
        match self {
            RopeScaling::Yarn { factor, .. } if *factor > 1.0 => 0.1 * factor.ln() + 1.0,
            _ => 1.0,
        }
    }
}

/// Resolved model configuration: no options left.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// GGUF llama weights rotate interleaved pairs; HF weights rotate halves.
    pub rope_interleaved: bool,
    pub max_position_embeddings: usize,
    /// The family-specific parts (Llama defaults: [`Variant::llama`]).
    pub variant: Variant,
}

/// MLP activation of the gated unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Mistral, Qwen2).
    Silu,
    /// GeGLU with the tanh approximation (Gemma).
    GeluTanh,
}

/// What distinguishes the families this model code serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Added to every RMSNorm weight: Gemma checkpoints store `w` for `x * (1 + w)`
    /// (GGUF conversion already added the 1, so 0 there).
    pub norm_offset: f32,
    /// Token embeddings are multiplied by this (Gemma: sqrt(hidden)).
    pub embed_scale: f32,
    /// Multiplies q·k (usually 1/sqrt(head_dim)).
    pub attn_scale: f32,
    pub activation: Activation,
    /// Per layer: true for a sliding-window (local) layer.
    pub local_layers: Vec<bool>,
    /// Window of the local layers.
    pub sliding_window: Option<usize>,
    /// RoPE base of the local layers (Gemma 3: 10k; global layers use `rope_theta`).
    pub rope_local_theta: Option<f32>,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// ALiBi position biases instead of RoPE (one slope per query head).
    pub alibi_slopes: Option<Vec<f32>>,
}

/// The ALiBi slopes of `n` heads, as the ALiBi paper and Hugging Face compute them
/// (a geometric series from the closest power of two, interleaved extras for the rest).
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    let cp2 = 1usize << (usize::BITS - 1 - n.max(1).leading_zeros());
    let base = 2f64.powf(-8.0 / cp2 as f64);
    let mut s: Vec<f32> = (1..=cp2).map(|p| base.powi(p as i32) as f32).collect();
    if cp2 < n {
        let extra = 2f64.powf(-4.0 / cp2 as f64);
        let rest = (n - cp2).min(cp2);
        s.extend((0..rest).map(|i| extra.powi((2 * i + 1) as i32) as f32));
    }
    s
}

impl Variant {
    pub fn llama(num_layers: usize, head_dim: usize) -> Self {
        Variant {
            norm_offset: 0.0,
            embed_scale: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            activation: Activation::Silu,
            local_layers: vec![false; num_layers],
            sliding_window: None,
            rope_local_theta: None,
            attn_softcap: None,
            final_softcap: None,
            alibi_slopes: None,
        }
    }
}

impl ModelConfig {
    pub fn check(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::EngineError::Load(m));
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!("num_heads {} is not a multiple of num_kv_heads {}", self.num_heads, self.num_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return bad(format!("head_dim {} must be even", self.head_dim));
        }
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return bad("model config has a zero size".into());
        }
        Ok(())
    }

    /// `inv_freq[i]` for base `theta` without scaling (Gemma 3's local layers).
    pub fn rope_inv_freq_unscaled(&self, theta: f32) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2).map(|i| (1.0 / (theta as f64).powf(2.0 * i as f64 / d as f64)) as f32).collect()
    }

    /// `inv_freq[i]` for the rotary half-dimension, with the configured scaling applied.
    pub fn rope_inv_freq(&self, theta: f32) -> Vec<f32> {
        let d = self.head_dim;
        let theta = match &self.rope_scaling {
            RopeScaling::DynamicNtk { factor, .. } => {
                let f = *factor as f64;
                theta as f64 * f.powf(d as f64 / (d as f64 - 2.0))
            }
            _ => theta as f64,
        };
        let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64)).collect();
        match &self.rope_scaling {
            RopeScaling::DynamicNtk { .. } => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Yarn { factor, original_max_position, beta_fast, beta_slow } => {
                let dd = d as f64;
                let corr = |rot: f64| dd * ((*original_max_position as f64) / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
                let low = corr(*beta_fast as f64).floor().max(0.0);
                let mut high = corr(*beta_slow as f64).ceil().min(dd - 1.0);
                if high == low {
                    high += 0.001;
                }
                base.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp; // 1: extrapolate (keep), 0: interpolate
                        (f / *factor as f64 * (1.0 - keep) + f * keep) as f32
                    })
                    .collect()
            }
            RopeScaling::None => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => base.iter().map(|&f| (f / *factor as f64) as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let (factor, lo, hi) = (*factor as f64, *low_freq_factor as f64, *high_freq_factor as f64);
                let old = *original_max_position as f64;
                let (low_wl, high_wl) = (old / lo, old / hi);
                base.iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        let v = if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let smooth = (old / wl - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        v as f32
                    })
                    .collect()
            }
        }
    }
}

pub struct Attention {
    /// Per-head RMSNorm of queries and keys (Gemma 3).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// Norm names follow Llama: `input_layernorm` before attention, `post_attention_layernorm`
/// before the MLP. Gemma's extra norms on the outputs of attention and MLP (its
/// `post_attention_layernorm` and `post_feedforward_layernorm`) are `attn_output_norm`
/// and `mlp_output_norm`.
pub struct DecoderLayer {
    pub input_layernorm: Vec<f32>,
    pub self_attn: Attention,
    pub attn_output_norm: Option<Vec<f32>>,
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: Mlp,
    pub mlp_output_norm: Option<Vec<f32>>,
}

pub struct LlamaModel {
    pub config: ModelConfig,
    /// `[vocab, hidden]`, read a row at a time.
    pub embed_tokens: Linear,
    pub layers: Vec<DecoderLayer>,
    pub norm: Vec<f32>,
    /// `[vocab, hidden]`; the embedding matrix when tied.
    pub lm_head: Linear,
    pub rope: Rope,
    /// RoPE of the sliding-window layers when their base differs (Gemma 3).
    pub rope_local: Option<Rope>,
}

/// One sequence of a packed step.
#[derive(Debug, Clone)]
pub struct SeqInput<'a> {
    /// First row of this sequence in the packed token matrix.
    pub query_start: usize,
    /// Tokens of this sequence in the step.
    pub query_len: usize,
    /// Tokens in the cache after this step (computed before + query_len).
    pub context_len: usize,
    pub block_table: &'a [u32],
    /// Block table in the sliding-window pool (released blocks hold `u32::MAX`), for the
    /// layers the cache keeps there.
    pub window_block_table: Option<&'a [u32]>,
}

/// Everything one forward needs. See the layout note in `kv_cache`.
#[derive(Debug, Clone)]
pub struct BatchInput<'a> {
    pub token_ids: &'a [u32],
    pub positions: &'a [usize],
    pub seqs: Vec<SeqInput<'a>>,
    /// Cache slot of every token.
    pub slot_mapping: &'a [usize],
    /// Slots in the sliding-window pool, when the cache has one.
    pub window_slot_mapping: Option<&'a [usize]>,
    /// Rows of the packed matrix whose logits are wanted, in output order.
    pub logits_rows: &'a [usize],
    /// LoRA adapters of this step and the rows each applies to.
    pub lora: Vec<AdapterRows<'a>>,
    /// Rows whose linear layers multiply f32 activations even under `--quantize act8`:
    /// with `--act8-prompts f32` the engine marks prompt tokens (positions before the
    /// request's prompt length, so a recomputed generated token stays on the INT8 path).
    /// Empty: none. Under other
    /// choices it changes nothing.
    pub f32_rows: &'a [bool],
}

/// The rows of one step split by how their activations are multiplied (`f32_rows`).
enum RowSplit {
    /// Every row as its weights ask.
    AsStored,
    /// Every row with f32 activations.
    F32,
    /// Rows `f32` with f32 activations, rows `stored` as the weights ask.
    Mixed { f32: Vec<usize>, stored: Vec<usize> },
}

impl RowSplit {
    fn new(f32_rows: &[bool], t: usize, act8: bool) -> RowSplit {
        let marked = f32_rows.iter().filter(|&&b| b).count();
        if !act8 || marked == 0 {
            return RowSplit::AsStored;
        }
        assert_eq!(f32_rows.len(), t, "f32_rows marks every row or none");
        if marked == t {
            return RowSplit::F32;
        }
        let (f32, stored) = (0..t).partition(|&r| f32_rows[r]);
        RowSplit::Mixed { f32, stored }
    }

    /// `y_i = x · W_iᵀ` for `x[t, K]`, each row as the split says.
    fn matmul(&self, pool: &ThreadPool, x: &[f32], t: usize, outs: &mut [(&Linear, &mut [f32])]) {
        use crate::cpu::matmul::Acts;
        match self {
            RowSplit::AsStored => matmul_many(pool, x, t, outs),
            RowSplit::F32 => matmul_many_acts(pool, x, t, outs, Acts::F32),
            RowSplit::Mixed { f32, stored } => {
                let k = x.len() / t;
                for (rows, acts) in [(f32, Acts::F32), (stored, Acts::AsStored)] {
                    let xs: Vec<f32> = rows.iter().flat_map(|&r| x[r * k..(r + 1) * k].iter().copied()).collect();
                    let mut ys: Vec<Vec<f32>> = outs.iter().map(|o| vec![0f32; rows.len() * o.0.out_features]).collect();
                    let mut part: Vec<(&Linear, &mut [f32])> = outs.iter().zip(ys.iter_mut()).map(|(o, y)| (o.0, y.as_mut_slice())).collect();
                    matmul_many_acts(pool, &xs, rows.len(), &mut part, acts);
                    for ((lin, y), ys) in outs.iter_mut().zip(&ys) {
                        let n = lin.out_features;
                        for (i, &r) in rows.iter().enumerate() {
                            y[r * n..(r + 1) * n].copy_from_slice(&ys[i * n..(i + 1) * n]);
                        }
                    }
                }
            }
        }
    }
}

impl BatchInput<'_> {
    /// The sequences as attention sees them, with their block tables in the main pool or
    /// (`window`) in the sliding-window pool where they have one.
    pub fn attn_seqs(&self, window: bool) -> Vec<SeqAttn<'_>> {
        self.seqs
            .iter()
            .map(|s| SeqAttn {
                query_start: s.query_start,
                query_len: s.query_len,
                context_len: s.context_len,
                block_table: if window { s.window_block_table.unwrap_or(s.block_table) } else { s.block_table },
            })
            .collect()
    }
}

/// Runs `f(row)` over the rows of a `[rows, width]` buffer in parallel chunks.
fn par_rows(pool: &ThreadPool, buf: &mut [f32], width: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let rows = buf.len() / width.max(1);
    const CHUNK: usize = 8;
    let p = crate::cpu::SyncPtr(buf.as_mut_ptr());
    pool.run(rows.div_ceil(CHUNK), &|c| {
        let _ = &p;
        for r in c * CHUNK..((c + 1) * CHUNK).min(rows) {
            // SAFETY: row r belongs to this chunk only.
            let row = unsafe { std::slice::from_raw_parts_mut(p.0.add(r * width), width) };
            f(r, row);
        }
    });
}

impl LlamaModel {
    /// Converts the decoder's linear layers to `q`; `Quantize::None` changes nothing. The
    /// output head (often the tied embedding) becomes INT8 under `Int8`, but keeps its
    /// checkpoint format under `Fp8`, as vLLM's FP8 leaves `lm_head` alone: on the default
    /// model an E4M3 head alone costs 2.4% perplexity. The embedding table is gathered a
    /// row at a time and always keeps its format.
    pub fn quantize(&mut self, q: crate::config::Quantize) {
        use crate::config::Quantize;
        if q == Quantize::None {
            return;
        }
        for l in &mut self.layers {
            let a = &mut l.self_attn;
            for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut l.mlp.gate_proj, &mut l.mlp.up_proj, &mut l.mlp.down_proj] {
                *lin = lin.quantized(q);
            }
        }
        if matches!(q, Quantize::Int8 | Quantize::Act8) {
            self.lm_head = self.lm_head.quantized(q);
        }
    }

    /// Packed forward over one step; returns `[logits_rows.len(), vocab]` logits.
    pub fn forward(&self, pool: &ThreadPool, batch: &BatchInput<'_>, cache: &mut KvCache) -> Vec<f32> {
        let c = &self.config;
        let (t, hdim) = (batch.token_ids.len(), c.hidden_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let v = &c.variant;
        let mut x = vec![0f32; t * hdim];
        for (row, &id) in x.chunks_exact_mut(hdim).zip(batch.token_ids) {
            self.embed_tokens.weight.dequant_rows(id as usize, hdim, row);
            if v.embed_scale != 1.0 {
                row.iter_mut().for_each(|e| *e *= v.embed_scale);
            }
        }
        let mut h = vec![0f32; t * hdim];
        let (mut q, mut k, mut vv) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
        let mut attn = vec![0f32; t * qd];
        let (mut gate, mut up) = (vec![0f32; t * c.intermediate_size], vec![0f32; t * c.intermediate_size]);
        let (seqs, window_seqs) = (batch.attn_seqs(false), batch.attn_seqs(true));
        let act8 = self.layers.iter().any(|l| matches!(l.mlp.up_proj.weight, Weight::A8(_)));
        let split = RowSplit::new(batch.f32_rows, t, act8);
        let eps = c.rms_norm_eps;
        for (li, layer) in self.layers.iter().enumerate() {
            let local = v.local_layers.get(li).copied().unwrap_or(false);
            let params = AttnParams {
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                block_size: cache.layout.block_size,
                scale: v.attn_scale,
                sliding_window: if local { v.sliding_window } else { None },
                softcap: v.attn_softcap,
                alibi_slopes: v.alibi_slopes.as_deref(),
            };
            ops::rms_norm(&x, &layer.input_layernorm, eps, v.norm_offset, &mut h);
            let a = &layer.self_attn;
            split.matmul(pool, &h, t, &mut [(&a.q_proj, &mut q), (&a.k_proj, &mut k), (&a.v_proj, &mut vv)]);
            let ad = |m: Module, x: &[f32], y: &mut [f32]| lora::apply(pool, &batch.lora, li, m, x, y);
            ad(Module::Q, &h, &mut q);
            ad(Module::K, &h, &mut k);
            ad(Module::V, &h, &mut vv);
            for (buf, bias) in [(&mut q, &a.q_bias), (&mut k, &a.k_bias), (&mut vv, &a.v_bias)] {
                if let Some(b) = bias {
                    buf.chunks_exact_mut(b.len()).for_each(|r| ops::add_inplace(r, b));
                }
            }
            if let Some(w) = &a.q_norm {
                ops::rms_norm_inplace(&mut q, w, eps, v.norm_offset);
            }
            if let Some(w) = &a.k_norm {
                ops::rms_norm_inplace(&mut k, w, eps, v.norm_offset);
            }
            let rope = if local { self.rope_local.as_ref().unwrap_or(&self.rope) } else { &self.rope };
            if v.alibi_slopes.is_none() {
                for (i, &pos) in batch.positions.iter().enumerate() {
                    rope.apply(&mut q[i * qd..(i + 1) * qd], c.head_dim, pos);
                    rope.apply(&mut k[i * kvd..(i + 1) * kvd], c.head_dim, pos);
                }
            }
            let in_window_pool = cache.windowed[li];
            let (slots, layer_seqs) = match (in_window_pool, batch.window_slot_mapping) {
                (true, Some(ws)) => (ws, &window_seqs),
                _ => (batch.slot_mapping, &seqs),
            };
            cache.write(li, slots, &k, &vv);
            paged_attention(pool, &q, cache.k[li].as_slice(), cache.v[li].as_slice(), layer_seqs, &params, &mut attn);
            split.matmul(pool, &attn, t, &mut [(&a.o_proj, &mut h)]);
            ad(Module::O, &attn, &mut h);
            if let Some(w) = &layer.attn_output_norm {
                ops::rms_norm_inplace(&mut h, w, eps, v.norm_offset);
            }
            ops::add_inplace(&mut x, &h);
            ops::rms_norm(&x, &layer.post_attention_layernorm, eps, v.norm_offset, &mut h);
            split.matmul(pool, &h, t, &mut [(&layer.mlp.gate_proj, &mut gate), (&layer.mlp.up_proj, &mut up)]);
            ad(Module::Gate, &h, &mut gate);
            ad(Module::Up, &h, &mut up);
            let inter = c.intermediate_size;
            let act = v.activation;
            par_rows(pool, &mut gate, inter, &|r, g| {
                let u = &up[r * inter..(r + 1) * inter];
                match act {
                    Activation::Silu => ops::silu_mul(g, u),
                    Activation::GeluTanh => ops::gelu_tanh_mul(g, u),
                }
            });
            split.matmul(pool, &gate, t, &mut [(&layer.mlp.down_proj, &mut h)]);
            ad(Module::Down, &gate, &mut h);
            if let Some(w) = &layer.mlp_output_norm {
                ops::rms_norm_inplace(&mut h, w, eps, v.norm_offset);
            }
            ops::add_inplace(&mut x, &h);
        }
        let n = batch.logits_rows.len();
        let mut rows = vec![0f32; n * hdim];
        for (dst, &r) in rows.chunks_exact_mut(hdim).zip(batch.logits_rows) {
            dst.copy_from_slice(&x[r * hdim..(r + 1) * hdim]);
        }
        ops::rms_norm_inplace(&mut rows, &self.norm, c.rms_norm_eps, c.variant.norm_offset);
        let mut logits = vec![0f32; n * c.vocab_size];
        self.lm_head.forward(pool, &rows, n, &mut logits);
        if let Some(cap) = c.variant.final_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        logits
    }

    /// One sequence through a fresh cache, without the scheduler: logits at `rows`
    /// (positions of `tokens`), `[rows.len(), vocab]`. For tests and tools.
    pub fn forward_sequence(&self, pool: &ThreadPool, tokens: &[u32], rows: &[usize], lora: Vec<AdapterRows<'_>>) -> Vec<f32> {
        self.forward_sequence_kv(pool, tokens, rows, lora, crate::KvDtype::F32)
    }

    /// [`LlamaModel::forward_sequence`] with a KV cache of `dtype`.
    pub fn forward_sequence_kv(&self, pool: &ThreadPool, tokens: &[u32], rows: &[usize], lora: Vec<AdapterRows<'_>>, dtype: crate::KvDtype) -> Vec<f32> {
        use crate::kv_cache::KvLayout;
        let c = &self.config;
        let bs = 16;
        let nb = tokens.len().div_ceil(bs);
        let layout = KvLayout { num_layers: c.num_layers, num_blocks: nb, block_size: bs, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let mut cache = KvCache::with_window_pool(layout, dtype, 0, &[]);
        let table: Vec<u32> = (0..nb as u32).collect();
        let positions: Vec<usize> = (0..tokens.len()).collect();
        let batch = BatchInput {
            token_ids: tokens,
            positions: &positions,
            seqs: vec![SeqInput { query_start: 0, query_len: tokens.len(), context_len: tokens.len(), block_table: &table, window_block_table: None }],
            slot_mapping: &positions,
            window_slot_mapping: None,
            logits_rows: rows,
            lora,
            // Every row as its weights ask: under act8 this measures the INT8 path.
            f32_rows: &[],
        };
        self.forward(pool, &batch, &mut cache)
    }

    /// Bytes of weights read per decode step.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Linear| l.weight.storage_bytes();
        let mut total = lin(&self.lm_head);
        for l in &self.layers {
            let a = &l.self_attn;
            total += lin(&a.q_proj) + lin(&a.k_proj) + lin(&a.v_proj) + lin(&a.o_proj);
            total += lin(&l.mlp.gate_proj) + lin(&l.mlp.up_proj) + lin(&l.mlp.down_proj);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> ModelConfig {
        ModelConfig {
            name: "t".into(),
            hidden_size: 64,
            intermediate_size: 64,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 64,
            vocab_size: 8,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: scaling,
            rope_interleaved: false,
            max_position_embeddings: 4096,
            variant: Variant::llama(1, 64),
        }
    }

    #[test]
    fn alibi_slopes_match_the_reference_formula() {
        // Powers of two: 2^(-8i/n).
        let s8 = alibi_slopes(8);
        for (i, v) in s8.iter().enumerate() {
            assert!((v - 2f32.powf(-(i as f32 + 1.0))).abs() < 1e-7);
        }
        // 12 heads: the 8-head series, then odd powers of 2^(-4/8) = 2^(-0.5).
        let s12 = alibi_slopes(12);
        assert_eq!(&s12[..8], &s8[..]);
        let want: Vec<f32> = [1, 3, 5, 7].iter().map(|&p| 2f32.powf(-0.5 * p as f32)).collect();
        for (a, b) in s12[8..].iter().zip(&want) {
            assert!((a - b).abs() < 1e-7);
        }
    }

    #[test]
    fn rope_scalings_follow_their_definitions() {
        let plain = cfg(RopeScaling::None).rope_inv_freq(10_000.0);
        let lin = cfg(RopeScaling::Linear { factor: 4.0 }).rope_inv_freq(10_000.0);
        for (a, b) in plain.iter().zip(&lin) {
            assert!((a / 4.0 - b).abs() < 1e-9);
        }
        // Dynamic NTK: base * factor^(d/(d-2)); the first frequency stays 1, the rest shrink.
        let ntk = cfg(RopeScaling::DynamicNtk { factor: 4.0, original_max_position: 4096 }).rope_inv_freq(10_000.0);
        assert_eq!(ntk[0], 1.0);
        let want_last = 1.0 / (10_000f64 * 4f64.powf(64.0 / 62.0)).powf(62.0 / 64.0);
        assert!((ntk[31] as f64 - want_last).abs() < 1e-9);
        // YaRN: high frequencies kept, low frequencies interpolated by the factor.
        let y = RopeScaling::Yarn { factor: 8.0, original_max_position: 4096, beta_fast: 32.0, beta_slow: 1.0 };
        let yarn = cfg(y.clone()).rope_inv_freq(10_000.0);
        assert_eq!(yarn[0], plain[0]);
        assert!((yarn[31] - plain[31] / 8.0).abs() < 1e-9);
        assert!(yarn[15] < plain[15] && yarn[15] > plain[15] / 8.0, "blended in the middle");
        assert!((y.attention_factor() - (0.1 * 8f32.ln() + 1.0)).abs() < 1e-6);
        // Llama 3: wavelengths above the low-frequency bound are divided by the factor.
        let l3 = cfg(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192 })
            .rope_inv_freq(500_000.0);
        let p3 = cfg(RopeScaling::None).rope_inv_freq(500_000.0);
        assert_eq!(l3[0], p3[0]);
        assert!((l3[31] - p3[31] / 8.0).abs() < 1e-12);
    }
}
