// Gated activations in place: gate[i] = act(gate[i]) * up[i].

extern "C" __global__ void silu_mul(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.f + expf(-g)) * up[i];
    }
}

// GeGLU with the tanh approximation of GELU (Gemma).
extern "C" __global__ void gelu_tanh_mul(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    const float C = 0.7978845608f;  // sqrt(2/pi)
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = gate[i];
        gate[i] = 0.5f * x * (1.f + tanhf(C * (x + 0.044715f * x * x * x))) * up[i];
    }
}

// x = cap * tanh(x / cap): Gemma 2's final logit soft-cap.
extern "C" __global__ void softcap(float* __restrict__ x, float cap, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = cap * tanhf(x[i] / cap);
}
