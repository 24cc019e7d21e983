// Per-token activation quantization for the INT8 and FP8 GEMMs, and their epilogues.
// One block per token row. INT8: scale = amax / 127, codes round(x / scale) ties to even.
// FP8: OCP E4M3 codes of x / scale with scale = amax / 448, as the CPU's f32_to_e4m3.

// max |x| over a row of k, every thread of the block gets it.
__device__ __forceinline__ float row_amax(const float* __restrict__ x, int k) {
    float amax = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(x[i]));
    return block_max(amax);
}

extern "C" __global__ void quantize_int8_rows(const float* __restrict__ x, signed char* __restrict__ q,
                                              float* __restrict__ scale, int k) {
    const size_t row = (size_t)blockIdx.x * k;
    const float amax = row_amax(x + row, k);
    // As quantize_row: an all-zero row has scale 0, a row with inf or NaN a NaN scale and
    // zero codes; a NaN element alone codes 0.
    const bool finite = amax <= 3.402823466e38f;
    const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        const float v = x[row + i] * inv;
        q[row + i] = v != v ? 0 : (signed char)__float2int_rn(fminf(fmaxf(v, -127.f), 127.f));
    }
    if (threadIdx.x == 0) scale[blockIdx.x] = finite ? amax / 127.f : __int_as_float(0x7fc00000);
}

__device__ __forceinline__ unsigned char f32_to_e4m3(float x) {
    if (x != x) return 0x7f;
    const unsigned char sign = (__float_as_uint(x) >> 24) & 0x80;
    const float a = fabsf(x);
    unsigned int code;
    if (a >= 448.f) {
        code = 0x7e;
    } else if (a < 0.015625f) {  // 2^-6: subnormals m * 2^-9
        code = (unsigned int)__float2int_rn(a * 512.f);
    } else {
        const unsigned int bits = __float_as_uint(a);
        const unsigned int r = (bits + 0x7ffffu + ((bits >> 20) & 1u)) >> 20;
        const int e = (int)(r >> 3) - 127 + 7;
        code = min(((unsigned int)e << 3) | (r & 7u), 0x7eu);
    }
    return sign | (unsigned char)code;
}

extern "C" __global__ void quantize_fp8_rows(const float* __restrict__ x, unsigned char* __restrict__ q,
                                             float* __restrict__ scale, int k) {
    const size_t row = (size_t)blockIdx.x * k;
    const float amax = row_amax(x + row, k);
    // x / (amax / 448), as F8Weight::quantize does (IEEE division: NVRTC's default).
    const float s = amax / 448.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) q[row + i] = s > 0.f ? f32_to_e4m3(x[row + i] / s) : 0;
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

// y[r, c] = acc[r, c] * sx[r] * sw[c]: the INT8 GEMM's int32 sums back to f32.
extern "C" __global__ void dequant_i32(const int* __restrict__ acc, const float* __restrict__ sx,
                                       const float* __restrict__ sw, float* __restrict__ y, int n) {
    const size_t row = (size_t)blockIdx.x * n;
    const float s = sx[blockIdx.x];
    for (int c = threadIdx.x; c < n; c += blockDim.x) y[row + c] = (float)acc[row + c] * s * sw[c];
}

// y[r, c] *= sx[r] * sw[c]: per-token and per-channel scales after an FP8 GEMM.
extern "C" __global__ void scale_rows_cols(float* __restrict__ y, const float* __restrict__ sx,
                                           const float* __restrict__ sw, int n) {
    const size_t row = (size_t)blockIdx.x * n;
    const float s = sx[blockIdx.x];
    for (int c = threadIdx.x; c < n; c += blockDim.x) y[row + c] *= s * sw[c];
}

// bf16 bits of x, round to nearest even (NaN stays NaN): activations for the bf16 GEMM.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, unsigned short* __restrict__ y, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const unsigned int b = __float_as_uint(x[i]);
        y[i] = (b & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((b >> 16) | 0x40u)
                                               : (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
}

// y[r, c] += bias[c].
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ bias, int n) {
    const size_t row = (size_t)blockIdx.x * n;
    for (int c = threadIdx.x; c < n; c += blockDim.x) y[row + c] += bias[c];
}
