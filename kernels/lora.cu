// LoRA over row segments of the packed batch (Punica SGMV semantics): each segment is a
// run of rows that use one adapter slot. The step's slot tables hold, per slot and per
// site (layer * 7 + module), the device address of the adapter's weights, its rank
// (0: this adapter leaves the site alone) and scale:
//   A: [rank, in]   Bt: [rank, out] (B transposed)     entry = slot * sites + site
// shrink:  t[row, j]  = scale * x[row] . A[j]          (j < rank)
// expand:  y[row, c] += sum_j t[row, j] * Bt[j, c]

extern "C" __global__ void lora_shrink(const float* __restrict__ x, int in_dim,
                                       const int* __restrict__ seg_start, const int* __restrict__ seg_len,
                                       const int* __restrict__ seg_slot,
                                       const unsigned long long* __restrict__ a_ptrs,
                                       const int* __restrict__ ranks, const float* __restrict__ scales,
                                       int site, int sites, float* __restrict__ t, int max_rank) {
    const int seg = blockIdx.x, j = blockIdx.y;
    const int e = seg_slot[seg] * sites + site;
    if (j >= ranks[e]) return;
    const float* a = (const float*)a_ptrs[e] + (size_t)j * in_dim;
    const float scale = scales[e];
    for (int r = seg_start[seg]; r < seg_start[seg] + seg_len[seg]; r++) {
        const float* xr = x + (size_t)r * in_dim;
        float s = 0.f;
        for (int i = threadIdx.x; i < in_dim; i += blockDim.x) s += xr[i] * a[i];
        s = block_sum(s);
        if (threadIdx.x == 0) t[(size_t)r * max_rank + j] = scale * s;
    }
}

extern "C" __global__ void lora_expand(const float* __restrict__ t, int max_rank,
                                       const int* __restrict__ seg_start, const int* __restrict__ seg_len,
                                       const int* __restrict__ seg_slot,
                                       const unsigned long long* __restrict__ bt_ptrs,
                                       const int* __restrict__ ranks, int site, int sites,
                                       float* __restrict__ y, int out_dim) {
    const int seg = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= out_dim) return;
    const int e = seg_slot[seg] * sites + site;
    const int rank = ranks[e];
    if (rank == 0) return;
    const float* bt = (const float*)bt_ptrs[e];
    for (int r = seg_start[seg]; r < seg_start[seg] + seg_len[seg]; r++) {
        const float* tr = t + (size_t)r * max_rank;
        float acc = y[(size_t)r * out_dim + c];
        for (int j = 0; j < rank; j++) acc += tr[j] * bt[(size_t)j * out_dim + c];
        y[(size_t)r * out_dim + c] = acc;
    }
}
