//! Turning one row of logits into a token: penalties, logit bias, greedy or temperature
//! sampling with top-k / top-p / min-p, and logprobs with top-N alternatives.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cpu::matmul::Kernel;
use crate::cpu::ops::{exp_poly, map_on, max_of};
use crate::cpu::quant::fold_lanes;
use crate::request::{SamplingParams, TokenLogprob};

/// Per-request sampling state: the RNG and the counts the penalties need.
pub struct SamplerState {
    rng: StdRng,
    /// Occurrences of each generated token (presence/frequency penalties).
    generated_counts: std::collections::HashMap<u32, u32>,
    /// Prompt tokens (repetition penalty covers prompt and output, as in HF and vLLM).
    prompt_tokens: std::collections::HashSet<u32>,
}

impl SamplerState {
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let prompt_tokens = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { Default::default() };
        SamplerState { rng, generated_counts: Default::default(), prompt_tokens }
    }

    pub fn record(&mut self, token: u32) {
        *self.generated_counts.entry(token).or_insert(0) += 1;
    }
}

/// Samples one token from `logits` (modified in place).
pub fn sample(logits: &mut [f32], params: &SamplingParams, state: &mut SamplerState) -> (u32, Option<TokenLogprob>) {
    // Logprobs are reported from the model's raw distribution (vLLM's default).
    let raw_logprobs = params.logprobs.map(|_| log_softmax(logits));
    apply_penalties(logits, params, state);
    for &(id, bias) in &params.logit_bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += bias;
        }
    }
    let token = if params.temperature == 0.0 { argmax(logits) } else { sample_random(logits, params, &mut state.rng) };
    let lp = raw_logprobs.map(|lps| {
        let n = params.logprobs.unwrap_or(0);
        TokenLogprob { token_id: token, logprob: lps[token as usize], top: top_n(&lps, n) }
    });
    (token, lp)
}

fn apply_penalties(logits: &mut [f32], p: &SamplingParams, st: &SamplerState) {
    if p.repetition_penalty != 1.0 {
        let r = p.repetition_penalty;
        let seen = st.prompt_tokens.iter().chain(st.generated_counts.keys());
        for &t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        for (&t, &c) in &st.generated_counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
}

/// Index of the largest value; the lowest index wins a tie (NaNs never win; 0 when
/// there is no number). The maximum first, in lanes ([`max_of`]), then its first
/// position: one chain of dependent compares over the vocabulary cost ~50 µs a token.
pub fn argmax(x: &[f32]) -> u32 {
    let m = max_of(x);
    x.iter().position(|&v| v == m).unwrap_or(0) as u32
}

pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let z: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
    let lz = z.ln() as f32 + m;
    x.iter().map(|&v| v - lz).collect()
}

/// The `n` largest entries, largest first (ties: lower id first).
pub fn top_n(x: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| x[*b as usize].total_cmp(&x[*a as usize]).then(a.cmp(b));
    let n = n.min(idx.len());
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, x[i as usize])).collect()
}

fn sample_random(logits: &[f32], p: &SamplingParams, rng: &mut StdRng) -> u32 {
    thread_local! {
        // The vocabulary's probabilities, kept: a fresh 200 KB vector per token came from
        // mmap and page-faulted on every use.
        static PROBS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PROBS.with(|buf| {
        let mut probs = buf.borrow_mut();
        relative_probs(logits, p.temperature, &mut probs);
        sample_probs(&probs, p, rng)
    })
}

fn sample_probs(probs: &[f32], p: &SamplingParams, rng: &mut StdRng) -> u32 {
    let total = sum_f64(probs);
    let needs_cut = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
    if !needs_cut {
        return draw(rng, probs.iter().enumerate().map(|(i, &v)| (i as u32, v)), total);
    }
    let head = nucleus(probs, total, p);
    let mass: f64 = head.iter().map(|&(_, v)| v as f64).sum();
    draw(rng, head.into_iter(), mass)
}

/// `e^((l - max) / t)` for every logit (the largest is 1; below e^-87.3, 0), in a loop
/// that vectorizes on the widest registers ([`exp_poly`], [`map_on`]; libm's `expf` per
/// logit was ~0.3 ms a token); the same bits on every path.
fn relative_probs(logits: &[f32], t: f32, probs: &mut Vec<f32>) {
    let m = max_of(logits);
    probs.resize(logits.len(), 0.0);
    map_on(Kernel::detect(), logits, probs, |l| {
        let z = (l - m) / t;
        if z < -87.3 { 0.0 } else { exp_poly(z) }
    });
}

/// `Σ v` in f64, in eight lanes ([`fold_lanes`]; a single chain of dependent adds cost
/// ~80 µs a token).
fn sum_f64(v: &[f32]) -> f64 {
    fold_lanes(v, 0f64, |a, x| a + x as f64).iter().sum()
}

/// The tokens top-k, min-p and top-p keep, most likely first (ties: lower id first), with
/// their probabilities (`probs` relative to the largest, `total` their sum): the
/// shortest prefix of the sorted vocabulary that holds `top_p` of the mass, cut to `top_k`
/// and to probabilities of at least `min_p` times the largest; at least one token.
/// Only a top set that holds enough mass is sorted ([`top_mass_set`]): sorting a growing
/// head of the whole vocabulary took 2-3 ms a token on a flat distribution.
fn nucleus(probs: &[f32], total: f64, p: &SamplingParams) -> Vec<(u32, f32)> {
    let target = p.top_p as f64 * total;
    let mut ids = if p.top_p < 1.0 { top_mass_set(probs, target) } else { (0..probs.len() as u32).collect() };
    if p.min_p > 0.0 {
        let floor = max_of(probs) * p.min_p;
        ids.retain(|&i| probs[i as usize] >= floor);
    }
    // Sort keys: the probability's bits inverted (non-negative floats sort as their bits),
    // then the id: ascending keys are descending probabilities, ties by id; plain integer
    // compares instead of lookups through the ids.
    let mut keys: Vec<u64> = ids.into_iter().map(|i| (0x7fff_ffffu32.wrapping_sub(probs[i as usize].to_bits()) as u64) << 32 | i as u64).collect();
    if p.top_k > 0 && keys.len() > p.top_k {
        keys.select_nth_unstable(p.top_k - 1);
        keys.truncate(p.top_k);
    }
    keys.sort_unstable();
    let mut head: Vec<(u32, f32)> = keys.into_iter().map(|k| (k as u32, probs[k as u32 as usize])).collect();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        if let Some(at) = head.iter().position(|&(_, v)| {
            acc += v as f64;
            acc >= target
        }) {
            head.truncate(at + 1);
        }
    }
    head
}

