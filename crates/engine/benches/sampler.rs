//! Sampling one token from a row of logits the size of the default model's vocabulary
//! (49,152), as the engine does for every sampled sequence of a step (rows spread over its
//! pool; this is one row on one thread): greedy, plain
//! temperature, and the top-p / top-k / min-p cuts, on a flat distribution (many
//! candidates: the worst case for top-p) and a peaked one (a model's usual shape).
//!
//!   cargo bench -p tessera-engine --bench sampler

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use engine::request::SamplingParams;
use engine::sampler::{sample, SamplerState};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 49_152;

fn sampler(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let flat: Vec<f32> = (0..VOCAB).map(|_| rng.random_range(-10.0f32..15.0)).collect();
    // A few likely tokens, then a long tail about 10 nats lower.
    let peaked: Vec<f32> = (0..VOCAB).map(|i| if i % 4099 == 0 { 12.0 - (i / 4099) as f32 * 0.7 } else { rng.random_range(-4.0f32..2.0) }).collect();
    let cases = [
        ("greedy", SamplingParams { temperature: 0.0, ..Default::default() }),
        ("temperature_1", SamplingParams { temperature: 1.0, ..Default::default() }),
        ("top_p_0.9_temp_0.7", SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() }),
        ("top_p_0.95", SamplingParams { temperature: 1.0, top_p: 0.95, ..Default::default() }),
        ("top_k_40_top_p_0.95_min_p_0.05", SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, ..Default::default() }),
        ("min_p_0.1", SamplingParams { temperature: 1.0, min_p: 0.1, ..Default::default() }),
    ];
    let mut g = c.benchmark_group("sample");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for (dist, logits) in [("flat", &flat), ("peaked", &peaked)] {
        for (name, p) in &cases {
            let p = SamplingParams { seed: Some(7), ..p.clone() };
            let mut st = SamplerState::new(&p, &[]);
            g.bench_function(format!("{dist}/{name}"), |b| {
                b.iter_batched_ref(|| logits.clone(), |l| sample(l, &p, &mut st).0, BatchSize::SmallInput)
            });
        }
    }
    g.finish();
}

criterion_group!(benches, sampler);
criterion_main!(benches);
