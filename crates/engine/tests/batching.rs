//! Continuous batching does not change results: concurrency, arrival times, block sizes,
//! chunking and preemption all give the tokens a request gets alone; cancellation frees
//! every block.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use engine::{EngineConfig, GenerateRequest, SamplingParams};

/// 16 prompts of different lengths, from the fixtures and slices of them.
fn prompts() -> Vec<Vec<u32>> {
    let g = golden("base.json");
    let base: Vec<Vec<u32>> = g["prompts"].as_array().unwrap().iter().map(|p| ids(&p["prompt_ids"])).collect();
    let mut out = base.clone();
    for (i, p) in base.iter().enumerate() {
        let cut = (p.len() / 2 + i).clamp(1, p.len());
        out.push(p[..cut].to_vec());
    }
    out
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "condition not reached in 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn concurrent_greedy_requests_equal_their_solo_runs() {
    concurrent_equals_solo(default_cfg());
}

/// Under act8 (INT8 activations, every row through the panel kernels, whose row tiles
/// take the rows of a batch eight, four, two or one at a time) and with
/// `--act8-prompts f32`, where a step mixes rows of two arithmetics (prompt tokens with
/// f32 activations, generated ones with INT8): solo runs have steps of one kind,
/// concurrent runs mix them.
#[test]
fn concurrent_greedy_requests_equal_their_solo_runs_under_act8() {
    concurrent_equals_solo(EngineConfig { quantize: engine::Quantize::Act8, ..default_cfg() });
    concurrent_equals_solo(EngineConfig { quantize: engine::Quantize::Act8, act8_prompts: engine::PromptActs::F32, ..default_cfg() });
}

fn concurrent_equals_solo(cfg: EngineConfig) {
    let h = start(EngineConfig { max_num_batched_tokens: 64, ..cfg });
    let ps = prompts();
    let params = || SamplingParams { ignore_eos: true, ..SamplingParams::greedy(12) };
    let solo: Vec<Vec<u32>> = ps.iter().map(|p| run(&h, p.clone(), params()).ids).collect();
    // Arrive in four waves while earlier ones are mid-prefill or decoding.
    let mut rxs = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        rxs.push(h.submit(GenerateRequest { prompt_ids: p.clone(), params: params(), adapter: None }).unwrap());
        if i % 4 == 3 {
            std::thread::sleep(Duration::from_millis(40));
        }
    }
    let together: Vec<Vec<u32>> = rxs.into_iter().map(|rx| collect(rx).ids).collect();
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i} changed when batched");
    }
}

#[test]
fn seeded_sampling_is_independent_of_other_traffic() {
    let h = start(default_cfg());
    let p = prompts()[0].clone();
    let params = SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(1234), ignore_eos: true, ..SamplingParams::greedy(16) };
    let alone = run(&h, p.clone(), params.clone()).ids;
    let noise: Vec<_> = prompts()
        .into_iter()
        .skip(3)
        .take(6)
        .map(|q| h.submit(GenerateRequest { prompt_ids: q, params: SamplingParams { temperature: 1.0, ignore_eos: true, ..SamplingParams::greedy(20) }, adapter: None }).unwrap())
        .collect();
    let busy = run(&h, p, params).ids;
    noise.into_iter().for_each(|rx| drop(collect(rx)));
    assert_eq!(alone, busy);
}

#[test]
fn block_sizes_1_16_64_and_forced_preemption_give_the_same_tokens() {
    let ps: Vec<Vec<u32>> = prompts().into_iter().take(6).collect();
    let params = || SamplingParams { ignore_eos: true, ..SamplingParams::greedy(10) };
    let gen = |cfg: EngineConfig| -> (Vec<Vec<u32>>, u64) {
        let h = start(cfg);
        let rxs: Vec<_> = ps.iter().map(|p| h.submit(GenerateRequest { prompt_ids: p.clone(), params: params(), adapter: None }).unwrap()).collect();
        let out = rxs.into_iter().map(|rx| collect(rx).ids).collect();
        (out, h.stats().num_preemptions_total.load(Ordering::Relaxed))
    };
    let (reference, _) = gen(EngineConfig { block_size: 16, ..default_cfg() });
    for bs in [1, 64] {
        assert_eq!(gen(EngineConfig { block_size: bs, ..default_cfg() }).0, reference, "block size {bs}");
    }
    // Room for about 400 tokens: the six requests (up to ~340 tokens each) cannot all run.
    let per_token = 2 * 30 * 3 * 64 * 4;
    let (tight, preemptions) = gen(EngineConfig { block_size: 16, kv_cache_bytes: per_token * 400, ..default_cfg() });
    assert!(preemptions > 0, "the small cache was expected to force preemption");
    assert_eq!(tight, reference, "preemption changed the tokens");
    // act8 with f32 prompts: a preempted request recomputes its generated tokens as a
    // prefill; they stay on the INT8 path (only prompt positions take f32 activations).
    let act8 = EngineConfig { quantize: engine::Quantize::Act8, act8_prompts: engine::PromptActs::F32, block_size: 16, ..default_cfg() };
    let (reference, _) = gen(act8.clone());
    let (tight, preemptions) = gen(EngineConfig { kv_cache_bytes: per_token * 400, ..act8 });
    assert!(preemptions > 0, "the small cache was expected to force preemption");
    assert_eq!(tight, reference, "preemption changed the act8 tokens");
}

