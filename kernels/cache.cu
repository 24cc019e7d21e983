// KV-cache write: the step's new K/V rows into their slots of the paged cache.
// Cache layout per layer as on CPU: [slots, num_kv_heads, head_dim]; slot < 0 skips a row.

extern "C" __global__ void reshape_and_cache(const float* __restrict__ k, const float* __restrict__ v,
                                             float* __restrict__ k_cache, float* __restrict__ v_cache,
                                             const int* __restrict__ slot_mapping, int kv_dim) {
    const int slot = slot_mapping[blockIdx.x];
    if (slot < 0) return;
    const size_t src = (size_t)blockIdx.x * kv_dim, dst = (size_t)slot * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
    }
}
