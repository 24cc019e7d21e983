//! Quick speed check:
//! `cargo run --release -p tessera-engine --example speed -- MODEL [THREADS] [QUANTIZE] [STREAMS...]`
//! (`TESSERA_KV_CACHE_DTYPE=f16` for an f16 cache, `SPEED_DECODE=N` tokens per stream,
//! `SPEED_SKIP_SINGLE=1` to skip the single-stream runs). Single stream at prompts 128 and
//! 512, then aggregate decode of STREAMS concurrent requests (64-token prompts).
fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().expect("model path");
    let threads: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(2);
    let quantize: engine::Quantize = args.next().map(|s| s.parse().unwrap()).unwrap_or_default();
    let mut streams: Vec<usize> = args.map(|s| s.parse().unwrap()).collect();
    if streams.is_empty() {
        streams = vec![4, 16, 64];
    }
    let kv_cache_dtype = match std::env::var("TESSERA_KV_CACHE_DTYPE").as_deref() {
        Ok("f16") => engine::KvDtype::F16,
        _ => engine::KvDtype::F32,
    };
    let decode: usize = std::env::var("SPEED_DECODE").ok().and_then(|s| s.parse().ok()).unwrap_or(128);
    let h = engine::Engine::start(engine::EngineConfig { model: model.into(), threads, quantize, kv_cache_dtype, ..Default::default() }).unwrap();
    let ids = h.tokenizer().encode("The GNU General Public License is a free, copyleft license for software and other kinds of works.", false).unwrap();
    let _ = engine::bench::single_stream(&h, &ids, 32, 8).unwrap();
    if std::env::var_os("SPEED_SKIP_SINGLE").is_none() {
        for (p, d) in [(128, 64), (512, 128)] {
            let r = engine::bench::single_stream(&h, &ids, p, d).unwrap();
            println!("{}", serde_json::to_string(&r).unwrap());
        }
    }
    for n in streams {
        let r = engine::bench::concurrent(&h, &ids, n, 64, decode).unwrap();
        println!("{}", serde_json::to_string(&r).unwrap());
    }
}
