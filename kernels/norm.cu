// RMSNorm, alone and fused with the residual add. One block per token row.
// out[t] = x[t] / rms(x[t]) * (w + offset); offset is 0 for Llama, 1 for Gemma.

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int dim, float eps, float offset) {
    const size_t row = (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = x[row + i];
        ss += v * v;
    }
    const float scale = rsqrtf(block_sum(ss) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[row + i] = x[row + i] * scale * (w[i] + offset);
}

// residual[t] += x[t]; out[t] = rms_norm(residual[t]).
extern "C" __global__ void add_rms_norm(float* __restrict__ residual, const float* __restrict__ x,
                                        const float* __restrict__ w, float* __restrict__ out, int dim,
                                        float eps, float offset) {
    const size_t row = (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = residual[row + i] + x[row + i];
        residual[row + i] = v;
        ss += v * v;
    }
    const float scale = rsqrtf(block_sum(ss) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[row + i] = residual[row + i] * scale * (w[i] + offset);
}
