#!/usr/bin/env python3
"""Serving load benchmark: N concurrent streaming chat requests with a fixed max_tokens
against any OpenAI-compatible server (tessera, llama-server, vLLM), reported as JSON.

  python3 benches/serve_load.py --url http://127.0.0.1:8000 --concurrency 1 4 16 64 \
      --requests-per-level 32 --max-tokens 128

For each concurrency level: aggregate generated tokens/s, TTFT p50/p95, inter-token
latency p50/p95 (between streamed content chunks), errors. Each request uses ignore_eos
where the server accepts it, so every request generates exactly max_tokens.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time

import openai

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, in simple words.",
    "List ten ideas for a rainy Sunday afternoon with children.",
    "Describe the water cycle to a ten-year-old.",
    "What are the pros and cons of working from home?",
    "Write a poem about autumn leaves falling in a city park.",
    "How do I make a good cup of tea? Give step-by-step instructions.",
    "Summarize the plot of a detective novel you invent on the spot.",
]


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one(client, model, i, max_tokens, ignore_eos):
    t0 = time.perf_counter()
    first, last, gaps, n = None, None, [], 0
    extra = {"ignore_eos": True} if ignore_eos else {}
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    usage_tokens = None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
            n += 1
    return {
        "ttft": (first or time.perf_counter()) - t0,
        "gaps": gaps,
        "tokens": usage_tokens if usage_tokens is not None else n,
        "end": time.perf_counter(),
    }


async def level(url, key, models, concurrency, total, max_tokens, ignore_eos):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    results, errors = [], []

    async def guarded(i):
        async with sem:
            try:
                results.append(await one(client, models[i % len(models)], i, max_tokens, ignore_eos))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e)[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*(guarded(i) for i in range(total)))
    wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    await client.close()
    return {
        "concurrency": concurrency,
        "requests": total,
        "max_tokens": max_tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p95_s": pct(ttfts, 95),
        "itl_p50_s": pct(gaps, 50),
        "itl_p95_s": pct(gaps, 95),
        "errors": len(errors),
        "error_samples": errors[:3],
    }


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="model name (default: the first listed)")
    ap.add_argument("--models", default=None, help="comma-separated names, cycled over requests (e.g. LoRA adapters)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests-per-level", type=int, default=None, help="default: 2 x concurrency, at least 4")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-ignore-eos", action="store_true")
    a = ap.parse_args()
    models = a.models.split(",") if a.models else ([a.model] if a.model else None)
    if models is None:
        c = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key=a.api_key)
        models = [(await c.models.list()).data[0].id]
        await c.close()
    out = []
    for conc in a.concurrency:
        total = a.requests_per_level or max(4, 2 * conc)
        r = await level(a.url, a.api_key, models, conc, total, a.max_tokens, not a.no_ignore_eos)
        print(json.dumps(r), file=sys.stderr, flush=True)
        out.append(r)
    print(json.dumps({"url": a.url, "models": models, "levels": out}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
