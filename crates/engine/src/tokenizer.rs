//! Text <-> token ids, built on the `tokenizers` crate from GGUF metadata or a Hugging Face
//! folder.
//!
//! Two vocabulary families are read from GGUF (`tokenizer.ggml.model`):
//!
//! - `gpt2`: byte-level BPE from `tokens` + `merges`; `tokenizer.ggml.pre` picks the
//!   pre-tokenizer split rules the way llama.cpp does (an unknown value is refused, never
//!   guessed).
//! - `llama`: SentencePiece BPE with byte fallback, from `tokens` + `scores`; merges are
//!   derived from the scores as Hugging Face's `LlamaConverter` does.
//!
//! Control tokens (type 3) are special added tokens and user-defined tokens (type 4) plain
//! added tokens: both are recognised when written in the text, so `"<|im_start|>"` encodes
//! to its id. [`Tokenizer::token_bytes`] gives the raw bytes each id stands for, which is
//! what incremental detokenization ([`crate::detok`]) concatenates.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::Value as Json;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::{EngineError, Result};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Texts of special tokens that end a turn in common chat formats; a model that declares
/// one of them as a special token stops on it as well as on its EOS (as llama.cpp does).
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// Llama 3 (`llama-bpe`) split regex, as in its `tokenizer.json`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 split regex, as in its `tokenizer.json` (single digits).
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tok_err(e: impl fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// How a vocabulary entry's text maps to the bytes it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceStyle {
    /// GPT-2 byte-to-unicode alphabet (`Ġworld` -> `b" world"`).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xAB>` is one raw byte.
    SentencePiece,
    /// The text is the bytes.
    Plain,
}

/// Kind of an added (in-text recognised) token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Added {
    No,
    /// Recognised in text, kept by `decode(skip_special = true)`.
    UserDefined,
    /// Recognised in text, dropped by `decode(skip_special = true)`.
    Special,
}

