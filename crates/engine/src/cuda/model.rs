//! The Llama-family forward on the device: the same packed step as `LlamaModel::forward`
//! (one matrix of every sequence's tokens, attention alone per sequence through the paged
//! cache), with the weights and the KV cache in device memory.
//!
//! Per step the host uploads the step's small tables (token ids, positions, slots, block
//! tables) and copies back only the logits of the rows that sample: sampling stays on the
//! host, shared with the CPU path (penalties, logprobs, seeds are per request there), and
//! at most `max_num_seqs` rows of logits cross per step.

use std::collections::HashMap;

use cudarc::driver::CudaSlice;

use super::backend::{CudaBackend, DeviceRope, LoraBatch, LoraSite, Norm};
use super::gemm::GemmKind;
use super::linear::DeviceLinear;
use crate::config::Quantize;
use crate::cpu::attention::AttnParams;
use crate::cpu::matmul::Linear;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvLayout;
use crate::lora::{AdapterId, AdapterRows, LoraAdapter, Module};
use crate::model::{Activation, BatchInput, LlamaModel, ModelConfig};

struct DeviceLayer {
    input_norm: CudaSlice<f32>,
    q: DeviceLinear,
    k: DeviceLinear,
    v: DeviceLinear,
    o: DeviceLinear,
    q_norm: Option<CudaSlice<f32>>,
    k_norm: Option<CudaSlice<f32>>,
    attn_output_norm: Option<CudaSlice<f32>>,
    post_norm: CudaSlice<f32>,
    gate: DeviceLinear,
    up: DeviceLinear,
    down: DeviceLinear,
    mlp_output_norm: Option<CudaSlice<f32>>,
}

/// LoRA sites per layer: one per [`Module`].
const MODULES: usize = 7;
/// Adapters kept on the device; beyond this the least recently used one not in the
/// current step is dropped (and uploaded again when it returns).
const MAX_DEVICE_ADAPTERS: usize = 64;

/// An adapter's weights on the device, with its row of the step's slot tables.
struct DeviceAdapter {
    _bufs: Vec<CudaSlice<f32>>,
    /// Per site (`layer * 7 + module`); 0 and rank 0 where the adapter is absent.
    a_ptrs: Vec<u64>,
    bt_ptrs: Vec<u64>,
    ranks: Vec<i32>,
    scales: Vec<f32>,
    max_rank: usize,
    last_used: u64,
}

impl DeviceAdapter {
    fn upload(b: &CudaBackend, a: &LoraAdapter) -> Result<DeviceAdapter> {
        let sites = a.layers.len() * MODULES;
        let mut d = DeviceAdapter {
            _bufs: Vec::new(),
            a_ptrs: vec![0; sites],
            bt_ptrs: vec![0; sites],
            ranks: vec![0; sites],
            scales: vec![0.0; sites],
            max_rank: a.max_rank,
            last_used: 0,
        };
        for (l, mods) in a.layers.iter().enumerate() {
            for (m, w) in mods.iter().enumerate() {
                let Some(w) = w else { continue };
                let (da, dbt) = (b.upload(&f32_rows(&w.a))?, b.upload(&w.bt)?);
                let site = l * MODULES + m;
                d.a_ptrs[site] = b.address(&da);
                d.bt_ptrs[site] = b.address(&dbt);
                d.ranks[site] = w.r as i32;
                d.scales[site] = w.scale;
                d._bufs.extend([da, dbt]);
            }
        }
        Ok(d)
    }
}

pub struct CudaModel {
    pub backend: CudaBackend,
    pub config: ModelConfig,
    embed: CudaSlice<f32>,
    layers: Vec<DeviceLayer>,
    norm: CudaSlice<f32>,
    lm_head: DeviceLinear,
    rope: DeviceRope,
    rope_local: Option<DeviceRope>,
    alibi: Option<CudaSlice<f32>>,
    k_cache: Vec<CudaSlice<f32>>,
    v_cache: Vec<CudaSlice<f32>>,
    windowed: Vec<bool>,
    block_size: usize,
    adapters: HashMap<AdapterId, DeviceAdapter>,
    steps: u64,
}

fn f32_rows(l: &Linear) -> Vec<f32> {
    let mut w = vec![0f32; l.out_features * l.in_features];
    l.weight.dequant_rows(0, l.in_features, &mut w);
    w
}

