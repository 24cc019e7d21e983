// Paged flash attention for MHA, GQA and MQA: prefill chunks of any length and decode
// rows in one kernel, with a split over the key range for long contexts.
//
//   q:      [tokens, num_heads * D]        (a sequence's queries are rows query_start ..)
//   cache:  [slots, num_kv_heads, D]       key j of sequence s sits in slot
//           block_tables[s][j / block_size] * block_size + j % block_size
//   a sequence's queries sit at positions context_len - query_len .. context_len - 1
//
// Grid: (tiles, num_kv_heads, partitions). A tile is up to MAX_ROWS (query, head) rows
// of one sequence that share a KV head: the query heads of a GQA/MQA group, and as many
// consecutive queries as fit, so each K/V tile loaded into shared memory serves them all.
// tiles[i] = {seq, first query, queries, first head within the group, heads}.
// Partition p covers key positions [p * partition_size, (p + 1) * partition_size); with
// one partition the kernel writes `out`, else unnormalized partial sums plus (max, sum)
// per row, and attention_reduce merges them.
//
// Score modifiers (the kernel contract of DESIGN.md): causal always; window > 0 limits a
// query at p to keys p - window + 1 ..= p; softcap > 0 applies cap * tanh(s / cap) after
// scaling; alibi (may be null) adds alibi[head] * (key_pos - query_pos).
//
// One warp per row (two rows per warp at most): lane j scores key j of the 32-key tile,
// an online softmax runs over tiles, and lane l accumulates output dims l, l + 32, ...
// Shared memory: q rows [MAX_ROWS, D], K tile [32, D + 1] (padded: no bank conflicts when
// lanes read different keys), V tile [32, D]. D <= 256.

#define MAX_ROWS 16
#define WARPS 8
#define KEYS 32
#define MAX_D 256

