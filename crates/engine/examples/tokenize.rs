//! Prints token ids and pieces: `tokenize MODEL TEXT`.
fn main() {
    let mut a = std::env::args().skip(1);
    let model = a.next().expect("model");
    let text = a.next().expect("text");
    let l = engine::loader::load(std::path::Path::new(&model)).unwrap();
    let ids = l.tokenizer.encode(&text, l.tokenizer.add_bos_default()).unwrap();
    for id in &ids {
        print!("{id}:{:?} ", l.tokenizer.token_str(*id));
    }
    println!();
}
