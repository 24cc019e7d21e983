//! Turning one row of logits into a token: penalties, logit bias, greedy or temperature
//! sampling with top-k / top-p / min-p, and logprobs with top-N alternatives.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// Index of the largest value; the lowest index wins a tie.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
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
    let t = p.temperature;
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    // Candidates, most likely first, cut by top-k, min-p and top-p.
    let probs: Vec<f32> = logits.iter().map(|&l| ((l - m) / t).exp()).collect();
    let total: f64 = probs.iter().map(|&v| v as f64).sum();
    let needs_cut = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
    if !needs_cut {
        return draw(rng, probs.iter().enumerate().map(|(i, &v)| (i as u32, v)), total);
    }
    let k_cap = if p.top_k > 0 { p.top_k.min(probs.len()) } else { probs.len() };
    // Grow the sorted head until it covers top_p (or reaches top_k).
    let mut k = k_cap.min(64);
    let mut head = loop {
        let h = top_n(&probs, k);
        let mass: f64 = h.iter().map(|&(_, v)| v as f64).sum();
        if k >= k_cap || mass >= p.top_p as f64 * total {
            break h;
        }
        k = (k * 4).min(k_cap);
    };
    if p.min_p > 0.0 {
        let floor = head[0].1 * p.min_p;
        head.retain(|&(_, v)| v >= floor);
    }
    if p.top_p < 1.0 {
        let target = p.top_p as f64 * total;
        let mut acc = 0.0;
        let mut keep = head.len();
        for (i, &(_, v)) in head.iter().enumerate() {
            acc += v as f64;
            if acc >= target {
                keep = i + 1;
                break;
            }
        }
        head.truncate(keep.max(1));
    }
    let mass: f64 = head.iter().map(|&(_, v)| v as f64).sum();
    draw(rng, head.into_iter(), mass)
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
