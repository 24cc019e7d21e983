//! Profiling loop: `perf record target/release/examples/decode_profile MODEL PROMPT DECODE`.
fn main() {
    let mut a = std::env::args().skip(1);
    let model = a.next().expect("model path");
    let prompt: usize = a.next().map(|s| s.parse().unwrap()).unwrap_or(16);
    let decode: usize = a.next().map(|s| s.parse().unwrap()).unwrap_or(400);
    let h = engine::Engine::start(engine::EngineConfig { model: model.into(), threads: 2, max_num_batched_tokens: 512, ..Default::default() }).unwrap();
    let ids = h.tokenizer().encode("Once upon a time, in a land far away, there lived a", false).unwrap();
    for _ in 0..3 {
        let r = engine::bench::single_stream(&h, &ids, prompt, decode).unwrap();
        println!("{}", serde_json::to_string(&r).unwrap());
    }
}
