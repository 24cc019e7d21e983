//! Flash-style paged attention on CPU for MHA, GQA and MQA.
//!
//! One work item is (sequence, KV head, block of queries). The query heads of the KV
//! group are processed together, so each K/V row is read once for the whole group.
//! Keys are visited in logical tiles of [`TILE`] positions aligned to absolute positions,
//! with an online softmax across tiles: memory does not grow with the context, and the
//! arithmetic for a query depends neither on the block size of the cache nor on how its
//! prompt was chunked nor on what else is in the batch.
//!
//! ```text
//! q:   [num_tokens, num_heads * head_dim]     rows query_start .. query_start + query_len
//! seq: positions 0 .. context_len; the chunk's queries sit at context_len - query_len ..
//! key j of a sequence: slot = block_table[j / block_size] * block_size + j % block_size
//! K/V cache of the layer: [slots, num_kv_heads, head_dim]
//! ```

use half::f16;

use crate::kv_cache::KvSlice;
use crate::threadpool::ThreadPool;

pub const TILE: usize = 32;
const QUERY_BLOCK: usize = 4;

/// One sequence of the packed batch, as attention sees it.
#[derive(Debug, Clone)]
pub struct SeqAttn<'a> {
    pub query_start: usize,
    pub query_len: usize,
    /// Tokens in the cache for this sequence after this step's writes.
    pub context_len: usize,
    pub block_table: &'a [u32],
}

/// Shape and score modifiers of one attention layer.
#[derive(Debug, Clone)]
pub struct AttnParams<'a> {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Multiplies q·k.
    pub scale: f32,
    /// A query at position p sees keys p - window + 1 ..= p.
    pub sliding_window: Option<usize>,
    /// `cap * tanh(score / cap)` after scaling.
    pub softcap: Option<f32>,
    /// Per query head, adds `slope * (key_pos - query_pos)`.
    pub alibi_slopes: Option<&'a [f32]>,
}

/// `out[t, h, :] = softmax(q[t, h] · K) V` over each sequence's cached keys.
pub fn paged_attention(
    pool: &ThreadPool,
    q: &[f32],
    k_cache: KvSlice<'_>,
    v_cache: KvSlice<'_>,
    seqs: &[SeqAttn<'_>],
    p: &AttnParams<'_>,
    out: &mut [f32],
) {
    let mut items = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for g in 0..p.num_kv_heads {
            for qb in (0..seq.query_len).step_by(QUERY_BLOCK) {
                items.push((s, g, qb));
            }
        }
    }
    let o = super::SyncPtr(out.as_mut_ptr());
    assert_eq!(out.len(), q.len());
    pool.run(items.len(), &|i| {
        let (s, g, qb) = items[i];
        let _ = &o;
        let ctx = Ctx { q, kc: k_cache, vc: v_cache, p, out: o.0 };
        // SAFETY: each item writes the rows of its own queries and heads only.
        unsafe { attend_item(&ctx, &seqs[s], g, qb) };
    });
}

/// What every work item of one attention call shares.
struct Ctx<'a> {
    q: &'a [f32],
    kc: KvSlice<'a>,
    vc: KvSlice<'a>,
    p: &'a AttnParams<'a>,
    out: *mut f32,
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

unsafe fn attend_item(ctx: &Ctx<'_>, seq: &SeqAttn<'_>, g: usize, qb: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
            return attend_item_avx2(ctx, seq, g, qb);
        }
    }
    attend_item_generic(ctx, seq, g, qb, widen_portable)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attend_item_avx2(ctx: &Ctx<'_>, seq: &SeqAttn<'_>, g: usize, qb: usize) {
    // SAFETY: this function runs only where F16C was detected.
    attend_item_generic(ctx, seq, g, qb, |s: &[f16], d: &mut [f32]| unsafe { widen_f16c(s, d) })
}

