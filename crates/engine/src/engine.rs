//! The engine thread: takes commands from [`EngineHandle`]s, runs steps, and sends each
//! request's [`TokenEvent`]s to its receiver.
//!
//! ```text
//! loop: commands ─► cancellations ─► scheduler.schedule() ─► model.forward(batch)
//!       ─► sample rows ─► scheduler.update() ─► detokenize, stop checks ─► TokenEvents
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::chat::ChatTemplate;
use crate::config::{EngineConfig, PromptActs, Quantize};
use crate::detok::IncrementalDecoder;
use crate::handle::{Command, EngineHandle, EngineStats, ModelInfo, RequestId, Shared, StepStats};
use crate::kv_cache::{KvCache, KvDtype, KvLayout};
use crate::loader;
use crate::lora::{AdapterRows, LoraAdapter};
use crate::model::{BatchInput, LlamaModel, SeqInput};
use crate::cpu::SyncPtr;
use crate::request::{FinishInfo, FinishReason, SamplingParams, TokenEvent, TokenLogprob};
use crate::sampler::{self, SamplerState};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput};
use crate::stop::StopMatcher;
use crate::threadpool::ThreadPool;
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};

pub struct Engine;

impl Engine {
    /// Loads the model (blocking) and starts the engine thread.
    pub fn start(cfg: EngineConfig) -> Result<EngineHandle> {
        let backend = open_device(&cfg)?;
        let loaded = loader::load(&cfg.model)?;
        Self::from_loaded(cfg, loaded, backend)
    }