/// A loaded tokenizer: encoding, decoding and per-token bytes. `Send + Sync`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Raw bytes of every id (added tokens: their text).
    pieces: Vec<Vec<u8>>,
    special: Vec<bool>,
    style: PieceStyle,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.pieces.len())
            .field("style", &self.style)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Tokenizer facts read from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`),
/// kept apart from building so that tests can feed altered values.
#[derive(Clone, Debug, Default)]
pub(crate) struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// Empty when the file has no `token_type` (every token is then normal).
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub scores: Vec<f32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub eot_id: Option<u32>,
    pub eom_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

fn meta_int(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        Value::Bool(x) => Some(i64::from(*x)),
        _ => None,
    }
}

impl GgufVocab {
    /// Reads the tokenizer keys of a GGUF file's metadata.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let load = |msg: String| EngineError::Load(msg);
        let string = |key: &str| -> Result<Option<String>> {
            match md.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(load(format!("GGUF key {key} should be a string, found {:?}", v.value_type()))),
            }
        };
        let id = |key: &str| -> Option<u32> { md.get(key).and_then(meta_int).and_then(|x| u32::try_from(x).ok()) };
        let flag = |key: &str| -> Option<bool> { md.get(key).and_then(meta_int).map(|x| x != 0) };
        let array = |key: &str| -> Result<Option<&Vec<Value>>> {
            match md.get(key) {
                None => Ok(None),
                Some(Value::Array(a)) => Ok(Some(a)),
                Some(v) => Err(load(format!("GGUF key {key} should be an array, found {:?}", v.value_type()))),
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            let Some(a) = array(key)? else { return Ok(Vec::new()) };
            a.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(load(format!("GGUF key {key}: element {i} is not a string"))),
                })
                .collect()
        };
        let model = string("tokenizer.ggml.model")?
            .ok_or_else(|| load("GGUF has no tokenizer (tokenizer.ggml.model is missing)".into()))?;
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(load("GGUF has no tokenizer.ggml.tokens".into()));
        }
        let token_types = match array("tokenizer.ggml.token_type")? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| meta_int(v).and_then(|x| i32::try_from(x).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| load("GGUF tokenizer.ggml.token_type holds a non-integer".into()))?,
        };
        let scores = match array("tokenizer.ggml.scores")? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| v.to_f32().ok())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| load("GGUF tokenizer.ggml.scores holds a non-f32 value".into()))?,
        };
        Ok(GgufVocab {
            model,
            pre: string("tokenizer.ggml.pre")?,
            tokens,
            token_types,
            merges: strings("tokenizer.ggml.merges")?,
            scores,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            eot_id: id("tokenizer.ggml.eot_token_id"),
            eom_id: id("tokenizer.ggml.eom_token_id"),
            add_bos: flag("tokenizer.ggml.add_bos_token"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
            chat_template: string("tokenizer.chat_template")?,
        })
    }

    fn token_type(&self, id: usize) -> i32 {
        self.token_types.get(id).copied().unwrap_or(1)
    }

    fn added_kind(&self, id: usize) -> Added {
        match self.token_type(id) {
            TOKEN_TYPE_CONTROL => Added::Special,
            TOKEN_TYPE_USER_DEFINED => Added::UserDefined,
            _ => Added::No,
        }
    }

    /// Token text -> id; the first id wins when a text appears twice.
    fn vocab(&self) -> Vocab {
        let mut vocab = Vocab::default();
        for (i, t) in self.tokens.iter().enumerate().rev() {
            vocab.insert(t.clone(), i as u32);
        }
        vocab
    }
}

/// The pre-tokenizer llama.cpp applies for a byte-level vocabulary's `tokenizer.ggml.pre`,
/// and whether whole pre-tokens found in the vocabulary skip merging (`ignore_merges`).
fn byte_level_pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex);
    let split = |regex: &str| {
        Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| EngineError::Load(format!("pre-tokenizer regex for {pre:?}: {e}")))
    };
    Ok(match pre {
        "gpt-2" | "default" => (byte_level(true).into(), false),
        "smollm" | "starcoder" | "refact" => {
            let seq = PreSequence::new(vec![Digits::new(true).into(), byte_level(true).into()]);
            (seq.into(), false)
        }
        "llama-bpe" | "llama3" | "llama-v3" => {
            let seq = PreSequence::new(vec![split(LLAMA3_REGEX)?.into(), byte_level(false).into()]);
            (seq.into(), true)
        }
        "qwen2" => {
            let seq = PreSequence::new(vec![split(QWEN2_REGEX)?.into(), byte_level(false).into()]);
            (seq.into(), false)
        }
        other => {
            return Err(EngineError::Load(format!(
                "unsupported tokenizer.ggml.pre {other:?} (supported: smollm, starcoder, refact, \
                 gpt-2, default, llama-bpe, llama3, llama-v3, qwen2)"
            )))
        }
    })
}

/// Splits a GGUF merge line "a b" at its first space after the first character.
fn split_merge(line: &str) -> Option<(String, String)> {
    let first = line.chars().next()?.len_utf8();
    let pos = line[first..].find(' ')? + first;
    Some((line[..pos].to_string(), line[pos + 1..].to_string()))
}

/// Merges for a SentencePiece vocabulary: every split of a token into two tokens, ordered by
/// the merged token's score (highest first), then by the ids of the parts; this is Hugging
/// Face's `SentencePieceExtractor`, which reproduces SentencePiece's BPE.
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Merges {
    let mut ranked: Vec<(f32, u32, u32, usize, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local = Vec::new();
        for (pos, _) in tok.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&tok[..pos]), vocab.get(&tok[pos..])) {
                local.push((score, l, r, id, pos));
            }
        }
        local.sort_by_key(|&(_, l, r, _, _)| (l, r));
        ranked.extend(local);
    }
    // Stable: ties keep token order, as the Python sort does.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked
        .into_iter()
        .map(|(_, _, _, id, pos)| (tokens[id][..pos].to_string(), tokens[id][pos..].to_string()))
        .collect()
}

/// GPT-2's byte-to-unicode table inverted: the byte each printable stand-in char denotes.
fn byte_level_chars() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
}

/// `<0xAB>` -> 0xAB.
fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The bytes one vocabulary entry stands for.
fn piece_bytes(style: PieceStyle, text: &str, added: Added, chars: &HashMap<char, u8>) -> Vec<u8> {
    if added != Added::No {
        return text.as_bytes().to_vec();
    }
    match style {
        // Like the ByteLevel decoder: a text outside the alphabet is taken verbatim.
        PieceStyle::ByteLevel => text
            .chars()
            .map(|c| chars.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| text.as_bytes().to_vec()),
        PieceStyle::SentencePiece => match byte_token(text) {
            Some(b) => vec![b],
            None => text.replace('\u{2581}', " ").into_bytes(),
        },
        PieceStyle::Plain => text.as_bytes().to_vec(),
    }
}

fn added_tokens(texts: &[String], kinds: &[Added]) -> Vec<AddedToken> {
    texts
        .iter()
        .zip(kinds)
        .filter(|(t, k)| **k != Added::No && !t.is_empty())
        .map(|(t, k)| AddedToken::from(t.clone(), *k == Added::Special).normalized(false))
        .collect()
}

/// Ids of the end-of-generation tokens: `first` (EOS and the like) then declared
/// end-of-turn special tokens, without duplicates.
fn end_ids(first: impl IntoIterator<Item = u32>, inner: &tokenizers::Tokenizer, special: &[bool]) -> Vec<u32> {
    let mut ids: Vec<u32> = Vec::new();
    let by_name = END_OF_TURN_TOKENS.iter().filter_map(|t| inner.token_to_id(t));
    for id in first.into_iter().chain(by_name.filter(|&id| special.get(id as usize) == Some(&true))) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file declares in its metadata.
    pub fn from_gguf(content: &Content) -> Result<Tokenizer> {
        Self::from_gguf_vocab(GgufVocab::from_metadata(&content.metadata)?)
    }

    pub(crate) fn from_gguf_vocab(v: GgufVocab) -> Result<Tokenizer> {
        let n = v.tokens.len();
        if !v.token_types.is_empty() && v.token_types.len() != n {
            return Err(EngineError::Load(format!("GGUF has {n} tokens but {} token types", v.token_types.len())));
        }
        for (key, id) in [("bos", v.bos_id), ("eos", v.eos_id), ("unknown", v.unk_id)] {
            if id.is_some_and(|id| id as usize >= n) {
                return Err(EngineError::Load(format!(
                    "GGUF {key}_token_id {id:?} is outside the {n}-token vocabulary"
                )));
            }
        }
        let kinds: Vec<Added> = (0..n).map(|i| v.added_kind(i)).collect();
        let (inner, style, add_bos_default) = match v.model.as_str() {
            "gpt2" => Self::gguf_byte_level(&v, &kinds)?,
            "llama" => Self::gguf_sentencepiece(&v, &kinds)?,
            other => {
                return Err(EngineError::Load(format!(
                    "unsupported tokenizer.ggml.model {other:?} (supported: gpt2, llama)"
                )))
            }
        };
        let chars = byte_level_chars();
        let pieces = v.tokens.iter().zip(&kinds).map(|(t, k)| piece_bytes(style, t, *k, &chars)).collect();
        let special: Vec<bool> = kinds.iter().map(|k| *k == Added::Special).collect();
        let eos = end_ids(v.eos_id.into_iter().chain(v.eot_id).chain(v.eom_id), &inner, &special);
        Ok(Tokenizer {
            inner,
            pieces,
            special,
            style,
            bos: v.bos_id,
            eos,
            add_bos: v.add_bos.unwrap_or(add_bos_default),
            chat_template: v.chat_template,
        })
    }

    /// `gpt2`: byte-level BPE. Returns the tokenizer, its piece style and the BOS default.
    fn gguf_byte_level(v: &GgufVocab, kinds: &[Added]) -> Result<(tokenizers::Tokenizer, PieceStyle, bool)> {
        let pre = v.pre.as_deref().unwrap_or_else(|| {
            tracing::warn!("GGUF has no tokenizer.ggml.pre; using the plain GPT-2 split");
            "default"
        });
        let (pre_tokenizer, ignore_merges) = byte_level_pre_tokenizer(pre)?;
        let merges = v
            .merges
            .iter()
            .map(|m| split_merge(m).ok_or_else(|| EngineError::Load(format!("malformed GGUF merge {m:?}"))))
            .collect::<Result<Merges>>()?;
        if merges.is_empty() {
            return Err(EngineError::Load("GGUF gpt2 tokenizer has no tokenizer.ggml.merges".into()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(v.vocab(), merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| EngineError::Load(format!("building the BPE model: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.add_tokens(&added_tokens(&v.tokens, kinds));
        let add_bos_default = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
        Ok((inner, PieceStyle::ByteLevel, add_bos_default))
    }

    /// `llama`: SentencePiece BPE with byte fallback, merges derived from the scores.
    fn gguf_sentencepiece(v: &GgufVocab, kinds: &[Added]) -> Result<(tokenizers::Tokenizer, PieceStyle, bool)> {
        if v.scores.len() != v.tokens.len() {
            return Err(EngineError::Load(format!(
                "GGUF llama tokenizer has {} tokens but {} scores",
                v.tokens.len(),
                v.scores.len()
            )));
        }
        let vocab = v.vocab();
        let merges = merges_from_scores(&v.tokens, &v.scores, &vocab);
        let unk = v
            .unk_id
            .or_else(|| (0..v.tokens.len()).find(|&i| v.token_type(i) == TOKEN_TYPE_UNKNOWN).map(|i| i as u32))
            .and_then(|id| v.tokens.get(id as usize).cloned());
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder.build().map_err(|e| EngineError::Load(format!("building the BPE model: {e}")))?;
        let space = |e| EngineError::Load(format!("SentencePiece normalizer: {e}"));
        let replace = Replace::new(" ", "\u{2581}").map_err(space)?;
        let prefix = v.add_space_prefix.unwrap_or(true);
        let mut inner = tokenizers::Tokenizer::new(bpe);
        if prefix {
            let prepend = Prepend::new("\u{2581}".to_string());
            inner.with_normalizer(Some(NormalizerSequence::new(vec![prepend.into(), replace.into()])));
        } else {
            inner.with_normalizer(Some(replace));
        }
        let mut decoders: Vec<DecoderWrapper> =
            vec![Replace::new("\u{2581}", " ").map_err(space)?.into(), ByteFallback::new().into(), Fuse::new().into()];
        if prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        inner.with_decoder(Some(DecoderSequence::new(decoders)));
        inner.add_tokens(&added_tokens(&v.tokens, kinds));
        Ok((inner, PieceStyle::SentencePiece, true))
    }

    /// Sets the chat template (for models whose files carry none).
    pub fn set_chat_template(&mut self, template: String) {
        self.chat_template = Some(template);
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` (to export a GGUF model's
    /// tokenizer into a model folder).
    pub fn to_tokenizer_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| EngineError::Tokenizer(format!("serializing the tokenizer: {e}")))
    }

    /// Loads `tokenizer.json` from a Hugging Face model folder, with `tokenizer_config.json`
    /// (chat template, BOS/EOS, `add_bos_token`), `chat_template.jinja` and the EOS ids of
    /// `generation_config.json` where present.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let read_json = |name: &str| -> Result<Option<Json>> {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path)
                .map_err(|e| EngineError::Load(format!("reading {}: {e}", path.display())))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| EngineError::Load(format!("parsing {}: {e}", path.display())))
        };
        let tok_path = dir.join("tokenizer.json");
        let tok_json = read_json("tokenizer.json")?
            .ok_or_else(|| EngineError::Load(format!("{} not found", tok_path.display())))?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(tok_json.clone())
            .map_err(|e| EngineError::Load(format!("loading {}: {e}", tok_path.display())))?;
        let config = read_json("tokenizer_config.json")?.unwrap_or(Json::Null);
        let generation = read_json("generation_config.json")?.unwrap_or(Json::Null);

        let style = hf_piece_style(&tok_json["decoder"]);
        let added = inner.get_added_tokens_decoder();
        let n = inner.get_vocab(true).values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let chars = byte_level_chars();
        let mut pieces = Vec::with_capacity(n);
        let mut special = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let kind = match added.get(&id) {
                Some(t) if t.special => Added::Special,
                Some(_) => Added::UserDefined,
                None => Added::No,
            };
            let text = inner.id_to_token(id).unwrap_or_default();
            pieces.push(piece_bytes(style, &text, kind, &chars));
            special.push(kind == Added::Special);
        }

        let token_id = |key: &str| hf_token_text(&config[key]).and_then(|t| inner.token_to_id(&t));
        let bos = token_id("bos_token").or_else(|| json_ids(&generation["bos_token_id"]).first().copied());
        let eos =
            end_ids(token_id("eos_token").into_iter().chain(json_ids(&generation["eos_token_id"])), &inner, &special);
        let add_bos = match config["add_bos_token"].as_bool() {
            Some(b) => b,
            // No explicit setting: the post-processor decides, as transformers does.
            None => match (bos, inner.encode_fast("a", true)) {
                (Some(bos), Ok(enc)) => enc.get_ids().first() == Some(&bos),
                _ => false,
            },
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| EngineError::Load(format!("reading {}: {e}", jinja.display())))?,
            )
        } else {
            hf_chat_template(&config["chat_template"])
        };
        Ok(Tokenizer { inner, pieces, special, style, bos, eos, add_bos, chat_template })
    }

    /// Token ids of `text`. Special tokens written in the text are recognised; `add_bos`
    /// prepends the BOS token when the model has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if add_bos {
            out.extend(self.bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Text of `ids`; `skip_special` drops control tokens. Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.pieces.len()) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.pieces.len()
            )));
        }
        if self.style != PieceStyle::ByteLevel {
            return self.inner.decode(ids, skip_special).map_err(tok_err);
        }
        // Byte-level decoding is exactly the concatenation of the pieces, which keeps it
        // identical to incremental detokenization.
        let mut bytes = Vec::new();
        for &id in ids.iter().filter(|&&id| !(skip_special && self.is_special(id))) {
            bytes.extend_from_slice(self.token_bytes(id));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The raw bytes token `id` stands for (`"Ġworld"` -> `b" world"`; special tokens: their
    /// text). Empty for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// [`Self::token_bytes`] as text, invalid UTF-8 replaced by U+FFFD.
    pub fn token_str(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }

    /// Whether `id` is a control token (dropped by `decode(.., skip_special = true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Number of token ids the tokenizer knows (highest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end generation: EOS first, then the end-of-turn tokens the model declares.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether the model expects a BOS token in front of a prompt by default.
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// The model's Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Id of a vocabulary entry given in its stored form (e.g. `"<|im_end|>"`, `"Ġworld"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Piece style implied by a `tokenizer.json` decoder.
fn hf_piece_style(decoder: &Json) -> PieceStyle {
    let types: Vec<&str> = match decoder["type"].as_str() {
        Some("Sequence") => decoder["decoders"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d["type"].as_str()).collect())
            .unwrap_or_default(),
        Some(t) => vec![t],
        None => Vec::new(),
    };
    if types.contains(&"ByteLevel") {
        PieceStyle::ByteLevel
    } else if types.iter().any(|t| matches!(*t, "ByteFallback" | "Metaspace" | "Replace")) {
        PieceStyle::SentencePiece
    } else {
        PieceStyle::Plain
    }
}

/// A token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn hf_token_text(v: &Json) -> Option<String> {
    v.as_str().or_else(|| v["content"].as_str()).map(str::to_string)
}

