//! Continuous batching in the shape of vLLM v1: no separate prefill and decode phases.
//! Each request's `num_computed` catches up with its `num_tokens` (prompt + output); one
//! step packs decode rows (one token each) and prefill chunks under one token budget.
//!
//! ```text
//! request tokens:  [ prompt ............ | output ... ]
//!                  0            num_computed       num_tokens
//!                               └─ scheduled this step ─┘  (a chunk, or 1 for decode)
//! blocks held:     ceil((num_computed + scheduled) / block_size)
//! ```
//!
//! Models with sliding-window layers keep those layers' K/V in a second pool whose
//! blocks are released as soon as they fall wholly outside the window of the request's
//! next query, so their memory stays bounded by the window however long the request.
//!
//! Out of blocks: preempt the newest running request (its blocks go back to the pool and
//! it is recomputed later from its tokens). Waiting requests are admitted FCFS, and none
//! is admitted in a step that had to preempt.

use std::collections::{HashMap, VecDeque};

use crate::handle::RequestId;
use crate::kv_cache::{BlockId, BlockPool};
use crate::lora::AdapterId;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    /// Most distinct LoRA adapters among the running requests.
    pub max_loras: usize,
}

/// Steps a waiting request may be passed over (by requests whose adapter is already
/// running) while it waits for an adapter slot; after that admission is strictly FCFS.
const MAX_ADAPTER_BYPASS_STEPS: usize = 32;

#[derive(Debug)]
pub struct SeqState {
    pub id: RequestId,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub num_computed: usize,
    pub blocks: Vec<BlockId>,
    /// Blocks of the sliding-window pool, by block index; `None` once released.
    pub window_blocks: Vec<Option<BlockId>>,
    pub preemptions: usize,
    /// Whether the request has been scheduled at least once.
    pub started: bool,
    pub adapter: Option<AdapterId>,
}

impl SeqState {
    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// One request's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// Tokens already in the cache before this step (= first position scheduled).
    pub start: usize,
    /// Tokens computed in this step.
    pub len: usize,
    /// The step reaches the request's last token, so its logits are sampled.
    pub sample: bool,
}

/// What `schedule()` decided; plain data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerOutput {
    /// Scheduled requests, running ones first, then newly admitted.
    pub seqs: Vec<ScheduledSeq>,
    /// Sum of `len` over `seqs`.
    pub num_tokens: usize,
    /// Requests preempted in this step (they went back to the front of the queue).
    pub preempted: Vec<RequestId>,
    /// Requests scheduled for the first time in this step.
    pub first_scheduled: Vec<RequestId>,
}

/// The second pool, for the layers that only look back `window` tokens.
pub struct WindowPool {
    pub pool: BlockPool,
    pub window: usize,
}

