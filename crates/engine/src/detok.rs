//! Incremental detokenization: token ids in, completed UTF-8 text out.
//!
//! A token may end in the middle of a multi-byte character (byte-level BPE splits emoji
//! and CJK characters over several tokens), so the decoder keeps the bytes of an
//! incomplete trailing character until the next token completes it. Bytes that can never
//! form a character become U+FFFD exactly as [`String::from_utf8_lossy`] would replace
//! them, so the concatenated output of [`IncrementalDecoder::push`] and
//! [`IncrementalDecoder::flush`] equals [`Tokenizer::decode`] for byte-level vocabularies.

use crate::tokenizer::Tokenizer;

/// Per-request streaming detokenizer.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    skip_special: bool,
    /// Bytes of an incomplete trailing UTF-8 sequence (at most 3).
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// `skip_special` drops control tokens (e.g. `<|im_end|>`) from the text.
    pub fn new(skip_special: bool) -> Self {
        IncrementalDecoder { skip_special, pending: Vec::new() }
    }

    /// Adds token `id` and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if self.skip_special && tok.is_special(id) {
            return String::new();
        }
        self.pending.extend_from_slice(tok.token_bytes(id));
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by construction; the lossy call never replaces.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // Bytes that no continuation can repair.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // An incomplete sequence at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Returns whatever is held back (an incomplete character becomes U+FFFD) and resets.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::{golden_prompts, smollm};

    fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
        let mut d = IncrementalDecoder::new(skip_special);
        let mut parts: Vec<String> = ids.iter().map(|&id| d.push(tok, id)).collect();
        parts.push(d.flush());
        parts
    }

    #[test]
    fn emoji_split_over_tokens_is_never_emitted_by_halves() {
        let tok = smollm();
        let text = "emoji 🦀🚀 and 日本語";
        let ids = tok.encode(text, false).unwrap();
        // The fixture shows these characters span several byte-level tokens.
        assert!(ids.iter().any(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err()));
        let parts = stream(tok, &ids, false);
        for p in &parts {
            assert!(!p.contains(char::REPLACEMENT_CHARACTER), "{parts:?}");
        }
        assert_eq!(parts.concat(), text);
        assert_eq!(parts.last().map(String::as_str), Some(""));
    }

    #[test]
    fn pushes_concatenate_to_decode_of_generated_ids() {
        let tok = smollm();
        for p in golden_prompts() {
            let ids: Vec<u32> =
                p["generated_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            for skip in [false, true] {
                assert_eq!(stream(tok, &ids, skip).concat(), tok.decode(&ids, skip).unwrap(), "{}", p["name"]);
            }
            assert_eq!(stream(tok, &ids, true).concat(), p["generated_text_skip_special"].as_str().unwrap());
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_chars_like_lossy_decoding() {
        let tok = smollm();
        // A lone UTF-8 lead byte followed by ASCII: invalid at once, not held back.
        let lead = (0..tok.vocab_size() as u32).find(|&id| tok.token_bytes(id) == [0xF0]).unwrap();
        let hello = tok.encode("Hello", false).unwrap();
        let ids = [vec![lead], hello.clone(), vec![lead]].concat();
        let mut d = IncrementalDecoder::new(false);
        assert_eq!(d.push(tok, lead), "");
        assert!(d.has_pending());
        assert_eq!(d.push(tok, hello[0]), "\u{FFFD}Hello");
        assert_eq!(d.push(tok, lead), "");
        assert_eq!(d.flush(), "\u{FFFD}");
        assert!(!d.has_pending());
        assert_eq!(tok.decode(&ids, false).unwrap(), "\u{FFFD}Hello\u{FFFD}");
    }

    #[test]
    fn special_tokens_are_skipped_when_asked() {
        let tok = smollm();
        let mut d = IncrementalDecoder::new(true);
        assert_eq!(d.push(tok, 2), "");
        let mut keep = IncrementalDecoder::new(false);
        assert_eq!(keep.push(tok, 2), "<|im_end|>");
        assert_eq!(d.push(tok, u32::MAX), "", "unknown ids add nothing");
    }
}
