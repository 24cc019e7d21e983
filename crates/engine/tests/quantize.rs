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

/// INT8 within 1% and FP8 within 3% of the float32 reference (24.924); act8 (the Q4_1
/// blocks as they are, INT8 activations) within 0.2% (measured +0.02%); the unquantized
/// path within 0.05%, which checks this harness against the fixture's recipe. An f16 KV
/// cache: within 0.1% unquantized (measured -0.004%), 0.2% with act8 (measured -0.02%).
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
        (Quantize::Act8, KvDtype::F32, 0.002),
        (Quantize::Act8, KvDtype::F16, 0.002),
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
/// over all prompts at least 65% of the reference tokens come before the first difference
/// (measured: 165 of 232, 71%).
#[test]
fn int8_greedy_tokens_agree_with_the_reference() {
    greedy_tokens_agree(Quantize::Int8, KvDtype::F32, 65);
}

/// The same for act8, whose perplexity is within 0.02% of float32: at least 80% of the
/// reference tokens before the first difference (measured: 216 of 232, 93%).
#[test]
fn act8_greedy_tokens_agree_with_the_reference() {
    greedy_tokens_agree(Quantize::Act8, KvDtype::F32, 80);
}

/// An f16 KV cache, on the exact weights path (measured: 232 of 232, asserted 95%) and
/// under act8, the fast combination (measured: 175 of 232, 75%, asserted 70%): the same
/// rule, every prompt follows the reference up to its first close call.
#[test]
fn f16_kv_cache_greedy_tokens_agree_with_the_reference() {
    greedy_tokens_agree(Quantize::None, KvDtype::F16, 95);
    greedy_tokens_agree(Quantize::Act8, KvDtype::F16, 70);
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
