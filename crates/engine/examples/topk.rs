//! Top-5 next tokens after a prompt given as token ids in a JSON file entry:
//! `topk MODEL REFERENCE.json NAME [EXTRA_IDS...]`.
fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let l = engine::loader::load(std::path::Path::new(&a[0])).unwrap();
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&a[1]).unwrap()).unwrap();
    let p = j["prompts"].as_array().unwrap().iter().find(|p| p["name"] == a[2].as_str()).unwrap();
    let mut ids: Vec<u32> = p["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    ids.extend(a[3..].iter().map(|s| s.parse::<u32>().unwrap()));
    let pool = engine::threadpool::ThreadPool::new(2);
    let logits = l.model.forward_sequence(&pool, &ids, &[ids.len() - 1], Vec::new());
    for (id, v) in engine::sampler::top_n(&logits, 5) {
        println!("{id} {:?} {v}", l.tokenizer.token_str(id));
    }
}