pub struct Scheduler {
    pub config: SchedulerConfig,
    pub pool: BlockPool,
    pub window: Option<WindowPool>,
    seqs: HashMap<RequestId, SeqState>,
    /// FCFS order of arrival (preempted requests go back to the front).
    waiting: VecDeque<RequestId>,
    /// In admission order; the last is the newest.
    running: Vec<RequestId>,
    /// Consecutive steps the head of the queue has waited for an adapter slot.
    head_blocked_steps: usize,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, num_blocks: usize) -> Self {
        Scheduler {
            config,
            pool: BlockPool::new(num_blocks),
            window: None,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            head_blocked_steps: 0,
        }
    }

    /// Adds the sliding-window pool of `num_blocks` blocks.
    pub fn with_window_pool(mut self, num_blocks: usize, window: usize) -> Self {
        self.window = Some(WindowPool { pool: BlockPool::new(num_blocks), window: window.max(1) });
        self
    }

    /// Blocks in use over both pools.
    pub fn used_blocks(&self) -> usize {
        self.pool.num_used() + self.window.as_ref().map_or(0, |w| w.pool.num_used())
    }

    /// Blocks over both pools.
    pub fn total_blocks(&self) -> usize {
        self.pool.num_blocks() + self.window.as_ref().map_or(0, |w| w.pool.num_blocks())
    }

    pub fn add(&mut self, id: RequestId, prompt: Vec<u32>, adapter: Option<AdapterId>) {
        let prompt_len = prompt.len();
        let s = SeqState {
            id,
            tokens: prompt,
            prompt_len,
            num_computed: 0,
            blocks: Vec::new(),
            window_blocks: Vec::new(),
            preemptions: 0,
            started: false,
            adapter,
        };
        self.seqs.insert(id, s);
        self.waiting.push_back(id);
    }

    pub fn get(&self, id: RequestId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn running_ids(&self) -> Vec<RequestId> {
        self.running.clone()
    }

    pub fn waiting_ids(&self) -> Vec<RequestId> {
        self.waiting.iter().copied().collect()
    }

    pub fn ids(&self) -> Vec<RequestId> {
        self.running.iter().chain(self.waiting.iter()).copied().collect()
    }

    fn blocks_needed(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    /// Grows `id`'s block tables to hold `tokens` tokens; false if a pool is short (then
    /// nothing is allocated).
    fn ensure_blocks(&mut self, id: RequestId, tokens: usize) -> bool {
        let bs = self.config.block_size;
        let need = self.blocks_needed(tokens);
        let s = &self.seqs[&id];
        let full_short = need.saturating_sub(s.blocks.len());
        // The window pool needs the blocks from the first key the step's first query sees.
        let window_missing: Vec<usize> = match &self.window {
            Some(w) => {
                let first = (s.num_computed + 1).saturating_sub(w.window) / bs;
                (first..need).filter(|&i| s.window_blocks.get(i).is_none_or(|b| b.is_none())).collect()
            }
            None => Vec::new(),
        };
        if self.pool.num_free() < full_short || self.window.as_ref().is_some_and(|w| w.pool.num_free() < window_missing.len()) {
            return false;
        }
        let s = self.seqs.get_mut(&id).expect("scheduled request exists");
        for _ in 0..full_short {
            s.blocks.push(self.pool.allocate().expect("checked free count"));
        }
        if let Some(w) = &mut self.window {
            if s.window_blocks.len() < need {
                s.window_blocks.resize(need, None);
            }
            for i in window_missing {
                s.window_blocks[i] = Some(w.pool.allocate().expect("checked free count"));
            }
        }
        true
    }

    fn release_blocks(&mut self, id: RequestId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            for b in s.blocks.drain(..) {
                self.pool.free(b);
            }
            for b in s.window_blocks.drain(..).flatten() {
                self.window.as_mut().expect("window blocks come from the window pool").pool.free(b);
            }
        }
    }

    /// Frees the window blocks that no future query of `id` can see: every position of
    /// block b is before `num_computed + 1 - window`, the first key of the next query.
    fn release_out_of_window(&mut self, id: RequestId) {
        let (Some(w), Some(s)) = (self.window.as_mut(), self.seqs.get_mut(&id)) else { return };
        let bound = (s.num_computed + 1).saturating_sub(w.window);
        let bs = self.config.block_size;
        for (i, slot) in s.window_blocks.iter_mut().enumerate() {
            if (i + 1) * bs > bound {
                break;
            }
            if let Some(b) = slot.take() {
                w.pool.free(b);
            }
        }
    }

    /// Decides the next step. See the module docs for the policy.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.config.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let s = &self.seqs[&id];
            let n = (s.tokens.len() - s.num_computed).min(budget);
            let (start, total) = (s.num_computed, s.num_computed + n);
            let mut scheduled = true;
            while !self.ensure_blocks(id, total) {
                // Preempt the newest running request; possibly this one.
                let victim = self.running.pop().expect("running is not empty");
                self.release_blocks(victim);
                let v = self.seqs.get_mut(&victim).expect("victim exists");
                v.num_computed = 0;
                v.preemptions += 1;
                self.waiting.push_front(victim);
                out.preempted.push(victim);
                if let Some(pos) = out.seqs.iter().position(|x| x.id == victim) {
                    let x = out.seqs.remove(pos);
                    out.num_tokens -= x.len;
                    budget += x.len;
                }
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if scheduled {
                let sample = total == self.seqs[&id].tokens.len();
                out.seqs.push(ScheduledSeq { id, start, len: n, sample });
                out.num_tokens += n;
                budget -= n;
                i += 1;
            }
        }
        if out.preempted.is_empty() {
            self.admit(&mut out, budget);
        }
        out
    }

    /// Admits waiting requests FCFS while the budget, `max_num_seqs`, the blocks and the
    /// adapter slots allow. A request waiting for an adapter slot may be passed by
    /// requests that need no new slot, for at most [`MAX_ADAPTER_BYPASS_STEPS`] steps.
    fn admit(&mut self, out: &mut SchedulerOutput, mut budget: usize) {
        let mut active: Vec<AdapterId> = self.running.iter().filter_map(|id| self.seqs[id].adapter).collect();
        active.sort();
        active.dedup();
        let mut idx = 0;
        let mut head_blocked = false;
        while budget > 0 && self.running.len() < self.config.max_num_seqs && idx < self.waiting.len() {
            let id = self.waiting[idx];
            let s = &self.seqs[&id];
            let needs_slot = s.adapter.is_some_and(|a| !active.contains(&a));
            if needs_slot && active.len() >= self.config.max_loras {
                if idx == 0 {
                    head_blocked = true;
                }
                if self.head_blocked_steps >= MAX_ADAPTER_BYPASS_STEPS {
                    break;
                }
                idx += 1;
                continue;
            }
            if head_blocked && needs_slot {
                // Never give a new slot to someone behind a request that waits for one.
                idx += 1;
                continue;
            }
            let n = (s.tokens.len() - s.num_computed).min(budget);
            let total = s.num_computed + n;
            if !self.ensure_blocks(id, total) {
                break;
            }
            self.waiting.remove(idx);
            self.running.push(id);
            let s = self.seqs.get_mut(&id).expect("admitted request exists");
            if let Some(a) = s.adapter {
                if !active.contains(&a) {
                    active.push(a);
                }
            }
            if !s.started {
                s.started = true;
                out.first_scheduled.push(id);
            }
            let sample = total == s.tokens.len();
            out.seqs.push(ScheduledSeq { id, start: s.num_computed, len: n, sample });
            out.num_tokens += n;
            budget -= n;
        }
        self.head_blocked_steps = if head_blocked { self.head_blocked_steps + 1 } else { 0 };
    }

    /// Records the step: computed counts advance and sampled tokens are appended.
    pub fn update(&mut self, out: &SchedulerOutput, sampled: &HashMap<RequestId, u32>) {
        for s in &out.seqs {
            if let Some(st) = self.seqs.get_mut(&s.id) {
                st.num_computed = s.start + s.len;
                if let Some(&t) = sampled.get(&s.id) {
                    st.tokens.push(t);
                }
            }
            self.release_out_of_window(s.id);
        }
    }

    /// Removes a request (finished, cancelled or aborted) and frees its blocks.
    pub fn finish(&mut self, id: RequestId) -> Option<SeqState> {
        self.release_blocks(id);
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&r| r != id);
        self.seqs.remove(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sched(blocks: usize, bs: usize, budget: usize, seqs: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig { max_num_seqs: seqs, max_num_batched_tokens: budget, block_size: bs, max_loras: 2 }, blocks)
    }

    fn check_invariants(s: &Scheduler) {
        let held: usize = s.seqs.values().map(|x| x.blocks.len()).sum();
        assert_eq!(held, s.pool.num_used(), "blocks held by requests == blocks used in the pool");
        if let Some(w) = &s.window {
            let held: usize = s.seqs.values().map(|x| x.window_blocks.iter().flatten().count()).sum();
            assert_eq!(held, w.pool.num_used(), "window blocks held == window blocks used");
            for x in s.seqs.values() {
                let live = x.window_blocks.iter().flatten().count();
                // Bounded by the window plus the chunk being computed.
                assert!(live <= (w.window + s.config.max_num_batched_tokens).div_ceil(s.config.block_size) + 1, "{live} window blocks live");
                // Every block a future query can see is still there.
                let first = (x.num_computed + 1).saturating_sub(w.window) / s.config.block_size;
                let upto = x.num_computed.div_ceil(s.config.block_size);
                assert!((first..upto).all(|i| x.window_blocks.get(i).is_some_and(|b| b.is_some())), "a visible window block was released");
            }
        }
        let mut all: Vec<_> = s.seqs.values().flat_map(|x| x.blocks.iter().copied()).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a block is held twice");
        for x in s.seqs.values() {
            assert!(x.blocks.len() * s.config.block_size >= x.num_computed);
        }
        assert!(s.running.len() <= s.config.max_num_seqs);
        let mut adapters: Vec<_> = s.running.iter().filter_map(|id| s.seqs[id].adapter).collect();
        adapters.sort();
        adapters.dedup();
        assert!(adapters.len() <= s.config.max_loras, "{} adapters running, max_loras {}", adapters.len(), s.config.max_loras);
    }

    #[test]
    fn decode_and_prefill_share_a_step_under_the_budget() {
        let mut s = sched(100, 4, 10, 8);
        s.add(RequestId(0), vec![1; 3], None);
        let o = s.schedule();
        assert_eq!(o.seqs, vec![ScheduledSeq { id: RequestId(0), start: 0, len: 3, sample: true }]);
        s.update(&o, &HashMap::from([(RequestId(0), 5)]));
        s.add(RequestId(1), vec![1; 20], None);
        let o = s.schedule();
        assert_eq!(o.num_tokens, 10);
        assert_eq!(o.seqs[0], ScheduledSeq { id: RequestId(0), start: 3, len: 1, sample: true });
        assert_eq!(o.seqs[1], ScheduledSeq { id: RequestId(1), start: 0, len: 9, sample: false });
    }

    #[test]
    fn out_of_blocks_preempts_the_newest() {
        let mut s = sched(4, 4, 64, 8);
        s.add(RequestId(0), vec![1; 8], None);
        s.add(RequestId(1), vec![1; 8], None);
        let o = s.schedule();
        assert_eq!(o.seqs.len(), 2);
        s.update(&o, &HashMap::from([(RequestId(0), 1), (RequestId(1), 1)]));
        let o = s.schedule();
        assert_eq!(o.preempted, vec![RequestId(1)]);
        assert_eq!(o.seqs.iter().map(|x| x.id).collect::<Vec<_>>(), vec![RequestId(0)]);
        check_invariants(&s);
    }

    /// Random arrivals, lengths, adapters (3 adapters, 2 slots) and cancellations against
    /// a small pool: no leak, no double hand-out, never more adapters than slots, and every
    /// request finishes within a bounded number of steps.
    #[test]
    fn randomized_schedule_has_no_leak_or_starvation() {
        for seed in 0..20u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let bs = [1usize, 4, 16][seed as usize % 3];
            let blocks = 256 / bs;
            let mut s = sched(blocks, bs, rng.random_range(8..64), rng.random_range(1..10));
            if seed % 2 == 1 {
                // A sliding-window pool big enough for one request's window and chunk.
                let window = [5usize, 16, 40][seed as usize % 3];
                let need = (window + s.config.max_num_batched_tokens).div_ceil(bs) + 1;
                s = s.with_window_pool(need + rng.random_range(0..need), window);
            }
            let mut target: HashMap<RequestId, usize> = HashMap::new();
            let mut next = 0u64;
            let mut done = 0;
            for step in 0..5000 {
                if next < 60 && rng.random_bool(0.3) {
                    let id = RequestId(next);
                    next += 1;
                    let p = rng.random_range(1..120);
                    let o = rng.random_range(1..(256 - p).min(60));
                    let adapter = match rng.random_range(0..4) {
                        0 => None,
                        a => Some(AdapterId(a)),
                    };
                    s.add(id, vec![7; p], adapter);
                    target.insert(id, o);
                }
                if rng.random_bool(0.02) {
                    let ids = s.ids();
                    if !ids.is_empty() {
                        let id = ids[rng.random_range(0..ids.len())];
                        s.finish(id);
                        target.remove(&id);
                        done += 1;
                    }
                }
                let o = s.schedule();
                check_invariants(&s);
                if !s.is_idle() {
                    assert!(!o.seqs.is_empty(), "seed {seed} step {step}: work pending but nothing scheduled");
                }
                let sampled: HashMap<_, _> = o.seqs.iter().filter(|x| x.sample).map(|x| (x.id, 3u32)).collect();
                s.update(&o, &sampled);
                for id in sampled.keys() {
                    let st = s.get(*id).unwrap();
                    if st.num_output() >= target[id] {
                        s.finish(*id);
                        target.remove(id);
                        done += 1;
                    }
                }
                if next == 60 && s.is_idle() {
                    break;
                }
            }
            assert_eq!(done, 60, "seed {seed}: every request finished");
            assert_eq!(s.pool.num_free(), blocks, "seed {seed}: every block returned");
            if let Some(w) = &s.window {
                assert_eq!(w.pool.num_used(), 0, "seed {seed}: every window block returned");
            }
        }
    }
}