/// The ids of every probability at or above a bound such that their mass reaches
/// `target` (all of them if none does): one pass sums the mass by the values' leading
/// bits (exponent and two mantissa bits: for non-negative floats the bit patterns sort as
/// the values do), the buckets are added from the top until the target is reached, and
/// the bound is the lower edge of the last bucket added. Four histograms, so that a run
/// of values in one bucket is not one chain of dependent adds.
fn top_mass_set(probs: &[f32], target: f64) -> Vec<u32> {
    const SHIFT: u32 = 21;
    const BUCKETS: usize = 1 << (32 - SHIFT - 1);
    let mut mass = vec![[0f64; 4]; BUCKETS];
    let bucket = |v: f32| (v.to_bits() >> SHIFT) as usize & (BUCKETS - 1);
    for (i, &v) in probs.iter().enumerate() {
        mass[bucket(v)][i % 4] += v as f64;
    }
    let mut acc = 0.0;
    let mut bound = 0f32;
    for b in (0..BUCKETS).rev() {
        acc += mass[b].iter().sum::<f64>();
        // (acc > 0: a target of 0 still takes the top bucket, not an empty one above it.)
        if acc > 0.0 && acc >= target {
            bound = f32::from_bits((b as u32) << SHIFT);
            break;
        }
    }
    probs.iter().enumerate().filter(|&(_, &v)| v >= bound).map(|(i, _)| i as u32).collect()
}

