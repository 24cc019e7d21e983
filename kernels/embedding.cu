// Embedding gather: out[t] = table[ids[t]] * scale (Gemma scales by sqrt(hidden); 1 else).
// Token ids are checked against the vocabulary on the host before they get here.

extern "C" __global__ void embedding(const float* __restrict__ table, const int* __restrict__ ids,
                                     float* __restrict__ out, int dim, float scale) {
    const size_t src = (size_t)ids[blockIdx.x] * dim, dst = (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[dst + i] = table[src + i] * scale;
}