/// `eos_token_id` of `generation_config.json`: one id or a list.
fn json_ids(v: &Json) -> Vec<u32> {
    let one = |v: &Json| v.as_u64().and_then(|x| u32::try_from(x).ok());
    match v {
        Json::Array(a) => a.iter().filter_map(one).collect(),
        v => one(v).into_iter().collect(),
    }
}

/// `chat_template` of `tokenizer_config.json`: a string, or named templates (`default` wins).
fn hf_chat_template(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |name: &str| list.iter().find(|t| t["name"].as_str() == Some(name));
            named("default").or_else(|| list.first()).and_then(|t| t["template"].as_str()).map(str::to_string)
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::OnceLock;

    pub(crate) const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    pub(crate) const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

    /// Metadata of the default model; fails (never skips) when the file is missing.
    pub(crate) fn smollm_metadata() -> &'static Content {
        static CONTENT: OnceLock<Content> = OnceLock::new();
        CONTENT.get_or_init(|| {
            let mut f = std::fs::File::open(MODEL)
                .unwrap_or_else(|e| panic!("{MODEL}: {e}; run scripts/fetch-model to fetch the default model"));
            Content::read(&mut f).expect("GGUF metadata")
        })
    }

    pub(crate) fn smollm() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::from_gguf(smollm_metadata()).expect("SmolLM2 tokenizer"))
    }

    pub(crate) fn fixture(name: &str) -> Json {
        let path = format!("{FIXTURES}/{name}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"));
        serde_json::from_str(&text).expect("fixture JSON")
    }

    /// Every prompt of the golden files (base and adapters).
    pub(crate) fn golden_prompts() -> Vec<Json> {
        let mut out = Vec::new();
        let dir = format!("{FIXTURES}/golden");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n == "base.json" || (n.starts_with("adapter_") && n.ends_with(".json")))
            .collect();
        names.sort();
        assert!(names.len() >= 4, "expected base.json and 3 adapter files in {dir}");
        for name in names {
            let f = fixture(&format!("golden/{name}"));
            out.extend(f["prompts"].as_array().expect("prompts").iter().cloned());
        }
        out
    }

    fn ids_of(v: &Json) -> Vec<u32> {
        v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
    }

    #[test]
    fn matches_hf_ids_of_convert_report() {
        let tok = smollm();
        let report = fixture("golden/convert_report.json");
        let checks = report["tokenizer_checks"].as_array().expect("tokenizer_checks");
        assert!(!checks.is_empty());
        for c in checks {
            let text = c["text"].as_str().expect("text");
            assert_eq!(tok.encode(text, false).unwrap(), ids_of(&c["hf_ids"]), "{text:?}");
            assert_eq!(tok.decode(&ids_of(&c["hf_ids"]), false).unwrap(), text);
        }
    }

    #[test]
    fn golden_prompt_texts_encode_to_prompt_ids_and_round_trip() {
        let tok = smollm();
        for p in golden_prompts() {
            let text = p["prompt_text"].as_str().expect("prompt_text");
            let expected = ids_of(&p["prompt_ids"]);
            assert_eq!(tok.encode(text, false).unwrap(), expected, "prompt {}", p["name"]);
            assert_eq!(tok.decode(&expected, false).unwrap(), text);
            let generated = ids_of(&p["generated_ids"]);
            assert_eq!(tok.decode(&generated, false).unwrap(), p["generated_text"].as_str().unwrap());
            assert_eq!(tok.decode(&generated, true).unwrap(), p["generated_text_skip_special"].as_str().unwrap());
        }
    }

    /// The fixtures were made with transformers' GGUF conversion, which ignores
    /// `tokenizer.ggml.pre` and splits with the plain GPT-2 regex; llama.cpp and the model's
    /// own `tokenizer.json` split digits off first (`smollm`). The two differ only where a
    /// whitespace run precedes a digit ("\n\n  0." -> "ĊĊĠĠ" + "0" vs "ĊĊĠ" + "Ġ" + "0").
    #[test]
    fn gpl_text_encodes_like_the_perplexity_fixture_under_the_gpt2_split() {
        let path = format!("{FIXTURES}/gpl-3.txt");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let expected = ids_of(&fixture("golden/perplexity_input_ids.json"));
        let total = fixture("golden/perplexity.json")["n_tokens_total_file"].as_u64().unwrap() as usize;

        let mut v = GgufVocab::from_metadata(&smollm_metadata().metadata).unwrap();
        v.pre = Some("gpt-2".into());
        let gpt2 = Tokenizer::from_gguf_vocab(v).unwrap();
        let ids = gpt2.encode(&text, false).unwrap();
        assert_eq!((ids.len(), &ids[..expected.len()]), (total, &expected[..]));

        let ids = smollm().encode(&text, false).unwrap();
        assert!(ids.len() < total, "digit splitting merges whitespace runs before digits");
        assert_eq!(smollm().decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn smollm_special_tokens_and_metadata() {
        let tok = smollm();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_ids().first(), Some(&2));
        assert!(tok.eos_ids().contains(&0), "<|endoftext|> ends generation too");
        assert!(!tok.add_bos_default());
        assert!(tok.chat_template().is_some_and(|t| t.contains("<|im_start|>")));
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(tok.token_bytes(905), b" world");
        assert_eq!(tok.token_bytes(2), b"<|im_end|>");
        assert!(tok.is_special(2) && !tok.is_special(905));
        assert_eq!(tok.token_bytes(u32::MAX), b"");
        assert_eq!(tok.encode("<|im_start|>hi", true).unwrap()[..2], [1, 1]);
        assert!(tok.decode(&[u32::MAX], false).is_err());
        assert_eq!(tok.decode(&[1, 19556, 2], true).unwrap(), "Hello");
    }

    #[test]
    fn unknown_pre_tokenizer_is_refused_by_name() {
        let mut v = GgufVocab::from_metadata(&smollm_metadata().metadata).unwrap();
        v.pre = Some("made-up-pre".into());
        let err = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(err.contains("made-up-pre"), "{err}");
    }

    #[test]
    fn unknown_model_is_refused_by_name() {
        let mut v = GgufVocab::from_metadata(&smollm_metadata().metadata).unwrap();
        v.model = "t5".into();
        let err = Tokenizer::from_gguf_vocab(v).unwrap_err().to_string();
        assert!(err.contains("t5"), "{err}");
    }

    #[test]
    fn regex_pre_tokenizers_build_and_round_trip() {
        for pre in ["qwen2", "llama-bpe", "gpt-2"] {
            let mut v = GgufVocab::from_metadata(&smollm_metadata().metadata).unwrap();
            v.pre = Some(pre.into());
            let tok = Tokenizer::from_gguf_vocab(v).unwrap();
            let text = "Hello world! It's 2024.\n\n  café 🦀";
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{pre}");
        }
    }

    /// A small SentencePiece vocabulary: specials, 256 byte tokens, then pieces with scores.
    fn tiny_sentencepiece() -> Tokenizer {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let pieces = [("▁hello", -1.0), ("▁he", -2.0), ("ll", -3.0), ("llo", -4.0), ("▁h", -5.0)];
        let singles = ["▁", "h", "e", "l", "o"].map(|s| (s, -10.0));
        for (t, s) in pieces.iter().chain(singles.iter()) {
            tokens.push(t.to_string());
            types.push(1);
            scores.push(*s);
        }
        let v = GgufVocab {
            model: "llama".into(),
            tokens,
            token_types: types,
            scores,
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            add_space_prefix: Some(true),
            ..GgufVocab::default()
        };
        Tokenizer::from_gguf_vocab(v).unwrap()
    }

    #[test]
    fn sentencepiece_merges_by_score_with_byte_fallback() {
        let tok = tiny_sentencepiece();
        let hello = tok.token_to_id("▁hello").unwrap();
        let h = tok.token_to_id("▁h").unwrap();
        assert_eq!(tok.encode("hello", true).unwrap(), vec![1, hello]);
        // "é" is not in the vocabulary: two byte tokens.
        let ids = tok.encode("hé", false).unwrap();
        assert_eq!(ids, vec![h, 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(tok.token_bytes(3 + 0xC3), [0xC3]);
        assert_eq!(tok.token_bytes(hello), b" hello");
        assert_eq!(tok.decode(&ids, false).unwrap(), "hé");
        assert_eq!(tok.encode("<s>hello", false).unwrap(), vec![1, hello]);
        assert!(tok.add_bos_default());
        assert_eq!(tok.eos_ids(), [2]);
    }

    #[test]
    fn hf_dir_loads_tokenizer_json_and_configs() {
        let dir = std::env::temp_dir().join(format!("tessera-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = smollm().inner.to_string(false).unwrap();
        std::fs::write(dir.join("tokenizer.json"), json).unwrap();
        let config = r#"{"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
            "chat_template": [{"name": "default", "template": "{{ messages }}"}]}"#;
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
        let tok = Tokenizer::from_hf_dir(&dir);
        std::fs::write(dir.join("chat_template.jinja"), "jinja file").unwrap();
        let with_jinja = Tokenizer::from_hf_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let (tok, with_jinja) = (tok.unwrap(), with_jinja.unwrap());
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_ids(), [2, 0]);
        assert!(!tok.add_bos_default());
        assert_eq!(tok.chat_template(), Some("{{ messages }}"));
        assert_eq!(with_jinja.chat_template(), Some("jinja file"));
        assert_eq!(tok.vocab_size(), 49152);
        assert!(tok.is_special(2));
        for p in golden_prompts().iter().take(3) {
            let text = p["prompt_text"].as_str().unwrap();
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(ids, ids_of(&p["prompt_ids"]));
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id).to_vec()).collect();
            assert_eq!(bytes, text.as_bytes());
        }
    }

    #[test]
    fn hf_dir_without_tokenizer_json_is_a_clear_error() {
        let err = Tokenizer::from_hf_dir(Path::new("/nonexistent/model")).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }
}