    /// Starts the engine thread on a model already in memory (`cfg.model` is not read),
    /// on `backend` when there is one (else the CPU).
    fn from_loaded(cfg: EngineConfig, loaded: loader::Loaded, backend: Backend) -> Result<EngineHandle> {
        let (mut model, tokenizer) = (loaded.model, Arc::new(loaded.tokenizer));
        let mc = &model.config;
        if cfg.block_size == 0 {
            return Err(EngineError::Load("block_size must be at least 1".into()));
        }
        let max_model_len = match cfg.max_model_len {
            Some(n) if n > mc.max_position_embeddings => {
                return Err(EngineError::Load(format!(
                    "max_model_len {n} is larger than the model's context length {}",
                    mc.max_position_embeddings
                )))
            }
            Some(0) => return Err(EngineError::Load("max_model_len must be at least 1".into())),
            Some(n) => n,
            None => mc.max_position_embeddings,
        };
        // The CUDA path keeps its cache in f32.
        let kv_dtype = if backend.is_some() { KvDtype::F32 } else { cfg.kv_cache_dtype };
        if kv_dtype != cfg.kv_cache_dtype {
            tracing::warn!("--kv-cache-dtype {}: the CUDA backend stores its KV cache in f32", cfg.kv_cache_dtype.as_str());
        }
        let plan = plan_kv(&cfg, &model.config, kv_dtype)?;
        let (per_token, num_blocks) = (plan.full_bytes_per_token, plan.full_blocks);
        let layout = KvLayout { num_layers: mc.num_layers, num_blocks, block_size: cfg.block_size, num_kv_heads: mc.num_kv_heads, head_dim: mc.head_dim };
        // The CPU converts the host model to `--quantize`; CUDA converts its device copy and
        // the host keeps the checkpoint's format.
        let cpu = |model: &mut LlamaModel| {
            model.quantize(cfg.quantize);
            Runner::Cpu(KvCache::with_window_pool(layout, kv_dtype, plan.window_blocks, &plan.windowed_layers))
        };
        let runner = match backend {
            None => cpu(&mut model),
            #[cfg(feature = "cuda")]
            Some(b) => {
                match crate::cuda::model::CudaModel::new(b, &model, cfg.quantize, layout, (plan.window_blocks, &plan.windowed_layers)) {
                    Ok(m) => Runner::Cuda(Box::new(m)),
                    // The device opened but cannot hold or run this model (memory, FP8 on
                    // an older card, ...): `auto` still means "else the CPU".
                    Err(e) if cfg.device == crate::config::Device::Auto => {
                        tracing::warn!("--device auto: {e}; running on the CPU");
                        cpu(&mut model)
                    }
                    Err(e) => return Err(e),
                }
            }
            #[cfg(not(feature = "cuda"))]
            Some(never) => match never {},
        };
        let mc = &model.config;
        let chat_template = match tokenizer.chat_template() {
            Some(src) => {
                let tok_text = |id: Option<u32>| id.map(|i| tokenizer.token_str(i)).unwrap_or_default();
                let eos = tok_text(tokenizer.eos_ids().first().copied());
                Some(Arc::new(ChatTemplate::new(src, &tok_text(tokenizer.bos_id()), &eos)?))
            }
            None => None,
        };
        let info = ModelInfo {
            name: mc.name.clone(),
            max_model_len,
            vocab_size: mc.vocab_size,
            kv_cache_tokens: num_blocks * cfg.block_size,
            kv_bytes_per_token: per_token,
            window_kv_bytes_per_token: plan.window_bytes_per_token,
            window_tokens: plan.window.unwrap_or(0),
            block_size: cfg.block_size,
            num_blocks: num_blocks + plan.window_blocks,
            weight_bytes: model.weight_bytes(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            tx,
            info: info.clone(),
            model_config: model.config.clone(),
            tokenizer: tokenizer.clone(),
            chat_template,
            stats: stats.clone(),
            next_id: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            queued: queued.clone(),
            max_queued: cfg.max_queued_requests,
        });
        let sched = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs.max(1),
                max_num_batched_tokens: cfg.max_num_batched_tokens.max(1),
                block_size: cfg.block_size,
                max_loras: cfg.max_loras.max(1),
            },
            num_blocks,
        );
        let sched = match plan.window {
            Some(w) => sched.with_window_pool(plan.window_blocks, w),
            None => sched,
        };
        let mut lp = EngineLoop {
            pool: ThreadPool::new(cfg.threads.max(1)),
            runner,
            model,
            tokenizer,
            sched,
            reqs: HashMap::new(),
            stats,
            queued,
            observer: cfg.observer.clone(),
            max_model_len,
            f32_prompts: cfg.act8_prompts == PromptActs::F32,
        };
        std::thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || lp.run(rx))
            .map_err(|e| EngineError::Load(format!("cannot spawn the engine thread: {e}")))?;
        tracing::info!(
            model = %info.name,
            max_model_len,
            kv_blocks = num_blocks,
            block_size = cfg.block_size,
            kv_cache_tokens = info.kv_cache_tokens,
            kv_bytes_per_token = per_token,
            kv_cache_dtype = kv_dtype.as_str(),
            quantize = cfg.quantize.as_str(),
            act8_prompts = (cfg.quantize == Quantize::Act8).then(|| cfg.act8_prompts.as_str()),
            threads = cfg.threads,
            "engine started"
        );
        Ok(EngineHandle { shared })
    }
}

/// How the KV budget is split between the main pool and the sliding-window pool.
struct KvPlan {
    full_blocks: usize,
    full_bytes_per_token: usize,
    window: Option<usize>,
    window_blocks: usize,
    window_bytes_per_token: usize,
    windowed_layers: Vec<bool>,
}

