//! Paged attention on the default model's shape (9 query heads, 3 KV heads, head_dim 64,
//! blocks of 16; `mqa_`: Gemma 3 270M's 4 query heads on one KV head of 256), each
//! instruction-set path this CPU has, both cache dtypes:
//! decode steps (one query per sequence; reported as K/V bytes read per second) and a
//! 512-token prefill chunk (reported as flops: 4·head_dim per query-key pair per head).
//!
//!   cargo bench -p tessera-engine --bench attention
//!   cargo bench -p tessera-engine --bench attention -- 'decode_16x512'   (a subset)

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::cpu::attention::{paged_attention_on, AttnParams, SeqAttn};
use engine::cpu::matmul::Kernel;
use engine::kv_cache::{KvCache, KvLayout};
use engine::threadpool::ThreadPool;
use engine::KvDtype;
use rand::{Rng, SeedableRng};

/// (query heads, KV heads, head_dim).
const SMOLLM2: (usize, usize, usize) = (9, 3, 64);
const GEMMA3: (usize, usize, usize) = (4, 1, 256);
const BS: usize = 16;

fn threads() -> usize {
    std::env::var("TESSERA_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

/// `seqs` sequences of `ctx` tokens each, the last `qlen` of each attended.
#[allow(non_snake_case)]
fn case(c: &mut Criterion, name: &str, (HEADS, KV_HEADS, D): (usize, usize, usize), seqs: usize, ctx: usize, qlen: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let pool = ThreadPool::new(threads());
    let per_seq = ctx.div_ceil(BS);
    let layout = KvLayout { num_layers: 1, num_blocks: seqs * per_seq, block_size: BS, num_kv_heads: KV_HEADS, head_dim: D };
    // Shuffled blocks, as a long-running server's pool hands them out.
    let mut ids: Vec<u32> = (0..(seqs * per_seq) as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let tables: Vec<Vec<u32>> = ids.chunks(per_seq).map(|c| c.to_vec()).collect();
    let p = AttnParams { num_heads: HEADS, num_kv_heads: KV_HEADS, head_dim: D, block_size: BS, scale: 0.125, sliding_window: None, softcap: None, alibi_slopes: None };
    let q: Vec<f32> = (0..seqs * qlen * HEADS * D).map(|_| rng.random_range(-1.0..1.0)).collect();
    let attn: Vec<SeqAttn<'_>> = (0..seqs).map(|s| SeqAttn { query_start: s * qlen, query_len: qlen, context_len: ctx, block_table: &tables[s] }).collect();
    let mut g = c.benchmark_group(name);
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for dtype in [KvDtype::F16, KvDtype::F32] {
        let mut cache = KvCache::with_window_pool(layout, dtype, 0, &[]);
        let kv: Vec<f32> = (0..KV_HEADS * D).map(|_| rng.random_range(-1.0..1.0)).collect();
        for t in &tables {
            let slots: Vec<usize> = (0..ctx).map(|j| t[j / BS] as usize * BS + j % BS).collect();
            let rows: Vec<f32> = slots.iter().flat_map(|_| kv.iter().copied()).collect();
            cache.write(0, &slots, &rows, &rows);
        }
        if qlen == 1 {
            g.throughput(Throughput::Bytes((2 * seqs * ctx * KV_HEADS * D * dtype.bytes()) as u64));
        } else {
            let pairs = seqs * (ctx - qlen..ctx).map(|p| p + 1).sum::<usize>();
            g.throughput(Throughput::Elements((4 * D * HEADS * pairs) as u64));
        }
        for kern in Kernel::available() {
            let mut out = vec![0f32; q.len()];
            g.bench_function(format!("{dtype:?}/{kern:?}"), |b| {
                b.iter(|| paged_attention_on(kern, &pool, &q, cache.k[0].as_slice(), cache.v[0].as_slice(), &attn, &p, &mut out))
            });
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    case(c, "decode_1x1024", SMOLLM2, 1, 1024, 1);
    case(c, "decode_16x512", SMOLLM2, 16, 512, 1);
    case(c, "prefill_512", SMOLLM2, 1, 512, 512);
    case(c, "mqa_decode_1x1024", GEMMA3, 1, 1024, 1);
}

criterion_group!(benches, attention);
criterion_main!(benches);
