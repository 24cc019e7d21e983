//! How many long requests run at once at one KV budget, and their aggregate throughput:
//! `long_prompts MODEL [STREAMS] [PROMPT_TOKENS] [DECODE_TOKENS] [KV_BYTES]`.
use std::sync::atomic::Ordering;
fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| a.get(i).map(|s| s.parse().unwrap()).unwrap_or(d);
    let (streams, prompt, decode, kv) = (arg(1, 16), arg(2, 2048), arg(3, 32), arg(4, 512 << 20));
    let cfg = engine::EngineConfig { model: a[0].clone().into(), threads: 2, kv_cache_bytes: kv, max_num_batched_tokens: 512, ..Default::default() };
    let h = engine::Engine::start(cfg).unwrap();
    let ids = h.tokenizer().encode("The GNU General Public License is a free, copyleft license for software and other kinds of works.", false).unwrap();
    let h2 = h.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let watcher = std::thread::spawn(move || {
        let (mut max_running, mut max_usage) = (0, 0f64);
        while !d2.load(Ordering::Relaxed) {
            max_running = max_running.max(h2.stats().num_running.load(Ordering::Relaxed));
            max_usage = max_usage.max(h2.kv_cache_usage());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        (max_running, max_usage)
    });
    let r = engine::bench::concurrent(&h, &ids, streams, prompt, decode).unwrap();
    done.store(true, Ordering::Relaxed);
    let (max_running, max_usage) = watcher.join().unwrap();
    let info = h.info();
    println!(
        "{}",
        serde_json::json!({
            "model": info.name, "kv_cache_bytes": kv, "kv_cache_tokens": info.kv_cache_tokens,
            "streams": streams, "prompt_tokens": prompt, "decode_tokens": decode,
            "tokens_per_s_generated": r.tokens_per_s, "wall_s": r.wall_s,
            "max_running": max_running, "max_kv_usage": max_usage,
            "preemptions": h.stats().num_preemptions_total.load(Ordering::Relaxed),
        })
    );
}