/// Models with sliding-window layers get a second pool for them, sized for every running
/// request's window plus one step's chunk (at most half the budget); the rest of the
/// budget holds the other layers' K/V for the whole context.
fn plan_kv(cfg: &EngineConfig, mc: &crate::model::ModelConfig, dtype: KvDtype) -> Result<KvPlan> {
    let bs = cfg.block_size;
    let per_layer_token = KvLayout::bytes_per_token(1, mc.num_kv_heads, mc.head_dim, dtype);
    let v = &mc.variant;
    let n_local = v.local_layers.iter().filter(|&&l| l).count();
    let window = v.sliding_window.filter(|_| n_local > 0 && n_local < mc.num_layers);
    let (window_blocks, window_bytes_per_token, windowed_layers) = match window {
        Some(w) => {
            let per_token = per_layer_token * n_local;
            let one_request = (w + cfg.max_num_batched_tokens).div_ceil(bs) + 1;
            let wanted = cfg.max_num_seqs * (w.div_ceil(bs) + 1) + one_request;
            let cap = cfg.kv_cache_bytes / 2 / (per_token * bs);
            if cap < one_request {
                return Err(EngineError::Load(format!(
                    "kv_cache_bytes {} is too small for one request's sliding window ({} tokens of window and chunk need {} bytes)",
                    cfg.kv_cache_bytes,
                    one_request * bs,
                    2 * one_request * bs * per_token
                )));
            }
            (wanted.min(cap), per_token, v.local_layers.clone())
        }
        None => (0, 0, Vec::new()),
    };
    let full_bytes_per_token = per_layer_token * (mc.num_layers - if window.is_some() { n_local } else { 0 });
    let full_budget = cfg.kv_cache_bytes - window_blocks * bs * window_bytes_per_token;
    let full_blocks = full_budget / (full_bytes_per_token * bs);
    if full_blocks == 0 {
        return Err(EngineError::Load(format!(
            "kv_cache_bytes {} holds no block of {bs} tokens ({full_bytes_per_token} bytes per token)",
            cfg.kv_cache_bytes
        )));
    }
    Ok(KvPlan { full_blocks, full_bytes_per_token, window, window_blocks, window_bytes_per_token, windowed_layers })
}

/// Output-side state of one request.
struct ReqOut {
    tx: mpsc::UnboundedSender<TokenEvent>,
    params: SamplingParams,
    sampler: SamplerState,
    detok: IncrementalDecoder,
    stop: StopMatcher,
    arrived: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    /// Held to the end, whatever the registry does meanwhile.
    adapter: Option<Arc<LoraAdapter>>,
}

/// The device a step runs on, already open (`None`: the CPU).
#[cfg(feature = "cuda")]
type Backend = Option<crate::cuda::CudaBackend>;
#[cfg(not(feature = "cuda"))]
type Backend = Option<std::convert::Infallible>;

/// Opens the device `cfg.device` asks for. `Auto` falls back to the CPU and logs why.
fn open_device(cfg: &EngineConfig) -> Result<Backend> {
    use crate::config::Device;
    let cuda = || -> Result<Backend> {
        #[cfg(feature = "cuda")]
        {
            let cache = crate::cuda::kernels::KernelCache::new(cfg.kernel_cache_dir.as_deref());
            crate::cuda::CudaBackend::open(0, &cache).map(Some)
        }
        #[cfg(not(feature = "cuda"))]
        Err(EngineError::Device("this build has no CUDA backend (build tessera with `--features cuda`)".into()))
    };
    match cfg.device {
        Device::Cpu => Ok(None),
        Device::Cuda => cuda(),
        Device::Auto if !cfg!(feature = "cuda") => Ok(None),
        Device::Auto => match cuda() {
            Ok(b) => Ok(b),
            Err(e) => {
                tracing::warn!("--device auto: {e}; running on the CPU");
                Ok(None)
            }
        },
    }
}

/// Where the forward runs, with the KV cache storage it owns.
enum Runner {
    Cpu(KvCache),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::model::CudaModel>),
}

struct EngineLoop {
    pool: ThreadPool,
    runner: Runner,
    model: LlamaModel,
    tokenizer: Arc<Tokenizer>,
    sched: Scheduler,
    reqs: HashMap<RequestId, ReqOut>,
    stats: Arc<EngineStats>,
    queued: Arc<AtomicUsize>,
    observer: Option<Arc<dyn crate::handle::StepObserver>>,
    max_model_len: usize,
    /// `--act8-prompts f32`: prompt positions are marked for f32 activations.
    f32_prompts: bool,
}

