// Rotary position embedding in place on [tokens, heads * head_dim], from the same
// cos/sin tables as the CPU path ([max_pos, half], attention factor folded in).
// interleaved != 0: pairs (2i, 2i+1) (GGUF llama weights); else halves (i, i + half).

extern "C" __global__ void rope(float* __restrict__ x, const int* __restrict__ positions,
                                const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                int num_heads, int head_dim, int half, int interleaved) {
    const int t = blockIdx.x;
    const int pos = positions[t];
    float* row = x + (size_t)t * num_heads * head_dim;
    const float* c = cos_t + (size_t)pos * half;
    const float* s = sin_t + (size_t)pos * half;
    for (int j = threadIdx.x; j < num_heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        float* head = row + h * head_dim;
        const int ia = interleaved ? 2 * i : i;
        const int ib = interleaved ? 2 * i + 1 : i + half;
        const float a = head[ia], b = head[ib];
        head[ia] = a * c[i] - b * s[i];
        head[ib] = a * s[i] + b * c[i];
    }
}