fn draw(rng: &mut StdRng, items: impl Iterator<Item = (u32, f32)>, total: f64) -> u32 {
    let u: f64 = rng.random::<f64>() * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, v) in items {
        acc += v as f64;
        last = i;
        if acc > u && v > 0.0 {
            return i;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams { temperature: 1.0, ..Default::default() }
    }

    #[test]
    fn greedy_takes_argmax_and_bias_can_move_it() {
        let mut p = SamplingParams::greedy(1);
        let mut st = SamplerState::new(&p, &[]);
        assert_eq!(sample(&mut [0.1, 3.0, 2.0], &p, &mut st).0, 1);
        p.logit_bias = vec![(2, 5.0)];
        assert_eq!(sample(&mut [0.1, 3.0, 2.0], &p, &mut st).0, 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let p = SamplingParams { seed: Some(42), top_p: 0.9, top_k: 50, ..params() };
        let run = || {
            let mut st = SamplerState::new(&p, &[]);
            (0..20).map(|_| sample(&mut logits.clone(), &p, &mut st).0).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = vec![1.0, 5.0, 4.9, -1.0];
        let p = SamplingParams { top_k: 1, seed: Some(1), ..params() };
        let mut st = SamplerState::new(&p, &[]);
        for _ in 0..50 {
            assert_eq!(sample(&mut logits.clone(), &p, &mut st).0, 1);
        }
    }

    #[test]
    fn top_p_and_min_p_exclude_the_tail() {
        let logits = vec![10.0, 9.0, 0.0, 0.0, 0.0];
        for p in [SamplingParams { top_p: 0.5, seed: Some(3), ..params() }, SamplingParams { min_p: 0.2, seed: Some(3), ..params() }] {
            let mut st = SamplerState::new(&p, &[]);
            for _ in 0..200 {
                let t = sample(&mut logits.clone(), &p, &mut st).0;
                assert!(t <= 1, "{p:?} drew {t}");
            }
        }
    }

    /// The kept tokens are those of the definition: the whole vocabulary sorted (ties by
    /// id), cut to top-k, to min-p times the largest and to the shortest prefix that holds
    /// top-p of the mass; on flat, peaked and tied distributions with zeros, every mix of
    /// the three cuts.
    #[test]
    fn nucleus_keeps_the_sorted_prefix_the_cuts_define() {
        let mut rng = StdRng::seed_from_u64(5);
        for case in 0..60 {
            let n = [5usize, 100, 3000][case % 3];
            let probs: Vec<f32> = (0..n)
                .map(|i| match case % 4 {
                    0 => rng.random_range(0.0f32..1.0),
                    1 => (-(i as f32) * rng.random_range(0.0f32..0.5)).exp(),
                    2 => (rng.random_range(0..8) as f32) / 8.0,
                    _ => if rng.random_bool(0.3) { 0.0 } else { rng.random_range(0.0f32..1.0).powi(6) },
                })
                .collect();
            let total = sum_f64(&probs);
            for (top_k, top_p, min_p) in [(0, 0.9f32, 0.0f32), (7, 1.0, 0.0), (0, 1.0, 0.3), (20, 0.5, 0.05), (3, 0.99, 0.1), (0, 0.0, 0.0), (0, 0.999, 0.0)] {
                let p = SamplingParams { top_k, top_p, min_p, ..params() };
                let mut want: Vec<u32> = (0..n as u32).collect();
                want.sort_by(|a, b| probs[*b as usize].total_cmp(&probs[*a as usize]).then(a.cmp(b)));
                if top_k > 0 {
                    want.truncate(top_k);
                }
                let max = probs.iter().cloned().fold(0f32, f32::max);
                want.retain(|&i| probs[i as usize] >= max * min_p);
                let mut acc = 0.0;
                if let Some(at) = want.iter().position(|&i| {
                    acc += probs[i as usize] as f64;
                    top_p < 1.0 && acc >= top_p as f64 * total
                }) {
                    want.truncate(at + 1);
                }
                let got: Vec<u32> = nucleus(&probs, total, &p).into_iter().map(|(i, _)| i).collect();
                assert_eq!(got, want, "case {case} n={n} top_k={top_k} top_p={top_p} min_p={min_p}");
            }
        }
    }

    /// Draws follow the kept tokens' probabilities: 20,000 draws from a peaked vocabulary
    /// of 50,000 with top-p 0.9 land within 0.015 of each kept token's share.
    #[test]
    fn draws_follow_the_kept_distribution() {
        let logits: Vec<f32> = (0..50_000).map(|i| if i < 6 { 8.0 - i as f32 * 0.5 } else { -((i % 97) as f32) * 0.1 }).collect();
        let p = SamplingParams { top_p: 0.9, seed: Some(11), ..params() };
        let mut probs = Vec::new();
        relative_probs(&logits, 1.0, &mut probs);
        let head = nucleus(&probs, sum_f64(&probs), &p);
        let mass: f64 = head.iter().map(|&(_, v)| v as f64).sum();
        let mut st = SamplerState::new(&p, &[]);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..20_000 {
            *counts.entry(sample(&mut logits.clone(), &p, &mut st).0).or_insert(0usize) += 1;
        }
        assert!(counts.keys().all(|t| head.iter().any(|h| h.0 == *t)), "drew outside the nucleus");
        for &(t, v) in &head {
            let share = *counts.get(&t).unwrap_or(&0) as f64 / 20_000.0;
            assert!((share - v as f64 / mass).abs() < 0.015, "token {t}: {share} vs {}", v as f64 / mass);
        }
    }

    #[test]
    fn penalties_lower_seen_tokens() {
        let p = SamplingParams { presence_penalty: 2.0, frequency_penalty: 1.0, repetition_penalty: 2.0, ..SamplingParams::greedy(1) };
        let mut st = SamplerState::new(&p, &[0]);
        st.record(1);
        st.record(1);
        let mut l = vec![4.0, 4.0, 3.0];
        apply_penalties(&mut l, &p, &st);
        assert_eq!(l, vec![2.0, 4.0 / 2.0 - 2.0 - 2.0, 3.0]);
    }

    #[test]
    fn logprobs_report_top_alternatives_in_order() {
        let p = SamplingParams { logprobs: Some(2), ..SamplingParams::greedy(1) };
        let mut st = SamplerState::new(&p, &[]);
        let (t, lp) = sample(&mut [1.0, 3.0, 2.0], &p, &mut st);
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let z = (1f32.exp() + 3f32.exp() + 2f32.exp()).ln();
        assert!((lp.logprob - (3.0 - z)).abs() < 1e-5);
    }
}
