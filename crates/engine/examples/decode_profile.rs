//! Decode-only loop for profiling: `perf record target/release/examples/decode_profile MODEL`.
fn main() {
    let model = std::env::args().nth(1).expect("model path");
    let h = engine::Engine::start(engine::EngineConfig { model: model.into(), threads: 2, ..Default::default() }).unwrap();
    let ids = h.tokenizer().encode("Once upon a time", false).unwrap();
    let r = engine::bench::single_stream(&h, &ids, 16, 400).unwrap();
    println!("{}", serde_json::to_string(&r).unwrap());
}