extern "C" __global__ void __launch_bounds__(WARPS * 32)
paged_attention(const float* __restrict__ q, const float* __restrict__ k_cache, const float* __restrict__ v_cache,
                const int* __restrict__ tiles, const int* __restrict__ query_start,
                const int* __restrict__ query_len, const int* __restrict__ context_len,
                const int* __restrict__ block_tables, int max_blocks, int num_heads, int num_kv_heads,
                int head_dim, int block_size, float scale, int window, float softcap,
                const float* __restrict__ alibi, int partition_size, int num_partitions,
                float* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml) {
    extern __shared__ float smem[];
    const int D = head_dim;
    const int* tile = tiles + blockIdx.x * 5;
    const int s = tile[0], q0 = tile[1], nq = tile[2], h0 = tile[3], nh = tile[4];
    const int g = blockIdx.y, part = blockIdx.z;
    const int group = num_heads / num_kv_heads;
    const int nrows = nq * nh;
    const int qs = query_start[s];
    const int first_pos = context_len[s] - query_len[s];
    const int* table = block_tables + (size_t)s * max_blocks;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    float* qsm = smem;
    float* ksm = qsm + MAX_ROWS * D;
    float* vsm = ksm + KEYS * (D + 1);

    for (int i = threadIdx.x; i < nrows * D; i += blockDim.x) {
        const int r = i / D, d = i % D;
        const int t = qs + q0 + r / nh, h = g * group + h0 + r % nh;
        qsm[i] = q[((size_t)t * num_heads + h) * D + d];
    }

    // Keys any row of the tile may see, cut to this partition.
    const int last_pos = first_pos + q0 + nq - 1;
    int k_lo = window > 0 ? max(0, first_pos + q0 + 1 - window) : 0;
    int k_hi = last_pos + 1;
    k_lo = max(k_lo, part * partition_size);
    k_hi = min(k_hi, (part + 1) * partition_size);

    float acc[2][MAX_D / 32];
    float m[2], l[2];
#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        m[ri] = NEG_INF;
        l[ri] = 0.f;
#pragma unroll
        for (int c = 0; c < MAX_D / 32; c++) acc[ri][c] = 0.f;
    }
    __syncthreads();

    for (int kt = k_lo; kt < k_hi; kt += KEYS) {
        const int n = min(KEYS, k_hi - kt);
        for (int i = threadIdx.x; i < n * D; i += blockDim.x) {
            const int j = i / D, d = i % D, kp = kt + j;
            const size_t slot = (size_t)table[kp / block_size] * block_size + kp % block_size;
            const size_t off = (slot * num_kv_heads + g) * D + d;
            ksm[j * (D + 1) + d] = k_cache[off];
            vsm[j * D + d] = v_cache[off];
        }
        __syncthreads();
#pragma unroll
        for (int ri = 0; ri < 2; ri++) {
            const int r = warp + ri * WARPS;
            if (r >= nrows) break;
            const int pos = first_pos + q0 + r / nh;
            const int h = g * group + h0 + r % nh;
            const int row_lo = window > 0 ? max(0, pos + 1 - window) : 0;
            const int kp = kt + lane;
            float sc = NEG_INF;
            if (lane < n && kp <= pos && kp >= row_lo) {
                const float* qr = qsm + r * D;
                const float* kr = ksm + lane * (D + 1);
                float dot = 0.f;
                for (int d = 0; d < D; d++) dot += qr[d] * kr[d];
                sc = dot * scale;
                if (softcap > 0.f) sc = softcap * tanhf(sc / softcap);
                if (alibi) sc += alibi[h] * (float)(kp - pos);
            }
            const float new_m = fmaxf(m[ri], warp_max(sc));
            if (new_m == NEG_INF) continue;  // every key of this tile is masked for the row
            const float corr = m[ri] == NEG_INF ? 0.f : expf(m[ri] - new_m);
            const float p = sc == NEG_INF ? 0.f : expf(sc - new_m);
            l[ri] = l[ri] * corr + warp_sum(p);
            m[ri] = new_m;
#pragma unroll
            for (int c = 0; c < MAX_D / 32; c++) acc[ri][c] *= corr;
            for (int j = 0; j < n; j++) {
                const float pj = __shfl_sync(FULL_MASK, p, j);
                const float* vr = vsm + j * D;
#pragma unroll
                for (int c = 0; c < MAX_D / 32; c++) {
                    const int d = lane + 32 * c;
                    if (d < D) acc[ri][c] += pj * vr[d];
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        const int r = warp + ri * WARPS;
        if (r >= nrows) break;
        const size_t t = (size_t)qs + q0 + r / nh;
        const int h = g * group + h0 + r % nh;
        if (num_partitions == 1) {
            const float inv = l[ri] > 0.f ? 1.f / l[ri] : 0.f;
            float* o = out + (t * num_heads + h) * D;
#pragma unroll
            for (int c = 0; c < MAX_D / 32; c++) {
                const int d = lane + 32 * c;
                if (d < D) o[d] = acc[ri][c] * inv;
            }
        } else {
            const size_t pr = (t * num_heads + h) * num_partitions + part;
            float* o = part_o + pr * D;
#pragma unroll
            for (int c = 0; c < MAX_D / 32; c++) {
                const int d = lane + 32 * c;
                if (d < D) o[d] = acc[ri][c];
            }
            if (lane == 0) {
                part_ml[pr * 2] = m[ri];
                part_ml[pr * 2 + 1] = l[ri];
            }
        }
    }
}

// Merges the partitions of each (token, head): grid (tokens, num_heads), D threads.
extern "C" __global__ void attention_reduce(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                            float* __restrict__ out, int num_heads, int head_dim,
                                            int num_partitions) {
    const size_t row = (size_t)blockIdx.x * num_heads + blockIdx.y;
    const float* ml = part_ml + row * num_partitions * 2;
    float mx = NEG_INF;
    for (int p = 0; p < num_partitions; p++) mx = fmaxf(mx, ml[2 * p]);
    float den = 0.f;
    for (int p = 0; p < num_partitions; p++)
        if (ml[2 * p] != NEG_INF) den += ml[2 * p + 1] * expf(ml[2 * p] - mx);
    const float inv = den > 0.f ? 1.f / den : 0.f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int p = 0; p < num_partitions; p++)
            if (ml[2 * p] != NEG_INF) o += part_o[(row * num_partitions + p) * head_dim + d] * expf(ml[2 * p] - mx);
        out[row * head_dim + d] = o * inv;
    }
}