#[test]
fn dropping_the_receiver_cancels_and_frees_every_block() {
    let h = start(default_cfg());
    let p = prompts()[4].clone();
    let mut rxs: Vec<_> = (0..4)
        .map(|_| h.submit(GenerateRequest { prompt_ids: p.clone(), params: SamplingParams { ignore_eos: true, ..SamplingParams::greedy(500) }, adapter: None }).unwrap())
        .collect();
    // Let them start decoding, then hang up.
    let _ = rxs[0].blocking_recv().unwrap();
    assert!(h.stats().used_blocks.load(Ordering::Relaxed) > 0);
    drop(rxs);
    wait_until(|| h.stats().used_blocks.load(Ordering::Relaxed) == 0 && h.stats().num_running.load(Ordering::Relaxed) == 0);
}

#[test]
fn impossible_requests_are_refused_at_submit_with_the_numbers() {
    let h = start(EngineConfig { max_model_len: Some(100), ..default_cfg() });
    let err = h.submit(GenerateRequest { prompt_ids: vec![1; 90], params: SamplingParams::greedy(20), adapter: None }).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("100") && msg.contains("110") && msg.contains("90"), "{msg}");
    let err = h.submit(GenerateRequest { prompt_ids: vec![], params: SamplingParams::greedy(2), adapter: None }).err().expect("refused");
    assert!(matches!(err, engine::EngineError::InvalidParam { .. }));
}

/// Once armed, panics on the engine thread's second step, after that step's work (the
/// observer runs inside the step, as a panic in any kernel or in the scheduler would).
#[derive(Default)]
struct PanicOnStep {
    armed: std::sync::atomic::AtomicBool,
    steps: std::sync::atomic::AtomicUsize,
}

impl engine::StepObserver for PanicOnStep {
    fn on_step(&self, _: &engine::StepStats) {
        if self.armed.load(Ordering::Acquire) && self.steps.fetch_add(1, Ordering::AcqRel) + 1 == 2 {
            panic!("injected failure in a step");
        }
    }
}

/// A panic in a step ends every request (running, waiting, still in the command queue)
/// with finish reason `error` instead of leaving its client waiting forever, records why,
/// refuses new requests with that reason, and zeroes the gauges.
#[test]
fn a_panicking_step_ends_every_request_with_an_error_and_stops_the_engine() {
    let obs = std::sync::Arc::new(PanicOnStep::default());
    let h = start(EngineConfig { max_num_seqs: 2, observer: Some(obs.clone() as std::sync::Arc<dyn engine::StepObserver>), ..default_cfg() });
    let p = prompts()[4].clone();
    let params = || SamplingParams { ignore_eos: true, ..SamplingParams::greedy(200) };
    let rxs: Vec<_> = (0..3).map(|_| h.submit(GenerateRequest { prompt_ids: p.clone(), params: params(), adapter: None }).unwrap()).collect();
    // Armed once all three are in: 200 tokens take far longer than the steps until then.
    obs.armed.store(true, Ordering::Release);
    for (i, rx) in rxs.into_iter().enumerate() {
        let d = collect(rx);
        let fin = d.events.last().and_then(|e| e.finish.clone()).unwrap_or_else(|| panic!("request {i} ended without a final event"));
        assert_eq!(fin.reason, engine::FinishReason::Error, "request {i}");
        assert!(d.ids.len() < 200, "request {i} ran to the end");
    }
    assert_eq!(h.failure(), Some("injected failure in a step"));
    let err = h.submit(GenerateRequest { prompt_ids: p.clone(), params: params(), adapter: None }).err().expect("refused");
    assert!(matches!(err, engine::EngineError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("injected failure in a step"), "{err}");
    for g in [&h.stats().num_running, &h.stats().num_waiting, &h.stats().used_blocks] {
        assert_eq!(g.load(Ordering::Relaxed), 0);
    }
}
