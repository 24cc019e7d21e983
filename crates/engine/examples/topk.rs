//! Top-5 next tokens after a prompt given as token ids in a JSON file entry:
//! `topk MODEL REFERENCE.json NAME [EXTRA_IDS...]`.
use engine::kv_cache::{KvCache, KvLayout};
use engine::model::{BatchInput, SeqInput};
fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let l = engine::loader::load(std::path::Path::new(&a[0])).unwrap();
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&a[1]).unwrap()).unwrap();
    let p = j["prompts"].as_array().unwrap().iter().find(|p| p["name"] == a[2].as_str()).unwrap();
    let mut ids: Vec<u32> = p["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    ids.extend(a[3..].iter().map(|s| s.parse::<u32>().unwrap()));
    let c = &l.model.config;
    let nb = ids.len().div_ceil(16);
    let mut cache = KvCache::new(KvLayout { num_layers: c.num_layers, num_blocks: nb, block_size: 16, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim });
    let table: Vec<u32> = (0..nb as u32).collect();
    let pos: Vec<usize> = (0..ids.len()).collect();
    let batch = BatchInput {
        token_ids: &ids,
        positions: &pos,
        seqs: vec![SeqInput { query_start: 0, query_len: ids.len(), context_len: ids.len(), block_table: &table, window_block_table: None }],
        slot_mapping: &pos,
        window_slot_mapping: None,
        logits_rows: &[ids.len() - 1],
        lora: Vec::new(),
    };
    let pool = engine::threadpool::ThreadPool::new(2);
    let logits = l.model.forward(&pool, &batch, &mut cache);
    for (id, v) in engine::sampler::top_n(&logits, 5) {
        println!("{id} {:?} {v}", l.tokenizer.token_str(id));
    }
}