impl CudaModel {
    /// Uploads `model` (its linear layers as f32, converted to the `--quantize` format on
    /// the device side) and allocates the KV cache of `layout` (layers marked `windowed`
    /// get `window_blocks` blocks).
    pub fn new(
        backend: CudaBackend,
        model: &LlamaModel,
        quantize: Quantize,
        layout: KvLayout,
        (window_blocks, windowed): (usize, &[bool]),
    ) -> Result<CudaModel> {
        let c = model.config.clone();
        if quantize == Quantize::Act8 {
            tracing::warn!("--quantize act8 has no block kernels on CUDA: INT8 weights per channel and per-token activations instead");
        }
        let kind = match quantize {
            Quantize::None => GemmKind::F32,
            // act8's block formats are CPU kernels; INT8 GEMMs are the device's nearest.
            Quantize::Int8 | Quantize::Act8 => GemmKind::Int8,
            Quantize::Fp8 => GemmKind::Fp8,
        };
        let b = &backend;
        let lin = |l: &Linear, bias: Option<&Vec<f32>>, kind: GemmKind| {
            DeviceLinear::new(b, &f32_rows(l), (l.out_features, l.in_features), bias.map(|v| v.as_slice()), kind)
        };
        let opt = |v: &Option<Vec<f32>>| v.as_ref().map(|v| b.upload(v)).transpose();
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let a = &l.self_attn;
            layers.push(DeviceLayer {
                input_norm: b.upload(&l.input_layernorm)?,
                q: lin(&a.q_proj, a.q_bias.as_ref(), kind)?,
                k: lin(&a.k_proj, a.k_bias.as_ref(), kind)?,
                v: lin(&a.v_proj, a.v_bias.as_ref(), kind)?,
                o: lin(&a.o_proj, None, kind)?,
                q_norm: opt(&a.q_norm)?,
                k_norm: opt(&a.k_norm)?,
                attn_output_norm: opt(&l.attn_output_norm)?,
                post_norm: b.upload(&l.post_attention_layernorm)?,
                gate: lin(&l.mlp.gate_proj, None, kind)?,
                up: lin(&l.mlp.up_proj, None, kind)?,
                down: lin(&l.mlp.down_proj, None, kind)?,
                mlp_output_norm: opt(&l.mlp_output_norm)?,
            });
        }
        // As on CPU: the head is INT8 under int8 and keeps full precision under fp8.
        let head_kind = if kind == GemmKind::Fp8 { GemmKind::F32 } else { kind };
        let per_block = layout.block_size * layout.slot_floats();
        let wind: Vec<bool> = (0..c.num_layers).map(|l| windowed.get(l).copied().unwrap_or(false)).collect();
        let size = |l: usize| if wind[l] { window_blocks } else { layout.num_blocks } * per_block;
        let k_cache = (0..c.num_layers).map(|l| b.zeros::<f32>(size(l))).collect::<Result<Vec<_>>>()?;
        let v_cache = (0..c.num_layers).map(|l| b.zeros::<f32>(size(l))).collect::<Result<Vec<_>>>()?;
        let m = CudaModel {
            embed: b.upload(&f32_rows(&model.embed_tokens))?,
            layers,
            norm: b.upload(&model.norm)?,
            lm_head: lin(&model.lm_head, None, head_kind)?,
            rope: b.upload_rope(&model.rope)?,
            rope_local: model.rope_local.as_ref().map(|r| b.upload_rope(r)).transpose()?,
            alibi: opt(&c.variant.alibi_slopes)?,
            k_cache,
            v_cache,
            windowed: wind,
            block_size: layout.block_size,
            adapters: HashMap::new(),
            steps: 0,
            config: c,
            backend,
        };
        m.backend.synchronize()?;
        Ok(m)
    }

    /// The step's adapters as slot tables (uploading adapters seen for the first time).
    fn lora_batch(&mut self, groups: &[AdapterRows<'_>]) -> Result<Option<LoraBatch>> {
        if groups.is_empty() {
            return Ok(None);
        }
        self.steps += 1;
        let b = &self.backend;
        for g in groups {
            if !self.adapters.contains_key(&g.adapter.id) {
                if self.adapters.len() >= MAX_DEVICE_ADAPTERS {
                    let in_step = |id: &AdapterId| groups.iter().any(|g| g.adapter.id == *id);
                    if let Some(old) = self.adapters.iter().filter(|(id, _)| !in_step(id)).min_by_key(|(_, d)| d.last_used).map(|(id, _)| *id) {
                        self.adapters.remove(&old);
                    }
                }
                self.adapters.insert(g.adapter.id, DeviceAdapter::upload(b, g.adapter)?);
            }
        }
        let sites = self.layers.len() * MODULES;
        let (mut a_ptrs, mut bt_ptrs, mut ranks, mut scales) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut seg_start, mut seg_len, mut seg_slot) = (Vec::new(), Vec::new(), Vec::new());
        let mut max_rank = 0;
        for (slot, g) in groups.iter().enumerate() {
            let d = self.adapters.get_mut(&g.adapter.id).expect("uploaded above");
            d.last_used = self.steps;
            if d.a_ptrs.len() != sites {
                return Err(EngineError::Device(format!("adapter {} has {} sites, the model {sites}", g.adapter.name, d.a_ptrs.len())));
            }
            a_ptrs.extend_from_slice(&d.a_ptrs);
            bt_ptrs.extend_from_slice(&d.bt_ptrs);
            ranks.extend_from_slice(&d.ranks);
            scales.extend_from_slice(&d.scales);
            max_rank = max_rank.max(d.max_rank);
            for &(start, len) in &g.segments {
                seg_start.push(start as i32);
                seg_len.push(len as i32);
                seg_slot.push(slot as i32);
            }
        }
        Ok(Some(LoraBatch {
            seg_start: b.upload(&seg_start)?,
            seg_len: b.upload(&seg_len)?,
            seg_slot: b.upload(&seg_slot)?,
            a_ptrs: b.upload(&a_ptrs)?,
            bt_ptrs: b.upload(&bt_ptrs)?,
            ranks: b.upload(&ranks)?,
            scales: b.upload(&scales)?,
            sites,
            num_segments: seg_start.len(),
            max_rank,
        }))
    }

    /// One packed step; returns `[logits_rows.len(), vocab]` logits on the host.
    pub fn forward(&mut self, batch: &BatchInput<'_>) -> Result<Vec<f32>> {
        let lora = self.lora_batch(&batch.lora)?;
        let b = &self.backend;
        let c = &self.config;
        let v = &c.variant;
        let t = batch.token_ids.len();
        let (hd, qd, kvd, inter) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let ids: Vec<i32> = batch.token_ids.iter().map(|&i| i as i32).collect();
        let pos: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        let slots: Vec<i32> = batch.slot_mapping.iter().map(|&s| s as i32).collect();
        let (ids, pos, slots) = (b.upload(&ids)?, b.upload(&pos)?, b.upload(&slots)?);
        let wslots = match batch.window_slot_mapping {
            Some(w) => Some(b.upload(&w.iter().map(|&s| s as i32).collect::<Vec<_>>())?),
            None => None,
        };
        let (seqs, wseqs) = (batch.attn_seqs(false), batch.attn_seqs(true));
        let params = |local: bool| AttnParams {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: self.block_size,
            scale: v.attn_scale,
            sliding_window: if local { v.sliding_window } else { None },
            softcap: v.attn_softcap,
            alibi_slopes: v.alibi_slopes.as_deref(),
        };
        // Block tables of the window pool hold u32::MAX for released blocks; the kernel
        // never reads them (they lie outside every query's window).
        let plan = b.plan_attention(&seqs, &params(false))?;
        let wplan = match batch.window_slot_mapping {
            Some(_) => Some(b.plan_attention(&wseqs, &params(true))?),
            None => None,
        };
        let norm = |dim: usize| Norm { dim, eps: c.rms_norm_eps, offset: v.norm_offset };

        let mut x = b.zeros::<f32>(t * hd)?;
        b.embedding(&self.embed, &ids, &mut x, v.embed_scale)?;
        let mut h = b.zeros::<f32>(t * hd)?;
        // Scratch the model's layers need, allocated once per step.
        let scratch = |need: bool, n: usize| if need { b.zeros::<f32>(n).map(Some) } else { Ok(None) };
        let has = |f: fn(&DeviceLayer) -> bool| self.layers.iter().any(f);
        let mut tmp = scratch(has(|l| l.attn_output_norm.is_some() || l.mlp_output_norm.is_some()), t * hd)?;
        let mut qn = scratch(has(|l| l.q_norm.is_some()), t * qd)?;
        let mut kn = scratch(has(|l| l.k_norm.is_some()), t * kvd)?;
        let mut o = b.zeros::<f32>(t * hd)?;
        let (mut q, mut k, mut vv) = (b.zeros::<f32>(t * qd)?, b.zeros::<f32>(t * kvd)?, b.zeros::<f32>(t * kvd)?);
        let mut attn = b.zeros::<f32>(t * qd)?;
        let (mut gate, mut up) = (b.zeros::<f32>(t * inter)?, b.zeros::<f32>(t * inter)?);
        let mut lt = b.zeros::<f32>(t * lora.as_ref().map_or(1, |l| l.max_rank.max(1)))?;
        // Adds the step's adapters at (layer, module): y += scale (x A^T) B^T per segment.
        let mut ad = |li: usize, m: Module, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>| -> Result<()> {
            let Some(l) = &lora else { return Ok(()) };
            let (out_dim, in_dim) = m.shape(c);
            b.lora(x, y, &mut lt, l, LoraSite { site: li * MODULES + m as usize, in_dim, out_dim })
        };
        b.rms_norm(&x, &self.layers[0].input_norm, &mut h, norm(hd))?;
        for li in 0..self.layers.len() {
            let layer = &self.layers[li];
            let local = v.local_layers.get(li).copied().unwrap_or(false);
            layer.q.forward(b, &h, &mut q)?;
            layer.k.forward(b, &h, &mut k)?;
            layer.v.forward(b, &h, &mut vv)?;
            ad(li, Module::Q, &h, &mut q)?;
            ad(li, Module::K, &h, &mut k)?;
            ad(li, Module::V, &h, &mut vv)?;
            if let (Some(w), Some(qn)) = (&layer.q_norm, qn.as_mut()) {
                b.rms_norm(&q, w, qn, norm(c.head_dim))?;
                std::mem::swap(&mut q, qn);
            }
            if let (Some(w), Some(kn)) = (&layer.k_norm, kn.as_mut()) {
                b.rms_norm(&k, w, kn, norm(c.head_dim))?;
                std::mem::swap(&mut k, kn);
            }
            if self.alibi.is_none() {
                let rope = if local { self.rope_local.as_ref().unwrap_or(&self.rope) } else { &self.rope };
                b.rope(&mut q, &pos, rope, c.head_dim)?;
                b.rope(&mut k, &pos, rope, c.head_dim)?;
            }
            let (layer_slots, layer_plan, p) = match (self.windowed[li], &wslots, &wplan) {
                (true, Some(ws), Some(wp)) => (ws, wp, params(true)),
                _ => (&slots, &plan, params(local)),
            };
            b.reshape_and_cache(&k, &vv, (&mut self.k_cache[li], &mut self.v_cache[li]), layer_slots)?;
            b.paged_attention(&q, (&self.k_cache[li], &self.v_cache[li]), layer_plan, &p, self.alibi.as_ref(), &mut attn)?;
            layer.o.forward(b, &attn, &mut o)?;
            ad(li, Module::O, &attn, &mut o)?;
            if let (Some(w), Some(tmp)) = (&layer.attn_output_norm, tmp.as_mut()) {
                b.rms_norm(&o, w, tmp, norm(hd))?;
                b.add_rms_norm(&mut x, tmp, &layer.post_norm, &mut h, norm(hd))?;
            } else {
                b.add_rms_norm(&mut x, &o, &layer.post_norm, &mut h, norm(hd))?;
            }
            layer.gate.forward(b, &h, &mut gate)?;
            layer.up.forward(b, &h, &mut up)?;
            ad(li, Module::Gate, &h, &mut gate)?;
            ad(li, Module::Up, &h, &mut up)?;
            match v.activation {
                Activation::Silu => b.silu_mul(&mut gate, &up)?,
                Activation::GeluTanh => b.gelu_tanh_mul(&mut gate, &up)?,
            }
            layer.down.forward(b, &gate, &mut o)?;
            ad(li, Module::Down, &gate, &mut o)?;
            let next = self.layers.get(li + 1).map_or(&self.norm, |l| &l.input_norm);
            if let (Some(w), Some(tmp)) = (&layer.mlp_output_norm, tmp.as_mut()) {
                b.rms_norm(&o, w, tmp, norm(hd))?;
                b.add_rms_norm(&mut x, tmp, next, &mut h, norm(hd))?;
            } else {
                b.add_rms_norm(&mut x, &o, next, &mut h, norm(hd))?;
            }
        }
        // h = final_norm(x) for every row; gather the sampled rows and project.
        let n = batch.logits_rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<i32> = batch.logits_rows.iter().map(|&r| r as i32).collect();
        let mut sel = b.zeros::<f32>(n * hd)?;
        b.embedding(&h, &b.upload(&rows)?, &mut sel, 1.0)?;
        let mut logits = b.zeros::<f32>(n * c.vocab_size)?;
        self.lm_head.forward(b, &sel, &mut logits)?;
        if let Some(cap) = v.final_softcap {
            b.softcap(&mut logits, cap)?;
        }
        b.download(&logits)
    }
}
