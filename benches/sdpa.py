#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention (flash backend) on the prefill shapes that
tessera's `cuda_timings` test times, for scripts/gpu-check. Flash needs fp16/bf16, so
this runs bf16 (tessera's kernel is f32 today: the ratio is stated with that caveat).
Prints one `TIMING {json}` line per shape."""
import json
import time

import torch
import torch.nn.functional as F

SHAPES = [(9, 3, 64), (32, 8, 128)]  # (heads, kv_heads, head_dim), batch 4, ctx 1024, causal


def main():
    dev = torch.device("cuda")
    batch, ctx = 4, 1024
    for heads, kvh, d in SHAPES:
        q = torch.randn(batch, heads, ctx, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(batch, kvh, ctx, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(batch, kvh, ctx, d, device=dev, dtype=torch.bfloat16)
        # GQA: repeat K/V per group (what SDPA's flash path takes on every torch version).
        k = k.repeat_interleave(heads // kvh, dim=1)
        v = v.repeat_interleave(heads // kvh, dim=1)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.cuda.synchronize()
            reps = 20
            t0 = time.perf_counter()
            for _ in range(reps):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.cuda.synchronize()
            t = (time.perf_counter() - t0) / reps
        flops = 4.0 * batch * (ctx * (ctx + 1) / 2) * heads * d
        print("TIMING " + json.dumps({
            "what": "sdpa_flash_bf16", "batch": batch, "ctx": ctx, "heads": heads, "kv_heads": kvh,
            "head_dim": d, "seconds": t, "tflops": flops / t / 1e12,
        }))


if __name__ == "__main__":
    main()