/// f16 to f32 (exact) one value at a time.
#[inline(always)]
fn widen_portable(src: &[f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// f16 to f32 (exact) eight values at a time with F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = src.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    widen_portable(&src[n8..], &mut dst[n8..]);
}

/// Values `at .. at + dst.len()` of a cache layer, as f32 (exact for both dtypes).
#[inline(always)]
fn load(src: KvSlice<'_>, at: usize, dst: &mut [f32], widen: &impl Fn(&[f16], &mut [f32])) {
    match src {
        KvSlice::F32(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
        KvSlice::F16(v) => widen(&v[at..at + dst.len()], dst),
    }
}

/// No FMA contraction happens in Rust, so this computes the same bits on every path.
/// Each tile's K and V rows are first copied (widened from f16) into f32 buffers.
#[inline(always)]
unsafe fn attend_item_generic(ctx: &Ctx<'_>, seq: &SeqAttn<'_>, g: usize, qb: usize, widen: impl Fn(&[f16], &mut [f32])) {
    let Ctx { q, kc, vc, p, out } = *ctx;
    let d = p.head_dim;
    let group = p.num_heads / p.num_kv_heads;
    let row = p.num_heads * d;
    let slot_stride = p.num_kv_heads * d;
    let (mut kt, mut vt) = (vec![0f32; TILE * d], vec![0f32; TILE * d]);
    let mut scores = vec![0f32; group * TILE];
    let mut acc = vec![0f32; group * d];
    let mut mx = vec![f32::NEG_INFINITY; group];
    let mut den = vec![0f32; group];
    let first_pos = seq.context_len - seq.query_len;
    for qi in qb..(qb + QUERY_BLOCK).min(seq.query_len) {
        let t = seq.query_start + qi;
        let pos = first_pos + qi;
        let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        acc.iter_mut().for_each(|v| *v = 0.0);
        mx.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        den.iter_mut().for_each(|v| *v = 0.0);
        let qrow = &q[t * row..(t + 1) * row];
        let mut tile_start = lo / TILE * TILE;
        while tile_start <= pos {
            let a = tile_start.max(lo);
            let b = (tile_start + TILE).min(pos + 1);
            let n = b - a;
            for j in 0..n {
                let kp = a + j;
                let slot = seq.block_table[kp / p.block_size] as usize * p.block_size + kp % p.block_size;
                load(kc, slot * slot_stride + g * d, &mut kt[j * d..(j + 1) * d], &widen);
                load(vc, slot * slot_stride + g * d, &mut vt[j * d..(j + 1) * d], &widen);
            }
            // Scores for every head of the group against each key of the tile.
            for j in 0..n {
                let kp = a + j;
                let krow = &kt[j * d..(j + 1) * d];
                for h in 0..group {
                    let qh = g * group + h;
                    let mut s = dot(&qrow[qh * d..(qh + 1) * d], krow) * p.scale;
                    if let Some(cap) = p.softcap {
                        s = cap * (s / cap).tanh();
                    }
                    if let Some(slopes) = p.alibi_slopes {
                        s += slopes[qh] * (kp as f32 - pos as f32);
                    }
                    scores[h * TILE + j] = s;
                }
            }
            // Online softmax update per head.
            for h in 0..group {
                let sc = &mut scores[h * TILE..h * TILE + n];
                let tmax = sc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let new_max = mx[h].max(tmax);
                let corr = if mx[h] == f32::NEG_INFINITY { 0.0 } else { (mx[h] - new_max).exp() };
                let mut sum = 0f32;
                for v in sc.iter_mut() {
                    *v = (*v - new_max).exp();
                    sum += *v;
                }
                den[h] = den[h] * corr + sum;
                mx[h] = new_max;
                for v in &mut acc[h * d..(h + 1) * d] {
                    *v *= corr;
                }
            }
            for j in 0..n {
                let vrow = &vt[j * d..(j + 1) * d];
                for h in 0..group {
                    let w = scores[h * TILE + j];
                    for (o, &v) in acc[h * d..(h + 1) * d].iter_mut().zip(vrow) {
                        *o += w * v;
                    }
                }
            }
            tile_start += TILE;
        }
        for h in 0..group {
            let qh = g * group + h;
            let inv = 1.0 / den[h];
            let dst = std::slice::from_raw_parts_mut(out.add(t * row + qh * d), d);
            for (o, &v) in dst.iter_mut().zip(&acc[h * d..(h + 1) * d]) {
                *o = v * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Full-softmax attention over contiguous K/V of one sequence, in f64.
        fn naive(q: &[f32], k: &[f32], v: &[f32], ctx: usize, qlen: usize, p: &AttnParams<'_>) -> Vec<f32> {
        let (d, h, kvh) = (p.head_dim, p.num_heads, p.num_kv_heads);
        let mut out = vec![0f32; qlen * h * d];
        for i in 0..qlen {
            let pos = ctx - qlen + i;
            for head in 0..h {
                let g = head / (h / kvh);
                let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let mut s: Vec<f64> = (lo..=pos)
                    .map(|j| {
                        let mut x = (0..d).map(|e| q[(i * h + head) * d + e] as f64 * k[(j * kvh + g) * d + e] as f64).sum::<f64>()
                            * p.scale as f64;
                        if let Some(cap) = p.softcap {
                            x = cap as f64 * (x / cap as f64).tanh();
                        }
                        if let Some(sl) = p.alibi_slopes {
                            x += sl[head] as f64 * (j as f64 - pos as f64);
                        }
                        x
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                s.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: f64 = s.iter().sum();
                for e in 0..d {
                    let val: f64 = (lo..=pos).zip(&s).map(|(j, w)| w * v[(j * kvh + g) * d + e] as f64).sum();
                    out[(i * h + head) * d + e] = (val / z) as f32;
                }
            }
        }
        out
    }

    fn run_paged(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        ctx: usize,
        qlen: usize,
        p: &AttnParams<'_>,
        rng: &mut rand::rngs::StdRng,
    ) -> Vec<f32> {
        run_paged_as(crate::KvDtype::F32, q, k, v, ctx, qlen, p, rng)
    }

    /// `k` and `v` scattered into shuffled blocks of a cache of `dtype`, then attention.
    #[allow(clippy::too_many_arguments)]
    fn run_paged_as(
        dtype: crate::KvDtype,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        ctx: usize,
        qlen: usize,
        p: &AttnParams<'_>,
        rng: &mut rand::rngs::StdRng,
    ) -> Vec<f32> {
        let bs = p.block_size;
        let nblocks = ctx.div_ceil(bs);
        // Scatter into shuffled blocks of a larger pool.
        let mut ids: Vec<u32> = (0..(nblocks * 2) as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let table: Vec<u32> = ids[..nblocks].to_vec();
        let layout = crate::kv_cache::KvLayout { num_layers: 1, num_blocks: nblocks * 2, block_size: bs, num_kv_heads: p.num_kv_heads, head_dim: p.head_dim };
        let mut cache = crate::kv_cache::KvCache::with_window_pool(layout, dtype, 0, &[]);
        // Slots no key was written to are NaN: reading one would show.
        for buf in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            match buf {
                crate::kv_cache::KvBuf::F32(b) => b.fill(f32::NAN),
                crate::kv_cache::KvBuf::F16(b) => b.fill(f16::NAN),
            }
        }
        let slots: Vec<usize> = (0..ctx).map(|j| table[j / bs] as usize * bs + j % bs).collect();
        cache.write(0, &slots, k, v);
        let seqs = [SeqAttn { query_start: 0, query_len: qlen, context_len: ctx, block_table: &table }];
        let mut out = vec![f32::NAN; q.len()];
        paged_attention(&ThreadPool::new(2), q, cache.k[0].as_slice(), cache.v[0].as_slice(), &seqs, p, &mut out);
        out
    }

    /// An f16 cache gives exactly what an f32 cache holding the same values, rounded to
    /// f16, gives: values are rounded once when written and widened exactly when read.
    #[test]
    fn f16_cache_equals_f32_cache_of_rounded_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // head_dim 20: widening runs eight at a time plus a tail.
        let (h, kvh, d, ctx, qlen) = (6, 2, 20, 150, 3);
        let p = AttnParams { num_heads: h, num_kv_heads: kvh, head_dim: d, block_size: 16, scale: 0.2, sliding_window: None, softcap: None, alibi_slopes: None };
        let q: Vec<f32> = (0..qlen * h * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let k: Vec<f32> = (0..ctx * kvh * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let v: Vec<f32> = (0..ctx * kvh * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let round = |x: &[f32]| x.iter().map(|&e| f16::from_f32(e).to_f32()).collect::<Vec<_>>();
        let (kr, vr) = (round(&k), round(&v));
        assert_ne!(k, kr, "the test needs values that f16 rounds");
        let half = run_paged_as(crate::KvDtype::F16, &q, &k, &v, ctx, qlen, &p, &mut rng);
        assert_eq!(half, run_paged_as(crate::KvDtype::F32, &q, &kr, &vr, ctx, qlen, &p, &mut rng));
        let exact = run_paged(&q, &k, &v, ctx, qlen, &p, &mut rng);
        for (a, b) in half.iter().zip(&exact) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn paged_matches_naive_for_mha_gqa_mqa_and_every_modifier() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let slopes: Vec<f32> = (0..8).map(|i| 0.5f32.powi(i + 1)).collect();
        for &(h, kvh) in &[(4usize, 4usize), (8, 2), (4, 1)] {
            for &bs in &[1usize, 16, 7] {
                for modifier in 0..4 {
                    let (d, ctx, qlen) = (16, 75, 9);
                    let p = AttnParams {
                        num_heads: h,
                        num_kv_heads: kvh,
                        head_dim: d,
                        block_size: bs,
                        scale: 1.0 / (d as f32).sqrt(),
                        sliding_window: (modifier == 1).then_some(33),
                        softcap: (modifier == 2).then_some(5.0),
                        alibi_slopes: (modifier == 3).then_some(&slopes[..h]),
                    };
                    let q: Vec<f32> = (0..qlen * h * d).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let k: Vec<f32> = (0..ctx * kvh * d).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let v: Vec<f32> = (0..ctx * kvh * d).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let got = run_paged(&q, &k, &v, ctx, qlen, &p, &mut rng);
                    let want = naive(&q, &k, &v, ctx, qlen, &p);
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-4, "h={h} kvh={kvh} bs={bs} mod={modifier}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn result_is_bitwise_independent_of_block_size() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let (h, kvh, d, ctx, qlen) = (6, 2, 32, 130, 5);
        let q: Vec<f32> = (0..qlen * h * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let k: Vec<f32> = (0..ctx * kvh * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let v: Vec<f32> = (0..ctx * kvh * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mk = |bs| AttnParams {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            block_size: bs,
            scale: 0.2,
            sliding_window: None,
            softcap: None,
            alibi_slopes: None,
        };
        let a = run_paged(&q, &k, &v, ctx, qlen, &mk(1), &mut rng);
        for bs in [16, 64] {
            assert_eq!(a, run_paged(&q, &k, &v, ctx, qlen, &mk(bs), &mut rng), "block size {bs}");
        }
    }
}
