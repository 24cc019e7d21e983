//! `--quantize int8|fp8|act8` on the default model: perplexity against the float32 reference
//! of the fixtures, and greedy agreement with the reference generations.

mod common;

use common::*;
use engine::model::LlamaModel;
use engine::threadpool::ThreadPool;
use engine::{EngineConfig, KvDtype, Quantize, SamplingParams};

/// The fixture's recipe: the first 4,096 tokens of the GPL-3 text in 8 independent
/// windows of 512, tokens 1..511 of each predicted (4,088 predictions), log_softmax in f32,
/// sums in f64, PPL = exp(mean NLL).
fn perplexity(model: &LlamaModel, pool: &ThreadPool, kv: KvDtype) -> f64 {
    let ids = ids(&golden("perplexity_input_ids.json"));
    assert_eq!(ids.len(), 4096);
    let vocab = model.config.vocab_size;
    let rows: Vec<usize> = (0..511).collect();
    let (mut nll, mut n) = (0f64, 0usize);
    for w in ids.chunks_exact(512) {
        let logits = model.forward_sequence_kv(pool, w, &rows, Vec::new(), kv);
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
            let lse = max as f64 + sum.ln();
            nll += lse - row[w[i + 1] as usize] as f64;
            n += 1;
        }
    }
    assert_eq!(n, 4088);
    (nll / n as f64).exp()
}

fn loaded(q: Quantize) -> LlamaModel {
    let mut m = engine::loader::load(&model_path()).unwrap().model;
    m.quantize(q);
    m
}

/// INT8 within 1% and FP8 within 3% of the float32 reference (24.924; measured +0.42%,
/// +0.96%); act8 (the Q4_1 blocks as they are, INT8 activations) within 0.4% (measured
/// +0.09%); the unquantized path within 0.05%, which checks this harness against the
/// fixture's recipe. An f16 KV cache: within 0.1% unquantized (measured -0.004%), 0.4%
/// with act8 (measured +0.17%). act8's figure moves by about 0.1% with float-rounding
/// changes upstream of its activation quantization (the attention kernel's exponential,
/// libm's or its own, moved it from +0.09/+0.17% to +0.10/+0.10%; the previous kernel
/// gave +0.02/-0.02%), so its bound leaves room for that.
#[test]
fn perplexity_of_each_quantization_is_near_the_float32_reference() {
    let g = golden("perplexity.json");
    let fp32 = g["results"].as_array().unwrap().iter().find(|r| r["model"] == "fp32").expect("an fp32 result");
    let reference = fp32["ppl"].as_f64().unwrap();
    let pool = ThreadPool::new(2);
    let cases = [
        (Quantize::None, KvDtype::F32, 0.0005),
        (Quantize::None, KvDtype::F16, 0.001),
        (Quantize::Int8, KvDtype::F32, 0.01),
        (Quantize::Fp8, KvDtype::F32, 0.03),
        (Quantize::Act8, KvDtype::F32, 0.004),
        (Quantize::Act8, KvDtype::F16, 0.004),
    ];
    for (q, kv, tol) in cases {
        let model = loaded(q);
        let ppl = perplexity(&model, &pool, kv);
        let rel = (ppl - reference) / reference;
        let what = format!("{} with an {} KV cache", q.as_str(), kv.as_str());
        eprintln!("{what}: ppl {ppl:.3} (float32 reference {reference:.3}, {:+.3}%)", rel * 100.0);
        assert!(rel.abs() <= tol, "{what}: perplexity {ppl:.3} is {:+.2}% from {reference:.3} (allowed ±{}%)", rel * 100.0, tol * 100.0);
    }
}

/// Greedy decoding with INT8 weights and activations follows the float32 reference on
/// every base fixture prompt until the reference itself is nearly undecided: tokens must
/// be equal up to the first step whose reference top-1/top-2 logprob margin is below
/// `CLOSE` (a 0.5%-perplexity model may flip such a step; measured: see the printout), and
/// over all prompts at least 60% of the reference tokens come before the first difference
/// (measured: 160 of 232, 69%, since `int8` runs on the act8 panels; 150 before them, 165
/// before the attention kernel's summation order changed by float rounding: which close
/// call flips first moves this count, so the step-by-step
/// check is `teacher_forced_top1_equals_the_reference_at_every_firm_step`).
#[test]
fn int8_greedy_tokens_agree_with_the_reference() {
    greedy_tokens_agree(Quantize::Int8, KvDtype::F32, 60);
}

/// The same for act8, whose perplexity is within 0.1% of float32 (every token with INT8
/// activations, the default `--act8-prompts int8`): at least 80% of the reference tokens
/// before the first difference (measured: 198 of 232, 85%; 200 with f32 prompt tokens
/// and the earlier per-lane act8 kernels).
#[test]
fn act8_greedy_tokens_agree_with_the_reference() {
    greedy_tokens_agree(Quantize::Act8, KvDtype::F32, 80);
}

