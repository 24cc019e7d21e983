//! Quick speed check: `cargo run --release -p tessera-engine --example speed -- MODEL [THREADS]`.
fn main() {
    let mut args = std::env::args().skip(1);
    let model = args.next().expect("model path");
    let threads: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(2);
    let h = engine::Engine::start(engine::EngineConfig { model: model.into(), threads, max_num_batched_tokens: 512, ..Default::default() }).unwrap();
    let ids = h.tokenizer().encode("The GNU General Public License is a free, copyleft license for software and other kinds of works.", false).unwrap();
    let _ = engine::bench::single_stream(&h, &ids, 32, 8).unwrap();
    for (p, d) in [(128, 64), (512, 128)] {
        let r = engine::bench::single_stream(&h, &ids, p, d).unwrap();
        println!("{}", serde_json::to_string(&r).unwrap());
    }
    for n in [4, 16, 64] {
        let r = engine::bench::concurrent(&h, &ids, n, 64, 64).unwrap();
        println!("{}", serde_json::to_string(&r).unwrap());
    }
}