impl EngineLoop {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<Command>) {
        // A panic here is a bug, and it may have left the scheduler and the KV cache
        // half-updated: end every request with an error and stop, rather than go on from a
        // state no one can vouch for (the process stays up to report it and should be
        // restarted).
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve(&rx))) {
            self.fail(panic_message(p.as_ref()), &rx);
        }
    }

    /// Takes commands and runs steps until shutdown.
    fn serve(&mut self, rx: &std::sync::mpsc::Receiver<Command>) {
        loop {
            // Block while idle; otherwise take whatever has arrived.
            if self.sched.is_idle() {
                match rx.recv() {
                    Ok(cmd) => {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                if !self.command(cmd) {
                    return;
                }
            }
            self.drop_cancelled();
            if !self.sched.is_idle() {
                self.step();
            }
            self.publish_gauges();
        }
    }

    /// After a panic on the engine thread: zeroes the gauges, records why, and ends every
    /// request with finish reason `error`, then every request still sent to it, until
    /// shutdown or the last handle is gone. Reads the scheduler only for token counts.
    fn fail(&mut self, why: String, rx: &std::sync::mpsc::Receiver<Command>) {
        tracing::error!(panic = %why, "the engine thread panicked; ending every request and stopping the engine");
        // Before any request ends: a client that sees its error sees these too.
        for g in [&self.stats.num_running, &self.stats.num_waiting, &self.stats.used_blocks] {
            g.store(0, Ordering::Relaxed);
        }
        *self.stats.lora.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
        let _ = self.stats.failure.set(why);
        let now = Instant::now();
        let end = |tx: &mpsc::UnboundedSender<TokenEvent>, info: FinishInfo| {
            let _ = tx.send(TokenEvent { finish: Some(info), ..TokenEvent::default() });
        };
        let info = |arrived, prompt_tokens, completion_tokens| FinishInfo {
            reason: FinishReason::Error,
            stopped_by: None,
            prompt_tokens,
            completion_tokens,
            arrived,
            first_scheduled: None,
            first_token: None,
            finished: now,
            preemptions: 0,
        };
        for (id, r) in self.reqs.drain() {
            if r.first_scheduled.is_none() {
                self.queued.fetch_sub(1, Ordering::AcqRel);
            }
            let (p, c) = self.sched.get(id).map_or((0, 0), |s| (s.prompt_len, s.num_output()));
            end(&r.tx, FinishInfo { first_scheduled: r.first_scheduled, first_token: r.first_token, ..info(r.arrived, p, c) });
        }
        // Until the handles are gone (or a shutdown): `submit` refuses once `failure` is
        // set, but a request it let through just before must still get its final event.
        while let Ok(cmd) = rx.recv() {
            match cmd {
                Command::Add { req, tx, arrived, .. } => {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    end(&tx, info(arrived, req.prompt_ids.len(), 0));
                }
                Command::AbortAll => {}
                Command::Shutdown => return,
            }
        }
    }

    /// Returns false on shutdown.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add { id, req, tx, arrived } => {
                let req = *req;
                let sampler = SamplerState::new(&req.params, &req.prompt_ids);
                let out = ReqOut {
                    tx,
                    detok: IncrementalDecoder::new(req.params.skip_special_tokens),
                    stop: StopMatcher::new(req.params.stop.clone()),
                    params: req.params,
                    sampler,
                    arrived,
                    first_scheduled: None,
                    first_token: None,
                    adapter: req.adapter.clone(),
                };
                self.reqs.insert(id, out);
                self.sched.add(id, req.prompt_ids, req.adapter.as_ref().map(|a| a.id));
                true
            }
            Command::AbortAll => {
                for id in self.sched.ids() {
                    self.abort(id);
                }
                true
            }
            Command::Shutdown => {
                for id in self.sched.ids() {
                    self.abort(id);
                }
                self.publish_gauges();
                false
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<RequestId> = self.reqs.iter().filter(|(_, r)| r.tx.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            tracing::debug!(request = %id, "receiver dropped; cancelling");
            self.abort(id);
        }
    }

    fn step(&mut self) {
        let t0 = Instant::now();
        let out = self.sched.schedule();
        if out.seqs.is_empty() {
            return;
        }
        for id in &out.first_scheduled {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if let Some(r) = self.reqs.get_mut(id) {
                r.first_scheduled = Some(t0);
            }
        }
        if !out.preempted.is_empty() {
            self.stats.num_preemptions_total.fetch_add(out.preempted.len() as u64, Ordering::Relaxed);
        }
        let mut logits = match self.forward(&out) {
            Ok(l) => l,
            Err(e) => {
                // A device failure ends the step's requests; the others and the engine go on.
                tracing::error!(error = %e, "forward failed; ending the step's requests");
                for s in &out.seqs {
                    let ev = TokenEvent::default();
                    self.finish_with(s.id, FinishReason::Error, None, ev);
                }
                return;
            }
        };
        let vocab = self.model.config.vocab_size;
        // The sampled rows with their requests' states, sampled across the pool (top-p on a
        // long tail takes ~0.5 ms a row, and a step may sample dozens of rows); each row is
        // sampled once, so penalties and bias change it in place. Every request's RNG
        // serves its own row only: the same seed gives the same tokens.
        let row_of: HashMap<RequestId, usize> = out.seqs.iter().filter(|s| s.sample).enumerate().map(|(row, s)| (s.id, row)).collect();
        let mut jobs: Vec<(usize, RequestId, &mut ReqOut)> =
            self.reqs.iter_mut().filter_map(|(id, r)| row_of.get(id).map(|&row| (row, *id, r))).collect();
        jobs.sort_unstable_by_key(|j| j.0);
        let mut results: Vec<Option<(u32, Option<TokenLogprob>)>> = (0..jobs.len()).map(|_| None).collect();
        // The rows the tasks slice without a bounds check.
        assert!(jobs.iter().all(|j| (j.0 + 1) * vocab <= logits.len()), "forward returned too few logits rows");
        let (jp, lp, rp) = (SyncPtr(jobs.as_mut_ptr()), SyncPtr(logits.as_mut_ptr()), SyncPtr(results.as_mut_ptr()));
        self.pool.run(jobs.len(), &|i| {
            let _ = (&jp, &lp, &rp);
            // SAFETY: task i touches only job i (a request of its own), the logits row of
            // that job (rows differ) and result i; all outlive the call.
            unsafe {
                let (row, _, r) = &mut *jp.0.add(i);
                let l = std::slice::from_raw_parts_mut(lp.0.add(*row * vocab), vocab);
                *rp.0.add(i) = Some(sampler::sample(l, &r.params, &mut r.sampler));
            }
        });
        let mut sampled = HashMap::new();
        let mut events = Vec::new();
        for ((_, id, r), res) in jobs.into_iter().zip(results) {
            let (tok, lp) = res.expect("the pool ran every sampling task");
            r.sampler.record(tok);
            sampled.insert(id, tok);
            events.push((id, tok, lp));
        }
        self.sched.update(&out, &sampled);
        let now = Instant::now();
        for (id, tok, lp) in events {
            self.emit(id, tok, lp, now);
        }
        self.stats.steps_total.fetch_add(1, Ordering::Relaxed);
        if let Some(obs) = &self.observer {
            let is_decode = |s: &&crate::scheduler::ScheduledSeq| s.len == 1 && s.start >= self.prompt_len(s.id);
            let decode_rows = out.seqs.iter().filter(is_decode).count();
            obs.on_step(&StepStats {
                num_tokens: out.num_tokens,
                num_prefill_tokens: out.num_tokens - decode_rows,
                num_decode_rows: decode_rows,
                num_running: self.sched.num_running(),
                num_waiting: self.sched.num_waiting(),
                kv_cache_usage: self.sched.used_blocks() as f64 / self.sched.total_blocks().max(1) as f64,
                num_preempted: out.preempted.len(),
                duration: t0.elapsed(),
            });
        }
    }

    fn prompt_len(&self, id: RequestId) -> usize {
        self.sched.get(id).map_or(0, |s| s.prompt_len)
    }

    /// Builds the packed batch of the step and runs the model.
    fn forward(&mut self, out: &SchedulerOutput) -> Result<Vec<f32>> {
        let bs = self.sched.config.block_size;
        let mut token_ids = Vec::with_capacity(out.num_tokens);
        let mut positions = Vec::with_capacity(out.num_tokens);
        let mut slots = Vec::with_capacity(out.num_tokens);
        let mut logits_rows = Vec::new();
        let mut f32_rows = Vec::with_capacity(out.num_tokens);
        let mut tables: Vec<Vec<u32>> = Vec::with_capacity(out.seqs.len());
        let windowed = self.sched.window.is_some();
        let mut window_tables: Vec<Vec<u32>> = Vec::new();
        let mut window_slots = Vec::new();
        for s in &out.seqs {
            let st = self.sched.get(s.id).expect("scheduled request exists");
            let table: Vec<u32> = st.blocks.iter().map(|b| b.0).collect();
            let wtable: Vec<u32> = st.window_blocks.iter().map(|b| b.map_or(u32::MAX, |b| b.0)).collect();
            for p in s.start..s.start + s.len {
                token_ids.push(st.tokens[p]);
                positions.push(p);
                f32_rows.push(self.f32_prompts && p < st.prompt_len);
                slots.push(table[p / bs] as usize * bs + p % bs);
                if windowed {
                    window_slots.push(wtable[p / bs] as usize * bs + p % bs);
                }
            }
            if s.sample {
                logits_rows.push(token_ids.len() - 1);
            }
            tables.push(table);
            window_tables.push(wtable);
        }
        let mut groups: Vec<AdapterRows<'_>> = Vec::new();
        let mut row = 0;
        for s in &out.seqs {
            if let Some(a) = self.reqs.get(&s.id).and_then(|r| r.adapter.as_deref()) {
                match groups.iter_mut().find(|g| g.adapter.id == a.id) {
                    Some(g) => g.segments.push((row, s.len)),
                    None => groups.push(AdapterRows { adapter: a, segments: vec![(row, s.len)] }),
                }
            }
            row += s.len;
        }
        let mut q0 = 0;
        let seqs = out
            .seqs
            .iter()
            .zip(tables.iter().zip(&window_tables))
            .map(|(s, (t, wt))| {
                let si = SeqInput {
                    query_start: q0,
                    query_len: s.len,
                    context_len: s.start + s.len,
                    block_table: t,
                    window_block_table: windowed.then_some(wt.as_slice()),
                };
                q0 += s.len;
                si
            })
            .collect();
        let batch = BatchInput {
            token_ids: &token_ids,
            positions: &positions,
            seqs,
            slot_mapping: &slots,
            window_slot_mapping: windowed.then_some(window_slots.as_slice()),
            logits_rows: &logits_rows,
            lora: groups,
            f32_rows: &f32_rows,
        };
        match &mut self.runner {
            Runner::Cpu(cache) => Ok(self.model.forward(&self.pool, &batch, cache)),
            #[cfg(feature = "cuda")]
            Runner::Cuda(m) => m.forward(&batch),
        }
    }

    /// Handles a sampled token: text, stop checks, the event, and finishing.
    fn emit(&mut self, id: RequestId, tok: u32, lp: Option<crate::request::TokenLogprob>, now: Instant) {
        let Some(st) = self.sched.get(id) else { return };
        let (n_out, n_tokens) = (st.num_output(), st.tokens.len());
        let Some(r) = self.reqs.get_mut(&id) else { return };
        r.first_token.get_or_insert(now);
        let is_eos = !r.params.ignore_eos && self.tokenizer.eos_ids().contains(&tok);
        let is_stop_tok = r.params.stop_token_ids.contains(&tok);
        let mut text = String::new();
        let mut finish: Option<(FinishReason, Option<String>)> = None;
        if is_eos || is_stop_tok {
            finish = Some((FinishReason::Stop, is_stop_tok.then(|| self.tokenizer.token_str(tok))));
        } else {
            let piece = r.detok.push(&self.tokenizer, tok);
            let pushed = r.stop.push(&piece);
            text = pushed.emit;
            if let Some(s) = pushed.stopped {
                finish = Some((FinishReason::Stop, Some(s)));
            }
        }
        if finish.is_none() && (n_out >= r.params.max_tokens || n_tokens >= self.max_model_len) {
            finish = Some((FinishReason::Length, None));
        }
        let ev = TokenEvent { text, token_ids: vec![tok], logprobs: lp.into_iter().collect(), finish: None };
        match finish {
            None => {
                if r.tx.send(ev).is_err() {
                    self.abort(id);
                }
            }
            Some((reason, by)) => {
                let stopped_by_string = reason == FinishReason::Stop && by.is_some() && !is_stop_tok;
                let mut ev = ev;
                if !stopped_by_string {
                    let rest = r.detok.flush();
                    let tail = r.stop.push(&rest);
                    ev.text.push_str(&tail.emit);
                    if tail.stopped.is_none() {
                        ev.text.push_str(&r.stop.flush());
                    }
                }
                self.finish_with(id, reason, by, ev);
            }
        }
    }

    /// Ends a request (cancelled, or at shutdown) with an event that carries only the finish.
    fn abort(&mut self, id: RequestId) {
        let ev = TokenEvent::default();
        self.finish_with(id, FinishReason::Abort, None, ev);
    }

    fn finish_with(&mut self, id: RequestId, reason: FinishReason, stopped_by: Option<String>, mut ev: TokenEvent) {
        let st = self.sched.finish(id);
        let Some(r) = self.reqs.remove(&id) else { return };
        if r.first_scheduled.is_none() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        let (prompt_tokens, completion_tokens, preemptions) = st.map_or((0, 0, 0), |s| (s.prompt_len, s.num_output(), s.preemptions));
        ev.finish = Some(FinishInfo {
            reason,
            stopped_by,
            prompt_tokens,
            completion_tokens,
            arrived: r.arrived,
            first_scheduled: r.first_scheduled,
            first_token: r.first_token,
            finished: Instant::now(),
            preemptions,
        });
        let _ = r.tx.send(ev);
    }

    fn publish_gauges(&self) {
        let names = |ids: Vec<RequestId>| {
            let mut v: Vec<String> = ids.iter().filter_map(|id| self.reqs.get(id)?.adapter.as_ref().map(|a| a.name.clone())).collect();
            v.sort();
            v.dedup();
            v
        };
        let activity = crate::handle::LoraActivity { running: names(self.sched.running_ids()), waiting: names(self.sched.waiting_ids()) };
        if let Ok(mut l) = self.stats.lora.lock() {
            if *l != activity {
                *l = activity;
            }
        }
        self.stats.num_running.store(self.sched.num_running(), Ordering::Relaxed);
        self.stats.num_waiting.store(self.sched.num_waiting(), Ordering::Relaxed);
        self.stats.used_blocks.store(self.sched.used_blocks(), Ordering::Relaxed);
    }
}

/// The text a panic carried (`panic!` with a literal or with format arguments).
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