/// An f16 KV cache, on the exact weights path (measured: 232 of 232, asserted 95%) and
/// under act8, the fast combination (measured: 214 of 232, 92%, asserted 70%): the same
/// rule, every prompt follows the reference up to its first close call.
#[test]
fn f16_kv_cache_greedy_tokens_agree_with_the_reference() {
    greedy_tokens_agree(Quantize::None, KvDtype::F16, 95);
    greedy_tokens_agree(Quantize::Act8, KvDtype::F16, 70);
}

/// Teacher-forced: the reference's prompt and generated tokens in one forward pass, the
/// next-token choice checked at every generated position. Unlike free-running greedy
/// decoding this does not end at the first flip, so every step counts. At every step where
/// the reference's top-1/top-2 logprob margin is at least `CLOSE` the quantized model's
/// top-1 must be the reference token: int8 and act8 at all of them (measured: 208 of 208
/// both), fp8 (within 3% perplexity) at 95% (measured 201 of 208); the close steps are
/// reported (int8 16 of 24, act8 21, fp8 16).
#[test]
fn teacher_forced_top1_equals_the_reference_at_every_firm_step() {
    const CLOSE: f64 = 0.25;
    let g = golden("base.json");
    let pool = ThreadPool::new(2);
    for (q, min_percent) in [(Quantize::Int8, 100), (Quantize::Fp8, 95), (Quantize::Act8, 100)] {
        let model = loaded(q);
        let vocab = model.config.vocab_size;
        let (mut firm, mut firm_same, mut close, mut close_same) = (0usize, 0usize, 0usize, 0usize);
        for p in g["prompts"].as_array().unwrap() {
            let (prompt, want) = (ids(&p["prompt_ids"]), ids(&p["generated_ids"]));
            let mut tokens = prompt.clone();
            tokens.extend_from_slice(&want[..want.len() - 1]);
            let rows: Vec<usize> = (prompt.len() - 1..tokens.len()).collect();
            let logits = model.forward_sequence_kv(&pool, &tokens, &rows, Vec::new(), KvDtype::F32);
            for (i, (row, step)) in logits.chunks_exact(vocab).zip(p["steps"].as_array().unwrap()).enumerate() {
                let top = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
                let lp = step["top5_logprobs"].as_array().unwrap();
                let margin = lp[0].as_f64().unwrap() - lp[1].as_f64().unwrap();
                if margin >= CLOSE {
                    firm += 1;
                    firm_same += (top == want[i]) as usize;
                    if top != want[i] {
                        eprintln!("{} {}: step {i} (reference margin {margin:.3}) picks {top}, not {}", q.as_str(), p["name"], want[i]);
                    }
                } else {
                    close += 1;
                    close_same += (top == want[i]) as usize;
                }
            }
        }
        eprintln!("{}: top-1 equal at {firm_same} of {firm} firm steps, {close_same} of {close} close ones", q.as_str());
        assert!(firm >= 150, "the fixtures have firm steps to check");
        assert!(firm_same * 100 >= firm * min_percent, "{}: top-1 equal at only {firm_same} of {firm} firm steps", q.as_str());
    }
}

fn greedy_tokens_agree(q: Quantize, kv: KvDtype, min_percent: usize) {
    const CLOSE: f64 = 0.25;
    let g = golden("base.json");
    let h = start(EngineConfig { quantize: q, kv_cache_dtype: kv, ..default_cfg() });
    let (mut agreed, mut total) = (0usize, 0usize);
    for p in g["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let want = ids(&p["generated_ids"]);
        let margins: Vec<f64> = p["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let lp = s["top5_logprobs"].as_array().unwrap();
                lp[0].as_f64().unwrap() - lp[1].as_f64().unwrap()
            })
            .collect();
        let firm = margins.iter().take_while(|&&m| m >= CLOSE).count().min(want.len());
        let got = run(&h, ids(&p["prompt_ids"]), SamplingParams { ignore_eos: false, ..SamplingParams::greedy(want.len()) });
        let same = got.ids.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let at = margins.get(same).map_or(String::new(), |m| format!(", reference margin there {m:.3}"));
        eprintln!("{name} ({} KV {}): first {same} of {} tokens equal (first close call at {firm}{at})", q.as_str(), kv.as_str(), want.len());
        assert!(same >= firm, "{name}: {} greedy departs from the reference at token {same}, before its first close call ({firm}): {:?} vs {want:?}", q.as_str(), got.ids);
        agreed += same;
        total += want.len();
    }
    eprintln!("{} KV {}: {agreed} of {total} reference tokens before the first difference", q.as_str(), kv.as_str());
    assert!(agreed * 100 >= total * min_percent, "{}: only {agreed} of {total} tokens agree", q.as_str());
}
